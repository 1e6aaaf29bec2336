"""The README's main command (`inc-ipamp run`, embedded default) timed as a newcomer would meet it, optionally with
a competing CPU-bound process on the same cores (issue 18's acceptance: ≤ 10 min, ≤ 2 GB on 2 shared cores, and a
measured speedup within its predicted tolerance or a clear statement that it could not measure reliably).

Records: wall time and peak RSS of the whole command (the child's ru_maxrss), the per-stage times from
`stages.json`, the thread count the run chose, the load average sampled every 10 s, the plan, the measured
speedup, the speed check and the measurement's quality record. Everything in the output is read from the run.

    python benchmarks/bench_default_run.py --compete 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from provenance import finish, header, provenance  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compete", type=int, default=1, help="CPU-bound busy-loop processes running alongside")
    ap.add_argument("--extra", default="", help="extra options for `inc-ipamp run`")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "default_run"))
    ap.add_argument("--keep", help="copy the run's output folder here (default: removed)")
    a = ap.parse_args()
    prov = provenance(__file__)
    work = Path(tempfile.mkdtemp(prefix="ipamp_default_run_"))
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.compete)]
    loads: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.time()
        while not stop.is_set():
            loads.append((round(time.time() - t0, 1), os.getloadavg()[0]))
            stop.wait(10)

    threading.Thread(target=sample, daemon=True).start()
    time.sleep(5)  # the competitor is running before the user's command starts, as on a busy machine
    exe = Path(sys.executable).with_name("inc-ipamp")  # the console script, as a user calls it
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "inc_ipamp.cli"]  # package on PYTHONPATH only
    cmd = [*cli, "run", "--out", str(work / "out"), *a.extra.split()]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        wall = time.perf_counter() - t0
        stop.set()
        for b in burners:
            b.kill()
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out = work / "out"
    res = {"provenance": finish(prov), "run_command": "inc-ipamp run " + a.extra, "exit_code": r.returncode,
           "wall_s": wall, "peak_rss_mb": peak_mb, "competing_busy_processes": a.compete, "cpus": os.cpu_count(),
           "load_avg_samples": loads, "stdout_tail": r.stdout.splitlines()[-25:],
           "stderr_tail": [ln for ln in r.stderr.splitlines() if "error" in ln.lower() or "WARNING" in ln][-10:]}
    if r.returncode == 0:
        stages = json.loads((out / "stages.json").read_text())
        ev = json.loads((out / "evaluation.json").read_text())
        plan = json.loads((out / "plan.json").read_text())
        gains = json.loads((out / "gains.json").read_text())
        res.update(stages=stages, evaluation=ev, plan_low_ops=len([f for f in plan["assignment"].values()
                                                                    if f != plan["reference_format"]]),
                   plan_ops=len(plan["assignment"]), gains_quality=gains["quality"], gains_notes=gains["notes"])
    path = Path(a.out)
    path.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = [f"# `inc-ipamp run{' ' + a.extra if a.extra else ''}` on the embedded default, {a.compete} competing busy "
          "process(es)", "", *header(prov), f"Exit code {r.returncode}.", "",
          f"- Wall time **{wall / 60:.2f} min**, peak RSS **{peak_mb:.0f} MiB** (the whole command).",
          f"- Load average during the run: {min(v for _, v in loads):.2f} – {max(v for _, v in loads):.2f}."]
    if r.returncode == 0:
        ip = res["evaluation"]["plans"]["ip"]
        st = res["stages"]
        md += [f"- Gains measured on: {gains['device']}.",
               f"- Threads chosen: {st[0]['machine_start']['threads']}.",
               "- Stages: " + ", ".join(f"{s['stage']} {s['wall_s']:.0f} s" for s in st) + ".",
               f"- Plan: {res['plan_low_ops']} of {res['plan_ops']} ops in {'/'.join(gains['formats'][1:])}; "
               "predicted loss MSE "
               f"{ip['predicted_loss_mse']:.3g}, measured (held-out) {ip['measured_loss_mse']:.3g}; perplexity "
               f"{res['evaluation']['reference']['perplexity']:.2f} → {ip['perplexity']:.2f}.",
               f"- Measured prefill speedup {ip.get('measured_speedup', float('nan')):.3f}x; speed check: "
               f"{ip['speed_check']['message'] if 'speed_check' in ip else 'n/a'}.",
               f"- Measurement quality: {res['gains_quality']['flagged_configs']} flagged config(s); Σ best gains "
               f"{res['gains_quality']['sum_best_gain_s'] * 1e3:.4g} ms vs reference prefill "
               f"{res['gains_quality']['reference_prefill_s'] * 1e3:.4g} ms.",
               "", "Baselines at the same budget (measured):", "",
               "| plan | low-precision ops | same plan as IP | measured speedup |", "|---|---|---|---|"]
        for name, row in res["evaluation"]["plans"].items():
            md.append(f"| {name} | {row['n_low_precision_ops']} | {bool(row.get('same_plan_as_ip'))} | "
                      f"{row.get('measured_speedup', float('nan')):.3f}x |")
    else:
        md += ["", "The run failed:", "", *[f"    {ln}" for ln in res["stderr_tail"]]]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    if a.keep:
        shutil.copytree(out, a.keep, dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    print("\n".join(md))


if __name__ == "__main__":
    main()
