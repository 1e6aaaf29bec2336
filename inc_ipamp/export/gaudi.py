"""Gaudi FP8: a Plan as the INC fp8_quant JSON files optimum-habana (``QUANT_CONFIG``) and vLLM-Gaudi read.

The translation (module names per engine, fail-closed allowlist of name regexes) is ``export.fp8.fp8_settings``;
this module only writes its MEASURE and QUANTIZE settings to files, with a notes file saying which modules run
FP8 and what the engine forced to differ from the plan.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..io import save_json
from ..ops import decoder_layer_index
from ..records import Plan
from .fp8 import ENGINES as FP8_ENGINES
from .fp8 import ExportError, fp8_settings, map_plan, name_regex

log = logging.getLogger(__name__)

#: Engines a Gaudi export is written for (``fp8.ENGINES`` also has plain ``inc``).
ENGINES = tuple(e for e in FP8_ENGINES if e != "inc")

__all__ = ["ENGINES", "ExportError", "export_gaudi", "map_plan", "name_regex"]


def export_gaudi(plan: Plan, folder: str | Path, engine: str = "optimum-habana", on_conflict: str = "bf16",
                 dump_stats_path: str | None = None, scale_method: str = "maxabs_hw") -> dict[str, Path]:
    """Write ``maxabs_measure.json`` and ``maxabs_quant.json`` for ``engine`` into ``folder``.

    Statistics go to ``dump_stats_path`` (default ``<folder>/stats/measure``, a folder of its own: INC's
    MEASURE moves files there that share the dump prefix into a backup folder). Returns name -> path,
    including ``notes`` (what the engine forced to differ from the plan, and the module lists).
    """
    if engine not in ENGINES:
        raise ExportError(f"unknown Gaudi engine {engine!r}; choose one of {', '.join(ENGINES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if dump_stats_path is None:
        stats = folder.resolve() / "stats"
        stats.mkdir(parents=True, exist_ok=True)  # INC checks that the folder is writable
        dump_stats_path = str(stats / "measure")
    out: dict[str, Path] = {}
    for kind, mode, name in (("measure", "MEASURE", "maxabs_measure.json"), ("quant", "QUANTIZE", "maxabs_quant.json")):
        s = fp8_settings(plan, engine, mode, dump_stats_path=dump_stats_path, scale_method=scale_method,
                         on_conflict=on_conflict)
        out[kind] = save_json(s.json, folder / name)
    mapping = s.mapping
    for note in mapping.notes:
        log.warning("%s: %s", engine, note)
    layers = sorted({i for i in map(decoder_layer_index, mapping.modules) if i is not None})
    out["notes"] = save_json({"engine": engine, "fp8_config": mapping.fp8_config, "notes": mapping.notes,
                              "n_layers_covered": len(layers), "fp8_modules": mapping.quantized,
                              "bf16_modules": mapping.blocked}, folder / "export_notes.json")
    return out
