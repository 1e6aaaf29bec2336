"""Validate measured group gains on SmolLM2-135M (CPU): the paper's Fig. 1 analogue, additivity, cost.

(a) attention group {q,k,v,qk,av}: sum of per-op gains vs the measured gain of every config of the group (on the
    enclosing-module run, which times every config itself: the default times single-op configs only and sums them);
(b) sum of group gains (sub-graph timings reused across layers) vs measured end-to-end prefill gain for
    random mixed configurations of the whole model, with relative errors;
(c) timed runs of this protocol vs the paper's (every config of every group timed end-to-end, no reuse).
Gains are measured three times in the same run: span all (every layer of the signature back to back per timed
run, each op's single-op configs timed on that op alone and multi-op configs summed from them: the default since
a3b5e97; before it each run called all the ops some config of the signature changes), the same on each group's
enclosing module (the protocol before ac03dc4, which ran the attention group's softmax and BGEMMs too), and span 1
(the representative group alone, weights hot in cache); (b) scores all three against the same end-to-end measurements.
Absolute CPU times are noisy on a shared machine; everything compared is measured in this one run.

    python benchmarks/bench_gains.py --layers 30 --seq-len 128 --reps 20 --configs 12
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from inc_ipamp.gains import compare_prefill, get_backend, measure_gains
from inc_ipamp.models import load_model
from inc_ipamp.partition import default_example_ids, partition_model
from inc_ipamp.runtime import set_threads

sys.path.insert(0, str(Path(__file__).parent))
from provenance import finish, header, provenance  # noqa: E402

OUT = Path(__file__).parent / "results"


def per_op_sum_vs_group(gg, ref: str) -> list[dict]:
    """For each config of a group: measured gain vs the sum of its single-op configs' measured gains."""
    idx = {tuple(c): i for i, c in enumerate(gg.configs)}
    n = len(gg.configs[0])
    single = {}
    for c in gg.configs:
        low = [k for k in range(n) if c[k] != ref]
        if len(low) == 1:
            single[(low[0], c[low[0]])] = gg.gains["ET"][idx[tuple(c)]]
    rows = []
    for c in gg.configs:
        low = [k for k in range(n) if c[k] != ref]
        if len(low) < 2:
            continue
        i = idx[tuple(c)]
        rows.append({"config": "+".join(c), "measured_s": gg.gains["ET"][i], "ci_s": gg.ci["ET"][i],
                     "per_op_sum_s": sum(single[(k, c[k])] for k in low)})
    return rows


#: the measurements compared in (b): record suffix -> (measure_gains keywords, label)
RUNS = {"": ({}, "span all, each changed op alone (default)"),
        "_enclosing": ({"enclosing": True}, "span all, enclosing module"),
        "_span1": ({"span": 1}, "span 1 (hot cache)")}


