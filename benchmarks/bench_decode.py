"""Issue 17's validation: decode-step (TPOT) gains and the decode / mix objectives on SmolLM2-135M, this CPU.

1. Kernel study: which real low-precision Linear is fastest for one new token here — fp32, torch.ao dynamic INT8
   (fbgemm, what prefill uses), ``aten._weight_int8pack_mm`` int8 weight-only, torchao's int8 weight-only — on every
   Linear shape of the model at the decode batch, timed round-robin (median of ``--kernel-reps``).
2. Σ group gains vs end-to-end decode step: whole-model configurations (random mixes of the usable group
   configurations, and structured ones: one Linear family in INT8 in every layer, and unions), predicted from the
   decode gains record, measured end to end with a real KV cache (``compare_decode``, interleaved).
3. Plans at equal budget: IP with the prefill, decode and mix objectives, Random (several seeds) and Prefix (the
   greedy baselines, on the decode record's allowed configs), each measured for its decode-step speedup and its
   prefill speedup with the real kernels (all plans of a budget in rotated rounds), and its held-out loss MSE.
4. KV cache in FP8-E4M3: the loss predicted from the BGEMMs' b-operand sums (``kvcache.kv_loss``) vs the loss MSE
   measured on held-out text with K and V rounded as the attention reads them (per-call scale, as the sums assume,
   and INC's static calibration-max scale); and whether a low-precision KV cache is faster on this CPU
   (transformers' ``QuantizedCache("fp8")`` vs its fp32 ``DynamicCache``, one decode step, interleaved).

The pipeline's own stages make the records in ``--work`` (calibrate, partition, measure with ``--objective mix``, so
gains.json and gains_decode.json), so an interrupted run resumes from the measurement cache.

    python benchmarks/bench_decode.py                     # ~15-25 min on 2 shared cores, 1 thread
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

from inc_ipamp import pipeline
from inc_ipamp.apply.fake import fake_quant_kv
from inc_ipamp.apply.kernels import dynamic_int8_linear
from inc_ipamp.baselines import baseline
from inc_ipamp.evaluate import loss_change, sequence_losses
from inc_ipamp.gains import compare_prefill, get_backend
from inc_ipamp.gains.base import gain_stats
from inc_ipamp.gains.decode import compare_decode, decode_step
from inc_ipamp.kvcache import kv_loss, static_scales
from inc_ipamp.records import Gains, Partition, Plan, Sensitivity
from inc_ipamp.runtime import machine_state, set_threads
from inc_ipamp.solver import mix_gains, plan_gain, solve, speedup_of

sys.path.insert(0, str(Path(__file__).parent))
from provenance import header, provenance  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- 1. kernels -------------------------------------------------------------------------------------------------------
class WeightOnlyInt8(torch.nn.Module):
    """``aten._weight_int8pack_mm``: int8 weights with per-output-channel scales, fp32 activations."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        s = (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        self.q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.s = s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shp = x.shape
        return torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shp[-1]), self.q, self.s).reshape(*shp[:-1], -1)


def torchao_int8_weight_only(lin: torch.nn.Linear) -> torch.nn.Module | str:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here", said in the table
        return f"not importable: {type(e).__name__}"
    m = torch.nn.Sequential(torch.nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None))
    m[0].load_state_dict(lin.state_dict())
    quantize_(m, Int8WeightOnlyConfig())
    return m


