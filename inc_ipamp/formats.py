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

    Activations (and both attention operands) may be quantised differently from weights, as the deployed
    kernel does: ``act_levels`` set = an affine unsigned grid 0..act_levels with a zero point, scale and zero point
    chosen from the tensor's min/max per call (fbgemm's ``ChooseQuantizationParams``), over ``act_granularity``.
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
    act_levels: int | None = None  # affine activations: qmax of the unsigned grid (qmin 0); None = as weights
    act_granularity: Granularity | None = None  # None = ``granularity``

    @property
    def act_affine(self) -> bool:
        return self.kind == "int" and self.act_levels is not None

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
    def output_rounded(self) -> bool:
        """A cast kernel (bf16) computes in the format and returns its output in it: the output is rounded too,
        an error the operands' terms do not hold (on SmolLM2 it was half the measured loss change of BF16 plans).
        Scaled formats' GEMMs (FP8 ``_scaled_mm``, INT8) return the reference dtype."""
        return self.kind == "float" and not self.has_scale

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
        # The CPU's INT8 kernel (torch.ao dynamic Linear on fbgemm/x86, gains/cpu.py) quantises activations per
        # call to uint8 with reduce_range (0..127) and a zero point: these are its numerics, bit for bit.
        Format("int8", "int", 8, granularity="tensor", inc_dtype="int8", act_levels=127, act_granularity="tensor",
               description="INT8 as torch.ao dynamic quantisation runs it: symmetric int8 weights (one scale per "
                           "tensor), activations affine uint8 with reduce_range (0..127) per tensor per call"),
        Format("int8_pc", "int", 8, granularity="channel", inc_dtype="int8", act_levels=127,
               act_granularity="tensor",
               description="as int8 with per-output-channel weight scales (activations stay per tensor, as "
                           "torch.ao's dynamic kernel runs them)"),
        Format("int4_pc", "int", 4, granularity="channel", inc_dtype="int4",
               description="symmetric INT4 per-channel (not group-32: SmolLM2's GGUF is Q4_1 group-32)"),
    )
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}") from None


def _amax(x: torch.Tensor, granularity: str, reduce_dim: int, per_sample: bool = False) -> torch.Tensor:
    if granularity == "channel":
        return x.abs().amax(dim=reduce_dim, keepdim=True)
    if per_sample and x.dim() > 1:
        return x.abs().flatten(1).amax(1).view(-1, *([1] * (x.dim() - 1)))
    return x.abs().amax()


def _fmt(fmt: Format | str) -> Format:
    return get_format(fmt) if isinstance(fmt, str) else fmt


def weight_scale(w: torch.Tensor, fmt: Format | str, reduce_dim: int = -1) -> torch.Tensor:
    """Symmetric max-abs scale of a weight (per tensor or per slice), never zero so all-zero tensors stay zero."""
    fmt = _fmt(fmt)
    # in fp32 whatever w's dtype, as the kernels compute it (a bf16 scale would put a bf16 model on another grid)
    return torch.clamp(_amax(w.detach(), fmt.granularity, reduce_dim).float() / fmt.qmax,
                       min=torch.finfo(torch.float32).tiny)


#: fbgemm's SMALL_SCALE_THRESHOLD (a float32 constant): smaller affine scales are raised to it
_SMALL_SCALE = float(torch.tensor(6.1e-5, dtype=torch.float32))


