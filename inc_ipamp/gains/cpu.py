"""CPU backend: the fastest real low-precision kernels this CPU has, and honest emulation elsewhere.

Measured on the development machine (DESIGN.md): only INT8 dynamic Linear (torch.ao / fbgemm) beats fp32;
bf16 and FP8 (``torch._scaled_mm`` runs on CPU) are real kernels but slower; there is no fast INT8 batch-GEMM,
so low-precision BGEMMs are emulated (quantize-dequantize around the fp32 matmul) and show negative gains.
Those negative gains are reported as measured, not hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import Format, get_format, weight_scale
from ..ops import linear_weight
from .base import Backend, CastLinear, CastMatmul, EmulatedLinear, EmulatedMatmul, ScaledMMLinear


def _engine() -> str:
    eng = torch.backends.quantized.engine
    if eng not in ("x86", "fbgemm") and "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"  # onednn is ~2× slower for dynamic Linear here
    return torch.backends.quantized.engine


def dynamic_int8_linear(mod: nn.Module, per_channel: bool) -> nn.Module:
    """torch.ao dynamic-quantised Linear (int8 weights; activations quantised per call by fbgemm)."""
    from torch.ao.nn.quantized import dynamic as nnqd

    w = linear_weight(mod).detach().float().contiguous()
    b = getattr(mod, "bias", None)
    q = nnqd.Linear(w.shape[1], w.shape[0], bias_=b is not None, dtype=torch.qint8)
    # the scales of formats.weight_scale, so that fake-quantisation (formats.quantize_weight) is bit-identical
    s = weight_scale(w, get_format("int8_pc" if per_channel else "int8"), -1)
    if per_channel:
        s = s.flatten().double()
        qw = torch.quantize_per_channel(w, s, torch.zeros_like(s, dtype=torch.long), 0, torch.qint8)
    else:
        qw = torch.quantize_per_tensor(w, float(s), 0, torch.qint8)
    q.set_weight_bias(qw, None if b is None else b.detach().float())
    q.path = f"torch.ao dynamic int8 ({_engine()})"
    return q


class CpuBackend(Backend):
    name = "cpu"
    version = "cpu-1"
    reference_formats = ("fp32",)

    def device_string(self) -> str:
        return f"cpu; torch {torch.__version__}; threads {torch.get_num_threads()}; qengine {_engine()}"

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
