"""IP-ET side by side with the two peer searchers, NVIDIA ModelOpt ``mtq.auto_quantize`` and AutoRound
``AutoScheme`` (issue 14, item 1), on the embedded default (SmolLM2-135M), CPU INT8 vs FP32.

Per track (``int8``: per-tensor weights, prefill; ``int8_pc``: per-channel weights, prefill; ``int8_decode``:
per-tensor weights, one decode step — where measured time is least proportional to bits on this CPU: a small INT8
Linear is *slower* than fp32 for one token, the lm_head ~6× faster, ``decode.md``):

- **IP-ET**: the package's own stages (``pipeline.stage_calibrate``/``stage_partition``/``stage_measure``) in a
  fresh output folder, then the IP at each budget of ``--betas`` (``solver.frontier`` with those β), each phase
  timed; the objective is the track's phase (``--objective decode`` measures the decode step's gains too).
- **ModelOpt**: ``mtq.auto_quantize`` (method "gradient") with the same calibration blocks, one INT8 candidate
  (per-tensor track: ``INT8_DEFAULT_CFG`` with the weight quantizer's ``axis`` set to None; per-channel track: the
  preset as shipped) plus its built-in "no quantization"; the lm_head is made searchable (the preset disables it)
  as it is in ours. Its first budget runs calibrate + score + solve; further budgets re-solve the stored scores
  (``algorithms._resolve_best_recipe``).
- **AutoScheme**: ``AutoScheme(options=[scheme, "BF16"])`` through ``AutoRound(iters=0).post_init()``; its
  calibration loader (``auto_round.auto_scheme.delta_loss.get_dataloader``) is replaced by one that yields the
  same calibration blocks. Per-tensor track: a scheme built from our ``int8`` format record (``autoscheme_fields``:
  8-bit symmetric per-tensor weights, dynamic per-tensor activations as the record defines them); per-channel
  track: its ``INT8`` preset. ModelOpt has no dynamic per-tensor INT8 activations: it keeps its static 8-bit ones.
  Its score cache goes to a fresh folder per track, so the first budget pays the scoring and later ones reuse it.

Peer budgets are matched to ours: for each IP-ET plan, the peer's bit budget is the one that puts the same number
of weight parameters in INT8 (ModelOpt: effective bits over its searchable Linears; AutoScheme: average bits over
the decoder Linears, the only ones it will quantise on a tied-embedding model).

Every plan, ours and theirs, is translated into our per-op assignment and scored the same way: held-out loss
change (``evaluate.loss_change`` on the evaluation split) and end-to-end time of the track's phase (a 1×128 prefill,
or one decode step with a real fp32 KV cache) with the cpu backend's real kernels (torch.ao dynamic INT8 Linear), all
plans of the phase and the FP32 reference interleaved in random order per round. The peers' searches do not depend
on the phase; on ``int8_decode`` they run again, at the budgets matched to IP-ET's decode plans.

    python benchmarks/bench_peers.py            # full run, writes benchmarks/results/peers.{md,json,png}
    python benchmarks/bench_peers.py --quick    # smoke run (fewer sequences, budgets and rounds)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from provenance import finish, header, provenance  # noqa: E402

RESULTS = Path(__file__).parent / "results"
#: track -> (our low-precision format, the phase every plan of the track is timed in and IP-ET maximises)
TRACK_SPEC = {"int8": ("int8", "prefill"), "int8_pc": ("int8_pc", "prefill"), "int8_decode": ("int8", "decode"),
              "fp8": ("fp8_e4m3", "prefill")}
TRACKS = ("int8", "int8_pc", "int8_decode")  # the default run (CPU); ``fp8`` needs an FP8 GPU
#: track -> (backend every plan is timed and its loss measured on, reference format); the rest: ("cpu", "fp32")
TRACK_DEVICE = {"fp8": ("cuda", "bf16")}
#: ``--peers-only``: the peers' budgets as shares of the searchable Linear parameters in the low format (no IP-ET
#: plans to match where the peers search on another machine than IP-ET; the equal-loss comparison interpolates)
DEFAULT_PEER_SHARES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.55, 0.7, 0.85, 1.0)
#: the useful range of budgets: β is the loss-RMSE budget relative to the mean loss, so (β·L̄)² is the loss MSE the
#: plan may add; 0.002-0.024 spans a perplexity change of a few tenths of a percent to ~10% on the default model
#: (at 16e3d60 and a4e67b9, β 0.0257 measured +11% perplexity; the all-INT8 plan +220%)
DEFAULT_BETAS = (0.002, 0.004, 0.008, 0.016, 0.024)
METHODS = ("IP-ET", "ModelOpt", "AutoScheme")
log = logging.getLogger("bench_peers")


# -- plan translation (pure functions; tested offline in tests/test_peers_bench.py) ----------------------------------
def modelopt_assignment(recipe: dict[str, Any], candidate_stats: dict[str, dict[str, Any]], fmt: str) -> dict[str, str]:
    """ModelOpt's chosen recipe -> our per-op assignment. One ModelOpt decision may cover several modules (q/k/v
    and gate/up are tied into one): every module of a quantised decision gets ``fmt``; "NONE" leaves them out."""
    out: dict[str, str] = {}
    for key, choice in recipe.items():
        if str(choice).upper().startswith("NONE"):
            continue
        names = candidate_stats.get(key, {}).get("module_names") or [key.removesuffix(".quant_recipe")]
        for name in names:
            out[name] = fmt
    return out


def autoscheme_assignment(layer_config: dict[str, dict[str, Any]], fmt: str, low_bits: int = 8) -> dict[str, str]:
    """AutoScheme's per-layer config -> our assignment: layers at ``low_bits`` weight bits get ``fmt``."""
    return {name: fmt for name, cfg in layer_config.items() if cfg.get("bits") == low_bits}


def bits_budget(low_params: float, total_params: float, low_bits: float = 8.0, high_bits: float = 16.0) -> float:
    """The average-bits budget at which ``low_params`` of ``total_params`` weights are in the low format."""
    frac = min(1.0, max(0.0, low_params / total_params)) if total_params > 0 else 0.0
    return high_bits - (high_bits - low_bits) * frac


def speedup_with_ci(t_ref: list[float], t_cfg: list[float]) -> dict[str, float]:
    """Median-based speedup and its 95% interval from the paired bootstrap CI of the gain (``gains.bootstrap_ci``)."""
    from inc_ipamp.gains import bootstrap_ci

    tr, tc = statistics.median(t_ref), statistics.median(t_cfg)
    gain, ci = tr - tc, bootstrap_ci(t_ref, t_cfg)
    lo, hi = tr / max(tr - (gain - ci), 1e-12), tr / max(tr - (gain + ci), 1e-12)
    return {"t_ref_s": tr, "t_cfg_s": tc, "gain_s": gain, "gain_ci_s": ci, "speedup": tr / tc,
            "speedup_lo": lo, "speedup_hi": hi}


