"""Gains of every group × configuration: ET measured on sub-graphs (or replayed), TT and M computed.

Beyond the paper's protocol (every config of every group timed end-to-end on the full model): a group is
timed on the ops its configs change (``timed_modules``: e.g. q/k/v's Linears for {q,k,v,qk,av} on CPU, where the
INT8 BGEMMs are only emulated; the smallest module enclosing the group where a graph compiler fuses across ops,
and the group's block at a decode step, whose weight-streaming Linears take longer or shorter with the traffic around),
called on inputs captured from a real forward, with reference and config runs interleaved; groups with the
same signature (same structure and shapes, e.g. the 30 decoder layers) share one measurement. Where ops are local
(``per_op_timing``: cpu, cuda) only single-op configs are timed, each on its op alone, and a config changing several
ops is the sum of its ops' gains (``sum_parts``): {q,k,v}'s 7 configs cost 3 op timings, {gate,up}'s 3 cost 2.

A group timed alone finds its weights hot in the L2 cache after the first call, which it never does in
the full model; on CPU that under-stated INT8's gain by ~30% (benchmarks/results/bench_gains*.md). So each
timed run calls the group's sub-graph in *every* layer of its signature (``span``) back to back and the
gain is divided by their number: the same weights stream from memory as in a prefill, and layer-to-layer
differences average out instead of being copied 30 times.

Every measured config passes quality checks (``check_quality``: CI width vs gain and reference time, the
reference time against its siblings') or is re-measured with twice the repetitions; what still fails is flagged
in the record and never enters a plan. The record also carries the machine state (threads, load) at start and
end and whether the best gains of all groups add up to less than the whole prefill, as they must.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import IpampError
from ..formats import get_format
from ..models import model_fingerprint
from ..ops import find_ops, install_attention, tied_linears
from ..partition import default_example_ids, first_calls, suffix
from ..records import Gains, Group, GroupGains, Partition
from .base import Backend, _timed, gain_stats, interleaved_times, prime, time_prefill
from .cache import MeasurementCache, cache_key
from .theory import (
    BACKEND_DEVICE,
    ROOFLINE_DEVICES,
    capture_op_shapes,
    memory_gain,
    rates_for,
    roofline_device,
    roofline_gain,
    theoretical_gain,
)

log = logging.getLogger(__name__)
#: ET measured time, TT MACs x rate table, RT roofline of a named device (datasheet peaks), M weight bytes
METRICS = ("ET", "TT", "RT", "M")
#: quality checks on one measured configuration (see ``check_quality``)
MAX_REL_CI = 0.05  # CI half-width of a gain may exceed half the gain only while it stays below 5% of t_ref
MAX_REF_DRIFT = 0.25  # a config's reference time may differ this much from its signature's median
RETRIES = 1  # re-measurements (each with twice the repetitions) before a config is flagged
#: re-measuring stops (what fails is flagged at once) when it has cost this fraction of the first measurements:
#: on a badly overloaded machine most configs fail, and re-measuring all of them tripled the stage's time
REMEASURE_BUDGET = 0.5
#: a drifted config (its reference time off its signature's median by more than MAX_REF_DRIFT) whose reference
#: ran at most this factor slower or faster is rescaled to the median instead of flagged: its gain was paired with
#: reference runs of the same rounds, so a machine that slowed down by s inflated both by s (``rescale_drift``)
MAX_RESCALE = 3.0
#: adaptive repetitions: a config is timed at least MIN_REPS rounds and stops early once its CI is within
#: PRECISE_REL of its gain or PRECISE_ABS of its reference time (``precise_enough``); at most ``reps`` rounds
MIN_REPS = 5
PRECISE_REL = 0.2
PRECISE_ABS = 0.01
#: how ``check_quality``'s too-wide-CI verdict starts
NOISY = "noisy"
#: rounds of the speed probe (every signature's reference run at one moment, right before the reference prefill;
#: ``align_to_probe``): about 3 prefills' time
PROBE_ROUNDS = 3


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


def time_group_configs(model: nn.Module, backend: Backend, groups: Sequence[Group], configs: Sequence[Sequence[str]],
                       calls: Sequence[tuple[str, tuple, dict]], reps: int, warmup: int, min_reps: int | None = None,
                       seed: int = 0) -> list[dict[str, float]]:
    """Gain per group of running ``groups`` (same signature) in each of ``configs``, the rest reference.

    One timed run makes ``calls`` ((module, args, kwargs), ``run_calls``: the groups' timed modules on their
    captured inputs) back to back; the configs are timed together against one shared reference run per round
    (``base.interleaved_times``). With ``min_reps``, a config stops after that many rounds once ``precise_enough``
    holds for it (adaptive repetitions). Gain and CI are divided by ``len(groups)``.
    """
    assignments = [{op: f for g in groups for op, f in zip(g.ops, c, strict=True)} for c in configs]
    for a in assignments:
        prime(backend, model, a)
    n = len(groups)

    def run(assign: dict[str, str]) -> Callable[[], object]:
        return group_run(model, backend, calls, assign)

    def settled(t_ref: list[float], t_cfg: list[float]) -> bool:
        return precise_enough(gain_stats(t_ref, t_cfg))

    timed = interleaved_times(run({}), [run(a) for a in assignments], reps, warmup, backend.synchronize,
                              min_reps=min_reps, settled=settled if min_reps is not None else None, seed=seed)
    out = []
    for t_ref, t_cfg in timed:
        r = gain_stats(t_ref, t_cfg)
        out.append({k: (v / n if k.endswith("_s") else v) for k, v in r.items()} | {"span": n})
    return out


def timed_modules(backend: Backend, groups: Sequence[Group], configs: Sequence[Sequence[str]],
                  ref: str, streaming: bool = False) -> list[str]:
    """The modules one timed run of ``groups`` (one signature) calls, group after group.

    Where the backend swaps ops module by module and runs them eagerly (``Backend.local_ops``) and the phase's ops
    are compute-bound (prefill), an op's time does not depend on what runs around it: the gain of any of ``configs``
    is the time saved in the ops some config puts in low precision, so those ops alone are called, each on its own
    captured input. The rest of the group runs the same in every config and would add time and noise but no gain
    (the attention group's softmax and BGEMMs, ~60% of ``self_attn``'s time on SmolLM2, when only q/k/v have a real
    low-precision kernel). Where a graph compiler fuses casts across ops (hpu): the smallest module enclosing each
    group's ops. Where the phase's Linears stream their weights from memory (``streaming``: decode), an op's time
    depends on the traffic around it, so the enclosing module, and for a one-op group the block holding it
    (o_proj: ``self_attn``; down_proj: ``mlp``; a top-level op such as lm_head alone). Measured on SmolLM2 on this
    CPU, one token: INT8 q_proj in 30 layers saved 2.20 ms timed alone, 1.23 ms between its layer's k/v/o, 0.82 ms
    in ``self_attn`` and 0.18 ± 1.24 ms in the decoder layer; INT8 o_proj 2.3 ms alone, 0.6-0.7 ms in ``self_attn``
    (at 128 tokens q_proj saved 20.8 ms alone and 20.6 ms in ``self_attn``).
    """
    if streaming:
        out = []
        for g in groups:
            e = enclosing_module(g.ops)
            out.append(e.rsplit(".", 1)[0] if e in g.ops and "." in e else e)
        return out
    if per_op_timing(backend):
        pos = [i for i in range(len(groups[0].ops)) if any(c[i] != ref for c in configs)]
        if pos:
            return [g.ops[i] for g in groups for i in pos]
    return [enclosing_module(g.ops) for g in groups]


def run_calls(names: Sequence[str], inputs: dict[str, tuple], ids: torch.Tensor | None = None,
              ) -> list[tuple[str, tuple, dict]]:
    """(module, args, kwargs) of each of ``names`` on its captured input; "" is the whole model on ``ids``."""
    return [(n, *inputs[n]) if n else ("", (ids,), {"use_cache": False}) for n in names]


def timed_runs(backend: Backend, timed_with: dict[str, list[Group]], todo: Sequence[tuple[str, Group, tuple]],
               formats: list[str], capture: Callable[[list[str]], dict[str, tuple]],
               ids: torch.Tensor | None = None, streaming: bool = False) -> tuple[dict[str, list], dict[str, str]]:
    """Per signature, the calls of one timed run (``timed_modules`` on all its configs in ``todo``, fixed for the
    whole measurement, so a config timed now and one taken from the cache were timed on the same sub-graph) and its
    name for the cache key and the record. ``capture(names)``: each named module's (args, kwargs) from one real
    forward of the phase; without ``ids`` (no whole-model run: decode) a group must have an enclosing module.
    ``streaming``: the phase's Linears stream their weights (decode; ``timed_modules``)."""
    names = {k: timed_modules(backend, v, [c for kk, _, c in todo if kk == k] or v[0].configs(formats), formats[0],
                              streaming)
             for k, v in timed_with.items()}
    if ids is None and any("" in v for v in names.values()):
        raise IpampError("a group's ops share no enclosing module: this phase's timing needs a sub-graph per group")
    inputs = capture(sorted({n for v in names.values() for n in v if n}))
    calls = {k: run_calls(v, inputs, ids) for k, v in names.items()}
    unit = {k: "+".join(dict.fromkeys(suffix(n) for n in v)) or "<model>" for k, v in names.items()}
    return calls, unit


