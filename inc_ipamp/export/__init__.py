"""Exporters: a Plan as the files users deploy (INC FP8 JSON for Gaudi engines, an INC 3.x config for CPU)."""

from .cpu import CPU_PATHS, apply_cpu, export_cpu, inc_config_for_plan, load_cpu_config
from .gaudi import ENGINES, ExportError, export_gaudi, map_plan

__all__ = ["CPU_PATHS", "ENGINES", "ExportError", "apply_cpu", "export_cpu", "export_gaudi", "inc_config_for_plan",
           "load_cpu_config", "map_plan"]