def compare_at_equal_loss(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At each of our plans' measured loss MSE inside the peer's measured range: the peer's speedup there (linear in
    log loss between its two neighbouring plans, CI half-widths interpolated alike) and whether the difference is
    outside the two CIs combined in quadrature."""
    pts = sorted((r for r in theirs if r["measured_loss_mse"] > 0), key=lambda r: r["measured_loss_mse"])
    out = []
    for r in ours:
        x = r["measured_loss_mse"]
        if x <= 0 or len(pts) < 2 or not (pts[0]["measured_loss_mse"] <= x <= pts[-1]["measured_loss_mse"]):
            continue
        for a, b in zip(pts, pts[1:], strict=False):
            if a["measured_loss_mse"] <= x <= b["measured_loss_mse"]:
                la, lb = math.log(a["measured_loss_mse"]), math.log(b["measured_loss_mse"])
                w = 0.0 if lb == la else (math.log(x) - la) / (lb - la)
                s = a["speedup"] + w * (b["speedup"] - a["speedup"])
                ci = _half(a) + w * (_half(b) - _half(a))
                diff = r["speedup"] - s
                comb = math.hypot(ci, _half(r))
                out.append({"plan": r["plan"], "loss_mse": x, "ours": r["speedup"], "theirs": s, "diff": diff,
                            "ci": comb, "verdict": "ahead" if diff > comb else "behind" if diff < -comb else "level"})
                break
    return out


def _replicates(rows: list[dict[str, Any]], times: dict[str, list[float]], n_boot: int,
                seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per plan, its loss MSE and speedup in each of ``n_boot`` joint bootstrap replicates: one redraw of the
    evaluation sequences and one of the timing rounds per replicate, shared by every plan (both were paired)."""
    rng = np.random.default_rng(seed)
    plans = {r["plan"]: r for r in rows}
    n_seq = len(next(iter(plans.values()))["loss_changes"])
    t_ref = np.asarray(times["reference"])
    idx_n = rng.integers(0, n_seq, (n_boot, n_seq))
    idx_r = rng.integers(0, len(t_ref), (n_boot, len(t_ref)))
    ref_med = np.median(t_ref[idx_r], axis=1)
    loss = {k: (np.asarray(r["loss_changes"])[idx_n] ** 2).mean(1) for k, r in plans.items()}
    speed = {k: ref_med / np.median(np.asarray(times[k])[idx_r], axis=1) for k in plans}
    return loss, speed


def bootstrap_equal_loss(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], times: dict[str, list[float]],
                         n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """``compare_at_equal_loss`` with a 95% interval that carries both measurements' sampling noise: each bootstrap
    replicate redraws the evaluation sequences (one draw for every plan: each plan's loss MSE from its per-sequence
    ``loss_changes``) and the timing rounds (one draw for every plan: the plans were interleaved round by round,
    ``times`` per plan and "reference"), and re-does the interpolation on the replicate's numbers. At small budgets
    the loss side dominates: over 24 sequences a plan's measured loss MSE is uncertain by tens of percent, which moves
    the peer's interpolated speedup by more than the timing CIs do. "ahead"/"behind" = the interval excludes 0.
    Replicates where our plan's loss falls outside the peer's range are left out (``share``: the share kept)."""
    point = compare_at_equal_loss(ours, theirs)
    if not point:
        return []
    loss, speed = _replicates([*ours, *theirs], times, n_boot, seed)
    peer = [r["plan"] for r in theirs if r["measured_loss_mse"] > 0]
    pl = np.log(np.stack([loss[k] for k in peer], 1))  # (n_boot, peers)
    ps = np.stack([speed[k] for k in peer], 1)
    out = []
    for c in point:
        x = np.log(loss[c["plan"]])
        diffs = []
        for b in range(n_boot):
            o = np.argsort(pl[b])
            if pl[b, o[0]] <= x[b] <= pl[b, o[-1]]:
                diffs.append(speed[c["plan"]][b] - np.interp(x[b], pl[b, o], ps[b, o]))
        lo, hi = (np.percentile(diffs, [2.5, 97.5]) if diffs else (float("nan"), float("nan")))
        timing_ci = c.pop("ci")  # renamed: the interval that decides is the joint one
        out.append({**c, "timing_ci": timing_ci, "lo": float(lo), "hi": float(hi), "share": len(diffs) / n_boot,
                    "verdict": "ahead" if lo > 0 else "behind" if hi < 0 else "level"})
    return out