def additivity(checks: list[dict]) -> dict:
    """Summary of predicted vs measured end-to-end gains over ``checks``, per measurement of ``RUNS``."""
    out: dict = {"n": len(checks)}
    if not checks:
        return out
    for sfx in RUNS:
        out["median_rel_error" + sfx] = statistics.median(c["rel_error" + sfx] for c in checks)
        out["mean_rel_error" + sfx] = statistics.mean(c["rel_error" + sfx] for c in checks)
        out["median_error_over_t_ref" + sfx] = statistics.median(c["error_over_t_ref" + sfx] for c in checks)
        pred = sum(c["predicted" + sfx + "_s"] for c in checks)
        out["total_predicted_over_measured" + sfx] = pred / sum(c["measured_s"] for c in checks)
    out["within_ci"] = statistics.mean(
        abs(c["predicted_s"] - c["measured_s"]) <= (c["predicted_ci_s"] ** 2 + c["measured_ci_s"] ** 2) ** 0.5
        for c in checks)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20, help="interleaved pairs per group config (sub-graph)")
    ap.add_argument("--e2e-reps", type=int, default=10, help="interleaved pairs per end-to-end config")
    ap.add_argument("--configs", type=int, default=12, help="random mixed configs for (b)")
    ap.add_argument("--formats", default="fp32,int8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="measurement cache (JSON lines); default: none")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: the cores free at start, as the CLI); 1 beside another job")
    args = ap.parse_args()
    set_threads(args.threads)
    prov = provenance(__file__)
    torch.manual_seed(args.seed)
    formats = args.formats.split(",")
    ref = formats[0]

    model, _ = load_model("default", num_layers=args.layers)
    part = partition_model(model)
    be = get_backend("cpu")

    class Enclosing(type(be)):  # the protocol before ac03dc4: each group's enclosing module timed
        local_ops = False

    runs = {}
    for sfx, (kw, _) in RUNS.items():
        t0 = time.perf_counter()
        g = measure_gains(model, part, formats, backend=Enclosing() if kw.get("enclosing") else be, batch=args.batch,
                          seq_len=args.seq_len, reps=args.reps, warmup=3, cache_path=args.cache, progress=True,
                          span=kw.get("span"))
        runs[sfx] = (g, time.perf_counter() - t0)
    gains, measure_s = runs[""]
    ids = default_example_ids(model, args.batch, args.seq_len)

    # (a) the attention group of layer 0, on the run that times every config itself
    att = part.groups[0]
    rows = per_op_sum_vs_group(runs["_enclosing"][0].groups[att.name], ref)
    err_a = [abs(r["per_op_sum_s"] - r["measured_s"]) for r in rows]
    scale_a = statistics.median(abs(r["measured_s"]) for r in rows)

    # (b) random mixed whole-model configurations, then structured ones (one op family in INT8 in every layer,
    # and their unions), measured end to end
    rng = random.Random(args.seed)
    checks = []
    t1 = time.perf_counter()
    configs = []
    for i in range(args.configs):
        p_low = rng.choice([0.2, 0.5, 0.8])
        configs.append((f"random{i}_p{p_low}", {g.name: tuple(rng.choice(formats[1:]) if rng.random() < p_low else ref
                                                             for _ in g.ops) for g in part.groups}))
    low = formats[1]
    fams = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
            "down": ("down_proj",), "lm_head": ("lm_head",)}
    for name in [*fams, "qkv+o", "gate_up+down", "qkv+o+gate_up+down", "all_linear"]:
        suffixes = tuple(x for f in (fams if name == "all_linear" else name.split("+")) for x in fams[f])
        configs.append((name, {g.name: tuple(low if o.endswith(suffixes) else ref for o in g.ops)
                               for g in part.groups}))
    for label, cfg in configs:
        assignment = {op: f for g in part.groups for op, f in zip(g.ops, cfg[g.name], strict=True) if f != ref}
        choice = {n: [tuple(x) for x in gains.groups[n].configs].index(c) for n, c in cfg.items()}
        pred = {k: sum(r.groups[n].gains["ET"][i] for n, i in choice.items()) for k, (r, _) in runs.items()}
        pred_ci = sum(gains.groups[n].ci["ET"][i] ** 2 for n, i in choice.items()) ** 0.5
        meas = compare_prefill(model, ids, be, assignment, reps=args.e2e_reps, warmup=2)
        m = meas["gain_s"]
        checks.append({"config": label, "low_ops": len(assignment), "predicted_ci_s": pred_ci, "measured_s": m,
                       "measured_ci_s": meas["ci_s"], "t_ref_s": meas["t_ref_s"]})
        for sfx, p in pred.items():
            checks[-1] |= {"predicted" + sfx + "_s": p, "rel_error" + sfx: abs(p - m) / max(abs(m), 1e-12),
                           "error_over_t_ref" + sfx: abs(p - m) / meas["t_ref_s"]}
        print(f"  {label:22s} {len(assignment):3d} low ops: predicted {pred[''] * 1e3:8.2f} ms (enclosing: "
              f"{pred['_enclosing'] * 1e3:8.2f}, span 1: {pred['_span1'] * 1e3:8.2f}), measured {m * 1e3:8.2f} ± "
              f"{meas['ci_s'] * 1e3:.2f} ms (T_ref {meas['t_ref_s'] * 1e3:.1f} ms)")
    e2e_s = time.perf_counter() - t1

    # (c) timed runs: the paper times every config of every group end to end, no reuse across layers
    paper_runs = sum(len(gg.configs) - 1 for gg in gains.groups.values()) * args.reps + args.reps
    reps_groups = {g.signature: g for g in part.groups}.values()
    ours = sum(len(g.configs(formats)) - 1 for g in reps_groups) * 2 * args.reps  # timed runs (ref + cfg)
    calls = gains.subgraph_calls  # sub-graph calls: a run over a 30-layer span counts 30
    t_ref = gains.reference_time_s or 0.0
    ours_model_equiv = measure_s / t_ref if t_ref else float("nan")

    res = {
        "provenance": finish(prov),
        "model": part.model, "layers": args.layers, "device": gains.device, "formats": formats,
        "batch": args.batch, "seq_len": args.seq_len, "reps": args.reps, "e2e_reps": args.e2e_reps,
        "partition": {"method": part.method, "groups": len(part.groups),
                      "signatures": len({g.signature for g in part.groups})},
        "reference_prefill_s": t_ref, "gain_notes": gains.notes,
        "single_op_gains_ms": {g.name: [round(x * 1e3, 4) for x in gains.groups[g.name].gains["ET"]]
                               for g in part.groups[:5]},
        "a_attention_group": {"group": att.name, "rows": rows,
                              "median_abs_error_s": statistics.median(err_a),
                              "median_abs_measured_s": scale_a,
                              "median_rel_error": statistics.median(e / max(abs(r["measured_s"]), 1e-12)
                                                                    for e, r in zip(err_a, rows, strict=True))},
        "b_end_to_end": {"checks": checks, "wall_s": e2e_s,
                         "measure_wall_s": {k: w for k, (_, w) in runs.items()},
                         "timed_calls": {k: r.subgraph_calls for k, (r, _) in runs.items()},
                         **{subset: additivity(sel) for subset, sel in
                            (("all", checks), ("random", [c for c in checks if c["config"].startswith("random")]),
                             ("structured", [c for c in checks if not c["config"].startswith("random")]))}},
        "c_cost": {"ours_timed_runs": ours, "ours_subgraph_calls": calls, "paper_timed_full_model_runs": paper_runs,
                   "run_count_ratio": paper_runs / max(ours, 1), "ours_wall_s": measure_s,
                   "ours_wall_in_full_prefills": ours_model_equiv,
                   "paper_wall_estimate_s": paper_runs * t_ref,
                   "wall_ratio_estimate": paper_runs * t_ref / measure_s if measure_s else float("nan")},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    stem = OUT / (f"bench_gains_L{args.layers}_s{args.seq_len}" + (f"_seed{args.seed}" if args.seed else ""))
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = [f"# bench_gains: {part.model}, {args.layers} layers, batch {args.batch}, seq {args.seq_len}", "",
          *header(prov),
          f"device: {gains.device}; formats {formats}; reference prefill {t_ref * 1e3:.1f} ms", "",
          f"## (a) attention group {att.name}: per-op sum vs measured (ms), enclosing-module run",
          "| config | measured | ±CI | per-op sum |", "|---|---|---|---|"]
    md += [f"| {r['config']} | {r['measured_s'] * 1e3:.3f} | {r['ci_s'] * 1e3:.3f} | {r['per_op_sum_s'] * 1e3:.3f} |"
           for r in rows]
    md += ["", f"median |sum − measured| = {statistics.median(err_a) * 1e3:.3f} ms vs median |measured| = "
           f"{scale_a * 1e3:.3f} ms", "", "## (b) predicted (sum of group gains) vs measured end-to-end gain (ms)",
           "| config | low ops | predicted (default) | ±CI | predicted (enclosing) | predicted (span 1) | measured "
           "| ±CI | rel. error default / enclosing / span 1 | error / T_ref default / enclosing / span 1 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {c['config']} | {c['low_ops']} | {c['predicted_s'] * 1e3:.2f} | {c['predicted_ci_s'] * 1e3:.2f} | "
           f"{c['predicted_enclosing_s'] * 1e3:.2f} | {c['predicted_span1_s'] * 1e3:.2f} | "
           f"{c['measured_s'] * 1e3:.2f} | {c['measured_ci_s'] * 1e3:.2f} | "
           + " / ".join(f"{c['rel_error' + sfx]:.1%}" for sfx in RUNS) + " | "
           + " / ".join(f"{c['error_over_t_ref' + sfx]:.1%}" for sfx in RUNS) + " |"
           for c in checks]
    b = res["b_end_to_end"]
    md.append("")
    for subset in ("all", "random", "structured"):
        for sfx, (_, label) in RUNS.items():
            d = b[subset]
            md.append(f"- {subset} ({d['n']} configs), {label}: median relative error "
                      f"{d['median_rel_error' + sfx]:.1%} "
                      f"(mean {d['mean_rel_error' + sfx]:.1%}), median error / T_ref "
                      f"{d['median_error_over_t_ref' + sfx]:.1%}, Σpredicted/Σmeasured "
                      f"{d['total_predicted_over_measured' + sfx]:.2f}"
                      + (f", within the combined 95% CI: {d['within_ci']:.0%}" if not sfx else ""))
    md.append("- measured in " + ", ".join(f"{b['measure_wall_s'][sfx]:.1f} s ({label})" for sfx, (_, label) in
                                          RUNS.items()))
    c = res["c_cost"]
    md += ["", "## (c) timed runs (span all)",
           f"ours: {c['ours_timed_runs']} timed runs ({c['ours_subgraph_calls']} sub-graph calls) in "
           f"{c['ours_wall_s']:.1f} s (= {c['ours_wall_in_full_prefills']:.0f} full prefills); paper protocol: "
           f"{c['paper_timed_full_model_runs']} timed full-model runs (≈ {c['paper_wall_estimate_s']:.0f} s): "
           f"{c['run_count_ratio']:.1f}× fewer timed runs, ≈ {c['wall_ratio_estimate']:.0f}× less time"]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md[-8:]))
    print(f"wrote {stem}.json/.md")


if __name__ == "__main__":
    main()
