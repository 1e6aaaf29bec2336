"""Does the IP's plan keep its loss budget on held-out text, with and without the selection correction?

The IP buys the ops whose estimated loss terms came out low on the calibration, so the plan's prediction from the
sequences it was chosen on is biased low (the winner's curse). This benchmark calibrates ``--sets`` disjoint sets of
``--n-calib`` calibration blocks (one block per Wikipedia article), solves each at every β twice — the IP alone
(``selection_draws=0``) and within the budget divided by the bootstrap's selection optimism (``solver.solve``'s
default) — and scores every plan by:
  - its own prediction, and the other sets' predictions of the same plan (independent calibrations);
  - its measured loss MSE on ``--n-eval`` held-out blocks (one per article of the evaluation split), with the
    kernels' numerics (``evaluate.loss_change``; CPU INT8 fake quantisation is bit-identical to the kernels);
  - measured / budget, the number a user's budget is judged by, and the predicted time gain.
Gains are measured once (cpu backend) and shared by every set. Nothing here is timed for the comparison.

    python benchmarks/bench_selection.py --sets 4 --n-calib 8 --betas 0.002,0.004,0.008
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from provenance import finish, header, provenance  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", type=int, default=4, help="disjoint calibration sets")
    ap.add_argument("--n-calib", type=int, default=8, help="calibration blocks per set")
    ap.add_argument("--n-eval", type=int, default=48)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--betas", default="0.002,0.004,0.008")
    ap.add_argument("--format", default="int8")
    ap.add_argument("--draws", type=int, default=None, help="bootstrap draws (default: solver.SELECTION_DRAWS)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "selection"))
    a = ap.parse_args()
    prov = provenance(__file__)

    import torch

    from inc_ipamp import pipeline
    from inc_ipamp.data import TokenBlocks, load_blocks
    from inc_ipamp.evaluate import loss_change, sequence_losses
    from inc_ipamp.runtime import set_threads
    from inc_ipamp.sensitivity import calibrate
    from inc_ipamp.solver import SELECTION_DRAWS, solve

    draws = SELECTION_DRAWS if a.draws is None else a.draws
    set_threads(a.threads)
    betas = [float(b) for b in a.betas.split(",") if b]
    base = pipeline.RunSettings(n_calib=a.n_calib, n_eval=a.n_eval, seq_len=a.seq_len, threads=a.threads,
                                formats=["fp32", a.format])
    model, tok = pipeline.load(base)
    cal = load_blocks(tok, "calibration", a.sets * a.n_calib, a.seq_len)
    ev = list(load_blocks(tok, "evaluation", a.n_eval, a.seq_len))
    work = Path(tempfile.mkdtemp(prefix="bench_selection_"))
    base.save(work)
    t0 = time.perf_counter()
    recs = []
    for k in range(a.sets):
        ids = cal.ids[k * a.n_calib:(k + 1) * a.n_calib]
        recs.append(calibrate(model, TokenBlocks(ids, cal.source, cal.split), [a.format], progress=False))
    t_cal = time.perf_counter() - t0
    pipeline.stage_partition(work, base, model, tok)
    gains = pipeline.stage_measure(work, base, model, tok)
    from inc_ipamp.records import Partition

    part = Partition.load(work / "partition.json")
    ref = sequence_losses(model, ev)
    measured: dict[str, dict[str, Any]] = {}

    def measure(asg: dict[str, str]) -> dict[str, Any]:
        key = json.dumps(sorted(asg.items()))
        if key not in measured:
            m = loss_change(model, ev, asg, reference=ref, per_sequence=True)
            measured[key] = {"mse": m["measured_loss_mse"], "shift": m["measured_loss_shift"]}
        return measured[key]

    rows = []
    for k, rec in enumerate(recs):
        for beta in betas:
            for mode, d in (("IP alone", 0), ("corrected", draws)):
                t = time.perf_counter()
                p = solve(rec, part, gains, beta=beta, selection_draws=d)
                solve_s = time.perf_counter() - t
                asg = {op: f for op, f in p.assignment.items() if f != "fp32"}
                m = measure(asg) if asg else {"mse": 0.0, "shift": 0.0}
                others = [r.predict(asg) for j, r in enumerate(recs) if j != k]
                opt = p.solver.get("selection_optimism")
                rows.append({"set": k, "beta": beta, "mode": mode, "n_ops": len(asg), "assignment": asg,
                             "budget": p.budget_loss_mse, "predicted": p.predicted_loss_mse,
                             "others_median": statistics.median(others) if others else None,
                             "optimism": opt["factor"] if opt else None,
                             "corrected": p.solver.get("corrected_loss_mse"), "gain_s": p.predicted_gain,
                             "solve_s": solve_s, "measured": m["mse"], "measured_shift": m["shift"]})
                print(f"set {k} beta {beta} {mode}: {len(asg)} ops, pred {p.predicted_loss_mse:.3g}, "
                      f"measured {m['mse']:.3g}, budget {p.budget_loss_mse:.3g}", flush=True)
    res = {"provenance": finish(prov), "settings": vars(a) | {"draws": draws}, "calibrate_s": t_cal,
           "reference_time_s": gains.reference_time_s, "eval_data": "evaluation split",
           "versions": {"torch": torch.__version__}, "rows": rows}
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    write_md(res, out.with_suffix(".md"))


def _ratios(rows: list[dict[str, Any]], mode: str) -> list[float]:
    return [r["measured"] / r["budget"] for r in rows if r["mode"] == mode and r["budget"]]


def write_md(res: dict[str, Any], path: Path) -> None:
    s, rows = res["settings"], res["rows"]
    md = ["# Loss budgets on held-out text: the IP alone vs corrected for its selection", "",
          *header(res["provenance"]), "",
          f"- SmolLM2-135M, {s['format']} vs fp32; {s['sets']} disjoint calibration sets of {s['n_calib']}×"
          f"{s['seq_len']} tokens (one block per Wikipedia article of the calibration split); held-out loss on "
          f"{s['n_eval']}×{s['seq_len']} tokens (one block per article of the evaluation split), kernel numerics.",
          f"- Corrected: `solver.solve`'s default, the budget divided by the bootstrap's selection optimism over "
          f"{s['draws']} redraws of the calibration sequences (`solver.selection_optimism`).",
          f"- Gains measured once on this CPU ({s['threads']} threads) and shared by every set; reference prefill "
          f"{res['reference_time_s'] * 1e3:.1f} ms.", "",
          "| set | β | plan | ops | budget | own prediction | other sets' prediction (median) | optimism | "
          "corrected prediction | measured | measured / budget | predicted gain (ms) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['set']} | {r['beta']:g} | {r['mode']} | {r['n_ops']} | {r['budget']:.3g} | "
                  f"{r['predicted']:.3g} | {r['others_median']:.3g} | "
                  f"{'—' if r['optimism'] is None else format(r['optimism'], '.2f')} | "
                  f"{'—' if r['corrected'] is None else format(r['corrected'], '.3g')} | {r['measured']:.3g} | "
                  f"{r['measured'] / r['budget']:.2f} | {r['gain_s'] * 1e3:.2f} |")
    md += ["", "## Summary", ""]
    for mode in ("IP alone", "corrected"):
        q = _ratios(rows, mode)
        g = [r["gain_s"] for r in rows if r["mode"] == mode]
        own = [r["measured"] / r["predicted"] for r in rows if r["mode"] == mode and r["predicted"] > 0]
        md.append(f"- {mode}: measured / budget median {statistics.median(q):.2f}, max {max(q):.2f}, over 1: "
                  f"{sum(x > 1 for x in q)} of {len(q)}, over 2 (`evaluate`'s loss check fails): "
                  f"{sum(x > 2 for x in q)}; measured / own prediction median {statistics.median(own):.2f}; "
                  f"Σ predicted gain {sum(g) * 1e3:.1f} ms.")
    path.write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