def dominance(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], times: dict[str, list[float]],
              n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Each peer plan against IP-ET's fastest plan whose measured loss is no larger, in every bootstrap replicate
    (the same joint redraw of evaluation sequences and timing rounds as ``bootstrap_equal_loss``). It covers what
    interpolation cannot: peer plans outside IP-ET's measured loss range, and IP-ET plans of zero loss (a budget at
    which no op gains, so IP-ET keeps the reference). "ahead" = IP-ET is faster with no more loss (interval above
    0); otherwise "inconclusive", never "behind": IP-ET's plan spent less loss, so being slower is not a loss at
    equal loss. ``share`` = the replicates in which IP-ET had a plan with no more loss."""
    if not ours or not theirs:
        return []
    loss, speed = _replicates([*ours, *theirs], times, n_boot, seed)
    mine = [r["plan"] for r in ours]
    ol, osp = np.stack([loss[k] for k in mine], 1), np.stack([speed[k] for k in mine], 1)
    out = []
    for p in theirs:
        ok = ol <= loss[p["plan"]][:, None]  # (n_boot, ours): IP-ET plans with no more loss in the replicate
        best = np.where(ok, osp, -np.inf).max(1)
        keep = ok.any(1)
        diffs = (best - speed[p["plan"]])[keep]
        pt = [r for r in ours if r["measured_loss_mse"] <= p["measured_loss_mse"]]
        if not pt:
            continue
        q = max(pt, key=lambda r: r["speedup"])
        lo, hi = (np.percentile(diffs, [2.5, 97.5]) if diffs.size else (float("nan"), float("nan")))
        out.append({"plan": p["plan"], "loss_mse": p["measured_loss_mse"], "ours_plan": q["plan"],
                    "ours_loss_mse": q["measured_loss_mse"], "ours": q["speedup"], "theirs": p["speedup"],
                    "diff": q["speedup"] - p["speedup"], "lo": float(lo), "hi": float(hi),
                    "share": float(keep.mean()), "verdict": "ahead" if lo > 0 else "inconclusive"})
    return out


def _half(r: dict[str, Any]) -> float:
    return (r["speedup_hi"] - r["speedup_lo"]) / 2


# -- the searches --------------------------------------------------------------------------------------------------
def track_device(track: str) -> tuple[str, str]:
    """(backend, reference format) of a track."""
    return TRACK_DEVICE.get(track, ("cpu", "fp32"))


def linear_params(model: torch.nn.Module) -> dict[str, int]:
    return {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def run_ipet(settings, betas: list[float]) -> tuple[list[Any], dict[str, float], dict[str, Any]]:
    """IP-ET's search as a user runs it: the package's calibrate, partition and measure stages, then the IP at each
    budget (``solver.frontier`` with those β: one persistent model, a MIP per budget, as ModelOpt re-solves its
    stored scores per budget). The objective (prefill or decode) is ``settings.objective``."""
    from inc_ipamp import pipeline
    from inc_ipamp.records import Partition, Sensitivity
    from inc_ipamp.solver import frontier

    out = Path(tempfile.mkdtemp(prefix="bench_peers_ipet_"))
    settings.save(out)
    model, tok = pipeline.load(settings)
    phases: dict[str, float] = {}
    t = time.perf_counter()
    pipeline.stage_calibrate(out, settings, model, tok)
    phases["calibrate"] = time.perf_counter() - t
    t = time.perf_counter()
    pipeline.stage_partition(out, settings, model, tok)
    phases["partition"] = time.perf_counter() - t
    t = time.perf_counter()
    gains = pipeline.stage_measure(out, settings, model, tok)
    phases["measure"] = time.perf_counter() - t
    t = time.perf_counter()
    obj_gains, dec = pipeline.objective_gains(out, settings, gains)
    plans = frontier(Sensitivity.load(out / "sensitivity.json"), Partition.load(out / "partition.json"), obj_gains,
                     metric=settings.metric, betas=list(betas), noise=settings.noise,
                     min_sqnr_db=settings.min_sqnr_db)
    phases[f"solve ({len(betas)} budgets)"] = time.perf_counter() - t
    measured = dec if dec is not None else gains
    info = {"objective": settings.objective, "distinct_plans": len(plans),
            "flagged_configs": measured.quality.get("flagged_configs"),
            "gains_reference_s": measured.reference_time_s,
            "timed_runs": gains.subgraph_calls + (dec.subgraph_calls if dec is not None else 0),
            "speed_probe_rescaled": gains.quality.get("speed_probe_rescaled"),
            "measure_notes": [n for n in measured.notes if n.startswith("ET")], "out": str(out),
            "reference_betas": [p.beta for p in plans if not p.low_precision_ops()]}
    del model
    return [p for p in plans if p.low_precision_ops()], phases, info


def modelopt_cfg(fmt: str) -> dict[str, Any]:
    """ModelOpt's candidate for one of our formats: ``INT8_DEFAULT_CFG`` (weights per tensor for ``int8``, per channel
    as shipped for ``int8_pc``) or ``FP8_DEFAULT_CFG`` (E4M3 per tensor, as our ``fp8_e4m3``); lm_head searchable."""
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG if fmt == "fp8_e4m3" else mtq.INT8_DEFAULT_CFG)
    for e in cfg["quant_cfg"]:
        if e.get("quantizer_name") == "*weight_quantizer" and fmt == "int8":
            e["cfg"]["axis"] = None  # per-tensor weights, as our int8
    cfg["quant_cfg"] = [e for e in cfg["quant_cfg"] if e.get("quantizer_name") != "*lm_head*"]
    return cfg


def run_modelopt(fmt: str, cal: list[torch.Tensor], low_params: list[int]) -> tuple[list[dict], dict[str, float]]:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.algorithms import _resolve_best_recipe

    from inc_ipamp.models import load_model

    model, _ = load_model("default")
    params = linear_params(model)
    plans, phases = [], {}
    state = None
    for i, lp in enumerate(low_params):
        t = time.perf_counter()
        if state is None:
            _, state = mtq.auto_quantize(
                model, constraints={"effective_bits": 16.0}, quantization_formats=[modelopt_cfg(fmt)],
                data_loader=cal, forward_step=lambda m, b: m(input_ids=b, labels=b), loss_func=lambda o, b: o.loss,
                num_calib_steps=len(cal), num_score_steps=len(cal), method="gradient", disabled_layers=None)
            phases["calibrate + score"] = time.perf_counter() - t
            t = time.perf_counter()
        searchable = sum(params[n] for st in state["candidate_stats"].values() for n in st["module_names"])
        bits = bits_budget(lp, searchable)
        best = _resolve_best_recipe(state, {"effective_bits": bits})
        recipe = best["recipe"] if isinstance(best, dict) and "recipe" in best else best
        phases[f"solve budget {i + 1}"] = time.perf_counter() - t
        plans.append({"budget": f"effective_bits={bits:.3f}",
                      "assignment": modelopt_assignment(recipe, state["candidate_stats"], fmt),
                      "decisions": len(state["candidate_stats"])})
    del model
    return plans, phases


def autoscheme_fields(fmt: str) -> dict[str, Any] | str:
    """AutoRound's candidate for one of our formats: its ``INT8`` preset for ``int8_pc``; for ``int8``
    the numerics of our ``int8`` format record (weights symmetric per tensor; activations dynamic per tensor,
    symmetric, or affine on the format's unsigned grid where the record says so: 0..127 is 7 bits)."""
    from inc_ipamp.formats import get_format

    if fmt == "int8_pc":
        return "INT8"
    if fmt == "fp8_e4m3":
        return "FP8_STATIC"  # E4M3 per-tensor weights and activations (static activation scales, as ModelOpt's)
    f = get_format(fmt)
    affine = bool(getattr(f, "act_affine", False))
    act_bits = int(math.log2(f.act_levels + 1)) if affine else f.bits
    return {"bits": f.bits, "group_size": 0 if f.granularity == "tensor" else -1, "sym": True, "data_type": "int",
            "act_bits": act_bits, "act_group_size": 0 if (getattr(f, "act_granularity", None) or f.granularity)
            == "tensor" else -1, "act_data_type": "int", "act_dynamic": True, "act_sym": not affine}


def autoscheme_scheme(fmt: str):
    from auto_round.schemes import QuantizationScheme

    fields = autoscheme_fields(fmt)
    return fields if isinstance(fields, str) else QuantizationScheme(**fields)


def run_autoscheme(fmt: str, cal: list[torch.Tensor], seq_len: int,
                   low_params: list[int]) -> tuple[list[dict], dict[str, float]]:
    import auto_round.auto_scheme.delta_loss as dl
    from auto_round import AutoRound, AutoScheme

    from inc_ipamp.models import load_model

    os.environ["AR_AUTO_SCHEME_CACHE"] = tempfile.mkdtemp(prefix="bench_peers_ar_cache_")
    fed: list[int] = []

    def loader(tokenizer, seqlen, dataset_name=None, seed=42, bs=8, nsamples=512, **kw):
        fed.append(len(cal))
        return [{"input_ids": b} for b in cal]

    dl.get_dataloader = loader  # AutoScheme takes a dataset *name*; this feeds our calibration blocks instead
    base, tok = load_model("default")
    params = linear_params(base)
    decoder = sum(v for n, v in params.items() if n != "lm_head")
    plans, phases = [], {}
    for i, lp in enumerate(low_params):
        bits = bits_budget(min(lp, decoder), decoder)
        model = copy.deepcopy(base)
        t = time.perf_counter()
        scheme = AutoScheme(avg_bits=bits, options=[autoscheme_scheme(fmt), "BF16"], ignore_scale_zp_bits=True,
                            nsamples=len(cal), seqlen=seq_len, device_map="cpu", dataset="ipamp-calibration")
        ar = AutoRound(model, tok, scheme=scheme, iters=0, nsamples=len(cal), seqlen=seq_len,
                       dataset="ipamp-calibration", quant_lm_head=True, device_map="cpu", enable_torch_compile=False)
        ar.post_init()
        phases[f"budget {i + 1}" + (" (score + solve)" if i == 0 else " (cached scores + solve)")] = \
            time.perf_counter() - t
        plans.append({"budget": f"avg_bits={bits:.3f}", "assignment": autoscheme_assignment(ar.layer_config, fmt),
                      "fed_our_blocks": bool(fed)})
        del ar, model
    return plans, phases


def run_peers(track: str, cal: list[torch.Tensor], seq_len: int,
              low_params: list[float]) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]], list[str]]:
    """Both peers' searches on ``track`` at the budgets that put ``low_params`` weights in its format: their plans
    (named "<method> <track> #i"), each method's search phases, and the errors of a peer that failed (reported; the
    other peer's plans still count)."""
    fmt = TRACK_SPEC[track][0]
    plans: list[dict[str, Any]] = []
    phases: dict[str, dict[str, float]] = {}
    errors: list[str] = []
    for method, search in (("ModelOpt", lambda: run_modelopt(fmt, cal, low_params)),
                           ("AutoScheme", lambda: run_autoscheme(fmt, cal, seq_len, low_params))):
        log.info("[%s] %s search at %d budgets", track, method, len(low_params))
        try:
            found, phases[method] = search()
        except Exception as e:  # a peer that fails is reported, the rest of the comparison still runs
            log.exception("%s failed", method)
            errors.append(f"{track} {method}: {type(e).__name__}: {e}")
            continue
        plans += [{"track": track, "method": method, "plan": f"{method} {track} #{i + 1}", **p}
                  for i, p in enumerate(found)]
    return plans, phases, errors


