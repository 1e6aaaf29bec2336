"""Theoretical time gain (MACs × rate difference), roofline time gain (RT) and memory gain (weight bytes saved).

Rates are inputs, not measurements: the per-device tables below are vendor peak dense throughputs
(TFLOPS) for Gaudi 2 and H100, and for CPU relative rates (fp32 = 1) that a user should replace with their
own. TT is in "theoretical seconds" = 2·MACs / (rate·1e12); only differences between formats matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import IpampError
from ..formats import get_format
from ..ops import linear_weight
from ..partition import first_calls, tensor_shapes

#: peak dense TFLOPS per format; CPU entries are relative rates (fp32 = 1), configurable, not measured here.
DEVICE_RATES: dict[str, dict[str, float]] = {
    "gaudi2": {"bf16": 432.0, "fp8_e4m3": 865.0, "fp8_e5m2": 865.0, "fp32": 432.0 / 4},
    "gaudi3": {"bf16": 1835.0, "fp8_e4m3": 1835.0, "fp8_e5m2": 1835.0, "fp32": 1835.0 / 8},
    "h100": {"fp32": 67.0, "bf16": 989.0, "fp8_e4m3": 1979.0, "fp8_e5m2": 1979.0, "int8": 1979.0},
    "cpu": {"fp32": 1.0, "int8": 1.2, "int8_pc": 1.2, "bf16": 0.2, "fp8_e4m3": 0.5, "fp8_e5m2": 0.5,
            "int4_pc": 1.0},
}
BACKEND_DEVICE = {"cpu": "cpu", "cuda": "h100", "cuda-on-cpu": "h100", "hpu": "gaudi2", "table": "gaudi2"}


def _lookup(table: dict[str, Any], device: Any, what: str, instead: str) -> Any:
    """``device`` itself when it is already a table entry (not a name), else the table's entry for that name."""
    if not isinstance(device, str):
        return device
    try:
        return table[device]
    except KeyError:
        raise IpampError(f"no {what} for device {device!r}; known: {', '.join(table)} (or pass {instead})") from None


def rates_for(device: str | dict[str, float]) -> dict[str, float]:
    return _lookup(DEVICE_RATES, device, "rate table", "device_rates={format: TFLOPS}")


def op_macs(kind: str, shapes: list[list[int]]) -> int:
    """MACs of one call: Linear x(…, d_in)·W(d_out, d_in)ᵀ needs the weight shape as shapes[1];
    BGEMM a(…, p, q)·b(…, q, r)."""
    if kind == "linear":
        x, w = shapes[0], shapes[1]
        return math.prod(x[:-1]) * w[1] * w[0]
    a, b = shapes[0], shapes[1]
    batch = math.prod(torch.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])))
    return batch * a[-2] * a[-1] * b[-1]


def capture_op_shapes(model: nn.Module, ops: dict[str, str], ids: torch.Tensor) -> dict[str, list[list[int]]]:
    """Operand shapes of every op in one forward ({op: kind} in; weight shape appended for Linears)."""
    mods = dict(model.named_modules())

    def record(name: str, args: tuple, kwargs: dict) -> list[list[int]]:
        s = tensor_shapes(args)
        return s[:1] + [list(linear_weight(mods[name]).shape)] if ops[name] == "linear" else s

    return first_calls(model, ops, ids, record)


def theoretical_gain(kind: str, shapes: list[list[int]], ref: str, fmt: str, rates: dict[str, float]) -> float:
    """2·MACs·(1/R_ref − 1/R_f) / 1e12 (theoretical seconds; 0 for the reference format)."""
    if fmt == ref:
        return 0.0
    missing = [f for f in (ref, fmt) if f not in rates]
    if missing:
        raise IpampError(f"no rate for format(s) {', '.join(missing)} in the device rate table {sorted(rates)}")
    return 2.0 * op_macs(kind, shapes) * (1.0 / rates[ref] - 1.0 / rates[fmt]) / 1e12


# -- roofline (RT): time from FLOPs and bytes against a named device's published peaks ---------------------------
@dataclass(frozen=True)
class RooflineDevice:
    """Published peak dense throughput per format (TFLOPS, no sparsity) and memory bandwidth (TB/s) of one device."""

    name: str
    peak_tflops: dict[str, float]
    mem_tb_s: float
    source: str


