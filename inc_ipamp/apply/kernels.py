"""The low-precision modules a plan's ops run as: the kernels a device backend times and swaps in.

Measured on the development machine (docs/DESIGN.md): on CPU only INT8 dynamic Linear (torch.ao / fbgemm) beats
fp32; bf16 and FP8 (``torch._scaled_mm`` runs on CPU) are real kernels but slower; there is no fast INT8 batch-GEMM,
so low-precision BGEMMs are emulated (quantize-dequantize around the reference matmul). Every module keeps the
numerics of ``formats.quantize``/``quantize_weight`` (tests/test_numerics.py), so fake quantisation and the kernels
agree.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import Format, get_format, quantize, quantize_weight, weight_scale
from ..ops import Matmul, linear_weight


# -- low-precision op modules --------------------------------------------------------------------------
def _bias(mod: nn.Module) -> torch.Tensor | None:
    b = getattr(mod, "bias", None)
    return None if b is None else b.detach()


class EmulatedLinear(nn.Module):
    """Fake-quantised Linear (weights rounded once, activations per call): exact numerics, no speed-up."""

    path = "emulated (quantize-dequantize + reference matmul)"

    def __init__(self, mod: nn.Module, fmt: Format):
        super().__init__()
        self.fmt = fmt
        self.weight = nn.Parameter(quantize_weight(linear_weight(mod).detach(), fmt, -1), requires_grad=False)
        self.bias = None if _bias(mod) is None else nn.Parameter(_bias(mod), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(quantize(x, self.fmt, -1), self.weight, self.bias)


class CastLinear(nn.Module):
    """Linear computed in a narrower float dtype (bf16/fp16), real kernel of that dtype."""

    path = "real cast kernel"

    def __init__(self, mod: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.weight = nn.Parameter(linear_weight(mod).detach().to(dtype), requires_grad=False)
        self.bias = None if _bias(mod) is None else nn.Parameter(_bias(mod).to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.dtype), self.weight, self.bias).to(x.dtype)


class ScaledMMLinear(nn.Module):
    """FP8 Linear through ``torch._scaled_mm`` with per-tensor max-abs scales (weights once, activations per call).

    The real FP8 GEMM on Hopper; on CPU torch also runs it (slower than fp32 there, which is reported).
    """

    path = "torch._scaled_mm fp8 (per-tensor scales)"

    def __init__(self, mod: nn.Module, fmt: Format):
        super().__init__()
        w = linear_weight(mod).detach().float()
        self.fmt = fmt
        self.fp8 = getattr(torch, fmt.torch_dtype)
        s_w = torch.clamp(w.abs().amax() / fmt.qmax, min=torch.finfo(torch.float32).tiny)
        w8 = (w / s_w).clamp(-fmt.qmax, fmt.qmax).to(self.fp8)
        self.register_buffer("w8t", w8.t())  # (d_in, d_out) column-major, as _scaled_mm wants
        self.register_buffer("s_w", s_w.reshape(()))
        b = _bias(mod)
        self.register_buffer("bias", None if b is None else b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shp = x.shape
        x2 = x.reshape(-1, shp[-1])
        s_x = torch.clamp(x2.detach().abs().amax().float() / self.fmt.qmax, min=torch.finfo(torch.float32).tiny)
        # divided in fp32: a bf16 quotient would round twice (bf16, then FP8) and miss formats.quantize's grid
        # (an H100 measured 1.3-1.8% relative error against it for 1-7 tokens with the bf16 quotient)
        x8 = (x2.float() / s_x).clamp(-self.fmt.qmax, self.fmt.qmax).to(self.fp8)
        y = torch._scaled_mm(x8, self.w8t, scale_a=s_x, scale_b=self.s_w, out_dtype=x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shp[:-1], y.shape[-1])


class EmulatedMatmul(Matmul):
    """Attention BGEMM with both operands fake-quantised along the contraction dimension."""

    path = "emulated (quantize-dequantize + reference matmul)"

    def __init__(self, fmt: Format):
        super().__init__()
        self.fmt = fmt

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(quantize(a, self.fmt, -1), quantize(b, self.fmt, -2))


class CastMatmul(Matmul):
    """BGEMM computed in a narrower float dtype (real kernel of that dtype)."""

    path = "real cast kernel"

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a.to(self.dtype), b.to(self.dtype)).to(a.dtype)


def quantized_engine() -> str:
    """torch's quantized engine, switched to x86 where it is supported and not already fbgemm."""
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
    q.path = f"torch.ao dynamic int8 ({quantized_engine()})"
    return q