# -- scoring --------------------------------------------------------------------------------------------------------
def time_interleaved(model, plans: dict[str, dict[str, str]], rounds: int, seq_len: int, seed: int,
                     phase: str = "prefill", decode_context: int = 256, warmup: int = 1, backend: Any = "cpu",
                     reference: str = "fp32") -> dict[str, list[float]]:
    """One call per plan per round, the FP32 reference included, in a fresh random order each round; each timed
    call enters the backend's ``apply`` (as ``compare_prefill``/``compare_decode`` do, so every side pays the module
    walk). ``phase`` "prefill": a 1×``seq_len`` prefill; "decode": one decode step of one sequence after
    ``decode_context`` cached tokens (``gains.decode.decode_step``, the step IP-ET's decode gains were measured on)."""
    from inc_ipamp.gains import get_backend
    from inc_ipamp.gains.base import _prefill_fn, _timed, prime
    from inc_ipamp.gains.decode import decode_step
    from inc_ipamp.runtime import Progress

    be = get_backend(backend) if isinstance(backend, str) else backend  # an instance keeps its converted modules
    be.check()
    be.prepare(model, reference)
    names = ["reference", *plans]
    assign = {"reference": {}, **plans}
    if phase == "decode":
        run = decode_step(model, 1, decode_context, seed, be.device())
    else:
        ids = torch.randint(0, model.config.vocab_size, (1, seq_len),
                            generator=torch.Generator().manual_seed(seed)).to(be.device())

        def run(m):
            return _prefill_fn(m, ids)()

    def call(name: str):
        def fn():
            with be.apply(model, assign[name]) as m:
                return run(m)
        return fn

    for name in names:
        prime(be, model, assign[name])
        for _ in range(warmup):
            call(name)()
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(seed)
    bar = Progress(rounds, f"timing {len(names)} plans interleaved ({phase})", unit="round")
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            times[name].append(_timed(call(name), be.synchronize))
        bar.update()
    bar.close()
    return times