#: Datasheet figures, dense (the sparse 2:4 figures NVIDIA headlines are twice these).
ROOFLINE_DEVICES: dict[str, RooflineDevice] = {
    # Intel Gaudi 2 (HL-225): MME BF16 432 TFLOPS, FP8 865 TFLOPS; 96 GB HBM2E at 2.45 TB/s.
    # Source: Intel Gaudi 2 AI accelerator white paper / product brief (habana.ai, 2022); INC_NOTES.md.
    "gaudi2": RooflineDevice("Intel Gaudi 2", {"bf16": 432.0, "fp8_e4m3": 865.0, "fp8_e5m2": 865.0}, 2.45,
                             "Intel Gaudi 2 white paper: 432 TFLOPS BF16, 865 TFLOPS FP8, 2.45 TB/s HBM2E"),
    # Intel Gaudi 3 (HL-325L OAM): MME BF16 = FP8 = 1835 TFLOPS; 128 GB HBM2E at 3.7 TB/s.
    # Source: Intel Gaudi 3 AI Accelerator White Paper (intel.com, April 2024).
    "gaudi3": RooflineDevice("Intel Gaudi 3", {"bf16": 1835.0, "fp8_e4m3": 1835.0, "fp8_e5m2": 1835.0}, 3.7,
                             "Intel Gaudi 3 white paper: 1835 TFLOPS BF16 and FP8, 3.7 TB/s HBM2E"),
    # NVIDIA H100 SXM5: BF16 989.4, FP8 1978.9, INT8 1978.9 dense Tensor Core TFLOPS; FP32 66.9 (non-tensor);
    # 80 GB HBM3 at 3.35 TB/s. Source: NVIDIA H100 Tensor Core GPU datasheet (sparse figures 1979/3958 halved)
    # and the Hopper architecture whitepaper's peak table.
    "h100": RooflineDevice("NVIDIA H100 SXM", {"fp32": 66.9, "bf16": 989.4, "fp8_e4m3": 1978.9, "fp8_e5m2": 1978.9,
                                               "int8": 1978.9}, 3.35,
                           "NVIDIA H100 datasheet: 989 TFLOPS BF16, 1979 FP8 (dense), 3.35 TB/s HBM3"),
    # NVIDIA H200 SXM: the same GH100 compute as H100 SXM; 141 GB HBM3e at 4.8 TB/s.
    # Source: NVIDIA H200 Tensor Core GPU datasheet (sparse figures 1979/3958 halved).
    "h200": RooflineDevice("NVIDIA H200 SXM", {"fp32": 66.9, "bf16": 989.4, "fp8_e4m3": 1978.9, "fp8_e5m2": 1978.9,
                                               "int8": 1978.9}, 4.8,
                           "NVIDIA H200 datasheet: 989 TFLOPS BF16, 1979 FP8 (dense), 4.8 TB/s HBM3e"),
}
PHASES = ("prefill", "decode")


def roofline_device(device: str | RooflineDevice) -> RooflineDevice:
    return _lookup(ROOFLINE_DEVICES, device, "roofline figures", "a RooflineDevice")


def phase_shapes(kind: str, shapes: list[list[int]], phase: str = "prefill") -> list[list[int]]:
    """Operand shapes of the op in ``phase``: prefill as captured; decode = one new token per sequence against a KV
    cache of the captured length (Linear x[..., S, K] -> S = 1; BGEMM a[..., p, q] -> p = 1, b unchanged)."""
    if phase not in PHASES:
        raise IpampError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    if phase == "prefill":
        return shapes
    a = list(shapes[0])
    if len(a) >= 2:
        a[-2] = 1
    return [a] + [list(s) for s in shapes[1:]]


def op_bytes(kind: str, shapes: list[list[int]], ref: str, fmt: str) -> float:
    """Bytes one call moves: operands in ``fmt`` read by the GEMM, the output written in ``ref``; in a low format the
    activation operand(s) are first cast from ``ref`` (read ref + write fmt). Linear weights are stored in ``fmt``."""
    r, f = get_format(ref).bytes, get_format(fmt).bytes
    if kind == "linear":
        x, w = shapes[0], shapes[1]
        m, k, n = math.prod(x[:-1]), w[1], w[0]
        acts = [m * k]
        moved = (m * k + n * k) * f + m * n * r
    else:
        a, b = shapes[0], shapes[1]
        batch = math.prod(torch.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])))
        acts = [math.prod(a), math.prod(b)]
        moved = (math.prod(a) + math.prod(b)) * f + batch * a[-2] * b[-1] * r
    if fmt != ref:
        moved += sum(acts) * (r + f)
    return float(moved)


def roofline_time(kind: str, shapes: list[list[int]], ref: str, fmt: str, device: str | RooflineDevice,
                  phase: str = "prefill") -> float:
    """Roofline seconds of one call in ``fmt``: max(FLOPs / peak[fmt], bytes / bandwidth)."""
    dev = roofline_device(device)
    if fmt not in dev.peak_tflops:
        raise IpampError(f"{dev.name} has no published peak for {fmt} (known: {', '.join(dev.peak_tflops)})")
    s = phase_shapes(kind, shapes, phase)
    flops = 2.0 * op_macs(kind, s)
    return max(flops / (dev.peak_tflops[fmt] * 1e12), op_bytes(kind, s, ref, fmt) / (dev.mem_tb_s * 1e12))


def roofline_gain(kind: str, shapes: list[list[int]], ref: str, fmt: str, device: str | RooflineDevice,
                  phase: str = "prefill") -> float:
    """RT: roofline seconds saved by running the op in ``fmt`` instead of ``ref`` on ``device`` (0 for the reference).

    Negative where the format is no faster and its casts add traffic. Per call with the captured (prefill) shapes, or
    one decode step (``phase="decode"``); sums over a group's ops like TT.
    """
    if fmt == ref:
        return 0.0
    return (roofline_time(kind, shapes, ref, ref, device, phase)
            - roofline_time(kind, shapes, ref, fmt, device, phase))


def memory_gain(kind: str, shapes: list[list[int]], ref: str, fmt: str, tied: bool = False) -> float:
    """Weight bytes saved; BGEMMs have no weights (see ``weight_bytes_saved``)."""
    if kind != "linear":
        return 0.0
    return weight_bytes_saved(math.prod(shapes[1]), ref, fmt, tied)


def weight_bytes_saved(numel: int, ref: str, fmt: str, tied: bool = False) -> float:
    """|W|·(bytes_ref − bytes_f); for a weight tied to another module (``ops.tied_linears``) the reference copy stays,
    so the low-precision copy is extra: −|W|·bytes_f."""
    if fmt == ref:
        return 0.0
    if tied:
        return -numel * get_format(fmt).bytes
    return numel * (get_format(ref).bytes - get_format(fmt).bytes)