def group_run(model: nn.Module, backend: Backend, calls: Sequence[tuple[str, tuple, dict]],
              assignment: dict[str, str]) -> Callable[[], object]:
    """One timed run: ``calls`` back to back inside ``backend.apply(assignment)`` (the reference too enters
    ``apply``, with an empty assignment)."""

    def fn() -> object:
        with torch.no_grad(), backend.apply(model, assignment) as m:
            return [m.get_submodule(e)(*a, **k) for e, a, k in calls]
    return fn


def speed_probe(fns: dict[str, Callable[[], object]], rounds: int, sync: Callable[[], None] = lambda: None,
                seed: int = 0, timer: Callable[[Callable[[], object], Callable[[], None]], float] = _timed,
                ) -> dict[str, float]:
    """Median time of each callable over ``rounds`` rounds, all of them in every round in a fresh random order: the
    reference run of every signature at one common moment (each has just been warmed by its own measurement)."""
    import random

    rng = random.Random(seed)
    keys = list(fns)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(rounds):
        rng.shuffle(keys)
        for k in keys:
            times[k].append(timer(fns[k], sync))
    return {k: statistics.median(v) for k, v in times.items() if v}


def align_to_probe(recs: Sequence[dict[str, Any]], probe_t: float) -> float:
    """Rescale a signature's records (in place) to the machine speed of the probe, if they were measured at a speed
    that differs by more than ``MAX_REF_DRIFT`` and at most ``MAX_RESCALE``; the factor used, 1.0 if none was
    needed, 0.0 if it was beyond ``MAX_RESCALE`` (left as measured, the caller notes it).

    Signatures are measured one after another, so on a shared machine one of them can run at another speed than
    the rest, and its gains then look larger or smaller than the other signatures' by that factor (peers.json at
    eb9f8dc: down_proj x1.40, lm_head x0.736). Within a signature the shared reference keeps the
    configs consistent; this makes the signatures consistent with each other and with the reference prefill timed
    right after the probe.
    """
    ts = [r["t_ref_s"] for r in recs if r.get("t_ref_s")]
    if not ts or not probe_t or not math.isfinite(probe_t):
        return 1.0
    f = probe_t / statistics.median(ts)
    if abs(f - 1) <= MAX_REF_DRIFT:
        return 1.0
    if not 1 / MAX_RESCALE <= f <= MAX_RESCALE:
        return 0.0
    for r in recs:
        _scale(r, f)
    return f


