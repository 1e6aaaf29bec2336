"""Sensitivity collector: one high-precision forward + backward per calibration sequence.

For every quantizable op and operand we accumulate, in float64, the sums the Taylor model needs
(METHOD.md): Σ(x⊙g)² (float noise), Σg² with real scales (integer noise) and, per candidate format,
the empirical Σg²(Q_f(x)−x)². Activation operands are reduced inside tensor hooks, so nothing of size
"activations" outlives a batch. Weight gradients are per sequence, computed by the hook from the output
gradient (parameters stay ``requires_grad=False``, so autograd computes no .grad), and reduced block by
block against the weight's rounding errors as they are made: per op only scalars are kept, no weight-sized
buffer. Sequences are batched (default 4) only to amortise the per-call cost of the hooks: every statistic
stays per sequence.

The loss of sequence n is its mean next-token cross-entropy; each input gets a view alias so that the
gradient a hook sees is that op's own share, not the sum over the q/k/v consumers of one tensor.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .errors import FormatError, SensitivityError
from .formats import get_format, quantize, quantize_with_scale, scale_of, weight_scale
from .lossmodel import DEFAULT_NOISE, NOISE_MODELS, auto_noise
from .ops import find_ops, install_attention, linear_weight, tied_linears
from .records import OperandStats, OpSensitivity, Sensitivity

log = logging.getLogger(__name__)

DEFAULT_FORMATS = ["fp8_e4m3", "fp8_e5m2", "int8", "int8_pc", "bf16"]
#: share of calibration batches that get the curvature backward. All of them: with a quarter (4 of 16 sequences)
#: INT8 plans measured a median 1.5x (held-out Wikipedia) and 2.3x (Lee news) their predicted loss MSE, with all
#: 1.0x and 1.4x (benchmarks/results/sensitivity.md); the pass costs ~0.85x a plain fwd+bwd on top (sensitivity_cost.md)
DEFAULT_CURVATURE_SHARE = 1.0
#: the diagonal noise models: their sums need each weight's per-sequence gradient squared element by element
DIAGONAL_MODELS = frozenset({"empirical", "uniform"})
#: a calibration sequence whose share of the coherent sums is over this many times the median sequence's is named
#: (``dominant_sequences``): of 62 one-article Wikipedia calibrations one carried 997x the median, the next 4x
DOMINANT_FACTOR = 20.0


def noise_models(noise: str, formats: Iterable[str]) -> list[str]:
    """The noise models whose sums ``calibrate`` collects for ``noise``: the one each format's ``auto`` picks, the
    one named, or ``"all"``. Only what a prediction will read is collected: the diagonal models' sums took a
    first-order calibration from 1.19x to 1.32x a plain fwd+bwd (benchmarks/results/sensitivity_cost.md) and the
    default (coherent) never reads them."""
    if noise == "all":
        return sorted(set(NOISE_MODELS) - {"auto"})
    if noise not in NOISE_MODELS:
        raise SensitivityError(f"noise model must be one of {NOISE_MODELS} or 'all', got {noise!r}")
    return sorted({auto_noise(f) for f in formats} if noise == "auto" else {noise})


def _sum(t: torch.Tensor) -> float:
    """Sum as a Python float (float64). torch's CPU float32 sum is a cascade sum (relative error ~1e-7 on
    10^8 terms); asking for dtype=float64 instead cost a quarter of the whole calibration time."""
    return float(t.sum())


def _check(op: str, operand: str, value: float) -> None:
    """A non-finite element makes the sum of squares non-finite: one scalar test instead of a tensor pass."""
    if not math.isfinite(value):
        raise SensitivityError(f"non-finite gradient at op {op} (operand {operand}); check the model dtype and "
                               "the calibration data")


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Detached, in float32 or wider (a float64 model keeps float64 statistics)."""
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _seq_sums(t: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sequence sums of ``t`` (leading dim: the ``n`` sequences) as float64.

    The sum is signed and cancels heavily, so it ends in float64; but converting every term cost 3x the time
    (lm_head's output, 256x49152 terms: 145 vs 47 ms a call). So the positions are summed first in ``t``'s own
    dtype (a cascade sum), then the last dim in float64. On SmolLM2 (3 sequences, int8 and fp8) that moved the
    record's sums by at most 1.5e-4 relative, and its most cancelling per-sequence terms by 5e-4."""
    return t.reshape(n, -1, t.shape[-1]).sum(1).sum(1, dtype=torch.float64)


def _first_order(e: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g⊙e and the first-order loss change of each sequence Σ g·e (``_seq_sums``), for a rounding error ``e``
    (``_rounding``)."""
    ge = g * e
    return ge, _seq_sums(ge, ge.shape[0])


def _rounding(x: torch.Tensor, fmt, reduce_dim: int, cache: dict | None,
              wide: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Rounding error e of the activation ``x`` in ``fmt`` (per-sequence scales, in ``_wide`` precision) and Σe²,
    from ``cache`` when this batch already rounded the same tensor the same way (``wide``: ``_wide(x)``, where the
    caller has made it already).

    Why: q, k and v (gate and up) read one tensor and each rounds it alike, and the curvature pass rounds again
    what the gradient pass rounded; the rounding was a tenth of the calibration. The key is the tensor's memory
    (address, layout, dtype, version) and the entry keeps the tensor alive, so an address is never reused while
    its entry exists; the cache lives for one batch (``calibrate`` empties it)."""
    key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version, fmt.name, reduce_dim)
    hit = None if cache is None else cache.get(key)
    if hit is None:
        w = _wide(x) if wide is None else wide
        e = quantize(w, fmt, reduce_dim, per_sample=True) - w
        hit = (x, e, _sum(e * e))
        if cache is not None:
            cache[key] = hit
    return hit[1], hit[2]


#: elements of one row block of a weight gradient (4 MiB float32): every sequence of a batch adds its square to the
#: block while it sits in L3, and the block is reduced against the weight's rounding errors right there
_MM_CHUNK = 1 << 20


def _row_blocks(w: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """Row blocks of a weight of about ``_MM_CHUNK`` elements each."""
    rows = max(1, _MM_CHUNK // w.shape[1])
    for i in range(0, w.shape[0], rows):
        yield slice(i, i + rows), w[i:i + rows]


def _block_scale(scale: torch.Tensor, rows: slice) -> torch.Tensor:
    """A row block's share of a whole-weight scale: per-row scales sliced, a per-tensor scale as is."""
    return scale[rows] if scale.dim() else scale


def _block_err(w_c: torch.Tensor, fmt, scale: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rounding error of a row block of a weight in ``fmt`` (``scale``: the whole weight's)."""
    return quantize_with_scale(w_c, fmt, _block_scale(scale, rows)) - w_c


class _Collector:
    """Hooks and float64 accumulators for one op."""

    def __init__(self, name: str, mod: nn.Module, kind: str, formats: list[str], state: dict | None = None,
                 diagonal: bool = True):
        self.name, self.mod, self.kind = name, mod, kind
        self.diagonal = diagonal  # collect the diagonal models' sums (g², (x⊙g)², Σg²e², s²/12) too
        self.formats = [get_format(f) for f in formats]
        self.rec = OpSensitivity(name=name, kind=kind)
        ops = ("x", "w") if kind == "linear" else ("a", "b")
        #: formats whose kernel rounds the op's output (bf16): their output error is an operand "y" of its own
        self.out_formats = [f for f in self.formats if f.output_rounded]
        self.rec.operands = {o: OperandStats() for o in ops + (("y",) if self.out_formats else ())}
        self._w: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None  # weight and its scales per format
        self.state = state if state is not None else {"phase": "grad"}
        self.handles: list = []

    def _curvature(self, operand: str, x: torch.Tensor, g: torch.Tensor, reduce_dim: int, formats: list) -> None:
        """Sampled-label pass: Σ_n T'_n (ĝ·e)², T'_n (ĝ·e)² an unbiased estimate of eᵀ(GN Hessian)e of sequence n
        (full quadratic form); T'_n = its predicted tokens, so sequences of different lengths weigh right."""
        st = self.rec.operands[operand]
        g = _wide(g)
        for f in formats:
            d = _first_order(_rounding(x, f, reduce_dim, self.state.get("errors"))[0], g)[1]
            self._add_curv(st, f.name, self.state["tokens"] * float((d * d).sum()))

    def _add_curv(self, st: OperandStats, fmt: str, v: float) -> None:
        """Add a curvature term to the sum and to this curvature batch's entry of ``cseq``."""
        st.curv[fmt] = st.curv.get(fmt, 0.0) + v
        _add_at(st.cseq, fmt, self.state["cbatch"], v)

    # -- activation-like operands (reduced per call) -----------------------------------------------
    def _reduce(self, operand: str, x: torch.Tensor, g: torch.Tensor, reduce_dim: int, copies: int = 1,
                formats: list | None = None) -> None:
        formats = self.formats if formats is None else formats
        if copies > 1:
            # GQA: K/V heads were repeated before the product, so the copies of one head carry one and the same
            # rounding error; its first-order effect is (Σ_copies g)·e, not independent Σ g²e² per copy
            b, h, *rest = x.shape
            x = x.reshape(b, h // copies, copies, *rest)[:, :, 0]
            g = g.reshape(b, h // copies, copies, *rest).sum(2)
        if self.state["phase"] == "curvature":
            return self._curvature(operand, x, g, reduce_dim, formats)
        st = self.rec.operands[operand]
        raw, x, g = x, _wide(x), _wide(g)
        st.x2 += _sum(x * x)
        st.numel += x.numel()
        st.amax = max(st.amax, float(x.abs().max()))
        if self.diagonal:
            g2 = g * g
            g2_sum = _sum(g2)
            xg = x * g
            st.xg2 += _sum(xg * xg)
            st.g2 += g2_sum
        for f in formats:
            e, e2 = _rounding(raw, f, reduce_dim, self.state.get("errors"), x)
            ge, d = _first_order(e, g)
            ge2 = _sum(ge.square_())  # the diagonal sum; for an activation it is also the empirical model's
            sq = self._add_changes(st, f.name, d.tolist(), ge2)
            _check(self.name, operand, sq)  # a non-finite gradient makes every d non-finite: one scalar test
            st.err2[f.name] = st.err2.get(f.name, 0.0) + e2
            if not self.diagonal:
                continue
            st.emp[f.name] = st.emp.get(f.name, 0.0) + ge2
            if f.kind == "int":
                s = scale_of(x, f, reduce_dim, per_sample=True)
                u = g2_sum * float(s) ** 2 / 12.0 if s.numel() == 1 else _sum(g2 * (s * s / 12.0))
                st.int_uniform[f.name] = st.int_uniform.get(f.name, 0.0) + u

    def _add_changes(self, st: OperandStats, fmt: str, d: list[float], diag: float) -> float:
        """Add one batch's per-sequence first-order changes ``d`` = [d_n] of an operand in ``fmt`` (``diag``: the
        squares of their terms) to its coherent, first-order, diagonal and per-sequence sums; returns Σ d_n²."""
        sq = sum(v * v for v in d)
        st.coh[fmt] = st.coh.get(fmt, 0.0) + sq
        st.lin[fmt] = st.lin.get(fmt, 0.0) + sum(d)
        st.dia[fmt] = st.dia.get(fmt, 0.0) + diag
        _add_at(st.dseq, fmt, self.state["batch"], diag)
        self._add_seq(st, fmt, d)
        return sq

    def _add_seq(self, st: OperandStats, fmt: str, d: list[float]) -> None:
        """Add this batch's per-sequence first-order changes to ``st.seq[fmt]`` at the batch's sequence indices (an op
        called more than once per sequence adds up, as its Σ d_n does)."""
        s = st.seq.setdefault(fmt, [])
        i0 = self.state["seq0"]
        s.extend([0.0] * (i0 + len(d) - len(s)))
        for i, v in enumerate(d):
            s[i0 + i] += v

    def pad_seq(self, n: int) -> None:
        """Every operand's ``seq`` as long as the calibration (zeros where the op was not reached), for every format
        it collects, so sequence n means the same sequence in every op's list."""
        for operand, st in self.rec.operands.items():
            for f in (self.out_formats if operand == "y" else self.formats):
                s = st.seq.setdefault(f.name, [])
                s.extend([0.0] * (n - len(s)))
                for lists, k in ((st.cseq, "cbatch"), (st.dseq, "batch")):  # as long as the (curvature) batches
                    if f.name in lists:  # an op a batch did not reach adds 0
                        lists[f.name].extend([0.0] * (self.state[k] - len(lists[f.name])))

    def _alias(self, t: torch.Tensor, operand: str, reduce_dim: int, copies: int = 1) -> torch.Tensor:
        if not t.requires_grad:
            return t
        alias = t.view_as(t)
        # The hook must not hold ``alias`` itself: tensor -> grad_fn -> hook -> tensor is a cycle through C++ that
        # Python's gc cannot see, so every batch's activations leaked (8.4 GB peak RSS on the default run).
        x = t.detach()
        alias.register_hook(lambda g: self._reduce(operand, x, g, reduce_dim, copies))
        return alias

    def attach(self) -> None:
        self.handles.append(self.mod.register_forward_pre_hook(self._pre))
        if self.kind == "linear" or self.out_formats:
            self.handles.append(self.mod.register_forward_hook(self._post))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _pre(self, mod: nn.Module, args: tuple) -> tuple:
        self.rec.calls += 1
        if self.kind == "linear":
            x = args[0]
            if self.rec.calls == 1:  # shapes and MACs of one sequence, whatever the calibration batch
                w = linear_weight(mod)
                self.rec.shapes = {"x": [1, *x.shape[1:]], "w": list(w.shape)}
                self.rec.macs = x[0, ..., 0].numel() * w.shape[0] * w.shape[1]
                self.rec.weight_numel = w.numel()
            return (self._alias(x, "x", -1), *args[1:])
        a, b = args[:2]
        if self.rec.calls == 1:
            self.rec.shapes = {"a": [1, *a.shape[1:]], "b": [1, *b.shape[1:]]}
            self.rec.macs = a[0, ..., 0].numel() * a.shape[-1] * b.shape[-1]
        rep = getattr(mod, "kv_repeat", 1)
        copies = rep if b.dim() == 4 and b.shape[1] % rep == 0 else 1
        return (self._alias(a, "a", -1), self._alias(b, "b", -2, copies), *args[2:])

    def _post(self, mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if not out.requires_grad:
            return
        x = args[0].detach()
        y = out.detach() if self.out_formats else None
        dys = self._output_errors(x) if self._by_output() else None

        def output_grad(gy: torch.Tensor) -> None:
            if y is not None:  # the output's own rounding (bf16 kernels), reduced as an activation
                self._reduce("y", y, gy, -1, formats=self.out_formats)
            if self.kind != "linear":
                return
            if dys is not None:
                return self._weight_sums_from_output(gy, dys)
            if self.state["phase"] == "curvature":
                # Sampled-label gradients are independent and zero-mean across sequences, so the square of the
                # batch's gradient is an unbiased estimate of Σ_n ĝ_W,n²: one gradient, not one per sequence.
                self._weight_sums(gy.reshape(1, -1, gy.shape[-1]), x.reshape(1, -1, x.shape[-1]), "curv")
            else:  # per sequence: Σ_n g_W,n², not (Σ_n g_W,n)²
                self._weight_sums(gy, x, "grad")

        out.register_hook(output_grad)

    # -- weight operand: reduced per batch, block by block; nothing weight-sized is kept ---------------
    def _by_output(self) -> bool:
        """Whether this batch's weight changes come from the output errors instead of the weight gradients.

        d_n = Σ g_W,n ⊙ E = Σ_t g_y,t · (E x_t): either the weight gradient (one GEMM per backward pass) contracted
        with each format's error E, or the output error E x (one GEMM per format, made in the forward) contracted
        with the output gradient of every pass. The second is cheaper when there are no more formats than backward
        passes (one format with the curvature pass: one GEMM instead of two; 2.04x -> 1.54x a plain fwd+bwd,
        benchmarks/results/sensitivity_cost.md); the diagonal models need the weight gradient's own square, so they
        keep the first."""
        return self.kind == "linear" and not self.diagonal and len(self.formats) <= self.state.get("passes", 1)

    def _output_errors(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """E_f x for each format (the output change of rounding the weight alone), made row block by row block of
        the weight so that no weight-sized error is kept; lives until this batch's backward passes are done."""
        w, scales = self._weight()
        x = _wide(x)
        out = {}
        for f in self.formats:
            dy = x.new_empty((*x.shape[:-1], w.shape[0]), dtype=torch.promote_types(x.dtype, w.dtype))
            for rows, w_c in _row_blocks(w):
                dy[..., rows] = x @ _block_err(w_c, f, scales[f.name], rows).t()
            out[f.name] = dy
        return out

    def _weight_sums_from_output(self, gy: torch.Tensor, dys: dict[str, torch.Tensor]) -> None:
        """The weight operand's d_n from output errors (``_by_output``): the same sums ``_weight_sums`` adds without
        the diagonal ones; in the curvature pass the batch counts as one sequence, as there."""
        gy = _wide(gy)
        curv = self.state["phase"] == "curvature"
        n = 1 if curv else gy.shape[0]
        for name, dy in dys.items():
            gd = gy * dy
            d = _seq_sums(gd, n)
            self._add_weight_changes(name, d.tolist(), curv, 0.0 if curv else _sum(gd.square_()))

    def _add_weight_changes(self, fmt: str, d: list[float], curv: bool, diag: float = 0.0) -> None:
        """Add the weight operand's per-sequence changes ``d`` = [d_n] in ``fmt`` (``diag`` = the squares of their
        terms) to the curvature sum (sampled-label pass, weighted by T') or, as an activation's, to the coherent,
        first-order, diagonal and per-sequence sums (``_add_changes``)."""
        st = self.rec.operands["w"]
        if curv:
            self._add_curv(st, fmt, self.state["tokens"] * sum(v * v for v in d))
        else:
            self._add_changes(st, fmt, d, diag)

    def _weight(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self._w is None:  # weights are fixed during calibration: one scale per format, once
            w = _wide(linear_weight(self.mod))
            self._w = w, {f.name: weight_scale(w, f, -1) for f in self.formats}
        return self._w

    def _weight_sums(self, gy: torch.Tensor, x: torch.Tensor, kind: str) -> None:
        """Add the weight operand's sums for the sequences n = leading index of ``gy``/``x``: Σ_n g_W,n² contracted
        with w², e_f² and the integer scales (the diagonal terms), and the first-order change of each sequence
        d_n = Σ g_W,n ⊙ e_f, whose Σ d_n² and Σ d_n give the full quadratic form and the mean shift (the error e_f is
        fixed, so the changes of one sequence's positions are coherent, not independent).

        Done in row blocks that stay in L3: a block's per-sequence gradients are made, contracted with each format's
        rounding error of the block and squared-and-summed at once; nothing weight-sized is kept. The price is
        re-rounding each weight block once per batch. ``kind == "curv"``: ``gy`` is the whole batch's sampled-label
        gradient as one sequence (its square estimates Σ_n, see ``_post``)."""
        st = self.rec.operands["w"]
        w, scales = self._weight()
        gy, x = _wide(gy), _wide(x)
        gy, x = gy.reshape(gy.shape[0], -1, gy.shape[-1]), x.reshape(x.shape[0], -1, x.shape[-1])
        n_seq = gy.shape[0]
        d = {f.name: [0.0] * n_seq for f in self.formats}
        dia = dict.fromkeys(d, 0.0)
        diagonal = kind == "grad" and self.diagonal  # else only the per-sequence changes d are needed
        buf = None
        for rows, w_c in _row_blocks(w):
            if diagonal and buf is None:  # the first block is the largest: one buffer for all
                buf = torch.empty(w_c.shape, dtype=torch.promote_types(gy.dtype, x.dtype))
            g2 = buf[:w_c.shape[0]] if diagonal else None
            errs = {f.name: _block_err(w_c, f, scales[f.name], rows) for f in self.formats}
            for n in range(n_seq):
                g = gy[n, :, rows].t() @ x[n]
                for name, e in errs.items():
                    ge = g * e
                    d[name][n] += _sum(ge)
                    if kind == "grad":
                        dia[name] += _sum(ge.mul_(ge))
                if not diagonal:
                    continue
                if n == 0:
                    torch.mul(g, g, out=g2)
                else:
                    g2.addcmul_(g, g)
            if not diagonal:
                continue
            st.g2 += _sum(g2)
            st.xg2 += _sum(w_c * w_c * g2)
            for f in self.formats:
                st.emp[f.name] = st.emp.get(f.name, 0.0) + _sum(errs[f.name].pow_(2).mul_(g2))
                if f.kind == "int":
                    s_c = _block_scale(scales[f.name], rows)
                    st.int_uniform[f.name] = st.int_uniform.get(f.name, 0.0) + _sum(g2 * (s_c * s_c / 12.0))
        for name, dn in d.items():
            self._add_weight_changes(name, dn, kind == "curv", dia[name])

    def finish_weight(self, n_samples: int) -> None:
        """Gradient-free sums of the weight operand (Σw², Σe², max|w|), once, and the non-finite check."""
        if self.kind != "linear" or self._w is None:
            return
        st = self.rec.operands["w"]
        for v in st.coh.values():
            _check(self.name, "w", v)
        w, scales = self._w
        st.numel, st.amax = w.numel() * n_samples, float(w.abs().max())
        x2, err2 = 0.0, dict.fromkeys(scales, 0.0)
        for rows, w_c in _row_blocks(w):
            x2 += _sum(w_c * w_c)
            for f in self.formats:
                err2[f.name] += _sum(_block_err(w_c, f, scales[f.name], rows).pow_(2))
        st.x2 = x2 * n_samples
        st.err2 = {k: v * n_samples for k, v in err2.items()}
        self._w = None


def sequence_loss(model: nn.Module, ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence in ``ids`` (shape: batch)."""
    return _logits_and_loss(model, ids, inputs_embeds)[1]


def _logits_and_loss(model: nn.Module, ids: torch.Tensor,
                     inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    kw = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": ids}
    logits = model(**kw, use_cache=False).logits[:, :-1].float()
    return logits, _ce(logits, ids[:, 1:])


def _ce(logits: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
    return ce.view(tgt.shape).mean(dim=1)


def _label_draws(batch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uniform draws for the sampled labels, seeded by each sequence's own tokens: a sequence gets the same labels
    whatever its batch, position or rank, so calibrations of the same sequences in any order or split agree."""
    rows = []
    for row in batch:
        seed = hash(tuple(row.tolist())) % (2 ** 63)  # hashes of int tuples are not randomised per process
        rows.append(torch.rand(row.shape[0] - 1, generator=torch.Generator().manual_seed(seed), dtype=dtype))
    return torch.stack(rows)


def rebatch(blocks: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive rows of ``blocks`` regrouped into (≤ batch_size, T) tensors (T changes start a new batch)."""
    if batch_size < 1:
        raise SensitivityError(f"batch size must be >= 1 (got {batch_size})")
    buf: list[torch.Tensor] = []
    for ids in blocks:
        for row in (ids if ids.dim() == 2 else ids.unsqueeze(0)).split(1):
            if buf and (len(buf) == batch_size or row.shape[1] != buf[0].shape[1]):
                yield torch.cat(buf)
                buf = []
            buf.append(row)
    if buf:
        yield torch.cat(buf)


def calibrate(model: nn.Module, blocks: Iterable[torch.Tensor], formats: list[str] | None = None,
              include_lm_head: bool = True, model_name: str = "", data_source: str = "",
              progress: bool = True, batch_size: int = 1, curvature: bool = True,
              curvature_share: float = DEFAULT_CURVATURE_SHARE, noise: str = DEFAULT_NOISE) -> Sensitivity:
    """One fwd+bwd per ``batch_size`` sequences over ``blocks`` ((1, T) or (B, T) tensors); returns the record.

    Every statistic is per sequence (its own loss, per-sequence scales and weight gradients), so the result
    does not depend on ``batch_size``; larger batches only amortise the hooks' per-call cost. Blocks are
    consumed one batch at a time (an iterator is fine): a long calibration set costs time, not memory.

    ``curvature``: a second backward through the same graph with labels sampled from the model's own
    predictions; its squared gradients estimate the Gauss-Newton curvature, hence the second-order part ½eᵀHe of
    each op's mean loss *shift* (``Sensitivity.shift``), which adds linearly over ops where the noise adds in
    quadrature. ``curvature_share``: the share of batches that get it (evenly spread; the shift is a mean, so a
    subset estimates it at a fraction of the cost). ``noise``: the noise model(s) the record must serve
    (``noise_models``; ``"all"`` for comparing them): sums no prediction will read are not collected.
    Defaults are the CLI's.
    """
    if not 0.0 < curvature_share <= 1.0:
        raise SensitivityError(f"curvature_share must be in (0, 1], got {curvature_share}")
    formats = list(formats or DEFAULT_FORMATS)
    for f in formats:
        if get_format(f).kind == "ref":
            raise FormatError(f"{f} is the reference format, not a candidate")
    models = noise_models(noise, formats)
    diagonal = bool(DIAGONAL_MODELS.intersection(models))
    install_attention(model)
    ops = find_ops(model, include_lm_head=include_lm_head)
    mods = dict(model.named_modules())
    # cbatch: curvature batches; errors: this batch's activation rounding errors (``_rounding``), emptied after each
    state: dict[str, Any] = {"phase": "grad", "tokens": 1, "cbatch": 0, "batch": 0, "errors": {}}
    cols = [_Collector(o.name, mods[o.name], o.kind, formats, state, diagonal) for o in ops]
    for c in cols:
        c.attach()
    emb = model.get_input_embeddings()
    n, loss_sum, seq_len, n_curv, n_batches = 0, 0.0, 0, 0, 0
    t0 = time.perf_counter()
    try:
        from .runtime import Progress

        bar = Progress(_len(blocks), "calibrate (fwd+bwd)", unit="seq", enabled=progress)
        for batch in rebatch(blocks, batch_size):
            # A leaf that requires grad makes every activation downstream require grad, so the
            # hooks see gradients while no parameter gradient is ever computed or stored.
            state["tokens"] = batch.shape[1] - 1  # predicted tokens of each sequence of the batch (T')
            state["seq0"] = n  # index of the batch's first sequence (``OperandStats.seq``)
            # batch i gets the curvature backward when the running share's ceiling steps up: evenly spread, and
            # the first batch always (a calibration of fewer than 1/share batches still gets a shift estimate)
            curv_now = curvature and math.ceil((n_batches + 1) * curvature_share) > math.ceil(
                n_batches * curvature_share)
            state["passes"] = 2 if curv_now else 1  # backward passes this batch gets (``_Collector._by_output``)
            state["batch"] = n_batches  # index of this batch (``OperandStats.dseq``)
            n_batches += 1
            embeds = emb(batch).detach().requires_grad_(True)
            logits, loss = _logits_and_loss(model, batch, embeds)
            if not torch.isfinite(loss).all():
                raise SensitivityError(f"non-finite calibration loss on sequence(s) {n}..{n + len(batch) - 1}: "
                                       f"{loss.tolist()}")
            loss.sum().backward(retain_graph=curv_now)
            if curv_now:
                n_curv += batch.shape[0]
                with torch.no_grad():  # inverse-CDF sampling: torch.multinomial took ~6% of the calibration
                    cdf = logits.detach().softmax(-1).reshape(-1, logits.shape[-1]).cumsum(-1)
                    u = _label_draws(batch, cdf.dtype).view(-1, 1) * cdf[:, -1:]
                    sampled = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1).view(logits.shape[:-1])
                state["phase"] = "curvature"
                try:
                    _ce(logits, sampled).sum().backward()
                finally:
                    state["phase"] = "grad"
                    state["cbatch"] += 1
            loss_sum += float(loss.detach().sum())
            # the graph (and through its hooks every op's saved input) lives as long as ``loss`` does: drop it
            # before the next batch builds its own, or two batches' activations are held at once
            del logits, loss, embeds
            state["errors"] = {}
            n += batch.shape[0]
            seq_len = batch.shape[1]
            bar.update(batch.shape[0])
        bar.close()
    finally:
        state["errors"] = {}
        for c in cols:
            c.detach()
    if n == 0:
        raise SensitivityError("the calibration data is empty")
    state["batch"] = n_batches  # pad_seq pads dseq to the batch count
    for c in cols:
        c.finish_weight(n)
        c.pad_seq(n)
    tied = tied_linears(model)
    for c in cols:
        c.rec.tied = c.name in tied
    unreached = [c.name for c in cols if c.rec.calls == 0]
    if unreached:
        log.warning("%d quantizable ops were never reached by the calibration data and will stay in high "
                    "precision: %s", len(unreached), ", ".join(unreached[:10]))
    sens = Sensitivity(model=model_name, n_samples=n, seq_len=seq_len, mean_loss=loss_sum / n, formats=formats,
                       ops={c.name: c.rec for c in cols}, unreached=unreached,
                       wall_s=time.perf_counter() - t0, data_source=data_source, n_curvature=n_curv,
                       noise_models=models)
    if note := dominance_note(sens):
        log.warning("%s", note)
    return sens


def dominant_sequences(sens: Sensitivity, factor: float = DOMINANT_FACTOR) -> list[tuple[int, float]]:
    """Calibration sequences (index, ratio) whose share of the coherent sums is over ``factor`` times the median's.

    A sequence's share in a format is Σ over ops and operands of its first-order loss change squared (``seq``), the
    terms that make up ``coh``; its ratio is the largest over the formats. Why: the plan is chosen from sums over the
    sequences, so one text far outside the rest decides it alone while the calibration looks like many samples (a
    Wikipedia article on Gershwin measured 1375x the median of five others in per-tensor INT8 on SmolLM2-135M).
    Needs at least 4 sequences for a median to mean anything.
    """
    n = sens.n_samples
    if n < 4:
        return []
    worst = [0.0] * n
    for f in sens.formats:
        share = [0.0] * n
        for st in sens.operand_stats():
            for i, d in enumerate(st.seq.get(f, ())[:n]):
                share[i] += d * d
        med = statistics.median(share)
        if med > 0:
            worst = [max(w, x / med) for w, x in zip(worst, share, strict=True)]
    return sorted(((i, r) for i, r in enumerate(worst) if r > factor), key=lambda t: -t[1])


def dominance_note(sens: Sensitivity, factor: float = DOMINANT_FACTOR) -> str | None:
    """One sentence naming the dominant calibration sequences (``dominant_sequences``), or None."""
    dom = dominant_sequences(sens, factor)
    if not dom:
        return None
    named = ", ".join(f"{i} ({r:.0f}x)" for i, r in dom[:5]) + (f" and {len(dom) - 5} more" if len(dom) > 5 else "")
    return (f"calibration sequence(s) {named} (0-based, in calibration order, of {sens.n_samples}) carry over "
            f"{factor:g}x the median sequence's share of the loss model's sums: each weighs in the plan's choice like "
            "that many ordinary sequences. If texts like it are what the model will serve, calibrate on more of "
            "them; if not, calibrate without it")


def _add_at(lists: dict[str, list[float]], fmt: str, i: int, v: float) -> None:
    """Add ``v`` to entry ``i`` of ``lists[fmt]``, growing it with zeros (per-batch sums: ``cseq``, ``dseq``)."""
    s = lists.setdefault(fmt, [])
    s.extend([0.0] * (i + 1 - len(s)))
    s[i] += v


def _len(x) -> int | None:
    try:
        return len(x)
    except TypeError:
        return None


