"""Issue 12's acceptance, recorded: both INC entry points run the whole method from scratch on the embedded default.

Runs, one after the other, each with a fresh workspace:
  INC 3.x  `python examples/cpu_inc_autotune.py`                 (main environment, neural-compressor-pt 3.10)
  INC 2.x  `.venv-inc2/bin/python examples/inc2_post_training_quant.py`   (second environment, INC 3.7.1)
and writes their console output verbatim (phase times, points tried, accepted plan, returned model vs fp32) with the
commit, command and load average. No number in the results file is computed here: they are the examples' own lines.

    python benchmarks/bench_inc_native.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from provenance import finish, header, provenance  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inc2-python", default=str(ROOT / ".venv-inc2" / "bin" / "python"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inc_native"))
    a = ap.parse_args()
    prov = provenance(__file__, "examples")
    runs = {"INC 3.x autotune": [sys.executable, "examples/cpu_inc_autotune.py"],
            "INC 2.x quantization.fit": [a.inc2_python, "examples/inc2_post_training_quant.py"]}
    res: dict = {"provenance": prov, "runs": {}}
    for name, cmd in runs.items():
        ws = Path(tempfile.mkdtemp(prefix="ipamp_inc_native_"))
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        r = subprocess.run([*cmd, "--workspace", str(ws)], capture_output=True, text=True, cwd=ROOT)
        res["runs"][name] = {"command": " ".join(cmd[1:]) + " --workspace <fresh>", "exit_code": r.returncode,
                             "wall_s": round(time.perf_counter() - t0, 1), "load_avg_before": round(load0, 2),
                             "load_avg_after": round(os.getloadavg()[0], 2),
                             "stdout": [ln for ln in r.stdout.splitlines() if ln.strip()][-30:],
                             "stderr_tail": r.stderr.splitlines()[-5:] if r.returncode else []}
        shutil.rmtree(ws, ignore_errors=True)
        print(name, r.returncode, flush=True)
    finish(prov)
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = ["# INC-native: the whole method from the user's own INC call (embedded SmolLM2-135M, from scratch)", "",
          *header(prov), "Each run's console output follows verbatim (its own phase times, trials and the returned "
          "model measured against fp32).", ""]
    for name, r in res["runs"].items():
        md += [f"## {name}", "", f"`{r['command']}`: exit {r['exit_code']}, {r['wall_s']:.0f} s, load average "
               f"{r['load_avg_before']} before / {r['load_avg_after']} after", "", "```", *r["stdout"],
               *r["stderr_tail"], "```", ""]
    out.with_suffix(".md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
