"""How much faster could IP-ET's plans be at equal loss, given only a few calibration sequences?

At small budgets IP-ET's plans and ModelOpt's tie on the CPU tracks of ``peers.md``. This benchmark measures the
headroom any better loss estimator could still win from the same calibration size: it calibrates ``--n-articles``
blocks one at a time (one block per article of the calibration split) and, for ``--sets`` disjoint sets of
``--n-calib`` of them, compares two frontiers scored on the same text:

  - IP-ET: the frontier chosen on the set's own calibration (what a run with ``--n-calib`` blocks gets);
  - oracle: the frontier chosen on the pool of every other article (the text its plans are scored on): a loss
    estimator that knew the test text, the ceiling of any estimator's ranking of the ops.

Every plan is scored by the pool's **Taylor proxy** of its held-out loss MSE, E_n[(Σ_ops d_n + ½·E Σ_ops c)²] over
the pool's articles n (d_n each op's first-order loss change on article n, c its curvature term): what the sums
say the plan does on text it was not chosen on, cheaply, for every plan. The proxy is itself checked against
measured loss (``--validate-sets`` sets' two smallest-budget plans run with the kernels' numerics on
``--n-eval`` blocks of the evaluation split). Articles whose curvature sum is over ``--outlier-factor`` times the
median are reported and kept out (one such article carries hundreds of times the others' sum: a mean over a pool
holding it would describe that article alone).

The gains are measured once on this CPU (prefill, ``--gain-seq-len`` tokens) and shared; the headroom is the
oracle's predicted gain minus IP-ET's at equal proxy loss (linear in log loss between each frontier's plans),
divided by the reference prefill time to give speedup points. Nothing else is timed.

    python benchmarks/bench_headroom.py --n-articles 62 --sets 7 --n-calib 8
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from provenance import finish, header, provenance  # noqa: E402


def proxy_loss(records: list[Any], assignment: dict[str, str]) -> float:
    """The Taylor proxy of a plan's loss MSE over one-sequence records: E_n[(Σ d_n + s)²], d_n the plan's ops'
    first-order changes on record n (``seq``), s = ½ × the records' mean curvature sum of those ops."""
    if not assignment:
        return 0.0
    firsts, curvs = [], []
    for r in records:
        d = c = 0.0
        for op, f in assignment.items():
            for st in r.ops[op].operands.values():
                if f in st.seq:
                    d += st.seq[f][0]
                    c += st.curv.get(f, 0.0)
        firsts.append(d)
        curvs.append(c)
    s = 0.5 * statistics.fmean(curvs)
    return statistics.fmean((d + s) ** 2 for d in firsts)


