"""runtime: thread choice from the free cores, the output-folder lock, and progress lines that survive a log file."""

from __future__ import annotations

import subprocess
import sys

import pytest

from inc_ipamp.errors import IpampError
from inc_ipamp.runtime import OutputLock, Progress, free_cores, loaded, set_threads


@pytest.mark.parametrize("load,cpus,expect", [(0.0, 2, 2), (0.4, 2, 2), (0.6, 2, 1), (1.0, 2, 1), (5.0, 2, 1),
                                              (2.0, 16, 14)])
def test_free_cores(load, cpus, expect) -> None:
    assert free_cores(load=load, cpus=cpus) == expect


def test_set_threads_refuses_zero() -> None:
    with pytest.raises(IpampError, match="threads"):
        set_threads(0)


def test_loaded() -> None:
    assert loaded({"load_avg_1min": 3.1, "cpus": 2, "threads": 1})
    assert not loaded({"load_avg_1min": 0.9, "cpus": 2, "threads": 1})


def test_lock_is_exclusive_across_processes(tmp_path) -> None:
    code = ("import sys; from inc_ipamp.runtime import OutputLock\n"
            "try:\n    OutputLock(sys.argv[1]).__enter__(); print('got it')\n"
            "except Exception as e:\n    print('refused:', e)")
    with OutputLock(tmp_path):
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert r.stdout.startswith("refused: another inc-ipamp process"), r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("got it")


def test_progress_writes_lines_when_not_a_terminal(capsys) -> None:
    with Progress(3, "stage x", unit="step", log_every_s=0.0) as bar:
        for _ in range(3):
            bar.update()
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[0] == "stage x: 3 step to do" and "3/3 step" in err
