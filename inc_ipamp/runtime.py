"""The machine a run happens on: thread count, load, memory, and one writer per output folder.

Why this exists: on a CPU shared with other jobs, torch's default of one thread per core makes every
parallel kernel wait for a core that another process holds; a 2-layer ``measure`` took 15x longer with one
competing process, and the noisy timings produced a plan 3x slower than fp32. So the thread count is chosen
from the cores actually free, set once per process, and recorded with the load in every artifact.
"""

from __future__ import annotations

import datetime
import errno
import os
import resource
import sys
from pathlib import Path
from typing import Any

from .errors import IpampError


def cpu_count() -> int:
    """Cores this process may run on (affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> float:
    """1-minute load average (0.0 where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def runnable_others() -> int:
    """Processes runnable right now besides this one (/proc/loadavg's 4th field; 0 where there is none)."""
    try:
        with open("/proc/loadavg") as f:
            return max(0, int(f.read().split()[3].split("/")[0]) - 1)
    except (OSError, IndexError, ValueError):
        return 0


def free_cores(load: float | None = None, cpus: int | None = None) -> int:
    """Cores not busy with other work: the core count minus what other jobs use, at least 1.

    "What other jobs use" is the larger of the 1-minute load average (called before this process starts
    computing, so it is other jobs'; a fraction below .5 rounds away) and the processes runnable right now: a job
    started seconds ago barely moves the average yet already takes a core.
    """
    cpus = cpu_count() if cpus is None else cpus
    busy = max(int((load_average() if load is None else load) + 0.5), runnable_others() if load is None else 0)
    return max(1, min(cpus, cpus - busy))


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (None: the free cores) and return the number used."""
    import torch

    if threads is not None and threads < 1:
        raise IpampError(f"--threads must be >= 1, got {threads}")
    n = free_cores() if threads is None else threads
    torch.set_num_threads(n)
    return n


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def machine_state() -> dict[str, Any]:
    """What a timing depended on, for the records: threads, cores, load, time."""
    import torch

    return {"threads": torch.get_num_threads(), "cpus": cpu_count(), "load_avg_1min": round(load_average(), 2),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def loaded(state: dict[str, Any]) -> bool:
    """Whether other work competed for the cores while ``state`` was taken (load beyond our own threads)."""
    return state.get("load_avg_1min", 0.0) > state.get("cpus", 1) + 0.5 or (
        state.get("load_avg_1min", 0.0) > state.get("threads", 1) + 0.75)


class OutputLock:
    """An exclusive, non-blocking lock on an output folder (``flock`` on ``.inc-ipamp.lock``).

    Two processes measuring into one folder would time the same configurations against each other and append
    duplicates to the cache; the second one stops with one clear sentence instead. The OS drops the lock when
    the process dies, so a crash never leaves a stale lock behind.
    """

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / ".inc-ipamp.lock"
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        import fcntl

        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            self._fd = None
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise IpampError(f"another inc-ipamp process (pid {holder}) is using {self.path.parent}; wait for "
                                 "it or give this run its own --out") from None
            raise
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Progress:
    """A progress bar that also reads well in a log file.

    On a terminal it is a tqdm bar that stays on screen when done; when stderr is not a terminal (CI, ``nohup``,
    ``| tee``) tqdm's carriage returns pile into one line, so a plain line is written instead at most every
    ``log_every_s`` seconds and at the end, with elapsed time and an estimate of what is left.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True,
                 log_every_s: float = 20.0):
        import time

        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.n = 0
        self._t0 = self._last = time.monotonic()
        self._every = log_every_s
        self._bar = None
        self._tty = sys.stderr.isatty()
        if enabled and self._tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=True)
        elif enabled:
            self._line(start=True)

    def _line(self, start: bool = False) -> None:
        import time

        el = time.monotonic() - self._t0
        if start:
            msg = f"{self.desc}: {self.total if self.total is not None else '?'} {self.unit} to do"
        else:
            msg = f"{self.desc}: {self.n}/{self.total if self.total is not None else '?'} {self.unit}, {el:.0f} s"
            if self.total and 0 < self.n < self.total:
                msg += f", ~{el / self.n * (self.total - self.n):.0f} s left"
        print(msg, file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        import time

        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self._every:
            self._last = time.monotonic()
            self._line()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self._line()
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
