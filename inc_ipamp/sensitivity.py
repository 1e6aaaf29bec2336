"""Sensitivity collector: one high-precision forward + backward per calibration sequence.

For every quantizable op and operand we accumulate, in float64, the sums the Taylor model needs
(METHOD.md): Σ(x⊙g)² (float noise), Σg² with real scales (integer noise) and, per candidate format,
the empirical Σg²(Q_f(x)−x)². Activation operands are reduced inside tensor hooks, so nothing of size
"activations" outlives a sequence. Weight gradients are per sequence (batch of one), computed by the
hook from the output gradient (parameters stay ``requires_grad=False``, so autograd computes no .grad),
and only Σ_n g_W² is kept: one weight-sized accumulator per Linear instead of per-format sums per sample.

The loss of sequence n is its mean next-token cross-entropy; each input gets a view alias so that the
gradient a hook sees is that op's own share, not the sum over the q/k/v consumers of one tensor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from torch import nn

from .errors import FormatError, SensitivityError
from .formats import get_format, quantize, scale_of
from .ops import find_ops, install_attention, linear_weight
from .records import OperandStats, OpSensitivity, Sensitivity

log = logging.getLogger(__name__)

DEFAULT_FORMATS = ["fp8_e4m3", "fp8_e5m2", "int8", "int8_pc", "bf16"]


def _f64(t: torch.Tensor) -> float:
    return float(t.sum(dtype=torch.float64))


class _Collector:
    """Hooks and float64 accumulators for one op."""

    def __init__(self, name: str, mod: nn.Module, kind: str, formats: list[str]):
        self.name, self.mod, self.kind = name, mod, kind
        self.formats = [get_format(f) for f in formats]
        self.rec = OpSensitivity(name=name, kind=kind)
        ops = ("x", "w") if kind == "linear" else ("a", "b")
        self.rec.operands = {o: OperandStats() for o in ops}
        self.gw2: torch.Tensor | None = None
        self.handles: list = []

    # -- activation-like operands (reduced per call) -----------------------------------------------
    def _reduce(self, operand: str, x: torch.Tensor, g: torch.Tensor, reduce_dim: int) -> None:
        if not torch.isfinite(g).all():
            raise SensitivityError(f"non-finite gradient at op {self.name} (operand {operand}); "
                                   "check the model dtype and the calibration data")
        st = self.rec.operands[operand]
        x = x.detach().float()
        g2 = g.detach().float().pow(2)
        x2 = x * x
        st.xg2 += _f64(x2 * g2)
        st.g2 += _f64(g2)
        st.x2 += _f64(x2)
        st.numel += x.numel()
        st.amax = max(st.amax, float(x.abs().max()))
        gf = g.detach().float()
        for f in self.formats:
            e = quantize(x, f, reduce_dim) - x
            d = (gf * e).flatten(1).sum(1, dtype=torch.float64)  # first-order loss change per sequence
            st.coh[f.name] = st.coh.get(f.name, 0.0) + float((d * d).sum())
            e2 = e.pow(2)
            st.emp[f.name] = st.emp.get(f.name, 0.0) + _f64(g2 * e2)
            st.err2[f.name] = st.err2.get(f.name, 0.0) + _f64(e2)
            if f.kind == "int":
                s = scale_of(x, f, reduce_dim)
                st.int_uniform[f.name] = st.int_uniform.get(f.name, 0.0) + _f64(g2 * (s * s / 12.0))

    def _alias(self, t: torch.Tensor, operand: str, reduce_dim: int) -> torch.Tensor:
        if not t.requires_grad:
            return t
        alias = t.view_as(t)
        alias.register_hook(lambda g, x=alias: self._reduce(operand, x, g, reduce_dim))
        return alias

    def attach(self) -> None:
        self.handles.append(self.mod.register_forward_pre_hook(self._pre))
        if self.kind == "linear":
            self.handles.append(self.mod.register_forward_hook(self._post))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _pre(self, mod: nn.Module, args: tuple) -> tuple:
        self.rec.calls += 1
        if self.kind == "linear":
            x = args[0]
            if self.rec.calls == 1:
                w = linear_weight(mod)
                self.rec.shapes = {"x": list(x.shape), "w": list(w.shape)}
                self.rec.macs = x[..., 0].numel() * w.shape[0] * w.shape[1]
                self.rec.weight_numel = w.numel()
            return (self._alias(x, "x", -1), *args[1:])
        a, b = args[:2]
        if self.rec.calls == 1:
            self.rec.shapes = {"a": list(a.shape), "b": list(b.shape)}
            self.rec.macs = a[..., 0].numel() * a.shape[-1] * b.shape[-1]
        return (self._alias(a, "a", -1), self._alias(b, "b", -2), *args[2:])

    def _post(self, mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if not out.requires_grad:
            return
        x = args[0].detach()

        def weight_grad(gy: torch.Tensor) -> None:
            gw = gy.reshape(-1, gy.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()
            if not torch.isfinite(gw).all():
                raise SensitivityError(f"non-finite weight gradient at op {self.name}")
            if self.gw2 is None:
                self.gw2 = torch.zeros_like(gw)
            self.gw2.add_(gw * gw)

        out.register_hook(weight_grad)

    # -- weight operand (from the accumulated Σ g_W²) --------------------------------------------------
    def finish_weight(self, n_samples: int) -> None:
        if self.kind != "linear" or self.gw2 is None:
            return
        st = self.rec.operands["w"]
        w = linear_weight(self.mod).detach().float()
        g2, w2 = self.gw2, w * w
        st.xg2, st.g2, st.x2 = _f64(w2 * g2), _f64(g2), _f64(w2) * n_samples
        st.numel, st.amax = w.numel() * n_samples, float(w.abs().max())
        for f in self.formats:
            e2 = (quantize(w, f, -1) - w).pow(2)
            st.emp[f.name] = _f64(g2 * e2)
            st.err2[f.name] = _f64(e2) * n_samples
            if f.kind == "int":
                s = scale_of(w, f, -1)
                st.int_uniform[f.name] = _f64(g2 * (s * s / 12.0))
        self.gw2 = None


def sequence_loss(model: nn.Module, ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence in ``ids`` (shape: batch)."""
    kw = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": ids}
    logits = model(**kw, use_cache=False).logits[:, :-1].float()
    tgt = ids[:, 1:]
    ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
    return ce.view(tgt.shape).mean(dim=1)


