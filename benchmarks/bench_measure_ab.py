"""Gain measurement before and after a change, side by side (issue 14, item 3): the measure stage of an older commit
(``--old``, default 29fd791: one reference run per config run, 3 warm-up pairs, fixed repetitions, drift flagged) and
of this checkout (configs of a signature against one shared reference per round, adaptive repetitions, drift
rescaled, speed probe), alternating, on one calibration and partition of SmolLM2-135M (CPU, fp32 vs INT8, 1 thread).

Per run: wall time of ``measure_gains``, timed sub-graph calls, flagged configs, load. Decisions: every run's gains
table is solved with this checkout's solver at the default budget, and each plan's predicted gain (as a share of the
reference prefill) is evaluated with every run's table, so a plan is judged by tables other than its own.

    python benchmarks/bench_measure_ab.py            # 2 x (old, new), writes benchmarks/results/measure_ab.md
    # beside other work in the checkout: PYTHONPATH=<git archive HEAD inc_ipamp, unpacked> python benchmarks/...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).parent))
from provenance import finish, header, provenance  # noqa: E402

#: the measure stage as both versions' public API has it (no settings file, which changed between versions)
MEASURE = """
import json, sys, time
from inc_ipamp.gains import measure_gains
from inc_ipamp.models import load_model
from inc_ipamp.records import Partition
from inc_ipamp.runtime import machine_state, set_threads
set_threads(1)
out = sys.argv[1]
model, _ = load_model("default")
part = Partition.load(out + "/partition.json")
st = machine_state()
t = time.perf_counter()
g = measure_gains(model, part, ["fp32", "int8"], backend="cpu", batch=1, seq_len=int(sys.argv[2]),
                  reps=int(sys.argv[3]), cache_path=out + "/gain_cache.jsonl", progress=False)
dt = time.perf_counter() - t
g.save(out + "/gains.json")
import inc_ipamp, pathlib
json.dump({"inc_ipamp": str(pathlib.Path(inc_ipamp.__file__).resolve().parents[1]), "measure_s": dt,
           # the old commit's record calls the count timed_runs
           "subgraph_calls": getattr(g, "subgraph_calls", getattr(g, "timed_runs", None)),
           "flagged": g.quality.get("flagged_configs"),
           "start": st, "end": machine_state(), "notes": [n for n in g.notes if n.startswith("ET:")]},
          open(out + "/run.json", "w"))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="29fd791")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--gain-seq-len", type=int, default=128)
    ap.add_argument("--out", default=str(RESULTS / "measure_ab.md"))
    a = ap.parse_args()
    import inc_ipamp
    from inc_ipamp import pipeline
    from inc_ipamp.records import Gains, Partition, Plan
    from inc_ipamp.runtime import set_threads
    from inc_ipamp.solver import plan_gain

    set_threads(1)
    prov = provenance(__file__)
    new_src = Path(inc_ipamp.__file__).resolve().parents[1]  # run with PYTHONPATH=<an export of HEAD> to isolate it
    work = Path(tempfile.mkdtemp(prefix="bench_measure_ab_"))
    old_src = work / "old"
    old_src.mkdir()
    subprocess.run(f"git archive {a.old} inc_ipamp | tar -x -C {old_src}", shell=True, check=True, cwd=ROOT)
    s = pipeline.RunSettings(n_calib=8, n_eval=8, seq_len=256, gain_seq_len=a.gain_seq_len, reps=a.reps, threads=1)
    base = work / "base"
    base.mkdir()
    s.save(base)
    model, tok = pipeline.load(s)
    pipeline.stage_calibrate(base, s, model, tok)
    pipeline.stage_partition(base, s, model, tok)
    runs: list[str] = []
    for i in range(a.repeats):
        for which, src in (("old", old_src), ("new", new_src)):
            name = f"{which}{i + 1}"
            d = work / name
            d.mkdir()
            for f in ("settings.json", "sensitivity.json", "partition.json"):
                (d / f).write_bytes((base / f).read_bytes())
            env = {**os.environ, "PYTHONPATH": str(src)}
            # cwd outside the checkout: ``python -c`` puts the cwd before PYTHONPATH on sys.path
            subprocess.run([sys.executable, "-c", MEASURE, str(d), str(a.gain_seq_len), str(a.reps)], check=True,
                           env=env, cwd=work)
            ran = json.loads((d / "run.json").read_text())["inc_ipamp"]
            if Path(ran).resolve() != Path(src).resolve():
                raise SystemExit(f"{name} imported inc_ipamp from {ran}, not {src}")
            pipeline.stage_solve(d, s)
            runs.append(name)
            print(name, json.loads((d / "run.json").read_text())["measure_s"], flush=True)
    part = Partition.load(base / "partition.json")
    gains = {r: Gains.load(work / r / "gains.json") for r in runs}
    plans = {r: Plan.load(work / r / "plan.json") for r in runs}

    def share(assignment: dict[str, str], g: Gains) -> float:
        return plan_gain(assignment, g, part) / g.reference_time_s

    info = {r: json.loads((work / r / "run.json").read_text()) for r in runs}
    md = ["# Gain measurement before and after (SmolLM2-135M, CPU fp32 vs INT8, 1 thread)", "",
          *header(finish(prov)), f"New = that commit, old = `{a.old}`"
          + (f"; the new inc_ipamp was imported from {new_src} (an export, not the checkout)." if new_src != ROOT
             else "."), "",
          f"- One calibration (8×256 tokens) and partition; each run measures every configuration from scratch "
          f"(reps {a.reps}, prefill 1×{a.gain_seq_len}), old and new alternating; 2 cores shared with other jobs.",
          "",
          "| run | measure s | timed sub-graph calls | flagged configs | load start → end |", "|---|---|---|---|---|"]
    for r in runs:
        x = info[r]
        md.append(f"| {r} | {x['measure_s']:.1f} | {x['subgraph_calls']} | {x['flagged']} | "
                  f"{x['start']['load_avg_1min']} → {x['end']['load_avg_1min']} |")
    md += ["", "Plan at the default budget (β = 0.01) solved on each run's table (rows), its predicted gain as a share "
           "of the reference prefill under every run's table (columns); INT8 ops in the plan:", "",
           "| plan from | " + " | ".join(runs) + " | INT8 ops |", "|---" * (len(runs) + 2) + "|"]
    for r in runs:
        asg = plans[r].assignment
        md.append(f"| {r} | " + " | ".join(f"{share(asg, gains[t]):.4f}" for t in runs)
                  + f" | {sum(f != 'fp32' for f in asg.values())} |")
    ops = {r: {o for o, f in plans[r].assignment.items() if f != "fp32"} for r in runs}
    md += ["", "Overlap of the plans' INT8 op sets (Jaccard): " + ", ".join(
        f"{x}/{y} {len(ops[x] & ops[y]) / max(1, len(ops[x] | ops[y])):.2f}"
        for i, x in enumerate(runs) for y in runs[i + 1:]) + ".", "",
        "Notes of each run's measurement:", ""]
    md += [f"- {r}: {n}" for r in runs for n in info[r]["notes"][-1:]]
    Path(a.out).write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
