"""What every results file records about how it was made: commit (and whether the code it depends on had
uncommitted changes), the exact command, and the machine state (threads, cores, load) at start and end."""

from __future__ import annotations

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


def provenance(script: str) -> dict[str, Any]:
    """Commit, command and machine state now; ``script`` = the benchmark's own file (its changes count too)."""
    from inc_ipamp.runtime import machine_state

    dirty = _git("status", "--porcelain", "--", "inc_ipamp", str(Path(script).resolve().relative_to(ROOT)))
    return {"commit": _git("rev-parse", "--short", "HEAD"), "uncommitted_changes": bool(dirty),
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
