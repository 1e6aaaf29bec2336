"""CPU backend: the fastest real low-precision kernels this CPU has (``apply.kernels``), and honest emulation
elsewhere: low-precision BGEMMs are emulated and show negative gains, reported as measured, not hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from ..apply.kernels import (
    CastLinear,
    CastMatmul,
    EmulatedLinear,
    EmulatedMatmul,
    ScaledMMLinear,
    dynamic_int8_linear,
    quantized_engine,
)
from ..formats import Format
from .base import Backend


class CpuBackend(Backend):
    name = "cpu"
    version = "cpu-1"
    reference_formats = ("fp32",)

    def device_string(self) -> str:
        return f"cpu; torch {torch.__version__}; threads {torch.get_num_threads()}; qengine {quantized_engine()}"

    def convert(self, mod: nn.Module, kind: str, fmt: Format) -> nn.Module:
        if kind == "linear":
            if fmt.kind == "int" and fmt.bits == 8:
                return dynamic_int8_linear(mod, per_channel=fmt.granularity == "channel")
            if fmt.kind == "float" and fmt.max_value is not None:
                return ScaledMMLinear(mod, fmt)
            if fmt.kind == "float":
                return CastLinear(mod, getattr(torch, fmt.torch_dtype))
            return EmulatedLinear(mod, fmt)
        if fmt.kind == "float" and fmt.max_value is None:
            return CastMatmul(getattr(torch, fmt.torch_dtype))
        return EmulatedMatmul(fmt)
