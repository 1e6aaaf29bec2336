"""Theoretical time gain (MACs × rate difference) and memory gain (weight bytes saved).

Rates are inputs, not measurements: the per-device tables below are vendor peak dense throughputs
(TFLOPS) for Gaudi 2 and H100, and for CPU relative rates (fp32 = 1) that a user should replace with their
own. TT is in "theoretical seconds" = 2·MACs / (rate·1e12); only differences between formats matter.
"""

from __future__ import annotations

import math

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


def rates_for(device: str | dict[str, float]) -> dict[str, float]:
    if isinstance(device, dict):
        return device
    try:
        return DEVICE_RATES[device]
    except KeyError:
        raise IpampError(f"no rate table for device {device!r}; known: {', '.join(DEVICE_RATES)} "
                         "(or pass device_rates={format: TFLOPS})") from None


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


def memory_gain(kind: str, shapes: list[list[int]], ref: str, fmt: str) -> float:
    """Weight bytes saved: |W|·(bytes_ref − bytes_f); BGEMMs have no weights."""
    if kind != "linear" or fmt == ref:
        return 0.0
    return math.prod(shapes[1]) * (get_format(ref).bytes - get_format(fmt).bytes)
