"""What every results file records about how it was made: commit (and whether the code it depends on had
uncommitted changes), the exact command, and the machine state (threads, cores, load) at start and end; and the
fresh-process runner the benchmarks that measure peak memory or isolated timings share."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(script: str, *paths: str) -> dict[str, Any]:
    """Commit, command and machine state now; ``script`` = the benchmark's own file (its changes count too, as do
    those of inc_ipamp and of ``paths``, relative to the repository root). ``finish`` adds the state at the end."""
    from inc_ipamp.runtime import machine_state

    commit = _git("rev-parse", "--short", "HEAD")
    if os.environ.get("IPAMP_COMMIT"):
        # a copy of the working tree sent to a lent accelerator machine, whose .git (if any) is not this one's: the
        # sender names the commit it sent, and whether the tree had changes (IPAMP_DIRTY=1)
        commit, dirty = os.environ["IPAMP_COMMIT"], os.environ.get("IPAMP_DIRTY", "1") != "0"
    else:
        dirty = bool(_git("status", "--porcelain", "--", "inc_ipamp", str(Path(script).resolve().relative_to(ROOT)),
                          *paths))
    return {"commit": commit, "uncommitted_changes": dirty,
            "command": "python " + shlex.join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]]),
            "machine_start": machine_state()}


def header(prov: dict[str, Any]) -> list[str]:
    """Markdown lines naming the commit, command and machine state of a run."""
    end = prov.get("machine_end", {})
    start = prov["machine_start"]
    dirty = " (with uncommitted changes: not reproducible from the commit)" if prov["uncommitted_changes"] else ""
    return [f"Made by `{prov['command']}` at commit {prov['commit']}{dirty}; {start['cpus']} cores, "
            f"{start['threads']} torch thread(s), load average {start['load_avg_1min']} at start "
            f"({start['time']}) and {end.get('load_avg_1min', '?')} at end ({end.get('time', '?')})."]


def finish(prov: dict[str, Any]) -> dict[str, Any]:
    """``prov`` with the machine state at the end of the run (``machine_end``), for ``header``."""
    from inc_ipamp.runtime import machine_state

    prov["machine_end"] = machine_state()
    return prov


def fresh_process(code: str, *args: str, check: bool = True) -> dict[str, Any]:
    """Run ``python -c code args…`` in a fresh process (its own peak RSS, nothing cached from an earlier step) and
    return the JSON object of its last stdout line, with the 1-minute load average before and after (the machine is
    shared). ``check=False``: a failing child gives ``{"error": its last stderr line}`` instead of raising."""
    load_before = os.getloadavg()[0]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=check)
    if r.returncode != 0:
        row: dict[str, Any] = {"error": (r.stderr.strip().splitlines() or ["(no output)"])[-1][:300]}
    else:
        row = json.loads(r.stdout.strip().splitlines()[-1])
    row["load_avg_before"], row["load_avg_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
    return row
