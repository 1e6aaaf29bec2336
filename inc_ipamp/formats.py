"""Number formats as data, with their noise models and a real fake-quantiser.

A format is a record, not a code path: adding one (say INT4 per-channel) means adding a row to
``FORMATS``. The sensitivity collector, the solver and the exporters all look formats up here, so the
noise model used for prediction and the quantiser used for validation can never drift apart.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from .errors import FormatError

Kind = Literal["ref", "float", "int"]
Granularity = Literal["tensor", "channel"]

#: Mean of 2^(2e)/x^2 for x log-uniform within a binade: (1 - 1/4) / ln 4. It turns the worst-case
#: floating-point rounding variance (spacing^2/12) into the average over a binade (METHOD.md).
FLOAT_NOISE_C = 0.75 / math.log(4.0)


@dataclass(frozen=True)
class Format:
    """One numeric format.

    ``granularity`` matters only for integers: "tensor" uses one max-abs scale per tensor,
    "channel" one scale per slice along the contraction dimension (per output channel for weights,
    per token for activations, per row/column for the attention operands).
    """

    name: str
    kind: Kind
    bits: int
    mantissa_bits: int | None = None
    exponent_bits: int | None = None
    max_value: float | None = None
    granularity: Granularity = "tensor"
    torch_dtype: str | None = None
    inc_dtype: str = ""
    description: str = ""

    @property
    def bytes(self) -> float:
        return self.bits / 8.0

    @property
    def qmax(self) -> float:
        """Largest representable magnitude on the quantised grid (before scaling)."""
        if self.kind == "int":
            return float(2 ** (self.bits - 1) - 1)
        if self.max_value is not None:
            return self.max_value
        return float("inf")

    @property
    def has_scale(self) -> bool:
        """Integers and range-limited floats (FP8) are quantised under a max-abs scale; BF16 and the reference not."""
        return self.kind == "int" or (self.kind == "float" and self.max_value is not None)

    @property
    def inc_fp8_config(self) -> str | None:
        """INC fp8_quant's ``fp8_config`` for an 8-bit float ("E4M3", "E5M2"); None for every other format."""
        if self.kind == "float" and self.bits == 8:
            return f"E{self.exponent_bits}M{self.mantissa_bits}"
        return None

    def to_dict(self) -> dict:
        return asdict(self)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("fp32", "ref", 32, 23, 8, None, torch_dtype="float32", inc_dtype="fp32",
               description="IEEE single precision (CPU reference)"),
        Format("bf16", "float", 16, 7, 8, None, torch_dtype="bfloat16", inc_dtype="bf16",
               description="bfloat16 (Gaudi/CUDA reference; a low-precision choice on a fp32 CPU)"),
        Format("fp8_e4m3", "float", 8, 3, 4, 448.0, torch_dtype="float8_e4m3fn", inc_dtype="fp8_e4m3",
               description="FP8 E4M3 with a per-tensor max-abs scale (INC maxabs)"),
        Format("fp8_e5m2", "float", 8, 2, 5, 57344.0, torch_dtype="float8_e5m2", inc_dtype="fp8_e5m2",
               description="FP8 E5M2 with a per-tensor max-abs scale"),
        Format("int8", "int", 8, granularity="tensor", inc_dtype="int8",
               description="symmetric INT8, one max-abs scale per tensor"),
        Format("int8_pc", "int", 8, granularity="channel", inc_dtype="int8",
               description="symmetric INT8, per-channel weights / per-token activations"),
        Format("int4_pc", "int", 4, granularity="channel", inc_dtype="int4",
               description="symmetric INT4 per-channel (not group-32: SmolLM2's GGUF is Q4_1 group-32)"),
    )
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}") from None


def _amax(x: torch.Tensor, fmt: Format, reduce_dim: int, per_sample: bool = False) -> torch.Tensor:
    if fmt.granularity == "channel":
        return x.abs().amax(dim=reduce_dim, keepdim=True)
    if per_sample and x.dim() > 1:
        return x.abs().flatten(1).amax(1).view(-1, *([1] * (x.dim() - 1)))
    return x.abs().amax()


def scale_of(x: torch.Tensor, fmt: Format, reduce_dim: int = -1, per_sample: bool = False) -> torch.Tensor:
    """Max-abs scale (per tensor or per slice), never zero so all-zero tensors stay zero.

    ``per_sample``: dim 0 holds independent sequences, and a per-tensor scale is taken per sequence, so a
    batch of B is quantised exactly as B batches of one (the calibration batches sequences for speed).
    """
    amax = _amax(x.detach(), fmt, reduce_dim, per_sample)
    return torch.clamp(amax / fmt.qmax, min=torch.finfo(torch.float32).tiny)


def quantize(x: torch.Tensor, fmt: Format | str, reduce_dim: int = -1, per_sample: bool = False) -> torch.Tensor:
    """Fake-quantise ``x`` for real: round to ``fmt`` and back, returning ``x``'s dtype.

    Scales are dynamic max-abs (computed from ``x`` itself), like INC's ``maxabs`` observer applied to
    the tensor at hand; ``reduce_dim`` is the contraction dimension for per-channel integers.
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    s = scale_of(x, fmt, reduce_dim, per_sample) if fmt.has_scale else None
    return quantize_with_scale(x, fmt, s)


def quantize_with_scale(x: torch.Tensor, fmt: Format, s: torch.Tensor | None) -> torch.Tensor:
    """Round ``x`` to ``fmt`` with a given (broadcastable) scale: lets a large tensor be processed in chunks
    under the scale of the whole tensor. ``s`` is ignored by formats without a scale (``has_scale``)."""
    if fmt.kind == "ref":
        return x
    if not fmt.has_scale:  # bf16
        return x.to(getattr(torch, fmt.torch_dtype)).to(x.dtype)
    if fmt.kind == "float":
        y = (x / s).clamp(-fmt.max_value, fmt.max_value).to(getattr(torch, fmt.torch_dtype))
        return y.to(x.dtype) * s
    q = fmt.qmax
    return torch.clamp(torch.round(x / s), -q, q) * s


def uniform_float_variance_factor(fmt: Format) -> float:
    """Var(e)/x^2 for a float format with m mantissa bits: c * 2^(-2m) / 12 (METHOD.md)."""
    assert fmt.mantissa_bits is not None
    return FLOAT_NOISE_C * 2.0 ** (-2 * fmt.mantissa_bits) / 12.0
