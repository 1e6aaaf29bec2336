"""Gains of every group × configuration: ET measured on sub-graphs (or replayed), TT and M computed.

Beyond the paper's protocol (every config of every group timed end-to-end on the full model): a group is
timed on the smallest module that encloses its ops (e.g. the layer's ``self_attn`` for {q,k,v,qk,av}),
called on inputs captured from a real forward, with reference and config runs interleaved; groups with the
same signature (same structure and shapes, e.g. the 30 decoder layers) share one measurement.

A group timed alone finds its weights hot in the L2 cache after the first call, which it never does in
the full model; on CPU that under-stated INT8's gain by ~30% (benchmarks/results/bench_gains*.md). So each
timed run calls the group's sub-graph in *every* layer of its signature (``span``) back to back and the
gain is divided by their number: the same weights stream from memory as in a prefill, and layer-to-layer
differences average out instead of being copied 30 times.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import IpampError
from ..formats import get_format
from ..models import model_fingerprint
from ..ops import install_attention
from ..partition import _suffix, default_example_ids, first_calls, list_ops
from ..records import Gains, Group, GroupGains, Partition
from .base import Backend, gain_stats, paired_times, time_prefill
from .cache import MeasurementCache, cache_key
from .theory import BACKEND_DEVICE, capture_op_shapes, memory_gain, rates_for, theoretical_gain

log = logging.getLogger(__name__)
METRICS = ("ET", "TT", "M")


def enclosing_module(ops: Sequence[str]) -> str:
    """Longest common dotted prefix of the op names: the smallest module containing the whole group."""
    parts = [o.split(".") for o in ops]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def capture_module_inputs(model: nn.Module, names: Sequence[str], ids: torch.Tensor) -> dict[str, tuple]:
    """(args, kwargs) of the first call of each named module in one forward on ``ids``."""
    return first_calls(model, names, ids, lambda n, args, kwargs: (args, kwargs))


def time_group_config(model: nn.Module, backend: Backend, groups: Sequence[Group], config: Sequence[str],
                      inputs: Sequence[tuple], reps: int, warmup: int) -> dict[str, float]:
    """Gain per group of running ``groups`` (same signature) in ``config``, rest reference.

    One timed run calls each group's enclosing module on its own captured inputs, back to back; reference
    and config runs are interleaved. Gain and CI are divided by ``len(groups)``.
    """
    calls = []
    assignment: dict[str, str] = {}
    for g, inp in zip(groups, inputs, strict=True):
        encl = enclosing_module(g.ops)
        args, kwargs = inp if encl else (inp[0], {"use_cache": False})
        calls.append((encl, args, kwargs))
        assignment.update(zip(g.ops, config, strict=True))

    def run(assign: dict[str, str]) -> Callable[[], object]:
        def fn() -> object:
            with torch.no_grad(), backend.apply(model, assign) as m:
                return [m.get_submodule(e)(*a, **k) for e, a, k in calls]
        return fn

    t_ref, t_cfg = paired_times(run({}), run(assignment), reps, warmup, backend.synchronize)
    r = gain_stats(t_ref, t_cfg)
    n = len(calls)
    return {k: (v / n if k.endswith("_s") else v) for k, v in r.items()} | {"span": n}


def measure_gains(model: nn.Module, partition: Partition, formats: list[str], backend: str | Backend = "cpu",
                  batch: int = 1, seq_len: int = 128, reps: int = 20, warmup: int = 3,
                  cache_path: str | Path | None = None, table_path: str | Path | None = None,
                  metrics: Sequence[str] = METRICS, device_rates: dict[str, float] | str | None = None,
                  reuse: bool = True, progress: bool = True, reference_reps: int | None = None,
                  span: int | None = None) -> Gains:
    """Gains record for every group × config of ``partition`` (``formats[0]`` is the reference).

    ET is measured with ``backend`` ("cpu", "cuda", "hpu") or replayed from ``table_path`` ("table");
    TT uses ``device_rates`` ({format: TFLOPS} or a device name, default per backend); M counts weight bytes.
    ``cache_path`` (JSON lines) makes a long run resumable: measurements already there are reused.
    ``span``: how many groups of one signature each timed run calls back to back (None: all; 1: the
    representative alone, hot in cache).
    """
    from . import get_backend

    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise IpampError(f"unknown metric(s) {bad}; choose from {', '.join(METRICS)}")
    if len(formats) < 2:
        raise IpampError("give at least two formats: the reference first, then the low-precision choices")
    for f in formats:
        get_format(f)
    ref = formats[0]
    be = backend if isinstance(backend, Backend) else get_backend(backend, table_path=table_path)
    notes: list[str] = []
    if "ET" in metrics:
        be.check()
    install_attention(model)
    if "ET" in metrics and be.name != "table":
        be.prepare(model, ref)
    kinds = {o.name: o.kind for o in list_ops(model)}
    measuring = "ET" in metrics and be.name != "table"
    dev = be.device() if measuring else next(model.parameters()).device
    ids = default_example_ids(model, batch, seq_len).to(dev)
    all_ops = [op for g in partition.groups for op in g.ops]
    unknown = [op for op in all_ops if op not in kinds]
    if unknown:
        raise IpampError(f"partition names ops the model does not have (e.g. {unknown[0]}); was it made for "
                         "another model?")
    shapes = capture_op_shapes(model, {op: kinds[op] for op in all_ops}, ids)
    rate_device = device_rates if device_rates is not None else BACKEND_DEVICE.get(be.name, "cpu")
    rates = rates_for(rate_device) if "TT" in metrics else {}

    groups: dict[str, GroupGains] = {}
    for g in partition.groups:
        cfgs = g.configs(formats)
        gg = GroupGains(g.name, [list(c) for c in cfgs], {}, {}, {})
        if "TT" in metrics:
            gg.gains["TT"] = [sum(theoretical_gain(kinds[op], shapes[op], ref, f, rates)
                                  for op, f in zip(g.ops, c, strict=True)) for c in cfgs]
            gg.source["TT"] = f"theoretical: MACs x rate table {rate_device!r} (rates are inputs, not measured)"
        if "M" in metrics:
            gg.gains["M"] = [sum(memory_gain(kinds[op], shapes[op], ref, f) for op, f in zip(g.ops, c, strict=True))
                             for c in cfgs]
            gg.source["M"] = "weight bytes saved"
        groups[g.name] = gg

    timed_runs = 0
    reference_time = None
    if "ET" in metrics:
        if be.name == "table":
            for g in partition.groups:
                vals = [be.lookup(g.name, g.signature, c) if any(f != ref for f in c) else (0.0, 0.0)
                        for c in g.configs(formats)]
                groups[g.name].gains["ET"] = [v[0] for v in vals]
                groups[g.name].ci["ET"] = [v[1] for v in vals]
                groups[g.name].source["ET"] = f"replayed:{be.path}"
        else:
            timed_runs, reference_time = _measure_et(model, partition, formats, be, ids, groups, reps, warmup,
                                                     cache_path, reuse, progress, notes,
                                                     reference_reps or max(5, reps // 2), span)
            notes.append("kernel paths: " + "; ".join(f"{k} -> {v}" for k, v in sorted(be.paths.items())))
    return Gains(partition.model, be.device_string(), list(formats), batch, seq_len, reference_time, groups,
                 timed_runs, notes)


def _measure_et(model: nn.Module, partition: Partition, formats: list[str], be: Backend, ids: torch.Tensor,
                groups: dict[str, GroupGains], reps: int, warmup: int, cache_path: str | Path | None,
                reuse: bool, progress: bool, notes: list[str], reference_reps: int,
                span: int | None = None) -> tuple[int, float]:
    from tqdm.auto import tqdm

    cache = MeasurementCache(cache_path)
    if cache.skipped:
        notes.append(f"measurement cache: skipped {cache.skipped} corrupt line(s)")
    members: dict[str, list[Group]] = {}
    for g in partition.groups:
        members.setdefault(g.signature if reuse else g.name, []).append(g)
    if span is not None and span < 1:
        raise IpampError(f"span must be >= 1 (got {span})")
    timed_with = {k: v[: span or len(v)] for k, v in members.items()}
    reps_of = {k: v[0] for k, v in members.items()}
    encl = {enclosing_module(g.ops) for v in timed_with.values() for g in v}
    inputs = capture_module_inputs(model, sorted(encl), ids)
    base: dict[str, Any] = dict(model=model_fingerprint(model), device=be.device_string(), batch=int(ids.shape[0]),
                                seq_len=int(ids.shape[1]), code=__version__, backend=be.version)
    ref = formats[0]
    timed = reused = 0
    measured: dict[str, tuple[list[float], list[float], str]] = {}
    todo = [(k, g, c) for k, g in reps_of.items() for c in g.configs(formats) if any(f != ref for f in c)]
    bar = tqdm(todo, desc="timing group configs", disable=not progress, leave=False)
    for k, g, c in bar:
        together = timed_with[k]
        key = cache_key(signature=g.signature, ops=[_suffix(o) for o in g.ops], config=list(c), span=len(together),
                        **base)
        rec = cache.get(key)
        if rec is None:
            e = enclosing_module(g.ops)
            r = time_group_config(model, be, together, c,
                                  [inputs.get(enclosing_module(x.ops), ((ids,), {})) for x in together], reps, warmup)
            timed += 2 * reps * len(together)
            rec = {"group": g.name, "signature": g.signature, "config": list(c), "module": e, **r}
            cache.put(key, rec)
        else:
            reused += 1
        gains, cis, _ = measured.setdefault(k, ([], [], g.name))
        gains.append(rec["gain_s"])
        cis.append(rec["ci_s"])
    for g in partition.groups:
        k = g.signature if reuse else g.name
        gains, cis, rep_name = measured.get(k, ([], [], g.name))
        it_g, it_c = iter(gains), iter(cis)
        et, ci = [], []
        for c in g.configs(formats):
            low = any(f != ref for f in c)
            et.append(next(it_g) if low else 0.0)
            ci.append(next(it_c) if low else 0.0)
        groups[g.name].gains["ET"] = et
        groups[g.name].ci["ET"] = ci
        n_t = len(timed_with[k])
        how = (f", mean over {n_t} groups of its signature" if n_t > 1 else "") + (
            "" if rep_name == g.name else f", reused from {rep_name} (same signature)")
        groups[g.name].source["ET"] = f"measured:{be.name} on sub-graph {enclosing_module(g.ops) or '<model>'}{how}"
    spans = sorted({len(v) for v in timed_with.values()})
    notes.append(f"ET: {len(reps_of)} signature(s) for {len(partition.groups)} groups, each timed over {spans} "
                 f"group(s) of its signature per run; {timed} timed sub-graph calls ({reps} reps x 2, interleaved, "
                 f"{warmup} warm-up pairs), "
                 f"{reused} config(s) taken from the cache")
    ref_t = time_prefill(model, ids, be, {}, reps=reference_reps, warmup=1)
    return timed, float(ref_t["median_s"])
