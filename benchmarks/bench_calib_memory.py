"""Peak memory and time of the default calibration (curvature on) per ``--calib-batch``, each in a fresh process.

Why: the default run peaked at 8.4 GB on a 135M model. Two causes were fixed (a tensor hook holding its own tensor,
a cycle through autograd that Python's gc cannot free; the previous batch's graph kept alive by ``loss``); what is
left scales with the sequences per fwd+bwd, which is why the default batch is 1. Each row is one fresh
``calibrate`` on the same sequences (ru_maxrss of that process), rows run one after another on this machine;
the load average is recorded with each row because the machine is shared.

    python benchmarks/bench_calib_memory.py --n-calib 8 --batches 1 2 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from provenance import finish, fresh_process, header, provenance  # noqa: E402

CHILD = r"""
import json, resource, sys, time, torch
from inc_ipamp.pipeline import RunSettings, blocks, load
from inc_ipamp.sensitivity import calibrate
n, b, T, threads = (int(x) for x in sys.argv[1:5])
torch.set_num_threads(threads)
s = RunSettings(n_calib=n, calib_batch=b, seq_len=T)
model, tok = load(s)
cal = blocks(tok, s, "calibration")
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
sens = calibrate(model, cal, ["int8"], batch_size=b, curvature=True, progress=False)
print(json.dumps({"calib_batch": b, "wall_s": time.perf_counter() - t0, "rss_before_mb": rss0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "mean_loss": sens.mean_loss}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "calib_memory"))
    a = ap.parse_args()
    prov = provenance(__file__)
    rows = []
    for b in a.batches:
        row = fresh_process(CHILD, str(a.n_calib), str(b), str(a.seq_len), str(a.threads))
        rows.append(row)
        print(row, flush=True)
    res = {"provenance": finish(prov), "threads": a.threads, "n_calib": a.n_calib, "seq_len": a.seq_len,
           "rows": rows}
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = [f"# Calibration peak memory per --calib-batch (SmolLM2-135M, {a.n_calib} x {a.seq_len} tokens, curvature on)",
          "", *header(prov), f"Torch threads {a.threads}; each row a fresh process.", "",
          "| calib batch | peak RSS (MiB) | RSS after loading (MiB) | calibration wall (s) | s / sequence | "
          "load avg before / after |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['calib_batch']} | {r['peak_rss_mb']:.0f} | {r['rss_before_mb']:.0f} | {r['wall_s']:.1f} | "
                  f"{r['wall_s'] / a.n_calib:.2f} | {r['load_avg_before']} / {r['load_avg_after']} |")
    same = len({round(r["mean_loss"], 6) for r in rows}) == 1
    losses = ", ".join(f"{r['mean_loss']:.6f}" for r in rows)
    md += ["", f"Mean calibration loss identical across batch sizes: {same} ({losses}). Times are from a shared "
           "machine (load above): compare memory, not speed."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
