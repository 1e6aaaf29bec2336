"""Per-group, per-configuration gains: ET (measured or replayed), TT (MACs × rates), M (weight bytes).

Backends: ``cpu`` (real INT8 dynamic Linear; other paths real-but-slower or emulated, reported as measured),
``cuda`` (FP8 via torch._scaled_mm on Hopper; ``cuda-on-cpu`` runs that code on the CPU), ``hpu`` (INC fp8_quant
on Gaudi), ``table`` (replay a file).
"""

from __future__ import annotations

from .backends import BACKENDS, get_backend
from .base import Backend, bootstrap_ci, compare_prefill, gain_stats, paired_times, time_prefill
from .cache import MeasurementCache, cache_key
from .measure import METRICS, capture_module_inputs, enclosing_module, measure_gains, time_group_config
from .theory import DEVICE_RATES, memory_gain, op_macs, theoretical_gain

__all__ = ["BACKENDS", "DEVICE_RATES", "METRICS", "Backend", "MeasurementCache", "bootstrap_ci", "cache_key",
           "capture_module_inputs", "compare_prefill", "enclosing_module", "gain_stats", "get_backend",
           "measure_gains", "memory_gain", "op_macs", "paired_times", "theoretical_gain", "time_group_config",
           "time_prefill"]
