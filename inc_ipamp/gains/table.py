"""Replay empirical gains measured elsewhere (e.g. on a Gaudi) from a JSON Gains record or a CSV file.

CSV columns: ``group`` (a group signature or group name), ``config`` (formats joined by '+'), ``gain_s``,
``ci_s`` (optional). JSON: a saved Gains record (``inc-ipamp measure``'s gains.json), looked up by group name.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import ArtifactError, DeviceUnavailableError
from .base import Backend


class TableBackend(Backend):
    name = "table"
    version = "table-1"

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        self.path = Path(path) if path is not None else None
        self.rows: dict[tuple[str, str], tuple[float, float]] = {}
        if self.path is not None:
            self.load(self.path)

    def check(self) -> None:
        if self.path is None:
            raise ArtifactError("the table backend needs a file of measured gains (--table PATH, JSON or CSV)")

    def device_string(self) -> str:
        return f"table:{self.path}"

    def apply(self, model, assignment):  # type: ignore[override]
        raise DeviceUnavailableError("the table backend only replays gains from a file; it cannot run a model")

    def load(self, path: Path) -> None:
        if not path.exists():
            raise ArtifactError(f"gain table not found: {path}")
        try:
            if path.suffix.lower() == ".csv":
                with open(path, newline="") as f:
                    for row in csv.DictReader(f):
                        key = row.get("group") or row.get("group_signature_or_name") or row.get("group_signature")
                        if key is None or "config" not in row or "gain_s" not in row:
                            raise ArtifactError(f"{path}: CSV needs columns group, config, gain_s[, ci_s]")
                        self.rows[(key, row["config"])] = (float(row["gain_s"]), float(row.get("ci_s") or 0.0))
            else:
                d = json.loads(path.read_text())
                groups = d["groups"]
                for gname, gg in groups.items():
                    et = gg["gains"]["ET"]
                    ci = gg.get("ci", {}).get("ET", [0.0] * len(et))
                    for cfg, g, c in zip(gg["configs"], et, ci, strict=True):
                        self.rows[(gname, "+".join(cfg))] = (float(g), float(c))
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{path} is not a gain table (JSON Gains record with ET, or CSV): {e}") from None

    def lookup(self, group_name: str, signature: str, config: tuple[str, ...]) -> tuple[float, float]:
        """(gain_s, ci_s) of ``config`` for a group, by signature first, then by name."""
        c = "+".join(config)
        for key in (signature, group_name):
            if (key, c) in self.rows:
                return self.rows[(key, c)]
        raise ArtifactError(f"gain table {self.path} has no entry for group {group_name} "
                            f"(signature {signature}) in config {c}")
