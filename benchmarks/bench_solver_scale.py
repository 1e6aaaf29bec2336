"""Solver at production size: the 21-point frontier on SYNTHETIC instances shaped like Llama-3-70B and Mixtral-8x7B.

The records are made by ``inc_ipamp.synthetic`` (seeded random numbers in the real record classes, the real op
shapes and group layout); only the solver timings are measurements. Each instance is solved by the fast path
(``fast=True``, HiGHS fed arrays, warm starts) and, where ``--pyomo`` lists it, by the Pyomo path as well, and the
two frontiers are compared plan by plan. Each row runs in a fresh process, one after another; the machine is shared,
so the 1-minute load average is recorded before and after every row.

    python benchmarks/bench_solver_scale.py
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from provenance import finish, fresh_process, header, provenance  # noqa: E402

CHILD = r"""
import json, sys, time
from inc_ipamp.runtime import machine_state
from inc_ipamp.synthetic import SHAPES, synthetic_records
from inc_ipamp import solver
shape, fmts, guard, both = sys.argv[1], tuple(sys.argv[2].split(",")), float(sys.argv[3]), sys.argv[4] == "1"
guard = None if guard < 0 else guard
sens, part, gains = synthetic_records(SHAPES[shape], fmts)
t0 = time.perf_counter()
inst = solver.build_instance(sens, part, gains, "ET", "auto", guard)
t_inst = time.perf_counter() - t0
t0 = time.perf_counter()
solver.GroupChoiceIP(inst, None)
t_model = time.perf_counter() - t0
row = {"shape": shape, "formats": list(fmts), "min_sqnr_db": guard, "groups": len(inst.groups),
       "binaries": sum(len(g.configs) for g in inst.groups), "configs_in_gains": sum(len(g.configs) for g in
       gains.groups.values()), "build_instance_s": t_inst, "fast_model_build_s": t_model,
       "betas": len(solver.default_betas(inst)), "machine_start": machine_state()}
runs = {}
for fast in ([True, False] if both else [True]):
    t0, c0 = time.perf_counter(), time.process_time()
    plans = solver.frontier(sens, part, gains, "ET", noise="auto", min_sqnr_db=guard, fast=fast)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    gaps = [p.solver["gap"] for p in plans if p.solver.get("gap") is not None]
    runs["fast" if fast else "pyomo"] = plans
    row["fast" if fast else "pyomo"] = {
        "frontier_s": wall, "frontier_cpu_s": cpu, "solver_s": sum(p.solver["wall_s"] for p in plans),
        "points": len(plans),
        "max_gap": max(gaps) if gaps else None, "max_cut_rounds": max(p.solver.get("cut_rounds") or 0 for p in plans),
        "terminations": sorted({p.solver["termination"] for p in plans}),
        "best_gain_s": max(p.predicted_gain for p in plans)}
if both:
    a, b = runs["fast"], runs["pyomo"]
    row["same_plans"] = sum(x.assignment == y.assignment for x, y in zip(a, b)) if len(a) == len(b) else 0
    row["max_rel_gain_diff"] = max(abs(x.predicted_gain - y.predicted_gain) / max(abs(y.predicted_gain), 1e-30)
                                   for x, y in zip(a, b)) if len(a) == len(b) else None
row["machine_end"] = machine_state()
print(json.dumps(row))
"""

CASES = [  # (shape, formats, SQNR guard (<0: none), also run the Pyomo path); 5 dB is the solver's default guard
    ("llama-70b", "bf16,fp8_e4m3,fp8_e5m2", 5.0, True),
    ("mixtral-8x7b", "bf16,fp8_e4m3,fp8_e5m2", 5.0, True),
    ("llama-70b", "bf16,fp8_e4m3,fp8_e5m2,int8_pc", 5.0, False),
    ("mixtral-8x7b", "bf16,fp8_e4m3,fp8_e5m2,int8_pc", 5.0, False),
    ("llama-70b", "bf16,fp8_e4m3,fp8_e5m2", -1.0, False),
    ("llama-70b", "bf16,fp8_e4m3,fp8_e5m2", 25.0, False),
]


def _t(run: dict) -> str:
    """Wall time, with CPU time where the run recorded it."""
    cpu = run.get("frontier_cpu_s")
    return f"{run['frontier_s']:.2f}" + (f" (cpu {cpu:.2f})" if cpu is not None else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "solver_scale"))
    ap.add_argument("--cases", type=int, nargs="*", help="indices into CASES (default: all)")
    a = ap.parse_args()
    prov = provenance(__file__)
    rows = []
    for i, (shape, fmts, guard, both) in enumerate(CASES):
        if a.cases and i not in a.cases:
            continue
        row = fresh_process(CHILD, shape, fmts, str(guard), "1" if both else "0")
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"provenance": finish(prov), "python": platform.python_version(),
           "note": "SYNTHETIC instances (inc_ipamp.synthetic): only the timings are measurements", "rows": rows}
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = ["# Solver at production size (SYNTHETIC instances, measured solver times)", "",
          *header(prov), f"Python {res['python']}; each row a fresh process, rows one after another. The instances "
          "are SYNTHETIC (`inc_ipamp.synthetic`: the real record classes with Llama-3-70B's "
          "and Mixtral-8x7B's op shapes and group layout, seeded random sensitivities with mean-shift sums and "
          "ET gains); only the times below are measurements. Frontier = `solver.frontier` with its default 21 "
          "β points (build_instance + model + 2-phase solves with cut rounds), noise `auto`. `(cpu …)`: the "
          "process's CPU time over the same span (HiGHS runs on one thread), which the machine's load inflates "
          "less than the wall time.", "",
          "| instance | formats | SQNR guard | groups | binaries (of configs) | frontier fast (s) | frontier Pyomo (s) "
          "| points | max gap | same plans fast vs Pyomo | load avg before / after |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        py, f = r.get("pyomo"), r["fast"]
        guard = "none" if r["min_sqnr_db"] is None else f"{r['min_sqnr_db']:g} dB"
        gap = "–" if f["max_gap"] is None else f"{f['max_gap']:.2g}"
        md.append(f"| {r['shape']} | {', '.join(r['formats'])} | {guard} | {r['groups']} | {r['binaries']} "
                  f"({r['configs_in_gains']}) | {_t(f)} | {_t(py)} | " if py else
                  f"| {r['shape']} | {', '.join(r['formats'])} | {guard} | {r['groups']} | {r['binaries']} "
                  f"({r['configs_in_gains']}) | {_t(f)} | – | ")
        md[-1] += (f"{f['points']} | {gap} | {str(r['same_plans']) + ' of ' + str(f['points']) if py else '–'} | "
                   f"{r['load_avg_before']} / {r['load_avg_after']} |")
    md += ["", "Gap: HiGHS's relative gap |bound − incumbent| / |incumbent| of each point's last solve, at most "
           "`MIP_REL_GAP` = 1e-7 or HiGHS's default absolute gap 1e-6 on the scaled objective (gains divided by "
           "Σ best group gain), whichever it meets first. Every plan's loss and gain are recomputed from the records "
           "(solver.plan_from_choice); a point whose budget could not be certified would be left out with a warning.",
           "", "Phase times (fresh process each): `build_instance` "
           + ", ".join(f"{r['shape']}/{len(r['formats'])} formats {r['build_instance_s']:.2f} s" for r in rows)
           + "; fast model build " + ", ".join(f"{r['fast_model_build_s']:.2f} s" for r in rows) + "."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