def kernel_study(model, batch: int, reps: int) -> list[dict[str, Any]]:
    shapes: dict[tuple[int, int], str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            shapes.setdefault((mod.in_features, mod.out_features), name)
    rows = []
    for (d_in, d_out), name in shapes.items():
        lin = dict(model.named_modules())[name]
        x = torch.randn(batch, 1, d_in, generator=torch.Generator().manual_seed(0))
        kernels: dict[str, Any] = {"fp32": lin, "torch.ao dynamic int8": dynamic_int8_linear(lin, False),
                                   "aten._weight_int8pack_mm": WeightOnlyInt8(lin),
                                   "torchao int8 weight-only": torchao_int8_weight_only(lin)}
        ok = {k: m for k, m in kernels.items() if not isinstance(m, str)}
        times: dict[str, list[float]] = {k: [] for k in ok}
        with torch.no_grad():
            for _ in range(3):
                for m in ok.values():
                    m(x)
            for r in range(reps):
                order = list(ok)
                random.Random(r).shuffle(order)
                for k in order:
                    t0 = time.perf_counter()
                    ok[k](x)
                    times[k].append(time.perf_counter() - t0)
        row = {"example": name, "d_in": d_in, "d_out": d_out, "batch": batch,
               "median_us": {k: statistics.median(v) * 1e6 for k, v in times.items()},
               "unavailable": {k: m for k, m in kernels.items() if isinstance(m, str)}}
        rows.append(row)
        log(f"kernels {d_in}x{d_out}: " + ", ".join(f"{k} {v:.1f} us" for k, v in row["median_us"].items()))
    return rows


# -- 2. Σ group gains vs end-to-end --------------------------------------------------------------------------------
def usable_configs(gains: Gains, group: str) -> list[int]:
    gg = gains.groups[group]
    return [i for i in range(len(gg.configs)) if gg.usable("ET", i)]


def whole_model_configs(part: Partition, dec: Gains, n_random: int, seed: int) -> dict[str, dict[str, str]]:
    """Random mixes (a usable config per group, drawn uniformly) and structured ones (families in every layer)."""
    rng = random.Random(seed)
    out: dict[str, dict[str, str]] = {}
    for i in range(n_random):
        a: dict[str, str] = {}
        for g in part.groups:
            c = dec.groups[g.name].configs[rng.choice(usable_configs(dec, g.name))]
            a.update(zip(g.ops, c, strict=True))
        out[f"random {i}"] = a
    fams = {"q": ("q_proj",), "k,v": ("k_proj", "v_proj"), "o": ("o_proj",), "gate,up": ("gate_proj", "up_proj"),
            "down": ("down_proj",), "lm_head": ("lm_head",),
            "attention Linears": ("q_proj", "k_proj", "v_proj", "o_proj"),
            "MLP": ("gate_proj", "up_proj", "down_proj"),
            "all Linears": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")}
    low = dec.formats[1]
    for name, suffixes in fams.items():
        a = {op: low for g in part.groups for op in g.ops if op.rsplit(".", 1)[-1] in suffixes}
        cfgs_ok = all(dec.groups[g.name].usable("ET", dec.groups[g.name].configs.index(
            [a.get(op, dec.formats[0]) for op in g.ops])) for g in part.groups)
        if a and cfgs_ok:
            out[f"{name} INT8"] = a
    return out


def sum_vs_e2e(model, step, backend, part, dec: Gains, configs: dict[str, dict[str, str]], reps: int):
    rows = []
    for name, a in configs.items():
        pred = plan_gain(a, dec, part)
        r = compare_decode(model, step, backend, a, reps=reps)
        rows.append({"config": name, "n_int8": sum(f != dec.formats[0] for f in a.values()), "predicted_gain_s": pred,
                     "measured_gain_s": r["gain_s"], "measured_ci_s": r["ci_s"], "t_ref_s": r["t_ref_s"]})
        log(f"sum-vs-e2e {name}: predicted {pred * 1e3:.3f} ms, measured {r['gain_s'] * 1e3:.3f} ± "
            f"{r['ci_s'] * 1e3:.3f} ms (ref {r['t_ref_s'] * 1e3:.2f} ms)")
    return rows


def error_summary(rows: list[dict[str, Any]], t_ref_measured: float) -> dict[str, Any]:
    """Prediction error two ways: in ms, and as the fraction of the step saved, each side against its own reference
    step (``pipeline.speed_check``'s convention: a machine that got uniformly slower since the measurement scales
    both times alike, which is not a prediction error)."""
    def stats(pred: list[float], meas: list[float], ref: list[float]) -> dict[str, float]:
        rel = [abs(p - m) / abs(m) for p, m in zip(pred, meas, strict=True) if m != 0]
        return {"median_rel_error": statistics.median(rel) if rel else math.nan,
                "median_error_of_step": statistics.median(abs(p - m) / t for p, m, t in zip(pred, meas, ref,
                                                                                          strict=True)),
                "sum_pred_over_sum_meas": sum(pred) / sum(meas)}

    pred, meas, ref = ([r[k] for r in rows] for k in ("predicted_gain_s", "measured_gain_s", "t_ref_s"))
    ms = stats(pred, meas, ref)
    frac = stats([p / t_ref_measured for p in pred], [m / t for m, t in zip(meas, ref, strict=True)], [1.0] * len(rows))
    return {"n": len(rows), "ms": ms, "fraction": frac}


# -- 3. plans at equal budget ----------------------------------------------------------------------------------------
def make_plans(sens, part, gains: Gains, dec: Gains, beta: float, seeds: list[int], weights) -> dict[str, Plan]:
    guard: dict[str, Any] = {}
    mix = mix_gains(gains, dec, weights)
    plans = {"IP prefill": solve(sens, part, gains, beta=beta, **guard),
             "IP decode": solve(sens, part, dec, beta=beta, **guard),
             "IP mix": solve(sens, part, mix, beta=beta, **guard)}
    for s in seeds:
        plans[f"Random#{s}"] = baseline("random", sens, part, mix, beta=beta, seed=s)
    plans["Prefix"] = baseline("prefix", sens, part, mix, beta=beta)
    return plans


def flagged_in(plan: Plan, gains: Gains, part: Partition) -> int:
    """Groups whose config in ``plan`` failed ``gains``' quality checks (its predicted gain there is not trusted)."""
    ref = gains.formats[0]
    n = 0
    for g in part.groups:
        gg = gains.groups[g.name]
        n += not gg.usable("ET", gg.configs.index([plan.assignment.get(op, ref) for op in g.ops]))
    return n


def measure_plans(ctx: dict[str, Any], plans: dict[str, Plan], rounds: int, reps: int) -> dict[str, dict[str, Any]]:
    """Each distinct plan: decode and prefill speedups (median over rotated rounds) and held-out loss MSE."""
    model, backend = ctx["model"], ctx["backend"]
    distinct: dict[str, str] = {}
    for name, p in plans.items():
        key = json.dumps(sorted(op for op, f in p.assignment.items() if f != p.reference_format))
        distinct.setdefault(key, name)
    names = list(dict.fromkeys(distinct.values()))
    dec_s: dict[str, list[float]] = {n: [] for n in names}
    pre_s: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            d = compare_decode(model, ctx["step"], backend, plans[n].assignment, reps=reps)
            dec_s[n].append(d["t_ref_s"] / d["t_cfg_s"])
            p = compare_prefill(model, ctx["ids"], backend, plans[n].assignment, reps=max(3, reps // 2))
            pre_s[n].append(p["t_ref_s"] / p["t_cfg_s"])
    out = {}
    for name, p in plans.items():
        key = json.dumps(sorted(op for op, f in p.assignment.items() if f != p.reference_format))
        rep = distinct[key]
        if rep == name:
            lc = loss_change(model, ctx["ev"], p.assignment, ctx["ref_losses"], backend.apply)
            measured = {"decode_speedup": statistics.median(dec_s[name]), "decode_speedups": dec_s[name],
                        "prefill_speedup": statistics.median(pre_s[name]), "prefill_speedups": pre_s[name],
                        "measured_loss_mse": lc["measured_loss_mse"]}
        else:
            measured = {**out[rep]["measured"], "same_plan_as": rep}
        out[name] = {"n_int8": len(p.low_precision_ops()), "predicted_loss_mse": p.predicted_loss_mse,
                     "flagged_decode_configs": flagged_in(p, ctx["dec"], ctx["part"]),
                     "flagged_prefill_configs": flagged_in(p, ctx["gains"], ctx["part"]),
                     "budget_loss_mse": p.budget_loss_mse,
                     "predicted_decode_speedup": speedup_of(plan_gain(p.assignment, ctx["dec"], ctx["part"]),
                                                            ctx["dec"].reference_time_s),
                     "predicted_prefill_speedup": speedup_of(plan_gain(p.assignment, ctx["gains"], ctx["part"]),
                                                             ctx["gains"].reference_time_s),
                     "measured": measured}
        m = out[name]
        log(f"  {name}: {m['n_int8']} INT8 ops, decode {m['predicted_decode_speedup']:.3f}x predicted / "
            f"{measured['decode_speedup']:.3f}x measured, prefill {m['predicted_prefill_speedup']:.3f}x / "
            f"{measured['prefill_speedup']:.3f}x, loss MSE {p.predicted_loss_mse:.3g} / "
            f"{measured['measured_loss_mse']:.3g}")
    return out


# -- 4. KV cache -----------------------------------------------------------------------------------------------------
def kv_validation(ctx: dict[str, Any], sens: Sensitivity, seeds: list[int]) -> list[dict[str, Any]]:
    model = ctx["model"]
    attn = sorted(op.rpartition(".")[0] for op in sens.ops if op.endswith(".matmul_qk"))
    n = len(attn)
    sets = {"K and V, all layers": [f"{a}.{c}" for a in attn for c in ("k_cache", "v_cache")],
            "K only, all layers": [f"{a}.k_cache" for a in attn], "V only, all layers": [f"{a}.v_cache" for a in attn],
            f"K and V, layers 0-{n // 3 - 1}": [f"{a}.{c}" for a in attn[: n // 3] for c in ("k_cache", "v_cache")],
            f"K and V, layers {n - n // 3}-{n - 1}": [f"{a}.{c}" for a in attn[n - n // 3:]
                                                     for c in ("k_cache", "v_cache")]}
    for s in seeds:
        half = random.Random(s).sample(attn, n // 2)
        sets[f"K and V, random half of the layers (seed {s})"] = [f"{a}.{c}" for a in half
                                                                 for c in ("k_cache", "v_cache")]
    rows = []
    for name, ops in sets.items():
        a = {op: "fp8_e4m3" for op in ops}
        pred = kv_loss(sens, a)
        dyn = loss_change(model, ctx["ev"], {}, ctx["ref_losses"], lambda m, _a, a=a: fake_quant_kv(m, a))
        sta = loss_change(model, ctx["ev"], {}, ctx["ref_losses"],
                          lambda m, _a, a=a: fake_quant_kv(m, a, static_scales(sens, a)))
        rows.append({"caches": name, "n": len(ops), "predicted_loss_mse": pred,
                     "measured_loss_mse_call_scale": dyn["measured_loss_mse"],
                     "measured_loss_mse_static_scale": sta["measured_loss_mse"]})
        log(f"kv {name}: predicted {pred:.3g}, measured {dyn['measured_loss_mse']:.3g} (per-call scale) / "
            f"{sta['measured_loss_mse']:.3g} (static scale)")
    return rows


def kv_cpu_timing(model, batch: int, context: int, reps: int) -> dict[str, Any]:
    """One decode step with transformers' fp32 DynamicCache vs its FP8 QuantizedCache, interleaved; each timed step
    starts from a fresh copy of the prefilled cache (copied outside the timing)."""
    import copy

    from transformers import DynamicCache, QuantizedCache

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=g)
    caches = {"fp32": DynamicCache(config=model.config), "fp8": QuantizedCache("fp8", model.config)}
    with torch.no_grad():
        for c in caches.values():
            nxt = model(prompt, cache=c, use_cache=True).logits[:, -1:].argmax(-1)
    pos = torch.tensor([[context]])

    def step(kind: str):
        fresh = {}

        def fn() -> object:
            return model(nxt, position_ids=pos, cache=fresh["c"], use_cache=True)

        def timed() -> object:
            fresh["c"] = copy.deepcopy(caches[kind])
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            return time.perf_counter() - t0
        return timed

    ref, low = step("fp32"), step("fp8")
    t_ref, t_low = [], []
    for i in range(reps):
        pair = [(t_ref, ref), (t_low, low)] if i % 2 == 0 else [(t_low, low), (t_ref, ref)]
        for out, f in pair:
            out.append(f())
    st = gain_stats(t_ref[1:], t_low[1:])  # the first pair warms up
    log(f"kv cache on CPU: fp32 DynamicCache step {st['t_ref_s'] * 1e3:.2f} ms, FP8 QuantizedCache step "
        f"{st['t_cfg_s'] * 1e3:.2f} ms")
    return st


# -- report ----------------------------------------------------------------------------------------------------------
def write_md(res: dict[str, Any], path: Path) -> None:
    L = ["# Decode step (TPOT) gains and objectives: SmolLM2-135M on this CPU (issue 17)", "",
         *header(res["provenance"]), "",
         f"Settings: calibration {res['settings']['n_calib']}x{res['settings']['seq_len']} tokens, held-out "
         f"{res['settings']['n_eval']}x{res['settings']['seq_len']}; prefill gains at "
         f"1x{res['settings']['gain_seq_len']}; "
         f"decode step: batch {res['decode_batch']}, {res['decode_context']} cached tokens, one new token; "
         f"{res['settings']['reps']} interleaved reps per group config; mix weights (w_TTFT, w_TPOT) = "
         f"{tuple(res['mix_weights'])}. Total wall time {res['wall_s'] / 60:.1f} min.", "",
         "## 1. Fastest real low-precision Linear for one new token (median µs per call, round-robin)", "",
         "| shape (d_in x d_out), e.g. | " + " | ".join(res["kernels"][0]["median_us"]) + " |",
         "|---|" + "---|" * len(res["kernels"][0]["median_us"])]
    for r in res["kernels"]:
        L.append(f"| {r['d_in']}x{r['d_out']} ({r['example']}) | "
                 + " | ".join(f"{v:.1f}" for v in r["median_us"].values()) + " |")
    unav = {k: v for r in res["kernels"] for k, v in r["unavailable"].items()}
    if unav:
        L += ["", "Not available: " + "; ".join(f"{k} ({v})" for k, v in unav.items())]
    best = {}
    for r in res["kernels"]:
        low = {k: v for k, v in r["median_us"].items() if k != "fp32"}
        best[f"{r['d_in']}x{r['d_out']}"] = min(low, key=low.get)
    L += ["", "Fastest low-precision kernel per shape: " + ", ".join(f"{k} {v}" for k, v in best.items()) + ".", ""]
    q = res["decode_quality"]
    L += ["## 2. Σ group gains vs the measured end-to-end decode step", "",
          f"Reference decode step (all fp32) {res['reference_decode_s'] * 1e3:.2f} ms at measurement; "
          f"Σ best group gains {q['sum_best_gain_s'] * 1e3:.2f} ms (consistent: {q['consistent']}); "
          f"{q['flagged_configs']} measured config(s) flagged"
          + (f"; {len(q['lower_bound'])} still noisy after their re-measurements but consistent, used at the lower "
             f"end of their 95% CI ({'; '.join(q['lower_bound'])})" if q.get("lower_bound") else "")
          + f". Decode gains measured in {res['measure_s']:.0f} s (prefill and decode together).", "",
          "Each configuration's end-to-end step is timed against its own interleaved reference; the share of the "
          "step saved is compared each against its own reference (measured vs the reference at measurement), as "
          "the pipeline's speed check does, because the shared machine's speed changed during the run (the "
          "reference column).", "",
          "| config | INT8 ops | predicted gain (ms) | measured gain (ms) ± CI | reference step now (ms) | "
          "share saved predicted / measured |", "|---|---|---|---|---|---|"]
    t_meas = res["reference_decode_s"]
    for r in res["sum_vs_e2e"]:
        L.append(f"| {r['config']} | {r['n_int8']} | {r['predicted_gain_s'] * 1e3:.3f} | "
                 f"{r['measured_gain_s'] * 1e3:.3f} ± {r['measured_ci_s'] * 1e3:.3f} | {r['t_ref_s'] * 1e3:.2f} | "
                 f"{100 * r['predicted_gain_s'] / t_meas:.1f}% / {100 * r['measured_gain_s'] / r['t_ref_s']:.1f}% |")
    for k, s in res["error_summary"].items():
        f, a = s["fraction"], s["ms"]
        L.append(f"\n**{k}** ({s['n']} configs): share of the step saved — median relative error "
                 f"{100 * f['median_rel_error']:.1f}%, median error {100 * f['median_error_of_step']:.1f} points, "
                 f"Σpredicted/Σmeasured {f['sum_pred_over_sum_meas']:.3f}; in ms — median relative error "
                 f"{100 * a['median_rel_error']:.1f}%, Σpredicted/Σmeasured {a['sum_pred_over_sum_meas']:.3f}.")
    L += ["", "## 3. Plans at equal predicted-loss budget: measured decode-step and prefill speedups", "",
          "Every plan of a budget was measured in the same rotated rounds (decode step, then prefill, per plan per "
          f"round; {res['rounds']} rounds; median). Random/Prefix are the greedy baselines (skip an op that would "
          "exceed the budget), over the configurations allowed in both phases. A plan that uses a configuration "
          "flagged by a phase's quality checks (possible for the plans of the other objective) says so: its "
          "predicted gain in that phase counts an untrusted measurement.", ""]
    for b in res["budgets"]:
        L += [f"### β = {b['beta']:g} (loss-MSE budget {b['budget_loss_mse']:.3g})", "",
              "| plan | INT8 ops | decode speedup pred / **meas** | prefill speedup pred / meas | "
              "loss MSE pred / meas |",
              "|---|---|---|---|---|"]
        for name, r in b["plans"].items():
            m = r["measured"]
            same = f" (= {m['same_plan_as']})" if "same_plan_as" in m else ""
            fl = "".join(f" ({r[k]} group(s) flagged in the {ph} record)" for k, ph in (
                ("flagged_decode_configs", "decode"), ("flagged_prefill_configs", "prefill")) if r[k])
            L.append(f"| {name}{same}{fl} | {r['n_int8']} | {r['predicted_decode_speedup']:.3f} / "
                     f"**{m['decode_speedup']:.3f}** | "
                     f"{r['predicted_prefill_speedup']:.3f} / {m['prefill_speedup']:.3f} | "
                     f"{r['predicted_loss_mse']:.3g} / {m['measured_loss_mse']:.3g} |")
        L.append("")
        rnd = [r["measured"]["decode_speedup"] for n, r in b["plans"].items() if n.startswith("Random")]
        L.append(f"IP decode measured {b['plans']['IP decode']['measured']['decode_speedup']:.3f}x vs Random "
                 f"{statistics.mean(rnd):.3f}x (mean of {len(rnd)} seeds, range {min(rnd):.3f}-{max(rnd):.3f}) and "
                 f"Prefix {b['plans']['Prefix']['measured']['decode_speedup']:.3f}x; the prefill-objective plan "
                 f"{b['plans']['IP prefill']['measured']['decode_speedup']:.3f}x.")
        L.append("")
    kv = res["kv_cache"]
    L += ["## 4. KV cache in FP8-E4M3: predicted vs measured loss, and its speed on this CPU", "",
          "Predicted: the attention BGEMMs' b-operand sums (K for matmul_qk, V for matmul_av; noise + shift², "
          "`kvcache.kv_loss`). Measured: loss MSE on the held-out text with K and V rounded to FP8-E4M3 as the "
          "attention reads them (a cache stores them rounded), with each call's own per-tensor scale (what the sums "
          "assume) and with INC's static scale (the calibration's max |K|, |V| / 448).", "",
          "| caches in FP8 | caches | predicted loss MSE | measured (per-call scale) | measured (static scale) |",
          "|---|---|---|---|---|"]
    for r in kv["validation"]:
        L.append(f"| {r['caches']} | {r['n']} | {r['predicted_loss_mse']:.3g} | {r['measured_loss_mse_call_scale']:.3g}"
                 f" | {r['measured_loss_mse_static_scale']:.3g} |")
    ratios = [r["measured_loss_mse_call_scale"] / r["predicted_loss_mse"] for r in kv["validation"]]
    L += ["", f"measured/predicted (per-call scale): median {statistics.median(ratios):.2f}, range "
          f"{min(ratios):.2f}-{max(ratios):.2f}; Spearman ρ {kv['spearman']:.2f}.", "",
          f"KV cache size at the decode step (batch {res['decode_batch']}, {res['decode_context']} tokens): "
          f"{kv['bytes_fp32'] / 2**20:.3g} MiB in fp32, {kv['bytes_fp8'] / 2**20:.3g} MiB in FP8. "
          f"On this CPU one decode step took {kv['cpu']['t_ref_s'] * 1e3:.2f} ms with transformers' fp32 "
          f"DynamicCache and {kv['cpu']['t_cfg_s'] * 1e3:.2f} ms with its FP8 QuantizedCache (gain "
          f"{kv['cpu']['gain_s'] * 1e3:+.2f} ± {kv['cpu']['ci_s'] * 1e3:.2f} ms): "
          + ("faster beyond its CI" if kv["cpu"]["gain_s"] - kv["cpu"]["ci_s"] > 0 else
             "not faster beyond its CI, so the IP gives a KV-cache decision no ET value here (M and RT plans use it)")
          + ".", ""]
    L += ["Load average during the run: " + ", ".join(f"{x}" for x in res["loads"]) + ".", ""]
    path.write_text("\n".join(L))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "inc_ipamp" / "bench_decode"))
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--n-eval", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--gain-seq-len", type=int, default=128)
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--decode-context", type=int, default=256)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--kernel-reps", type=int, default=100)
    ap.add_argument("--configs", type=int, default=12, help="random whole-model configs for Σ-vs-e2e")
    ap.add_argument("--e2e-reps", type=int, default=20)
    ap.add_argument("--betas", default="0.005,0.01,0.02")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mix-weights", default="1,128")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "decode"))
    args = ap.parse_args()
    set_threads(args.threads)  # first: the provenance records the thread count
    prov = provenance(__file__)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    loads = [machine_state()["load_avg_1min"]]
    weights = tuple(float(x) for x in args.mix_weights.split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    settings = pipeline.RunSettings(n_calib=args.n_calib, n_eval=args.n_eval, seq_len=args.seq_len, device="cpu",
                                    formats=["fp32", "int8"], gain_seq_len=args.gain_seq_len, reps=args.reps,
                                    objective="mix", decode_batch=args.decode_batch, calib_formats=["fp8_e4m3"],
                                    decode_context=args.decode_context, mix_weights=list(weights), threads=args.threads)
    settings.validate()
    settings.save(work)
    log(f"loading the default model ({args.threads} thread(s))")
    model, tok = pipeline.load(settings)
    backend = get_backend("cpu")
    kernels = kernel_study(model, args.decode_batch, args.kernel_reps)
    loads.append(machine_state()["load_avg_1min"])
    if (work / "sensitivity.json").exists():
        sens = Sensitivity.load(work / "sensitivity.json")
    else:
        log("calibrating")
        sens = pipeline.stage_calibrate(work, settings, model, tok)
    part = Partition.load(work / "partition.json") if (work / "partition.json").exists() else \
        pipeline.stage_partition(work, settings, model, tok)
    log("measuring prefill and decode-step gains (cache: gain_cache.jsonl)")
    t0 = time.perf_counter()
    gains = pipeline.stage_measure(work, settings, model, tok)
    measure_s = time.perf_counter() - t0
    dec = Gains.load(work / "gains_decode.json")
    loads.append(machine_state()["load_avg_1min"])
    log(f"reference prefill {gains.reference_time_s * 1e3:.1f} ms, decode step {dec.reference_time_s * 1e3:.2f} ms")

    backend.prepare(model, "fp32")
    step = decode_step(model, args.decode_batch, args.decode_context, seed=0)
    configs = whole_model_configs(part, dec, args.configs, seed=0)
    rows = sum_vs_e2e(model, step, backend, part, dec, configs, args.e2e_reps)
    summary = {"random": error_summary([r for r in rows if r["config"].startswith("random")], dec.reference_time_s),
               "structured": error_summary([r for r in rows if not r["config"].startswith("random")],
                                           dec.reference_time_s),
               "all": error_summary(rows, dec.reference_time_s)}
    loads.append(machine_state()["load_avg_1min"])

    ev = pipeline.blocks(tok, settings, "evaluation")
    g = torch.Generator().manual_seed(0)
    ctx = {"model": model, "backend": backend, "step": step, "ev": ev, "ref_losses": sequence_losses(model, ev),
           "ids": torch.randint(0, model.config.vocab_size, (1, args.gain_seq_len), generator=g),
           "dec": dec, "gains": gains, "part": part}
    budgets = []
    for beta in (float(b) for b in args.betas.split(",")):
        log(f"plans at beta {beta}")
        plans = make_plans(sens, part, gains, dec, beta, [int(s) for s in args.seeds.split(",")], weights)
        budgets.append({"beta": beta, "budget_loss_mse": plans["IP decode"].budget_loss_mse,
                        "plans": measure_plans(ctx, plans, args.rounds, args.reps)})
        loads.append(machine_state()["load_avg_1min"])
    seeds = [int(s) for s in args.seeds.split(",")]
    kv_rows = kv_validation(ctx, sens, seeds)
    geo = dec.quality["kv_cache"]
    kv = {"validation": kv_rows, "spearman": float(spearmanr([r["predicted_loss_mse"] for r in kv_rows],
                                                             [r["measured_loss_mse_call_scale"] for r in kv_rows])[0]),
          "bytes_fp32": 2 * 4 * sum(v["numel"] for v in geo.values()),
          "bytes_fp8": 2 * 1 * sum(v["numel"] for v in geo.values()),
          "cpu": kv_cpu_timing(model, args.decode_batch, args.decode_context, 2 * args.reps + 1)}
    loads.append(machine_state()["load_avg_1min"])
    prov["machine_end"] = machine_state()
    res = {"provenance": prov, "settings": {k: getattr(settings, k) for k in ("n_calib", "n_eval", "seq_len",
                                                                            "gain_seq_len", "reps")},
           "decode_batch": args.decode_batch, "decode_context": args.decode_context, "mix_weights": list(weights),
           "kernels": kernels, "reference_prefill_s": gains.reference_time_s,
           "reference_decode_s": dec.reference_time_s,
           "decode_quality": dec.quality, "decode_notes": dec.notes, "measure_s": measure_s, "sum_vs_e2e": rows,
           "error_summary": summary, "rounds": args.rounds, "budgets": budgets, "kv_cache": kv, "loads": loads,
           "wall_s": time.perf_counter() - t_start}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    write_md(res, out.with_suffix(".md"))
    log(f"wrote {out.with_suffix('.md')} and .json in {res['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