def calibrate(model: nn.Module, blocks: Iterable[torch.Tensor], formats: list[str] | None = None,
              include_lm_head: bool = True, model_name: str = "", data_source: str = "",
              progress: bool = True) -> Sensitivity:
    """One fwd+bwd per sequence over ``blocks`` (tensors of shape (1, T) or (B, T)); returns the record.

    Blocks are consumed one at a time (an iterator is fine), so a long calibration set costs time, not memory.
    """
    formats = list(formats or DEFAULT_FORMATS)
    for f in formats:
        if get_format(f).kind == "ref":
            raise FormatError(f"{f} is the reference format, not a candidate")
    install_attention(model)
    ops = find_ops(model, include_lm_head=include_lm_head)
    mods = dict(model.named_modules())
    cols = [_Collector(o.name, mods[o.name], o.kind, formats) for o in ops]
    for c in cols:
        c.attach()
    emb = model.get_input_embeddings()
    n, loss_sum, seq_len = 0, 0.0, 0
    t0 = time.perf_counter()
    try:
        it = blocks
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(blocks, desc="calibrate (fwd+bwd)", unit="seq", total=_len(blocks))
        for ids in it:
            ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
            for row in ids.split(1):
                # A leaf that requires grad makes every activation downstream require grad, so the
                # hooks see gradients while no parameter gradient is ever computed or stored.
                embeds = emb(row).detach().requires_grad_(True)
                loss = sequence_loss(model, row, embeds)
                if not torch.isfinite(loss).all():
                    raise SensitivityError(f"non-finite calibration loss on sequence {n}: {loss.tolist()}")
                loss.sum().backward()
                loss_sum += float(loss.detach().sum())
                n += row.shape[0]
                seq_len = row.shape[1]
    finally:
        for c in cols:
            c.detach()
    if n == 0:
        raise SensitivityError("the calibration data is empty")
    for c in cols:
        c.finish_weight(n)
    unreached = [c.name for c in cols if c.rec.calls == 0]
    if unreached:
        log.warning("%d quantizable ops were never reached by the calibration data and will stay in high "
                    "precision: %s", len(unreached), ", ".join(unreached[:10]))
    return Sensitivity(model=model_name, n_samples=n, seq_len=seq_len, mean_loss=loss_sum / n, formats=formats,
                       ops={c.name: c.rec for c in cols}, unreached=unreached,
                       wall_s=time.perf_counter() - t0, data_source=data_source)


def _len(x) -> int | None:
    try:
        return len(x)
    except TypeError:
        return None


