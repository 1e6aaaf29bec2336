"""JSON artifact helpers: atomic writes and loud, specific errors on corrupt or missing files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import ArtifactError


def save_json(obj: Any, path: str | Path) -> Path:
    """Write atomically (temp file + rename) so an interrupted run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_json(path: str | Path, what: str = "artifact") -> Any:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{what} file not found: {path} (run the stage that writes it first)")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{what} file {path} is corrupt ({e}); delete it and rerun its stage") from None