def _scale(rec: dict[str, Any], f: float) -> None:
    keys = [k for k in ("gain_s", "ci_s", "t_ref_s", "t_cfg_s") if k in rec]
    rec.setdefault("measured", {k: rec[k] for k in keys})
    rec.update({k: rec[k] * f for k in keys}, rescaled=rec.get("rescaled", 1.0) * f)


def time_group_config(model: nn.Module, backend: Backend, groups: Sequence[Group], config: Sequence[str],
                      calls: Sequence[tuple[str, tuple, dict]], reps: int, warmup: int) -> dict[str, float]:
    """``time_group_configs`` for one config, all ``reps`` rounds."""
    return time_group_configs(model, backend, groups, [config], calls, reps, warmup)[0]


def per_op_timing(backend: Backend) -> bool:
    """True where an op's prefill time does not depend on its neighbours' formats: the backend swaps ops module by
    module and runs them eagerly (``Backend.local_ops``, the base ``apply``). There a config's gain is the sum of its
    ops' gains, so only single-op configs are timed, each on its op alone (``sum_parts``): per round 2 runs of each
    op instead of one run of all the signature's changed ops per config (q/k/v: 7 configs, gate/up: 3)."""
    return backend.local_ops and type(backend).apply is Backend.apply


def sum_parts(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A multi-op config's record from its ops' single-op records (``per_op_timing``): gains and times add, the
    independent CIs add in quadrature. A part's flag is the config's, except "noisy": the sum is judged on its own
    CI (``check_quality``), as a directly timed config would be."""
    if len(parts) == 1:
        return dict(parts[0])
    out: dict[str, Any] = {k: sum(p.get(k, math.nan) for p in parts) for k in ("gain_s", "t_ref_s", "t_cfg_s")}
    out.update(ci_s=math.sqrt(sum(p["ci_s"] ** 2 for p in parts)), reps=min(p.get("reps", 0) for p in parts),
               span=parts[0].get("span"), module="+".join(str(p.get("module")) for p in parts))
    hard = [f"{p.get('module')}: {p['flag']}" for p in parts if p.get("flag") and not p["flag"].startswith(NOISY)]
    out["flag"] = hard[0] if hard else check_quality(out, None)
    return out


def precise_enough(rec: dict[str, Any]) -> bool:
    """Adaptive repetitions' stopping rule: the gain's CI is within ``PRECISE_REL`` of the gain or within
    ``PRECISE_ABS`` of the reference time (a gain of about nothing, known to be about nothing)."""
    ci, gain, t_ref = rec["ci_s"], rec["gain_s"], rec["t_ref_s"]
    return math.isfinite(ci) and (ci <= PRECISE_REL * abs(gain) or ci <= PRECISE_ABS * t_ref)


def measure_gains(model: nn.Module, partition: Partition, formats: list[str], backend: str | Backend = "cpu",
                  batch: int = 1, seq_len: int = 128, reps: int = 20, warmup: int = 1,
                  cache_path: str | Path | None = None, table_path: str | Path | None = None,
                  metrics: Sequence[str] = METRICS, device_rates: dict[str, float] | str | None = None,
                  reuse: bool = True, progress: bool = True, reference_reps: int | None = None,
                  span: int | None = None, retries: int = RETRIES, roofline: str | None = None,
                  measure_emulated: bool = False, distributed: bool = False,
                  min_reps: int | None = MIN_REPS, probe_rounds: int = PROBE_ROUNDS) -> Gains:
    """Gains record for every group × config of ``partition`` (``formats[0]`` is the reference).

    ET is measured with ``backend`` ("cpu", "cuda", "hpu") or replayed from ``table_path`` ("table");
    TT uses ``device_rates`` ({format: TFLOPS} or a device name, default per backend); M counts weight bytes;
    RT is the roofline gain on ``roofline`` (a name in ``theory.ROOFLINE_DEVICES``; default: the backend's device,
    none for cpu) at the measured prefill shapes, left out with a note where that device has no peak for a format.
    Configs that put an op in a format the backend can only emulate (quantize-dequantize around the reference
    kernel, e.g. INT8 attention BGEMMs on CPU, which no deployment path runs in INT8) are not timed but flagged,
    so no plan contains them; ``measure_emulated=True`` times them anyway (for studies of emulation cost).
    ``cache_path`` (JSON lines) makes a long run resumable: measurements already there are reused.
    ``span``: how many groups of one signature each timed run calls back to back (None: all; 1: the
    representative alone, hot in cache). The configs of one signature are timed together against one shared
    reference run per round (``time_group_configs``); ``warmup`` untimed rounds first, then up to ``reps`` rounds,
    a config leaving after ``min_reps`` once its CI is tight (``precise_enough``; None: always ``reps``).
    ``retries``: re-measurements of a config that fails ``check_quality`` (each with twice the repetitions) before
    it is flagged; 0 flags without re-measuring. A config whose reference time drifted from its siblings' is
    rescaled to their median where that is sound (``rescale_drift``), else re-measured once, then flagged.
    ``probe_rounds``: rounds of the speed probe that brings every signature to one machine speed
    (``align_to_probe``; 0: none; not run when sharded).
    ``distributed``: every rank of the initialised ``torch.distributed`` world calls this with the same arguments and
    one shared ``cache_path``; the configurations are dealt to the ranks (``distributed.shard``), each appends its
    timings to the cache, and after a barrier every rank builds the same gains table from all of them (with rank 0's
    reference prefill time; notes, ``subgraph_calls`` and machine states stay per rank); a reference-drift failure is
    flagged at once instead of re-measured (it would be re-timed on every rank).
    """
    from .backends import get_backend

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
    kinds = {o.name: o.kind for o in find_ops(model, ordered=False)}
    tied = tied_linears(model)
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

    rt_device = roofline if roofline is not None else BACKEND_DEVICE.get(be.name)
    if "RT" in metrics and rt_device is not None:
        if roofline is None and rt_device not in ROOFLINE_DEVICES:
            rt_device = None  # the backend's own device (cpu) has no datasheet roofline
        else:
            missing = [f for f in formats if f not in roofline_device(rt_device).peak_tflops]
            if missing:
                notes.append(f"RT left out: {rt_device} has no published peak for {', '.join(missing)}")
                rt_device = None
    groups: dict[str, GroupGains] = {}
    for g in partition.groups:
        cfgs = g.configs(formats)
        gg = GroupGains(g.name, [list(c) for c in cfgs], {}, {}, {})
        if "RT" in metrics and rt_device is not None:
            gg.gains["RT"] = [sum(roofline_gain(kinds[op], shapes[op], ref, f, rt_device)
                                  for op, f in zip(g.ops, c, strict=True)) for c in cfgs]
            gg.source["RT"] = f"roofline: max(FLOPs/peak, bytes/bandwidth) on {rt_device} (datasheet figures)"
        if "TT" in metrics:
            gg.gains["TT"] = [sum(theoretical_gain(kinds[op], shapes[op], ref, f, rates)
                                  for op, f in zip(g.ops, c, strict=True)) for c in cfgs]
            gg.source["TT"] = f"theoretical: MACs x rate table {rate_device!r} (rates are inputs, not measured)"
        if "M" in metrics:
            gg.gains["M"] = [sum(memory_gain(kinds[op], shapes[op], ref, f, op in tied)
                                 for op, f in zip(g.ops, c, strict=True)) for c in cfgs]
            gg.source["M"] = "weight bytes saved"
        groups[g.name] = gg

    subgraph_calls = 0
    reference_time = None
    quality: dict[str, Any] = {}
    if "ET" in metrics:
        if be.name == "table":
            for g in partition.groups:
                vals = [be.lookup(g.name, g.signature, c) if any(f != ref for f in c) else (0.0, 0.0)
                        for c in g.configs(formats)]
                groups[g.name].gains["ET"] = [v[0] for v in vals]
                groups[g.name].ci["ET"] = [v[1] for v in vals]
                groups[g.name].source["ET"] = f"replayed:{be.path}"
        else:
            subgraph_calls, reference_time, quality = _measure_et(
                model, partition, formats, be, ids, groups, reps, warmup, cache_path, reuse, progress, notes,
                reference_reps or max(5, reps // 2), kinds, span, retries, measure_emulated, distributed, min_reps,
                probe_rounds)
            notes.append("kernel paths: " + "; ".join(f"{k} -> {v}" for k, v in sorted(be.paths.items())))
    return Gains(partition.model, be.device_string(), list(formats), batch, seq_len, reference_time, groups,
                 subgraph_calls, notes, quality)


def time_signature(k: str, cs: list[tuple[str, ...]], measure: Callable[..., list[dict[str, Any]]],
                   cache: MeasurementCache, keys: dict, recs: dict, counts: dict[str, int], reps: int, retries: int,
                   affordable: Callable[[], bool] = lambda: True) -> None:
    """Configs ``cs`` of signature ``k`` from the cache, or timed together by ``measure(k, configs, reps, again)``;
    the ones failing the quality checks re-measured together with twice the repetitions (``retries`` times, while
    ``affordable()``). Results go to ``recs`` and the cache (flag included: the next run re-times what failed);
    ``counts`` gets "reused" and "remeasured". One loop for the prefill and the decode-step measurements."""
    pending = []
    for c in cs:
        rec = cache.get(keys[(k, c)])
        if rec is not None and not rec.get("flag"):
            counts["reused"] += 1
            recs[(k, c)] = rec
        else:
            pending.append(c)
    if not pending:
        return
    got = dict(zip(pending, measure(k, pending, reps, False), strict=True))
    n_reps = reps
    for _ in range(retries):
        bad = [c for c in pending if check_quality(got[c], None)]
        if not bad or not affordable():
            break
        n_reps *= 2
        counts["remeasured"] += len(bad)
        got.update(zip(bad, measure(k, bad, n_reps, True), strict=True))
    for c in pending:
        got[c]["flag"] = check_quality(got[c], None)
        cache.put(keys[(k, c)], got[c])
        recs[(k, c)] = got[c]


def check_quality(rec: dict[str, Any], ref_median: float | None) -> str:
    """"" if a measured config can be trusted, else why not.

    * noisy: the gain's CI is wider than half the gain *and* wider than ``MAX_REL_CI`` of the reference time
      (a small gain with a small CI is a reliable "about nothing"; a CI of 30 ms on a 6 ms sub-graph is not);
    * reference drift: its reference time differs from the other configs of its signature by more than
      ``MAX_REF_DRIFT`` — the machine changed speed during this measurement (on a shared CPU one {q,k} config
      was timed at t_ref 58.8 ms against 5-6 ms for its siblings, and the solver put that outlier in 30 layers);
    * non-finite or non-positive times.
    """
    t_ref, gain, ci = rec.get("t_ref_s"), rec.get("gain_s"), rec.get("ci_s")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (t_ref, gain, ci)) or t_ref <= 0:
        return "non-finite or non-positive time"
    if ci > 0.5 * abs(gain) and ci > MAX_REL_CI * t_ref:
        return f"{NOISY}: CI ±{ci * 1e3:.3g} ms on a gain of {gain * 1e3:.3g} ms (t_ref {t_ref * 1e3:.3g} ms)"
    if ref_median and abs(t_ref / ref_median - 1) > MAX_REF_DRIFT:
        return (f"reference drift: t_ref {t_ref * 1e3:.3g} ms vs {ref_median * 1e3:.3g} ms for the other configs "
                "of its signature")
    return ""


def rescale_drift(rec: dict[str, Any], ref_median: float, apply: bool = False) -> float:
    """The factor ``ref_median / t_ref`` that expresses a drifted config at its signature's median reference time,
    or 0.0 beyond ``MAX_RESCALE`` either way (such a config is re-measured or flagged instead).

    Sound because the gain was paired with reference runs of the same rounds: a machine s times slower during
    them made both t_ref and t_cfg s times longer, so the gain *fraction* gain/t_ref is what was measured, and the
    signature's median t_ref says at which speed its siblings ran. (Flagging such configs instead kept the {gate,up}
    INT8 config, the most valuable one, out of Table 1's IP-ET plans; benchmarks/results/table1.md.) ``apply``
    multiplies the record's times, gain and CI by it and keeps the measured values under ``measured``.
    """
    t = rec.get("t_ref_s")
    if not t or not ref_median or not (math.isfinite(t) and math.isfinite(ref_median)):
        return 0.0
    f = ref_median / t
    if not 1 / MAX_RESCALE <= f <= MAX_RESCALE:
        return 0.0
    if apply:
        _scale(rec, f)
    return f


def inconsistency(quality: dict[str, Any]) -> str:
    """"" if a gains record's best gains add up to less than its reference prefill, as they must; else the one
    sentence that `measure` warns with and `solve` refuses with (the numbers, the load, what to do)."""
    if not quality or quality.get("consistent", True):
        return ""
    st = quality.get("machine_end", {})
    return (f"the measured gains cannot be trusted: the best gains of all groups add up to "
            f"{quality['sum_best_gain_s'] * 1e3:.4g} ms, more than the whole reference prefill "
            f"({quality['reference_prefill_s'] * 1e3:.4g} ms); load average {st.get('load_avg_1min')} on "
            f"{st.get('cpus')} core(s) with {st.get('threads')} thread(s). Rerun `inc-ipamp measure` on a quieter "
            "machine or with --threads 1")


EMULATED = "no real kernel"


def _emulated_configs(model: nn.Module, be: Backend, representative: dict[str, Group], formats: list[str],
                      kinds: dict[str, str]) -> dict[tuple[str, tuple[str, ...]], str]:
    """(signature, config) -> why, for configs with an op the backend would only emulate.

    Decided by the module the backend really builds (its ``path``), not by a table of beliefs. Backends with their
    own ``apply`` (hpu: INC converts whole ops) are trusted to refuse what they cannot run.
    """
    if type(be).apply is not Backend.apply:
        return {}
    ref = formats[0]
    mods = dict(model.named_modules())
    out: dict[tuple[str, tuple[str, ...]], str] = {}
    for k, g in representative.items():
        for c in g.configs(formats):
            for op, f in zip(g.ops, c, strict=True):
                if f == ref:
                    continue
                kind = kinds[op]
                path = getattr(be._converted_module(mods[op], kind, f), "path", "")
                if "emulated" in path:
                    out[(k, tuple(c))] = f"{EMULATED}: {kind} in {f} is {path} on {be.name}"
                    break
    return out


def _measure_et(model: nn.Module, partition: Partition, formats: list[str], be: Backend, ids: torch.Tensor,
                groups: dict[str, GroupGains], reps: int, warmup: int, cache_path: str | Path | None,
                reuse: bool, progress: bool, notes: list[str], reference_reps: int, kinds: dict[str, str],
                span: int | None = None, retries: int = RETRIES, measure_emulated: bool = False,
                distributed: bool = False, min_reps: int | None = MIN_REPS,
                probe_rounds: int = PROBE_ROUNDS) -> tuple[int, float, dict[str, Any]]:
    """Time every config of every signature, check each measurement, re-measure what fails (module docstring).
    ``kinds``: {op: "linear" | "bgemm"}, to tell which configs the backend only emulates."""

    from ..runtime import Progress, loaded, machine_state

    state_start = machine_state()
    cache = MeasurementCache(cache_path)
    if cache.skipped:
        notes.append(f"measurement cache: skipped {cache.skipped} corrupt line(s)")
    members: dict[str, list[Group]] = {}
    for g in partition.groups:
        members.setdefault(g.signature if reuse else g.name, []).append(g)
    if span is not None and span < 1:
        raise IpampError(f"span must be >= 1 (got {span})")
    timed_with = {k: v[: span or len(v)] for k, v in members.items()}
    representative = {k: v[0] for k, v in members.items()}
    base: dict[str, Any] = dict(model=model_fingerprint(model), device=be.device_string(), batch=int(ids.shape[0]),
                                seq_len=int(ids.shape[1]), code=__version__, backend=be.version)
    ref = formats[0]
    counts = {"timed": 0, "reused": 0, "remeasured": 0, "rescaled": 0}
    todo = [(k, g, c) for k, g in representative.items() for c in g.configs(formats) if any(f != ref for f in c)]
    recs: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    keys: dict[tuple[str, tuple[str, ...]], str] = {}

    spent = {"first": 0.0, "again": 0.0}

    def measure(k: str, cs: list[tuple[str, ...]], n_reps: int, again: bool = False) -> list[dict[str, Any]]:
        """Time ``cs`` (configs of signature ``k``) together against one shared reference."""
        together = timed_with[k]
        g = rep_of[k]
        t0 = time.perf_counter()
        rs = time_group_configs(model, be, together, cs, calls[k], n_reps, warmup, min_reps=min_reps)
        spent["again" if again else "first"] += time.perf_counter() - t0
        counts["timed"] += len(together) * (max(r["reps"] for r in rs) + sum(r["reps"] for r in rs))
        return [{"group": g.name, "signature": g.signature, "config": list(c), "module": unit[k], **r}
                for c, r in zip(cs, rs, strict=True)]

    def affordable() -> bool:
        return spent["again"] <= REMEASURE_BUDGET * spent["first"]

    emulated = {} if measure_emulated else _emulated_configs(model, be, representative, formats, kinds)
    if emulated:
        notes.append(f"ET: {len(emulated)} config(s) not timed and kept out of plans: they need a kernel the "
                     f"{be.name} backend only emulates ({'; '.join(sorted(set(emulated.values())))})")
    for (k, c), why in emulated.items():
        recs[(k, c)] = {"gain_s": 0.0, "ci_s": 0.0, "t_ref_s": 0.0, "flag": why}
    todo = [(k, g, c) for k, g, c in todo if (k, c) not in emulated]
    # where ops are local (``timed_modules``) only single-op configs are timed, each on its own op (key "sig#i");
    # a config that changes several ops is the sum of its ops' records (``sum_parts``, after the probe below)
    parts: dict[tuple[str, tuple[str, ...]], list[tuple[str, tuple[str, ...]]]] = {}
    rep_of: dict[str, Group] = representative
    timed_todo = todo
    units_of: dict[str, dict[int, str]] = {}  # signature -> {op position: its single-op timing's key}
    per_op = per_op_timing(be)
    if per_op:
        singles: dict[tuple[str, tuple[str, ...]], tuple[str, Group, tuple[str, ...]]] = {}
        for k, g, c in todo:
            parts[(k, c)] = []
            for i, f in enumerate(c):
                if f == ref:
                    continue
                u, s = f"{k}#{i}", tuple(f if j == i else ref for j in range(len(c)))
                parts[(k, c)].append((u, s))
                singles[(u, s)] = (u, g, s)
                timed_with[u] = timed_with[k]
                units_of.setdefault(k, {})[i] = u
        timed_todo = list(singles.values())
        rep_of = {u: g for u, g, _ in timed_todo}
    calls, unit = timed_runs(be, {k: timed_with[k] for k in rep_of}, timed_todo, formats,
                             lambda n: capture_module_inputs(model, n, ids), ids)

    from ..distributed import rank_and_world, shard

    rank, world = rank_and_world() if distributed else (0, 1)
    for k, g, c in timed_todo:
        keys[(k, c)] = cache_key(signature=g.signature, ops=[suffix(o) for o in g.ops], config=list(c),
                                 span=len(timed_with[k]), timed=unit[k], **base)
    my_share = {(k, c) for k, _, c in shard(timed_todo, rank, world)} if world > 1 else None
    if world > 1 and cache_path is None:
        raise IpampError("a measurement sharded over ranks needs one cache_path that every rank can read and append to")

    def timed(k: str, cs: list[tuple[str, ...]]) -> None:
        time_signature(k, cs, measure, cache, keys, recs, counts, reps, retries, affordable)

    by_sig: dict[str, list[tuple[str, ...]]] = {}
    for k, _, c in timed_todo:
        if my_share is None or (k, c) in my_share:
            by_sig.setdefault(k, []).append(c)
    with Progress(sum(map(len, by_sig.values())), "measure: timing group configs", unit="config",
                  enabled=progress) as bar:
        for k, cs in by_sig.items():
            timed(k, cs)
            bar.update(len(cs))
    if my_share is not None:  # every rank's timings are in the shared cache once all ranks pass the barrier
        import torch.distributed as dist

        dist.barrier()
        cache = MeasurementCache(cache_path)
        for k, g, c in timed_todo:
            if (k, c) not in my_share:
                if keys[(k, c)] not in cache:
                    raise IpampError(f"rank {rank}: the shared cache {cache_path} lacks {g.name} {'+'.join(c)} after "
                                     "the barrier (is it on a file system every rank sees?)")
                recs[(k, c)] = cache.get(keys[(k, c)])
                counts["reused"] += 1
        retries = 0  # drift re-checks flag at once: a re-measurement would run on every rank
    # reference drift over the whole signature, now that every config is in: rescaled where the factor is moderate,
    # else re-measured once (if the budget allows) and flagged if it still drifts
    for k in rep_of:
        mine = {c: r for (kk, c), r in recs.items() if kk == k and (kk, c) not in emulated}
        if len(mine) < 3:
            continue
        med = statistics.median(r["t_ref_s"] for r in mine.values())
        drifted = [c for c, r in mine.items() if not r.get("flag") and check_quality(r, med)]
        if drifted and retries and affordable() and any(not rescale_drift(mine[c], med) for c in drifted):
            far = [c for c in drifted if not rescale_drift(mine[c], med)]
            counts["remeasured"] += len(far)
            for c, again in zip(far, measure(k, far, 2 * reps, again=True), strict=True):
                again["flag"] = check_quality(again, None)
                cache.put(keys[(k, c)], again)
                recs[(k, c)] = mine[c] = again
        # the cache keeps what was measured: rescaling and drift flags follow from the records, so a later run
        # that reuses them decides the same (and ranks sharing a cache write no line twice)
        for c in drifted:
            rec = mine[c]
            if not rec.get("flag") and check_quality(rec, med):
                rec = recs[(k, c)] = dict(rec)
                counts["rescaled"] += bool(rescale_drift(rec, med, apply=True))
                rec["flag"] = check_quality(rec, med)
    # the speed probe: every measured signature's reference run again, all at one moment, right before the
    # reference prefill; a signature measured while the machine ran at another speed is rescaled to it
    aligned: dict[str, float] = {}
    mismatch: list[str] = []
    if probe_rounds and my_share is None:  # (sharded: each rank would probe its own moment; tables must agree)
        sigs = [k for k in rep_of if any(kk == k and (kk, c) not in emulated for kk, c in recs)]
        probe = speed_probe({k: group_run(model, be, calls[k], {}) for k in sigs}, probe_rounds, be.synchronize)
        for k, t in probe.items():
            mine = [(kk, c) for kk, c in recs if kk == k and (kk, c) not in emulated and not recs[(kk, c)].get("flag")]
            for key in mine:
                recs[key] = dict(recs[key])
            f = align_to_probe([recs[key] for key in mine], t / len(timed_with[k]))
            label = rep_of[k].name + (f" {unit[k]}" if per_op else "")
            if f == 0.0:
                mismatch.append(f"{label}: reference {recs[mine[0]]['t_ref_s'] * 1e3:.3g} ms when "
                                f"measured vs {t / len(timed_with[k]) * 1e3:.3g} ms at the probe")
            elif f != 1.0:
                aligned[label] = f
        if mismatch:
            log.warning("the machine's speed changed more than %gx between measuring a signature and the end; its "
                        "gains are left as measured: %s", MAX_RESCALE, "; ".join(mismatch))
    if per_op:
        for k, g, c in todo:
            recs[(k, c)] = {"group": g.name, "signature": g.signature, "config": list(c)} | sum_parts(
                [recs[p] for p in parts[(k, c)]])
    flagged = []
    for g in partition.groups:
        k = g.signature if reuse else g.name
        rep_name = representative[k].name
        et, ci, flags = [], [], []
        for c in g.configs(formats):
            rec = recs.get((k, tuple(c))) if any(f != ref for f in c) else None
            et.append(rec["gain_s"] if rec else 0.0)
            ci.append(rec["ci_s"] if rec else 0.0)
            flags.append(rec.get("flag", "") if rec else "")
            if rec and rec.get("flag") and g.name == rep_name and (k, tuple(c)) not in emulated:
                flagged.append(f"{g.name} {'+'.join(c)}: {rec['flag']}")
        groups[g.name].gains["ET"] = et
        groups[g.name].ci["ET"] = ci
        groups[g.name].flags["ET"] = flags
        n_t = len(timed_with[k])
        how = (f", mean over {n_t} groups of its signature" if n_t > 1 else "") + (
            "" if rep_name == g.name else f", reused from {rep_name} (same signature)")
        if not per_op:
            timed_on = f"sub-graph {unit[k]}"
        elif k in units_of:
            timed_on = (f"each changed op alone ({'+'.join(unit[u] for _, u in sorted(units_of[k].items()))}), a "
                        "config changing several ops as the sum of their gains")
        else:
            timed_on = "no op (every config needs an emulated kernel)"
        groups[g.name].source["ET"] = f"measured:{be.name} on {timed_on}{how}"
    spans = sorted({len(v) for v in timed_with.values()})
    notes.append(f"ET: {len(representative)} signature(s) for {len(partition.groups)} groups, each timed over {spans} "
                 f"group(s) of its signature per run"
                 + ("; single-op configs timed on their op alone, multi-op ones summed from them" if per_op else "")
                 + f"; {counts['timed']} timed sub-graph calls (the configs of a "
                 f"signature in rounds with one shared reference run, random order, {warmup} warm-up round(s); "
                 + (f"{min_reps}-{reps} rounds, stopping once precise" if min_reps is not None else f"{reps} rounds")
                 + f"), {counts['reused']} config(s) taken from the cache, "
                 f"{counts['remeasured']} re-measurement(s) after a failed quality check, {counts['rescaled']} "
                 "drifted config(s) rescaled to their signature's median reference time"
                 + (f"; speed probe ({probe_rounds} rounds): rescaled " + ", ".join(
                     f"{n} x{f:.3g}" for n, f in aligned.items()) if aligned else "")
                 + (f"; left as measured (speed changed more than {MAX_RESCALE:g}x): " + "; ".join(mismatch)
                    if mismatch else "")
                 + ("" if affordable() else f" (re-measuring stopped at its budget of {REMEASURE_BUDGET:.0%} of the "
                                            "first measurements' time: later failures were flagged at once)"))
    ref_t = float(time_prefill(model, ids, be, {}, reps=reference_reps, warmup=1)["median_s"])
    if my_share is not None:  # one record on every rank: rank 0's reference prefill
        box = [ref_t]
        dist.broadcast_object_list(box, src=0)
        ref_t = float(box[0])
    best = 0.0
    for gg in groups.values():
        ok = [x for i, x in enumerate(gg.gains["ET"]) if gg.usable("ET", i)]
        best += max([0.0, *ok])
    state_end = machine_state()
    quality = {"machine_start": state_start, "machine_end": state_end, "flagged_configs": len(flagged),
               "flagged": flagged, "sum_best_gain_s": best, "reference_prefill_s": ref_t,
               "consistent": best < ref_t, "loaded": loaded(state_start) or loaded(state_end),
               "speed_probe_rescaled": aligned, "speed_probe_mismatch": mismatch}
    if flagged:
        log.warning("%d of %d measured configs failed the quality checks and are kept out of plans (e.g. %s); "
                    "load %.2f on %d cores with %d threads", len(flagged), len(todo), flagged[0],
                    state_end["load_avg_1min"], state_end["cpus"], state_end["threads"])
    if inconsistency(quality):
        log.warning("%s", inconsistency(quality))
    return counts["timed"], ref_t, quality
