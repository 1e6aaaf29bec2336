"""The gain backends by name: the one place a new device backend is registered."""

from __future__ import annotations

from pathlib import Path

from ..errors import IpampError
from .base import Backend

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
