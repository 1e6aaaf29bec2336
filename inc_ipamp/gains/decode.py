"""Decode-step gains: the time one new token costs (TPOT) per group configuration, with a real KV cache.

Why a phase of its own: a decode step multiplies a (B, 1, d) activation by every weight, so it streams the weights
from memory instead of reusing them over a long prompt; the same group configuration saves a different share of
the time (on SmolLM2's k/v projections INT8 is slower than fp32 at one token, faster at 128). Which low-precision
kernel is fastest at one token on this CPU was measured, not assumed (``benchmarks/results/decode.md``, kernel
table): torch.ao's dynamic INT8 Linear (fbgemm), the kernel prefill uses, beat ``aten._weight_int8pack_mm``
int8 weight-only and torchao's int8 weight-only, both slower than fp32 at every SmolLM2 shape here (no AVX-512). So
the decode gains are timed with the same backend modules as prefill and the loss model needs no new numerics.

How (the prefill machinery, reused): a prompt of ``context`` random tokens is run once into a transformers
``StaticCache`` (``FixedSlotCache``), then one decode step is run with hooks that capture each group's sub-graph
inputs — the (B, 1, d) hidden states, the rotary embeddings, the mask and the cache itself. The cache writes the new
token's K/V into one fixed slot on every call, so a sub-graph (or the whole step) can be called again and again and
always attends to the same ``context`` cached tokens plus itself; a signature's configurations are timed together
against one shared reference run per round with adaptive repetitions (``measure.time_group_configs``) on the
sub-graphs of every group of the signature back to back (``span``), checked with the prefill's quality checks
(``measure.check_quality``; a drifted reference rescaled, ``measure.rescale_drift``), brought to the machine speed of
the reference step by prefill's speed probe (``measure.speed_probe``, ``align_to_probe``), cached
(``cache.MeasurementCache``, the key says "decode" and the context), and the end-to-end step is timed interleaved
with the reference (``compare_decode``).
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import IpampError
from ..formats import get_format
from ..models import model_fingerprint
from ..ops import find_ops, install_attention, linear_weight, tied_linears
from ..partition import suffix, tensor_shapes
from ..records import Gains, Group, GroupGains, Partition
from .base import Backend, gain_stats, paired_times, prime
from .cache import MeasurementCache, cache_key
from .measure import (
    MIN_REPS,
    NOISY,
    PROBE_ROUNDS,
    _emulated_configs,
    align_to_probe,
    check_quality,
    group_run,
    rescale_drift,
    speed_probe,
    time_group_configs,
    time_signature,
    timed_runs,
)
from .theory import memory_gain, roofline_device, roofline_gain

log = logging.getLogger(__name__)
#: re-measurements of a noisy decode config (each with twice the repetitions). Two were affordable when a timed run
#: was one layer's block (~1 ms); a run spans every layer of the signature (~40 ms for SmolLM2's 30 attention blocks),
#: and the second, at 40 rounds, cost ~18 s of a 34 s decode measure (a peers run at 6082c8b): its 7 attention configs
#: stayed noisy and were used at a negative lower bound either way; o and {up} alone passed at 40 rounds, and with
#: one re-measurement are used at their CI's lower end (``noisy_lower_bound``) instead: a smaller, safe gain
DECODE_RETRIES = 1


def noisy_lower_bound(measurements: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """A decode config that stayed ``noisy`` (``measure.check_quality``) through its re-measurements, made usable at
    the lower end of its last measurement's 95% CI (gain − CI, what it saves at least), or None (it stays flagged).

    Why: a decode step's attention sub-graph is ~1 ms per layer, and the gain of a q/k/v projection in INT8 ~0.1 ms,
    so on a shared CPU its CI stays near the noisy check's 5% of t_ref even at 40 rounds. Flagging those kept them
    out of every decode plan while the prefill objective's plans used them and ran faster at decode
    (benchmarks/results/decode.md at 7e16af7). Fail closed: only when every measurement is finite, positive and
    agrees with every other (their gains differ by no more than their CIs together: the same quantity measured
    twice, not a machine that changed in between); the bound never exceeds what was measured, and one that is <= 0
    makes the config worth nothing to the solver. The record keeps the CI and says ``lower_bound``.
    """
    ms = list(measurements)
    if len(ms) < 2:
        return None
    for m in ms:
        g, ci, t = m.get("gain_s"), m.get("ci_s"), m.get("t_ref_s")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (g, ci, t)) or t <= 0 or ci < 0:
            return None
    if any(abs(a["gain_s"] - b["gain_s"]) > a["ci_s"] + b["ci_s"] for a, b in itertools.combinations(ms, 2)):
        return None
    last = ms[-1]
    why = check_quality(last, None)
    if not why.startswith(NOISY):
        return None
    return {**last, "gain_s": last["gain_s"] - last["ci_s"], "flag": "",
            "lower_bound": f"{why}: used at its CI's lower end ({len(ms)} consistent measurements)"}


def decode_quality(rec: dict[str, Any], ref_median: float | None) -> str:
    """``measure.check_quality``, except that a record at its CI's lower bound (``noisy_lower_bound``) is not noisy
    again: the drift and finiteness checks still apply to it."""
    return check_quality({**rec, "ci_s": 0.0} if rec.get("lower_bound") else rec, ref_median)


def _static_cache_class() -> type:
    from transformers import StaticCache

    class FixedSlotCache(StaticCache):
        """A ``StaticCache`` of ``context + 1`` slots whose one-token updates always write slot ``context``.

        A decode step run on it twice gives the same result and leaves the same cache, which repeated timing needs
        (a growing cache would make every timed call longer than the one before)."""

        def __init__(self, config: Any, context: int):
            super().__init__(config=config, max_cache_len=context + 1)
            self.slot = context

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            layer = self.layers[layer_idx]
            if getattr(layer, "is_initialized", False) and key_states.shape[-2] == 1:
                layer.cumulative_length.fill_(self.slot)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return FixedSlotCache


@dataclass
class DecodeStep:
    """One decode step of ``batch`` sequences after a ``context``-token prompt, callable again and again."""

    ids: torch.Tensor  # (batch, 1): the next token (the prompt's greedy continuation)
    position_ids: torch.Tensor  # (1, 1) = context
    cache: Any  # FixedSlotCache holding the prompt's K/V
    batch: int
    context: int
    prompt: torch.Tensor  # (batch, context), kept so a test can check the step against a full forward

    def __call__(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(self.ids, position_ids=self.position_ids, cache=self.cache, use_cache=True).logits


def decode_step(model: nn.Module, batch: int = 1, context: int = 256, seed: int = 0,
                device: torch.device | None = None) -> DecodeStep:
    """Prefill ``batch`` random prompts of ``context`` tokens (seeded) into a real KV cache; return the next step."""
    if batch < 1 or context < 1:
        raise IpampError(f"a decode step needs batch >= 1 and context >= 1 (got batch {batch}, context {context})")
    install_attention(model)
    dev = device or next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=g).to(dev)
    cache = _static_cache_class()(model.config, context)
    with torch.no_grad():
        logits = model(prompt, cache=cache, use_cache=True).logits
    nxt = logits[:, -1:].argmax(-1)
    return DecodeStep(nxt, torch.tensor([[context]], device=dev), cache, batch, context, prompt)


def capture_decode_inputs(model: nn.Module, step: DecodeStep, names: Sequence[str],
                          record: Callable[[str, tuple, dict], Any] | None = None) -> dict[str, Any]:
    """``record(name, args, kwargs)`` (default: the (args, kwargs) themselves) of each named module's first call in
    one decode step: what ``time_group_config`` calls the sub-graphs with."""
    mods = dict(model.named_modules())
    got: dict[str, Any] = {}
    rec = record or (lambda n, a, k: (a, k))

    def pre(name: str, args: tuple, kwargs: dict) -> None:
        if name not in got:
            got[name] = rec(name, args, kwargs)

    missing = [n for n in names if n and n not in mods]
    if missing:
        raise IpampError(f"no module named {missing[0]!r} in the model")
    handles = [mods[n].register_forward_pre_hook(lambda m, a, k, n=n: pre(n, a, k), with_kwargs=True)
               for n in names if n]
    try:
        step(model)
    finally:
        for h in handles:
            h.remove()
    return got


def compare_decode(model: nn.Module, step: DecodeStep, backend: Backend, assignment: dict[str, str],
                   reps: int = 10, warmup: int = 2) -> dict[str, float]:
    """Measured end-to-end decode-step gain of ``assignment`` vs all-reference, interleaved (both enter ``apply``,
    as in ``base.compare_prefill``)."""
    def run(assign: dict[str, str]) -> Callable[[], object]:
        def fn() -> object:
            with backend.apply(model, assign) as m:
                return step(m)
        return fn

    prime(backend, model, assignment)
    t_ref, t_cfg = paired_times(run({}), run(assignment), reps, warmup, backend.synchronize)
    return gain_stats(t_ref, t_cfg)


def decode_op_shapes(model: nn.Module, step: DecodeStep, ops: dict[str, str]) -> dict[str, list[list[int]]]:
    """Operand shapes of every op in the decode step ({op: kind} in; the weight shape appended for Linears)."""
    mods = dict(model.named_modules())

    def record(name: str, args: tuple, kwargs: dict) -> list[list[int]]:
        s = tensor_shapes(args)
        return s[:1] + [list(linear_weight(mods[name]).shape)] if ops[name] == "linear" else s

    return capture_decode_inputs(model, step, list(ops), record)


def measure_decode_gains(model: nn.Module, partition: Partition, formats: list[str], backend: str | Backend = "cpu",
                         batch: int = 1, context: int = 256, reps: int = 20, warmup: int = 1,
                         cache_path: str | Path | None = None, span: int | None = None,
                         retries: int = DECODE_RETRIES,
                         reference_reps: int | None = None, progress: bool = True, seed: int = 0,
                         roofline: str | None = None, min_reps: int | None = MIN_REPS,
                         probe_rounds: int = PROBE_ROUNDS) -> Gains:
    """Gains record (``phase="decode"``, ``seq_len`` = the context length) of every group × config for one decode
    step: ET measured on sub-graphs with a real KV cache, checked and re-measured like prefill's (``measure``), M the
    weight bytes saved, RT (with ``roofline``, a device of ``theory.ROOFLINE_DEVICES``) the roofline time saved at the
    decode step's own operand shapes. ``reference_time_s`` is the all-reference decode step; ``quality.consistent``
    whether the best gains of all groups add up to less than it; ``quality.kv_cache`` the KV cache's geometry (what a
    KV-cache precision decision saves, ``inc_ipamp.kvcache``). Configs the backend only emulates are flagged, never
    timed. A config still noisy after ``retries`` re-measurements is used at the lower end of its CI where its
    measurements agree (``noisy_lower_bound``; listed in ``quality.lower_bound``), else flagged."""
    from ..runtime import Progress, loaded, machine_state
    from . import get_backend

    if len(formats) < 2:
        raise IpampError("give at least two formats: the reference first, then the low-precision choices")
    for f in formats:
        get_format(f)
    if span is not None and span < 1:
        raise IpampError(f"span must be >= 1 (got {span})")
    ref = formats[0]
    rt_missing = [f for f in formats if roofline and f not in roofline_device(roofline).peak_tflops]
    if rt_missing:
        raise IpampError(f"{roofline} has no published peak for {', '.join(rt_missing)}: no RT decode gains")
    be = backend if isinstance(backend, Backend) else get_backend(backend)
    if be.name == "table":
        raise IpampError("decode gains are measured on a device; the table backend replays prefill gains only")
    be.check()
    install_attention(model)
    be.prepare(model, ref)
    kinds = {o.name: o.kind for o in find_ops(model, ordered=False)}
    unknown = [op for g in partition.groups for op in g.ops if op not in kinds]
    if unknown:
        raise IpampError(f"partition names ops the model does not have (e.g. {unknown[0]}); was it made for another "
                         "model?")
    state_start = machine_state()
    step = decode_step(model, batch, context, seed, be.device())
    tied = tied_linears(model)
    all_ops = [op for g in partition.groups for op in g.ops]
    shapes = decode_op_shapes(model, step, {op: kinds[op] for op in all_ops})
    members: dict[str, list[Group]] = {}
    for g in partition.groups:
        members.setdefault(g.signature or g.name, []).append(g)
    timed_with = {k: v[: span or len(v)] for k, v in members.items()}
    representative = {k: v[0] for k, v in members.items()}
    base = dict(phase="decode", model=model_fingerprint(model), device=be.device_string(), batch=batch,
                context=context, code=__version__, backend=be.version)
    emulated = _emulated_configs(model, be, representative, formats, kinds)
    notes = [f"decode step: batch {batch}, {context} cached tokens (transformers StaticCache, fixed slot), one new "
             "token; sub-graphs called with inputs captured from that step"]
    if emulated:
        notes.append(f"ET: {len(emulated)} config(s) not timed and kept out of plans: they need a kernel the "
                     f"{be.name} backend only emulates ({'; '.join(sorted(set(emulated.values())))})")
    recs: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {
        kc: {"gain_s": 0.0, "ci_s": 0.0, "t_ref_s": 0.0, "flag": why} for kc, why in emulated.items()}
    todo = [(k, g, tuple(c)) for k, g in representative.items() for c in g.configs(formats)
            if any(f != ref for f in c) and (k, tuple(c)) not in emulated]
    # each group's block, never the changed ops alone: a one-token Linear streams its weights, and how long that
    # takes depends on the traffic around it (``measure.timed_modules``)
    calls, unit = timed_runs(be, timed_with, todo, formats, lambda n: capture_decode_inputs(model, step, n),
                             streaming=True)
    cache = MeasurementCache(cache_path)
    counts = {"timed": 0, "reused": 0, "remeasured": 0, "rescaled": 0}
    history: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}  # every measurement of a config, in order
    keys = {(k, c): cache_key(signature=g.signature, ops=[suffix(o) for o in g.ops], config=list(c),
                              span=len(timed_with[k]), timed=unit[k], **base) for k, g, c in todo}

    def measure(k: str, cs: list[tuple[str, ...]], n_reps: int) -> list[dict[str, Any]]:
        """``cs`` (configs of signature ``k``) timed together against one shared reference per round, adaptive
        repetitions: prefill's ``time_group_configs``."""
        together = timed_with[k]
        rs = time_group_configs(model, be, together, cs, calls[k], n_reps, warmup, min_reps=min_reps)
        counts["timed"] += len(together) * (max(r["reps"] for r in rs) + sum(r["reps"] for r in rs))
        for c, r in zip(cs, rs, strict=True):
            history.setdefault((k, tuple(c)), []).append(dict(r))
        return [{"group": representative[k].name, "signature": k, "config": list(c), **r}
                for c, r in zip(cs, rs, strict=True)]

    t0 = time.perf_counter()
    by_sig: dict[str, list[tuple[str, ...]]] = {}
    for k, _, c in todo:
        by_sig.setdefault(k, []).append(c)
    with Progress(len(todo), "measure: timing decode-step group configs", unit="config", enabled=progress) as bar:
        for k, cs in by_sig.items():  # cached, or timed together; what fails re-measured with twice the reps
            time_signature(k, cs, lambda k_, cs_, n, _again: measure(k_, cs_, n), cache, keys, recs, counts, reps,
                           retries)
            bar.update(len(cs))
    # still noisy after the re-measurements: at the lower end of the CI where the measurements agree (the cache keeps
    # the flag, so the next run times it again)
    bounded = []
    for kc, r in list(recs.items()):
        if kc not in emulated and r.get("flag", "").startswith(NOISY):
            lb = noisy_lower_bound(history.get(kc, []))
            if lb is not None:
                recs[kc] = {**r, **lb}
                bounded.append(f"{representative[kc[0]].name} {'+'.join(kc[1])}: {lb['gain_s'] * 1e3:.3g} ms "
                               f"(measured {(lb['gain_s'] + lb['ci_s']) * 1e3:.3g} ± {lb['ci_s'] * 1e3:.3g} ms)")
    # reference drift over the whole signature: rescaled to its median where moderate (the gain was paired with
    # reference runs of the same rounds, ``measure.rescale_drift``), else flagged
    for k in representative:
        mine = {c: r for (kk, c), r in recs.items() if kk == k and (kk, c) not in emulated}
        if len(mine) >= 3:
            med = statistics.median(r["t_ref_s"] for r in mine.values())
            for c, r in mine.items():
                if r.get("flag") or not decode_quality(r, med):
                    continue
                r = recs[(k, c)] = dict(r)  # the cache keeps what was measured
                if rescale_drift(r, med, apply=True):
                    counts["rescaled"] += 1
                else:
                    r["flag"] = decode_quality(r, med)
                    cache.put(keys[(k, c)], r)  # flagged: the next run re-times it
    # prefill's speed probe: every signature's reference run again at one moment, right before the reference decode
    # step, and a signature measured at another machine speed rescaled to it (``measure.align_to_probe``)
    aligned, mismatch = {}, []
    if probe_rounds:
        sigs = [k for k in representative if any(kc[0] == k and kc not in emulated for kc in recs)]
        probe = speed_probe({k: group_run(model, be, calls[k], {}) for k in sigs}, probe_rounds, be.synchronize)
        for k, t in probe.items():
            mine_keys = [kc for kc in recs if kc[0] == k and kc not in emulated and not recs[kc].get("flag")]
            for kc in mine_keys:
                recs[kc] = dict(recs[kc])
            f = align_to_probe([recs[kc] for kc in mine_keys], t / len(timed_with[k]))
            if f == 0.0:
                mismatch.append(representative[k].name)
            elif f != 1.0:
                aligned[representative[k].name] = f
    groups: dict[str, GroupGains] = {}
    flagged = []
    for g in partition.groups:
        k = g.signature or g.name
        cfgs = g.configs(formats)
        et, ci, flags = [], [], []
        for c in cfgs:
            rec = recs.get((k, tuple(c))) if any(f != ref for f in c) else None
            et.append(rec["gain_s"] if rec else 0.0)
            ci.append(rec["ci_s"] if rec else 0.0)
            flags.append(rec.get("flag", "") if rec else "")
            if rec and rec.get("flag") and g is representative[k] and (k, tuple(c)) not in emulated:
                flagged.append(f"{g.name} {'+'.join(c)}: {rec['flag']}")
        mem = [sum(memory_gain(kinds[op], shapes[op], ref, f, op in tied) for op, f in zip(g.ops, c, strict=True))
               for c in cfgs]
        n_t = len(timed_with[k])
        groups[g.name] = GroupGains(
            g.name, [list(c) for c in cfgs], {"ET": et, "M": mem}, {"ET": ci},
            {"ET": f"measured:{be.name} decode step on sub-graph {unit[k]}"
                   + (f", mean over {n_t} groups of its signature" if n_t > 1 else ""), "M": "weight bytes saved"},
            {"ET": flags})
        if roofline:  # shapes captured in the decode step itself: one token against the cache
            groups[g.name].gains["RT"] = [sum(roofline_gain(kinds[op], shapes[op], ref, f, roofline)
                                              for op, f in zip(g.ops, c, strict=True)) for c in cfgs]
            groups[g.name].source["RT"] = f"roofline on {roofline} at the decode step's shapes (datasheet figures)"
    notes.append(f"ET (decode): {len(representative)} signature(s), {counts['timed']} timed sub-graph calls "
                 f"(a signature's configs against one shared reference per round, {min_reps or reps}-{reps} rounds, "
                 f"{warmup} warm-up rounds) in {time.perf_counter() - t0:.1f} s, {counts['reused']} config(s) from the "
                 f"cache, {counts['remeasured']} re-measurement(s), {counts['rescaled']} rescaled for reference drift"
                 + (f"; speed probe ({probe_rounds} rounds): rescaled " + ", ".join(f"{n} x{f:.3g}" for n, f in
                                                                                   aligned.items()) if aligned else "")
                 + (f"; left as measured (speed changed more than the rescale limit): {', '.join(mismatch)}"
                    if mismatch else "")
                 + (f"; {len(bounded)} config(s) still noisy after {retries} re-measurement(s) but consistent, used "
                    "at the lower end of their 95% CI: " + "; ".join(bounded) if bounded else ""))
    notes.append("kernel paths: " + "; ".join(f"{k} -> {v}" for k, v in sorted(be.paths.items())))
    ref_t = reference_decode_time(model, step, be, reference_reps or max(5, reps // 2))
    best = sum(max([0.0, *(x for i, x in enumerate(gg.gains["ET"]) if gg.usable("ET", i))]) for gg in groups.values())
    state_end = machine_state()
    quality = {"machine_start": state_start, "machine_end": state_end, "flagged_configs": len(flagged),
               "flagged": flagged, "sum_best_gain_s": best, "reference_decode_s": ref_t, "consistent": best < ref_t,
               "loaded": loaded(state_start) or loaded(state_end), "kv_cache": kv_geometry(step),
               "speed_probe_rescaled": aligned, "speed_probe_mismatch": mismatch, "lower_bound": bounded}
    if flagged:
        log.warning("decode: %d of %d measured configs failed the quality checks and are kept out of plans (e.g. %s)",
                    len(flagged), len(todo), flagged[0])
    return Gains(partition.model, be.device_string(), list(formats), batch, context, ref_t, groups, counts["timed"],
                 notes, quality, phase="decode")


def kv_geometry(step: DecodeStep) -> dict[str, Any]:
    """Per layer: the cached K (and V) tensor's shape (batch, kv heads, context, head dim) and element count, read from
    the decode step's real cache (the KV-cache decision's memory and bandwidth gains are computed from it)."""
    out = {}
    for i, layer in enumerate(step.cache.layers):
        if getattr(layer, "keys", None) is not None:
            b, h, _, d = layer.keys.shape
            out[str(i)] = {"batch": b, "kv_heads": h, "context": step.context, "head_dim": d,
                           "numel": b * h * step.context * d}
    return out


def reference_decode_time(model: nn.Module, step: DecodeStep, backend: Backend, reps: int = 10,
                          warmup: int = 1) -> float:
    """Median all-reference decode-step time (both sides of every comparison enter ``apply``, so this does too)."""
    def fn() -> object:
        with backend.apply(model, {}) as m:
            return step(m)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        backend.synchronize()
        t0 = time.perf_counter()
        fn()
        backend.synchronize()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))