# -- report ---------------------------------------------------------------------------------------------------------
def plot(rows: list[dict[str, Any]], path: Path, tracks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tracks), figsize=(6 * len(tracks), 4.5), squeeze=False)
    style = {"IP-ET": ("C0", "o"), "ModelOpt": ("C1", "s"), "AutoScheme": ("C2", "^")}
    for ax, track in zip(axes[0], tracks, strict=True):
        for m in METHODS:
            rs = sorted((r for r in rows if r["track"] == track and r["method"] == m),
                        key=lambda r: r["measured_loss_mse"])
            if not rs:
                continue
            x = [max(r["measured_loss_mse"], 1e-9) for r in rs]
            y = [r["speedup"] for r in rs]
            err = [[r["speedup"] - r["speedup_lo"] for r in rs], [r["speedup_hi"] - r["speedup"] for r in rs]]
            c, mk = style[m]
            ax.errorbar(x, y, yerr=err, color=c, marker=mk, capsize=3, label=m, linestyle="-", alpha=0.85)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("measured held-out loss MSE (log)")
        ax.set_ylabel(f"measured {TRACK_SPEC[track][1]} speedup vs {track_device(track)[1]} (95% CI)")
        ax.set_title(f"track {track}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def search_ratios(res: dict[str, Any]) -> dict[str, float]:
    """IP-ET's total search wall time over ModelOpt's, per track where both searches ran."""
    return {t: sum(res["search"][t]["IP-ET"].values()) / sum(res["search"][t]["ModelOpt"].values())
            for t in res["tracks"] if res["search"][t].get("ModelOpt") and res["search"][t].get("IP-ET")}


def verdicts(res: dict[str, Any], track: str, peer: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The equal-loss comparisons with ``peer`` on ``track`` (both directions pooled) and how many are ahead, level
    and behind."""
    cs = [c for c in res["equal_loss"] + res["equal_loss_peer_points"] if c["track"] == track and c["peer"] == peer]
    covered = {c["plan"] for c in cs}  # peer plans the interpolation compared; dominance adds the rest
    cs += [c for c in res.get("dominance", []) if c["track"] == track and c["peer"] == peer
           and c["plan"] not in covered]
    return cs, {v: sum(c["verdict"] == v or (v == "level" and c["verdict"] == "inconclusive") for c in cs)
                for v in ("ahead", "level", "behind")}


def goals(res: dict[str, Any]) -> list[str]:
    """Issue 14's goals 2 and 3, judged from this run's numbers alone: every IP-ET budget is in the useful range
    (``--betas``), so goal 2 asks for every comparison with ModelOpt on a track to be "ahead" (outside the CIs) on
    at least one track and none "behind" on any; goal 3 for IP-ET's search ≤ 1.5× ModelOpt's on each track."""
    out = ["## Issue 14's goals in this run", ""]
    ahead_tracks, behind = [], []
    for track in res["tracks"]:
        cs, n = verdicts(res, track, "ModelOpt")
        if cs and n["ahead"] == len(cs):
            ahead_tracks.append(track)
        if n["behind"]:
            behind.append(track)
    met2 = bool(ahead_tracks) and not behind
    out.append(f"- Goal 2 (strictly ahead of ModelOpt at equal measured loss over the useful range on at least one "
               f"track, never behind on any): **{'met' if met2 else 'not met'}** — ahead at every comparison on: "
               f"{', '.join(ahead_tracks) or 'no track'}; behind at some comparison on: "
               f"{', '.join(behind) or 'no track'}.")
    ratios = search_ratios(res)
    if not ratios:
        out.append("- Goal 3 (IP-ET search ≤ 1.5× ModelOpt's, same machine, same run): not judged in this run (the "
                   "peers searched on another machine).")
        return out
    met3 = all(r <= 1.5 for r in ratios.values())
    out.append(f"- Goal 3 (IP-ET search ≤ 1.5× ModelOpt's, same machine, same run): **{'met' if met3 else 'not met'}** "
               "— " + ", ".join(f"{t} {r:.2f}×" for t, r in ratios.items()) + ".")
    return out


def write_md(res: dict[str, Any], path: Path) -> None:
    s = res["settings"]
    ref = res.get("reference_format", "fp32")
    low = "/".join(sorted({TRACK_SPEC[t][0] for t in res["tracks"]}))
    elsewhere = res.get("peers_searched_elsewhere")
    md = [f"# IP-ET vs ModelOpt auto_quantize vs AutoRound AutoScheme (SmolLM2-135M, {res.get('device', 'cpu')} "
          f"{low} vs {ref})", "", *header(res["provenance"]), "",
          *([f"- Plans timed and their loss measured with the {res['device']} backend's real kernels: "
             f"{res.get('loss_numerics', '')}."] if res.get("device", "cpu") != "cpu" else []),
          *([f"- The peers searched on another machine (`--peers-only`, {elsewhere['file']}): "
             f"{header(elsewhere['provenance'])[0]} Their budgets: shares {', '.join(map(str, elsewhere['shares']))} "
             "of the Linear weight parameters in the low format (not matched to IP-ET's plans); their search "
             "times below are that machine's and are not compared with IP-ET's."] if elsewhere else []),
          *([f"- inc_ipamp was imported from {res['inc_ipamp_from']}, not this checkout."]
            if res.get("inc_ipamp_from") else []),
          f"- Versions: torch {res['versions']['torch']}, transformers {res['versions']['transformers']}, "
          f"nvidia-modelopt {res['versions']['modelopt']}, auto-round {res['versions']['auto_round']}.",
          "- Torch threads chosen by `runtime.set_threads` from "
          + ("--threads" if s["threads_given"] else "the free cores") + f" ({s['threads']}).",
          f"- Calibration (all methods, the same blocks): {s['n_calib']}×{s['seq_len']} tokens of the calibration "
          f"split; held-out loss: {s['n_eval']}×{s['seq_len']} tokens of the evaluation split ({res['eval_data']}), "
          f"per-sequence changes kept for the bootstrap; the loss pass (not timed) on {s.get('loss_threads', 1)} "
          "thread(s).",
          f"- IP-ET budgets β = {', '.join(f'{b:g}' for b in s['betas'])} (loss-RMSE budget relative to the mean "
          "loss)" + ("." if elsewhere else "; each peer gets, per IP-ET plan, the bit budget that puts the same weight "
                     "parameters in INT8."),
          *[f"- Timing, {ph} tracks ({', '.join(t for t in res['tracks'] if TRACK_SPEC[t][1] == ph)}): "
            + (f"prefill 1×{s['gain_seq_len']} tokens" if ph == "prefill" else
               f"one decode step of 1 sequence after {s['decode_context']} cached tokens (fp32 KV cache)")
            + f", {tm['rounds']} rounds, {len(tm['plans'])} plans + {ref} reference interleaved in random order per "
            f"round; speedup = median T({ref}) / median T(plan), 95% CI from the paired bootstrap of the gain. "
            f"Reference median {tm['reference_median_s'] * 1e3:.1f} ms; load average {tm['load_start']} → "
            f"{tm['load_end']}." for ph, tm in res["timing"].items()],
          f"- Reference held-out loss {res['reference_loss']:.4f} (perplexity {math.exp(res['reference_loss']):.2f}).",
          *[f"- Search failed: {e}" for e in res.get("errors", [])],
          *([f"- Comparisons recomputed from this run's saved measurements by `{res['rescored']['command']}` at "
             f"commit {res['rescored']['commit']}" + (" (with uncommitted changes)" if res['rescored'][
                 'uncommitted_changes'] else "") + "; nothing was measured again."] if res.get("rescored") else []),
          *[f"- Noise floor: {name} changes no op, so it is the reference program (speedup 1 by identity in the "
            f"comparisons); timed apart, interleaved like a plan, it measured {r['speedup']:.3f} "
            f"[{r['speedup_lo']:.3f}, {r['speedup_hi']:.3f}] against the reference: what two runs of one program "
            "differ by here." for name, r in res.get("noise_floor", {}).items()],
          "", "## Search wall time", "", "| track | method | total s | phases (s) |", "|---|---|---|---|"]
    for track in res["tracks"]:
        for m in METHODS:
            ph = res["search"][track].get(m) or (elsewhere or {}).get("search", {}).get(track, {}).get(m)
            if ph:
                md.append(f"| {track} | {m} | {sum(ph.values()):.1f} | "
                          + ", ".join(f"{k} {v:.1f}" for k, v in ph.items()) + " |")
    md += ["", "Ratio IP-ET / ModelOpt total search time: "
           + (", ".join(f"{t} {r:.2f}×" for t, r in search_ratios(res).items()) or "not compared (the peers searched "
              "on another machine)") + ".", ""]
    md += ["## Plans", "", "Low-precision ops are counted in our op list (271 ops: 210 decoder Linears, 60 attention "
           "BGEMMs, lm_head); a ModelOpt decision on q/k/v or gate/up counts as 3 or 2 ops. Speedup is of the "
           "track's phase (prefill, or the decode step on `int8_decode`).", "",
           f"| track | method | budget | {low} ops | of which down_proj | lm_head | {low} weight params | measured "
           "speedup [95% CI] | measured loss MSE | IP-ET's predicted loss MSE | mean loss shift | perplexity |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["plans"]:
        pred = f"{r['predicted_loss_mse']:.3g}" if r.get("predicted_loss_mse") is not None else "—"
        md.append(f"| {r['track']} | {r['method']} | {r['budget']} | {r['n_low']} | {r['n_down_proj']} | "
                  f"{TRACK_SPEC[r['track']][0] if r['lm_head'] else ref} | {r['low_params'] / 1e6:.1f} M | "
                  f"{r['speedup']:.3f} "
                  f"[{r['speedup_lo']:.3f}, {r['speedup_hi']:.3f}] | {r['measured_loss_mse']:.3g} | {pred} | "
                  f"{r['measured_loss_shift']:+.4f} | {r['perplexity']:.2f} |")
    md += ["", "## At equal measured loss", "",
           "Each IP-ET plan whose measured loss lies inside a peer's measured range, against the peer's speedup "
           "interpolated there (linear in log loss between its neighbouring plans). The 95% interval of the "
           "difference is a joint bootstrap (2000 replicates) over the evaluation sequences and the timing rounds, "
           "both paired across plans, through the interpolation (`bootstrap_equal_loss`); ahead/behind = the "
           "interval excludes 0. \"± timing\" is the timing CIs alone (combined in quadrature), for comparison: "
           "the difference between the two is the held-out loss measurement's share of the uncertainty.", "",
           "| track | peer | IP-ET plan | loss MSE | IP-ET speedup | peer speedup | difference [95% CI] | ± timing | "
           "verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for c in res["equal_loss"]:
        md.append(f"| {c['track']} | {c['peer']} | {c['plan']} | {c['loss_mse']:.3g} | {c['ours']:.3f} | "
                  f"{c['theirs']:.3f} | {c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}] | {c['timing_ci']:.3f} | "
                  f"{c['verdict']} |")
    md += ["", "The other direction: each peer plan whose measured loss lies inside IP-ET's measured range, against "
           "IP-ET's interpolated speedup there (verdict from IP-ET's side).", "",
           "| track | peer | peer plan | loss MSE | IP-ET speedup (interpolated) | peer speedup | "
           "difference [95% CI] | ± timing | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for c in res["equal_loss_peer_points"]:
        md.append(f"| {c['track']} | {c['peer']} | {c['plan']} | {c['loss_mse']:.3g} | {c['ours']:.3f} | "
                  f"{c['theirs']:.3f} | {c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}] | {c['timing_ci']:.3f} | "
                  f"{c['verdict']} |")
    md += ["", "Dominance: each peer plan against IP-ET's fastest plan with no more measured loss (the zero-loss "
           "reference plan included where some budget gave it), same joint bootstrap; it adds the peer plans the "
           "interpolation cannot reach. \"ahead\" = IP-ET faster with no more loss; otherwise \"inconclusive\" (IP-ET "
           "spent less loss).", "",
           "| track | peer | peer plan | peer loss MSE | peer speedup | IP-ET plan | its loss MSE | IP-ET speedup | "
           "difference [95% CI] | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in res.get("dominance", []):
        md.append(f"| {c['track']} | {c['peer']} | {c['plan']} | {c['loss_mse']:.3g} | {c['theirs']:.3f} | "
                  f"{c['ours_plan']} | {c['ours_loss_mse']:.3g} | {c['ours']:.3f} | {c['diff']:+.3f} "
                  f"[{c['lo']:+.3f}, {c['hi']:+.3f}] | {c['verdict']} |")
    md += ["", "Summary (IP-ET minus peer speedup at equal measured loss, both directions pooled, plus the dominance "
           "rows of peer plans the interpolation did not reach, inconclusive counted as level):", ""]
    for track in res["tracks"]:
        for peer in METHODS[1:]:
            cs, n = verdicts(res, track, peer)
            if not cs:
                md.append(f"- {track} vs {peer}: the two methods' measured loss ranges do not overlap.")
                continue
            md.append(f"- {track} vs {peer}: {len(cs)} comparisons, IP-ET {n['ahead']} ahead, {n['level']} level "
                      f"(interval includes 0), {n['behind']} behind; mean difference "
                      f"{statistics.mean(c['diff'] for c in cs):+.3f}× speedup.")
    md += ["", *goals(res), "", f"![speed vs loss]({path.with_suffix('.png').name})", ""]
    path.write_text("\n".join(md) + "\n")


# -- peers searched on another machine --------------------------------------------------------------------------------
def blocks_digest(blocks: list[torch.Tensor]) -> str:
    """Content hash of the calibration token blocks: peers' plans are only comparable when made from the same ones."""
    import hashlib

    h = hashlib.sha256()
    for b in blocks:
        h.update(b.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def write_peer_plans(path: Path, res: dict[str, Any], tracks: list[str], cal: list[torch.Tensor], cal_digest: str,
                     params: dict[str, int], shares: list[float]) -> None:
    """``--peers-only``: the peers' searches at ``shares`` of the Linear weights in the low format, with their search
    times and this machine's provenance, for ``--peer-plans`` on the machine that scores them."""
    out = {"provenance": res["provenance"], "versions": res["versions"], "calibration_digest": cal_digest,
           "settings": res["settings"], "shares": shares, "search": {t: {} for t in tracks}, "plans": [],
           "errors": []}
    total = sum(params.values())
    for track in tracks:
        found, out["search"][track], errors = run_peers(track, cal, len(cal[0][0]), [sh * total for sh in shares])
        out["plans"] += found
        out["errors"] += errors
    finish(out["provenance"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"{len(out['plans'])} peer plans -> {path}; errors: {out['errors'] or 'none'}")


def load_peer_plans(path: Path, tracks: list[str], cal_digest: str, res: dict[str, Any]) -> dict[str, Any]:
    """``--peer-plans``: a ``--peers-only`` file, refused unless made from the same calibration blocks; its search
    times and provenance go into ``res`` (``peers_searched_elsewhere``), not into the search-time comparison."""
    d = json.loads(path.read_text())
    if d.get("calibration_digest") != cal_digest:
        raise SystemExit(f"{path} was searched on other calibration blocks ({d.get('calibration_digest')} vs "
                         f"{cal_digest} here): give the same --data, --n-calib, --seq-len")
    missing = [t for t in tracks if not any(p["track"] == t for p in d["plans"])]
    if missing:
        raise SystemExit(f"{path} has no peer plans for track(s) {', '.join(missing)}")
    res["peers_searched_elsewhere"] = {"file": str(path), "provenance": d["provenance"], "versions": d["versions"],
                                       "search": d["search"], "shares": d["shares"], "errors": d["errors"]}
    res["versions"].update({k: v for k, v in d["versions"].items() if k in ("modelopt", "auto_round")})
    res.setdefault("errors", []).extend(d["errors"])
    return d


# -- main -----------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 4+4 sequences of 128 tokens, 2 budgets, "
                    "5 rounds, reps 3")
    ap.add_argument("--tracks", default=",".join(TRACKS))
    ap.add_argument("--betas", default=",".join(map(str, DEFAULT_BETAS)),
                    help="IP-ET's budgets (loss RMSE relative to the mean loss); the peers' budgets are matched to the "
                    "plans these give")
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--n-eval", type=int, default=48,
                    help="held-out sequences; at 24 the loss measurement's noise alone spanned ±0.05× speedup in the "
                    "equal-loss comparison at the small budgets")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--gain-seq-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10, help="IP-ET's measure repetitions")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved prefill timing rounds")
    ap.add_argument("--decode-rounds", type=int, default=100, help="interleaved decode-step timing rounds")
    ap.add_argument("--decode-context", type=int, default=256, help="cached tokens before the timed decode step")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--loss-threads", type=int, default=None,
                    help="torch threads for the held-out loss pass, which is not timed (default: the cores free when "
                    "the run starts; by the loss pass this run's own load would count)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="text file for calibration and held-out loss (default: the embedded "
                    "Wikipedia sample; the same documents written to a file give the same blocks)")
    ap.add_argument("--peers-only", metavar="JSON", help="run only the peers' searches (at --peer-shares) and write "
                    "their plans here, for scoring on a machine where they cannot run (the fp8 track's GPU)")
    ap.add_argument("--peer-plans", metavar="JSON", help="the peers' plans from a --peers-only run instead of "
                    "searching here; their search times are then not compared with IP-ET's (another machine)")
    ap.add_argument("--peer-shares", default=",".join(map(str, DEFAULT_PEER_SHARES)),
                    help="--peers-only budgets: shares of the Linear weight parameters in the low format")
    ap.add_argument("--backend", help="time and score on this gain backend instead of the track's own (e.g. "
                    "cuda-on-cpu: the fp8 track's code on CPU, for a rehearsal without a GPU)")
    ap.add_argument("--rescore", metavar="JSON", help="recompute the comparisons and the report from a run's saved "
                    "JSON (its measured times and per-sequence losses) with this code; nothing is measured")
    ap.add_argument("--out", default=str(RESULTS / "peers"))
    a = ap.parse_args()
    if a.rescore:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        rescore(Path(a.rescore), Path(a.out), a.seed)
        return
    if a.peers_only and a.peer_plans:
        ap.error("--peers-only writes the peers' plans and --peer-plans reads them: give one")
    if a.quick:
        a.betas, a.n_calib, a.n_eval, a.seq_len, a.reps, a.rounds, a.decode_rounds = "0.004,0.016", 4, 4, 128, 3, 5, 5
        if a.out == str(RESULTS / "peers"):
            a.out = str(Path(tempfile.gettempdir()) / "peers_quick")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from inc_ipamp import pipeline
    from inc_ipamp.evaluate import loss_change, sequence_losses
    from inc_ipamp.runtime import free_cores, machine_state, set_threads

    loss_threads_default = free_cores()
    threads = set_threads(a.threads)
    prov = provenance(__file__)  # after set_threads: it records the thread count
    tracks = [t for t in a.tracks.split(",") if t]
    unknown = [t for t in tracks if t not in TRACK_SPEC]
    if unknown:
        ap.error(f"unknown track {unknown[0]!r}; tracks: {', '.join(TRACK_SPEC)}")
    if len({track_device(t) for t in tracks}) > 1:
        ap.error("tracks on different devices run separately: " + ", ".join(f"{t} on {track_device(t)[0]}"
                                                                            for t in tracks))
    device, reference = track_device(tracks[0])
    if a.backend:
        device, reference = a.backend, pipeline.DEVICE_FORMATS[a.backend][0]
    betas = [float(b) for b in a.betas.split(",") if b]
    import inc_ipamp

    pkg = Path(inc_ipamp.__file__).resolve().parents[1]
    res: dict[str, Any] = {
        "provenance": prov,  # the editable install may point elsewhere: say which code ran
        "inc_ipamp_from": str(pkg) if pkg != Path(__file__).resolve().parents[1] else None, "tracks": tracks,
        "device": device, "reference_format": reference, "search": {t: {} for t in tracks},
        "settings": {"n_calib": a.n_calib, "n_eval": a.n_eval, "seq_len": a.seq_len, "gain_seq_len": a.gain_seq_len,
                     "reps": a.reps, "rounds": a.rounds, "decode_rounds": a.decode_rounds,
                     "decode_context": a.decode_context, "betas": betas, "threads": threads,
                     "threads_given": a.threads is not None, "seed": a.seed}}
    import transformers

    res["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    if not a.peer_plans:
        import auto_round
        import modelopt

        res["versions"].update(modelopt=modelopt.__version__, auto_round=auto_round.__version__)
    base = pipeline.RunSettings(n_calib=a.n_calib, n_eval=a.n_eval, seq_len=a.seq_len, gain_seq_len=a.gain_seq_len,
                                reps=a.reps, threads=threads, seed=a.seed, data=a.data)
    model, tok = pipeline.load(base)
    cal = [b if b.dim() == 2 else b[None] for b in pipeline.blocks(tok, base, "calibration")]
    cal_digest = blocks_digest(cal)
    if a.peers_only:
        write_peer_plans(Path(a.peers_only), res, tracks, cal, cal_digest, linear_params(model),
                         [float(x) for x in a.peer_shares.split(",") if x])
        return
    imported = load_peer_plans(Path(a.peer_plans), tracks, cal_digest, res) if a.peer_plans else None
    ev_blocks = pipeline.blocks(tok, base, "evaluation")
    res["eval_data"] = f"{ev_blocks.source}, {ev_blocks.split}"
    ev = list(ev_blocks)
    params = linear_params(model)
    plans: list[dict[str, Any]] = []
    for track in tracks:
        fmt, phase = TRACK_SPEC[track]
        settings = copy.deepcopy(base)
        settings.device = device
        settings.formats = [reference, fmt]
        settings.objective = phase
        settings.decode_context = a.decode_context
        log.info("[%s] IP-ET search", track)
        ours, phases, info = run_ipet(settings, betas)
        res["search"][track]["IP-ET"] = phases
        res.setdefault("ipet_info", {})[track] = info
        low = []
        for i, p in enumerate(ours):
            asg = {op: f for op, f in p.assignment.items() if f != reference}
            low.append(sum(params.get(op, 0) for op in asg))
            plans.append({"track": track, "method": "IP-ET", "plan": f"IP-ET {track} #{i + 1}",
                          "budget": f"beta={p.beta:.3g}", "assignment": asg,
                          "predicted_loss_mse": p.predicted_loss_mse, "predicted_gain_s": p.predicted_gain})
        if info["reference_betas"]:  # budgets at which no op gains: IP-ET's plan is the reference, timed as a plan
            plans.append({"track": track, "method": "IP-ET", "plan": f"IP-ET {track} reference",
                          "budget": "beta=" + ",".join(f"{b:.3g}" for b in info["reference_betas"]),
                          "assignment": {}, "predicted_loss_mse": 0.0, "predicted_gain_s": 0.0})
        if imported is not None:
            plans += [p for p in imported["plans"] if p["track"] == track]
            continue
        found, peer_phases, errors = run_peers(track, cal, a.seq_len, low)
        plans += found
        res["search"][track].update(peer_phases)
        if errors:
            res.setdefault("errors", []).extend(errors)

    loss_threads = set_threads(a.loss_threads or loss_threads_default)  # untimed: every core free at the start
    res["settings"]["loss_threads"] = loss_threads
    log.info("held-out loss of %d plans on %d sequences, %d threads", len(plans), len(ev), loss_threads)
    apply = None  # CPU tracks: fake quantisation (the kernels' numerics, bit-identical: tests/test_numerics.py)
    timing_backend: Any = device
    if device != "cpu":  # an accelerator: the backend's real kernels in its reference format, as they are timed
        from inc_ipamp.gains import get_backend

        be = get_backend(device)
        be.check()
        be.prepare(model, reference)
        apply, timing_backend = be.apply, be  # the timing reuses the modules the loss pass converted
        res["loss_numerics"] = f"{be.name} backend kernels ({be.device_string()}), reference {reference}"
    ref_losses = sequence_losses(model, ev)
    res["reference_loss"] = float(ref_losses.mean())
    seen: dict[tuple, dict[str, float]] = {}
    for p in plans:
        key = tuple(sorted(p["assignment"].items()))
        if key not in seen:
            seen[key] = loss_change(model, ev, p["assignment"], ref_losses, apply=apply, per_sequence=True)
        p.update(seen[key])
        p["n_low"] = len(p["assignment"])
        p["n_down_proj"] = sum(op.endswith("down_proj") for op in p["assignment"])
        p["lm_head"] = "lm_head" in p["assignment"]
        p["low_params"] = sum(params.get(op, 0) for op in p["assignment"])

    set_threads(threads)  # back to the timing's threads
    res["timing"] = {}
    for phase in dict.fromkeys(TRACK_SPEC[t][1] for t in tracks):
        rounds = a.decode_rounds if phase == "decode" else a.rounds
        mine = [p for p in plans if TRACK_SPEC[p["track"]][1] == phase]
        log.info("interleaved %s timing of %d plans, %d rounds", phase, len(mine), rounds)
        load_t0 = machine_state()["load_avg_1min"]
        times = time_interleaved(model, {p["plan"]: p["assignment"] for p in mine}, rounds, a.gain_seq_len, a.seed,
                                 phase, a.decode_context, backend=timing_backend, reference=reference)
        res["timing"][phase] = {"rounds": rounds, "plans": [p["plan"] for p in mine], "load_start": load_t0,
                                "load_end": machine_state()["load_avg_1min"],
                                "reference_median_s": statistics.median(times["reference"]), "times_s": times}
    res["plans"] = plans
    finish(prov)
    compare(res, a.seed)
    write_all(res, Path(a.out))


def compare(res: dict[str, Any], seed: int) -> None:
    """Speedups and every equal-loss comparison from the measured times and per-sequence losses in ``res``.

    A plan that changes no op (IP-ET's answer at a budget where nothing gains) is the reference program itself: its
    times are the reference's, so its speedup is 1 by identity. It was also timed apart, interleaved like any plan;
    that speedup (``noise_floor``) is what two runs of one program differ by on this machine, and is reported."""
    res["noise_floor"] = {}
    for phase, tm in res["timing"].items():
        times = tm["times_s"]
        for p in res["plans"]:
            if TRACK_SPEC[p["track"]][1] != phase:
                continue
            if not p["assignment"] and p["plan"] in times:
                res["noise_floor"][p["plan"]] = speedup_with_ci(times["reference"], times[p["plan"]])
                tm.setdefault("times_s_timed_apart", {})[p["plan"]] = times[p["plan"]]
                times[p["plan"]] = times["reference"]
            p.update(speedup_with_ci(times["reference"], times[p["plan"]]))
    res["equal_loss"], res["equal_loss_peer_points"], res["dominance"] = [], [], []
    for track in res["tracks"]:
        ours = [p for p in res["plans"] if p["track"] == track and p["method"] == "IP-ET"]
        for peer in METHODS[1:]:
            theirs = [p for p in res["plans"] if p["track"] == track and p["method"] == peer]
            times = res["timing"][TRACK_SPEC[track][1]]["times_s"]
            res["equal_loss"] += [{"track": track, "peer": peer, **c}
                                  for c in bootstrap_equal_loss(ours, theirs, times, seed=seed)]
            # the other direction: each peer plan inside IP-ET's measured range against IP-ET's interpolated curve
            # (verdict from IP-ET's side: "ahead" = IP-ET's curve is above the peer's plan)
            res["equal_loss_peer_points"] += [
                {"track": track, "peer": peer, **c, "diff": -c["diff"], "ours": c["theirs"], "theirs": c["ours"],
                 "lo": -c["hi"], "hi": -c["lo"],
                 "verdict": {"ahead": "behind", "behind": "ahead"}.get(c["verdict"], c["verdict"])}
                for c in bootstrap_equal_loss(theirs, ours, times, seed=seed)]
            res["dominance"] += [{"track": track, "peer": peer, **c}
                                 for c in dominance(ours, theirs, times, seed=seed)]


def write_all(res: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    plot(res["plans"], out.with_suffix(".png"), res["tracks"])
    write_md(res, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


def rescore(path: Path, out: Path, seed: int) -> None:
    """``--rescore``: the comparisons recomputed by this code from a run's saved measurements (times, per-sequence
    losses), nothing measured again; the run's provenance stays, this command's is added as ``rescored``."""
    res = json.loads(path.read_text())
    for tm in res["timing"].values():  # the times as the run measured them
        tm["times_s"].update(tm.pop("times_s_timed_apart", {}))
    res["rescored"] = finish(provenance(__file__))
    res["rescored"]["from"] = str(path)
    compare(res, seed)
    write_all(res, out)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