def gain_at(points: list[tuple[float, float]], loss: float) -> float | None:
    """A frontier's gain at ``loss``, linear in log loss between its (loss, gain) points; None outside them."""
    pts = sorted(p for p in points if p[0] > 0)
    for (l0, g0), (l1, g1) in zip(pts, pts[1:], strict=False):
        if l0 <= loss <= l1:
            w = 0.0 if l1 == l0 else (math.log(loss) - math.log(l0)) / (math.log(l1) - math.log(l0))
            return g0 + w * (g1 - g0)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-articles", type=int, default=62, help="calibration blocks, one per article")
    ap.add_argument("--sets", type=int, default=7, help="disjoint calibration sets")
    ap.add_argument("--n-calib", type=int, default=8, help="blocks per set")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--gain-seq-len", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=48, help="held-out blocks for the proxy's check")
    ap.add_argument("--validate-sets", type=int, default=3, help="sets whose two smallest plans are measured")
    ap.add_argument("--betas", default="0.0006,0.0008,0.001,0.0012,0.0016,0.002,0.0028,0.004,0.0056,0.008,0.011",
                    help="β of each frontier (wider than the grid: IP-ET's plans land above their budgets)")
    ap.add_argument("--grid", default="0.0012,0.0016,0.002,0.0028,0.004,0.0056,0.008",
                    help="β whose loss budgets the two frontiers are compared at")
    ap.add_argument("--format", default="int8")
    ap.add_argument("--outlier-factor", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-modelopt", action="store_true",
                    help="skip ModelOpt auto_quantize's frontier on each set (needs the bench extra)")
    ap.add_argument("--work", default="out/bench_headroom", help="per-article records and gains (resumed)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "headroom"))
    a = ap.parse_args()
    from inc_ipamp.runtime import set_threads

    set_threads(a.threads)
    prov = provenance(__file__)

    import torch

    from inc_ipamp import pipeline
    from inc_ipamp.data import TokenBlocks, load_blocks
    from inc_ipamp.distributed import merge_sensitivities
    from inc_ipamp.evaluate import loss_change, sequence_losses
    from inc_ipamp.records import Gains, Partition, Sensitivity
    from inc_ipamp.sensitivity import calibrate
    from inc_ipamp.solver import frontier, plan_gain

    betas = sorted(float(b) for b in a.betas.split(",") if b)
    base = pipeline.RunSettings(n_calib=a.n_calib, n_eval=a.n_eval, seq_len=a.seq_len, gain_seq_len=a.gain_seq_len,
                                threads=a.threads, formats=["fp32", a.format])
    model, tok = pipeline.load(base)
    cal = load_blocks(tok, "calibration", a.n_articles, a.seq_len)
    work = Path(a.work)
    (work / "articles").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    recs, fresh = [], 0
    for i in range(len(cal.ids)):
        p = work / "articles" / f"{i}.json"
        if not p.exists():
            fresh += 1
            calibrate(model, TokenBlocks(cal.ids[i:i + 1], cal.source, cal.split), [a.format],
                      progress=False).save(p)
        recs.append(Sensitivity.load(p))
    t_cal = time.perf_counter() - t0
    base.save(work)
    if not (work / "gains.json").exists():
        pipeline.stage_partition(work, base, model, tok)
        pipeline.stage_measure(work, base, model, tok)
    part, gains = Partition.load(work / "partition.json"), Gains.load(work / "gains.json")

    curv = [sum(st.curv.get(a.format, 0.0) for o in r.ops.values() for st in o.operands.values()) for r in recs]
    med = statistics.median(curv)
    outliers = [i for i, c in enumerate(curv) if c > a.outlier_factor * med]
    keep = [i for i in range(len(recs)) if i not in outliers]
    if len(keep) < max(a.sets, 3) * a.n_calib:  # each set's pool is every other kept article: at least 2 sets' worth
        raise SystemExit(f"{len(keep)} usable articles: too few for {a.sets} disjoint sets of {a.n_calib} with pools "
                         f"of at least {2 * a.n_calib}")
    sets = [keep[k * a.n_calib:(k + 1) * a.n_calib] for k in range(a.sets)]
    mean_loss = statistics.fmean(recs[i].mean_loss for i in keep)
    grid = sorted(float(b) for b in a.grid.split(",") if b)
    budgets = [(b * mean_loss) ** 2 for b in grid]
    ev = list(load_blocks(tok, "evaluation", a.n_eval, a.seq_len)) if a.validate_sets else []
    ref = sequence_losses(model, ev) if ev else None
    rows, checks = [], []
    for k, s in enumerate(sets):
        pool = [i for i in keep if i not in s]
        pool_recs = [recs[i] for i in pool]
        fronts: dict[str, list[dict[str, Any]]] = {}
        for name, idx in (("IP-ET", s), ("oracle", pool)):
            merged = merge_sensitivities([recs[i] for i in idx])
            pts = []
            for p in frontier(merged, part, gains, betas=betas):
                asg = {op: f for op, f in p.assignment.items() if f != "fp32"}
                pts.append({"beta": p.beta, "n_ops": len(asg), "gain_s": p.predicted_gain,
                            "predicted": p.predicted_loss_mse, "proxy": proxy_loss(pool_recs, asg),
                            "assignment": asg})
            fronts[name] = pts
        if not a.no_modelopt:
            # ModelOpt's search on the same 8 blocks, at the bit budgets of IP-ET's plans (as bench_peers gives it)
            from bench_peers import linear_params, run_modelopt

            params = linear_params(model)
            low = [sum(params.get(op, 0) for op in x["assignment"]) for x in fronts["IP-ET"] if x["assignment"]]
            found, _ = run_modelopt(a.format, [cal.ids[i:i + 1] for i in s], low)
            fronts["ModelOpt"] = [{"budget": f["budget"], "n_ops": len(f["assignment"]),
                                   "gain_s": plan_gain(f["assignment"], gains, part),
                                   "proxy": proxy_loss(pool_recs, f["assignment"]), "assignment": f["assignment"]}
                                  for f in found]
        if k < a.validate_sets:
            for pt in fronts["IP-ET"][:2]:
                if pt["assignment"]:
                    m = loss_change(model, ev, pt["assignment"], reference=ref)
                    checks.append({"set": k, "beta": pt["beta"], "n_ops": pt["n_ops"], "proxy": pt["proxy"],
                                   "measured": m["measured_loss_mse"], "predicted": pt["predicted"]})
                    print(f"check set {k} β {pt['beta']}: proxy {pt['proxy']:.3g} measured "
                          f"{m['measured_loss_mse']:.3g}", flush=True)
        at = {name: [gain_at([(x["proxy"], x["gain_s"]) for x in pts], b) for b in budgets]
              for name, pts in fronts.items()}
        rows.append({"set": k, "articles": s, "frontiers": fronts, "gain_at": at})
        print(f"set {k}: " + "; ".join(f"{n} {v}" for n, v in at.items()), flush=True)
    res = {"provenance": finish(prov), "settings": vars(a), "calibrate_s": t_cal, "calibrated_here": fresh,
           "outliers": outliers,
           "curvature_sums": curv, "budgets": budgets, "grid": grid, "betas": betas,
           "reference_time_s": gains.reference_time_s, "mean_loss": mean_loss,
           "versions": {"torch": torch.__version__}, "rows": rows, "checks": checks}
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    write_md(res, out.with_suffix(".md"))


def write_md(res: dict[str, Any], path: Path) -> None:
    s, rows, t_ref = res["settings"], res["rows"], res["reference_time_s"]
    md = ["# Headroom at equal loss: IP-ET's frontier on a few calibration articles vs an oracle's (and ModelOpt's)",
          "",
          *header(res["provenance"]), "",
          f"- SmolLM2-135M, {s['format']} vs fp32, prefill gains measured once on this CPU ({s['threads']} thread(s), "
          f"{s['gain_seq_len']} tokens; reference {t_ref * 1e3:.1f} ms) and shared by every frontier.",
          f"- {s['n_articles']} calibration articles, one {s['seq_len']}-token block each, calibrated one at a time "
          f"({res.get('calibrated_here', '?')} of them in this run, {res['calibrate_s'] / 60:.1f} min; the others "
          f"resumed from `--work`). Left out as outliers (curvature sum over {s['outlier_factor']:g}× "
          f"the median {statistics.median(res['curvature_sums']):.3g}): "
          + (", ".join(f"article {i} ({res['curvature_sums'][i]:.3g})" for i in res["outliers"]) or "none") + ".",
          f"- {s['sets']} disjoint sets of {s['n_calib']} articles. IP-ET: the frontier (β = {s['betas']}) chosen on "
          "the set; oracle: the frontier chosen on the pool of every other kept article"
          + ("" if s.get("no_modelopt") else "; ModelOpt: `mtq.auto_quantize` (gradient scores, INT8 per-tensor "
             "candidate, as `bench_peers.py` runs it) on the set's blocks at the weight-bit budgets of IP-ET's plans, "
             "its plans given the same measured group gains")
          + ". All scored by the pool's Taylor proxy of the loss MSE (first-order changes per article, plus half "
          "the mean curvature, squared and averaged).", ""]
    if res["checks"]:
        md += ["## The proxy against measured loss", "",
               f"IP-ET's two smallest plans of the first sets, measured on {s['n_eval']} held-out blocks of the "
               "evaluation split (one per article) with the kernels' numerics.", "",
               "| set | β | ops | own prediction | proxy (pool) | measured (held out) | measured / proxy |",
               "|---|---|---|---|---|---|---|"]
        for c in res["checks"]:
            md.append(f"| {c['set']} | {c['beta']:g} | {c['n_ops']} | {c['predicted']:.3g} | {c['proxy']:.3g} | "
                      f"{c['measured']:.3g} | {c['measured'] / c['proxy']:.2f} |")
        r = [c["measured"] / c["proxy"] for c in res["checks"]]
        md += ["", f"measured / proxy: median {statistics.median(r):.2f}, range {min(r):.2f}-{max(r):.2f}.", ""]
    md += ["## Gain at equal proxy loss", "",
           "Per set, the predicted gain (ms) of each frontier at the loss MSE of a β budget "
           f"((β × {res['mean_loss']:.3f})², the kept articles' mean loss); — where that loss lies outside a "
           "frontier's plans.", "",
           "| set | " + " | ".join(f"β {b:g} ({x:.2g})" for b, x in zip(res["grid"], res["budgets"], strict=True))
           + " |", "|---|" + "---|" * len(res["grid"])]

    def cell(x: float | None) -> str:
        return "—" if x is None else f"{x * 1e3:.2f}"

    methods = list(rows[0]["gain_at"])
    for r in rows:
        md += [f"| {r['set']} {m} | " + " | ".join(cell(x) for x in r["gain_at"][m]) + " |" for m in methods]

    def mean_pair(j: int, m: str) -> tuple[int, float, float] | None:
        pairs = [(r["gain_at"]["IP-ET"][j], r["gain_at"][m][j]) for r in rows]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        if not pairs:
            return None
        return len(pairs), statistics.fmean(p[0] for p in pairs), statistics.fmean(p[1] for p in pairs)

    from inc_ipamp.solver import speedup_of

    def points(gi: float, go: float) -> float:
        return speedup_of(go, t_ref) - speedup_of(gi, t_ref)

    md += ["", "## Summary", "",
           "Means over the sets where both frontiers reach the loss. Speedup points: the difference of the two "
           f"speedups T / (T − gain) at the reference {t_ref * 1e3:.1f} ms.", "",
           "| β budget | vs | sets | IP-ET gain (ms) | its gain (ms) | its minus IP-ET (ms) | in speedup points | "
           "its / IP-ET |", "|---|---|---|---|---|---|---|---|"]
    for j, b in enumerate(res["grid"]):
        for m in methods[1:]:
            mp = mean_pair(j, m)
            if mp is None:
                md.append(f"| {b:g} | {m} | 0 | — | — | — | — | — |")
                continue
            n, gi, go = mp
            md.append(f"| {b:g} | {m} | {n} | {gi * 1e3:.2f} | {go * 1e3:.2f} | {(go - gi) * 1e3:+.2f} | "
                      f"{points(gi, go):+.4f} | {go / gi:.2f} |")
    own = [x["predicted"] / x["proxy"] for r in rows for x in r["frontiers"]["IP-ET"] if x["proxy"] > 0]
    md += ["", f"IP-ET's own prediction / proxy over its {len(own)} plans: median {statistics.median(own):.2f}, "
           f"range {min(own):.2f}-{max(own):.2f}."]
    path.write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
