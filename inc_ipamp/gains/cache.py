"""Append-only, crash-safe measurement cache (JSON lines, one measurement per line, no pickle).

Each line is written, flushed and fsync'ed on its own, so a crash loses at most the line being written; a
truncated or corrupt line is skipped with a warning on load, and the next append starts on a fresh line. Appends
take an exclusive ``flock``, so several processes (ranks of a sharded measurement) can share one file.
The key is a sha256 over everything that changes a timing (model, group signature, config, device string,
batch, sequence length, code and backend version), so a rerun reuses exactly what is still valid.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def cache_key(**fields: Any) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


class MeasurementCache:
    """In-memory view of a JSON-lines file; ``path=None`` keeps everything in memory only."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict[str, Any]] = {}
        self.skipped = 0
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        with open(self.path, encoding="utf-8", errors="replace") as f:
            lines = f.read().split("\n")
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.entries[rec["key"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                self.skipped += 1
                log.warning("measurement cache %s: skipping corrupt line %d (an interrupted write?)", self.path, i)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, record: dict[str, Any]) -> None:
        rec = {"key": key, **record}
        self.entries[key] = rec
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(rec, sort_keys=True)
        with open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # ranks sharing one cache append whole lines, one at a time
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # previous write was cut off: never glue onto it
                    f.write(b"\n")
            f.write(line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
