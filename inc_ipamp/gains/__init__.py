"""Per-group, per-configuration gains: ET (measured or replayed), TT (MACs × rates), M (weight bytes).

Backends: ``cpu`` (real INT8 dynamic Linear; other paths real-but-slower or emulated, reported as measured),
``cuda`` (FP8 via torch._scaled_mm on Hopper; ``cuda-on-cpu`` runs that code on the CPU), ``hpu`` (INC fp8_quant
on Gaudi), ``table`` (replay a file).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import IpampError
from .base import Backend, bootstrap_ci, compare_prefill, gain_stats, paired_times, time_prefill
from .cache import MeasurementCache, cache_key
from .measure import METRICS, capture_module_inputs, enclosing_module, measure_gains, time_group_config
from .theory import DEVICE_RATES, memory_gain, op_macs, theoretical_gain

#: ``cuda-on-cpu``: the cuda backend's code placed on the CPU (real FP8 numerics, CPU timings), for CI.
BACKENDS = ("cpu", "cuda", "cuda-on-cpu", "hpu", "table")


def get_backend(name: str, table_path: str | Path | None = None) -> Backend:
    """A fresh backend by name (construction never touches the device; call ``.check()`` for that)."""
    if name == "cpu":
        from .cpu import CpuBackend

        return CpuBackend()
    if name == "cuda":
        from .cuda import CudaBackend

        return CudaBackend()
    if name == "cuda-on-cpu":
        from .cuda import CudaBackend

        return CudaBackend(device="cpu")
    if name == "hpu":
        from .hpu import HpuBackend

        return HpuBackend()
    if name == "table":
        from .table import TableBackend

        return TableBackend(table_path)
    raise IpampError(f"unknown gain backend {name!r}; choose from {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "DEVICE_RATES", "METRICS", "Backend", "MeasurementCache", "bootstrap_ci", "cache_key",
           "capture_module_inputs", "compare_prefill", "enclosing_module", "gain_stats", "get_backend",
           "measure_gains", "memory_gain", "op_macs", "paired_times", "theoretical_gain", "time_group_config",
           "time_prefill"]
