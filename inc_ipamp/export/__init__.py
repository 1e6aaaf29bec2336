"""Exporters: a Plan as the files users deploy (INC FP8 JSON for Gaudi engines, an INC 3.x config for CPU).

Running those configs on a model is ``inc_ipamp.apply``.
"""

from .cpu import CPU_PATHS, export_cpu, inc_config_for_plan, load_cpu_config
from .fp8 import Fp8Settings, fp8_settings, name_regex
from .gaudi import ENGINES, ExportError, export_gaudi, map_plan

__all__ = ["CPU_PATHS", "ENGINES", "ExportError", "Fp8Settings", "export_cpu", "export_gaudi",
           "fp8_settings", "inc_config_for_plan", "load_cpu_config", "map_plan", "name_regex"]