def _affine_qparams(mn: torch.Tensor, mx: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of an unsigned grid 0..levels from a tensor's min and max: fbgemm's
    ``ChooseQuantizationParams`` (preserve_sparsity off, no power-of-two scale), vectorised, so fake-quantised
    activations equal what the CPU's dynamic INT8 kernel feeds its integer GEMM (tests/test_numerics.py)."""
    mn, mx = torch.clamp(mn.float(), max=0.0), torch.clamp(mx.float(), min=0.0)  # the grid always holds 0
    scale = (mx.double() - mn.double()) / levels
    s32 = scale.float()
    scale = torch.where((s32 == 0) | torch.isinf(1.0 / s32), torch.full_like(scale, 0.1), scale)
    small = scale < _SMALL_SCALE
    amp = (_SMALL_SCALE / scale.float()).float()
    mn_s = torch.where(mn == 0, mn, torch.where(mx == 0, torch.full_like(mn, -_SMALL_SCALE * levels), mn * amp))
    mx_s = torch.where(mn == 0, torch.full_like(mx, _SMALL_SCALE * levels), torch.where(mx == 0, mx, mx * amp))
    mn, mx = torch.where(small, mn_s, mn), torch.where(small, mx_s, mx)
    scale = torch.where(small, torch.full_like(scale, _SMALL_SCALE), scale)
    lo, hi = mn.double() / scale, mx.double() / scale
    zp = torch.where(-lo.abs() < levels - hi.abs(), -lo, levels - hi)
    return scale.float(), torch.round(zp).clamp_(0, levels)


def act_qparams(x: torch.Tensor, fmt: Format | str, reduce_dim: int = -1,
                per_sample: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (the grid step) and zero point (None on a symmetric grid) of an activation-like operand.

    ``per_sample``: dim 0 holds independent sequences, and a per-tensor scale is taken per sequence, so a batch of B
    is quantised exactly as B calls of one (the calibration batches sequences for speed)."""
    fmt = _fmt(fmt)
    gran = fmt.act_granularity or fmt.granularity
    x = x.detach()
    if not fmt.act_affine:
        return torch.clamp(_amax(x, gran, reduce_dim, per_sample).float() / fmt.qmax,
                           min=torch.finfo(torch.float32).tiny), None
    if gran == "channel":
        mn, mx = x.amin(dim=reduce_dim, keepdim=True), x.amax(dim=reduce_dim, keepdim=True)
    elif per_sample and x.dim() > 1:
        shape = (-1, *([1] * (x.dim() - 1)))
        mn, mx = x.flatten(1).amin(1).view(shape), x.flatten(1).amax(1).view(shape)
    else:
        mn, mx = x.amin(), x.amax()
    return _affine_qparams(mn, mx, fmt.act_levels)


def scale_of(x: torch.Tensor, fmt: Format | str, reduce_dim: int = -1, per_sample: bool = False) -> torch.Tensor:
    """Grid step of an activation-like operand in ``fmt`` (see ``act_qparams``)."""
    return act_qparams(x, fmt, reduce_dim, per_sample)[0]


def quantize(x: torch.Tensor, fmt: Format | str, reduce_dim: int = -1, per_sample: bool = False) -> torch.Tensor:
    """Fake-quantise an activation-like operand for real: round to ``fmt`` and back, returning ``x``'s dtype.

    Scales are dynamic (computed from ``x`` itself, per call), as the deployed kernels and INC's ``maxabs`` observer
    do; ``reduce_dim`` is the contraction dimension for per-channel integers. Weights: ``quantize_weight``.
    """
    fmt = _fmt(fmt)
    if not fmt.has_scale:
        return quantize_with_scale(x, fmt, None)
    s, zp = act_qparams(x, fmt, reduce_dim, per_sample)
    if zp is None:
        return quantize_with_scale(x, fmt, s)
    # one rounding of x·(1/s) + zp, as fbgemm's fused multiply-add computes it
    zp, s = zp.to(x.dtype), s.to(x.dtype)
    q = torch.addcmul(zp.expand_as(x), x, torch.reciprocal(s)).round_().clamp_(0, fmt.act_levels)
    return (q - zp) * s


def quantize_weight(w: torch.Tensor, fmt: Format | str, reduce_dim: int = -1) -> torch.Tensor:
    """Fake-quantise a weight (symmetric, max-abs scale per tensor or per output channel) and back."""
    fmt = _fmt(fmt)
    return quantize_with_scale(w, fmt, weight_scale(w, fmt, reduce_dim) if fmt.has_scale else None)


def quantize_with_scale(x: torch.Tensor, fmt: Format, s: torch.Tensor | None) -> torch.Tensor:
    """Round ``x`` to ``fmt``'s symmetric grid with a given (broadcastable) scale: lets a large tensor be processed in
    chunks under the scale of the whole tensor. ``s`` is ignored by formats without a scale (``has_scale``).
    Integers round x·(1/s) as torch's quantize_per_tensor/per_channel do (x/s differs in the last bit now and then)."""
    if fmt.kind == "ref":
        return x
    if not fmt.has_scale:  # bf16
        return x.to(getattr(torch, fmt.torch_dtype)).to(x.dtype)
    if fmt.kind == "float":  # in fp32, as ScaledMMLinear: a bf16 quotient would round twice (bf16, then FP8)
        y = (x.float() / s).clamp(-fmt.max_value, fmt.max_value).to(getattr(torch, fmt.torch_dtype))
        return (y.float() * s).to(x.dtype)
    q = fmt.qmax
    return (torch.clamp(torch.round(x * torch.reciprocal(s)), -q, q) * s).to(x.dtype)


def uniform_float_variance_factor(fmt: Format) -> float:
    """Var(e)/x^2 for a float format with m mantissa bits: c * 2^(-2m) / 12 (METHOD.md)."""
    assert fmt.mantissa_bits is not None
    return FLOAT_NOISE_C * 2.0 ** (-2 * fmt.mantissa_bits) / 12.0
