"""Fake quantisation: round-and-back with the deployed kernels' numerics, for formats the machine has no kernel for.

Both are appliers (``inc_ipamp.apply``): hooks and swapped weights on the model inside the ``with`` block, all
removed on exit. ``fake_quant`` rounds the planned ops' inputs and weights (``formats.quantize`` /
``quantize_weight``, bit-identical to the torch.ao INT8 and ``torch._scaled_mm`` FP8 kernels: tests/test_numerics.py);
``fake_quant_kv`` rounds the K and V a low-precision KV cache would hold, and ``with_kv_cache`` puts both on a model
for a plan with KV-cache decisions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import IpampError
from ..formats import get_format, quantize, quantize_weight, quantize_with_scale
from ..ops import Matmul, install_attention, is_kv_op, kv_bgemm


@contextlib.contextmanager
def fake_quant(model: nn.Module, assignment: dict[str, str], reference: str | None = None) -> Iterator[nn.Module]:
    """Quantise inputs and weights of the assigned ops and restore them on exit. Ops in a reference-kind format or
    in ``reference`` (a plan's reference format, e.g. bf16 on Gaudi: those ops run as the model does) are left alone.

    Numerics are ``formats.quantize`` (activations, per call) and ``formats.quantize_weight``, and a cast kernel's
    rounded output (``Format.output_rounded``): the deployed kernels' and the sensitivity collector's.
    """
    install_attention(model)
    mods = dict(model.named_modules())
    handles, saved = [], []
    try:
        for name, fname in assignment.items():
            fmt = get_format(fname)
            if fmt.kind == "ref" or fname == reference:
                continue
            if name not in mods:
                raise KeyError(f"op {name!r} of the assignment is not a module of this model")
            mod = mods[name]
            if fmt.output_rounded:  # the cast kernel returns its output in the format
                dt = getattr(torch, fmt.torch_dtype)
                handles.append(mod.register_forward_hook(lambda m, a, out, dt=dt: out.to(dt).to(out.dtype)))
            if isinstance(mod, Matmul):
                handles.append(mod.register_forward_pre_hook(
                    lambda m, a, f=fmt: (quantize(a[0], f, -1), quantize(a[1], f, -2), *a[2:])))
            else:
                conv1d = type(mod).__name__ == "Conv1D"  # weight stored (d_in, d_out)
                # A new Parameter on this module only: an in-place write would also quantise every module
                # tied to the same tensor (lm_head shares its weight with the input embedding).
                saved.append((mod, mod.weight))
                mod.weight = nn.Parameter(quantize_weight(mod.weight.detach(), fmt, 0 if conv1d else -1),
                                          requires_grad=False)
                handles.append(mod.register_forward_pre_hook(lambda m, a, f=fmt: (quantize(a[0], f, -1), *a[1:])))
        yield model
    finally:
        for h in handles:
            h.remove()
        for mod, weight in saved:
            mod.weight = weight


@contextlib.contextmanager
def fake_quant_kv(model: nn.Module, assignment: dict[str, str],
                  scales: dict[str, float] | None = None) -> Iterator[nn.Module]:
    """Round the K and V the attention reads, as a low-precision KV cache would: the ``b`` operand of ``matmul_qk``
    (Kᵀ) and ``matmul_av`` (V) of each cache in ``assignment``, per tensor, with the call's own scale (``quantize``,
    what the calibration sums assume) or a fixed one per cache (``scales``, e.g. ``static_scales``: INC's). Hooks on
    the modules the model holds when entered; removed on exit (an applier)."""
    mods = dict(model.named_modules())
    handles = []

    def hook(fmt: str, s: float | None):
        f = get_format(fmt)

        def pre(mod: nn.Module, args: tuple) -> tuple:
            a, b = args
            qb = quantize(b, f) if s is None else quantize_with_scale(b, f, torch.tensor(s, dtype=b.dtype))
            return a, qb
        return pre

    try:
        for op, fmt in assignment.items():
            if get_format(fmt).kind == "ref":
                continue
            mm = kv_bgemm(op)
            if mm not in mods:
                raise IpampError(f"no module {mm} for the KV cache {op}")
            handles.append(mods[mm].register_forward_pre_hook(hook(fmt, (scales or {}).get(op))))
        yield model
    finally:
        for h in handles:
            h.remove()


def split_kv(assignment: dict[str, str], reference: str) -> tuple[dict[str, str], dict[str, str]]:
    """(the ops' assignment without any KV-cache entry, the KV caches held in a format other than ``reference``)."""
    ops = {op: f for op, f in assignment.items() if not is_kv_op(op)}
    kv = {op: f for op, f in assignment.items() if is_kv_op(op) and f != reference and get_format(f).kind != "ref"}
    return ops, kv


def with_kv_cache(apply: Callable[..., Any], scales_of: Callable[[dict[str, str]], dict[str, float]], reference: str,
                  kernels: bool = True) -> Callable[..., Any]:
    """An applier for plans with KV-cache decisions: ``apply`` (the device's kernels, or fake quantisation) on the ops,
    and the K and V of every low-precision cache rounded as the attention reads them with the scales ``scales_of``
    gives (``kvcache.static_scales``: INC's, what a deployed cache stores). No kernel here runs a low-precision cache
    faster (benchmarks/results/decode.md, section 4), so this is the cache's numerics only.

    The cache is rounded before the attention BGEMM's own rounding, as a cache feeds the BGEMM: after ``apply`` has
    swapped modules (``kernels``: the hooks go on the swapped ones), before it adds its hooks otherwise."""

    @contextlib.contextmanager
    def both(model: Any, assignment: dict[str, str]) -> Iterator[Any]:
        ops, kv = split_kv(assignment, reference)
        scales = scales_of(kv)
        if kernels:
            with apply(model, ops) as m, fake_quant_kv(m, kv, scales):
                yield m
        else:
            with fake_quant_kv(model, kv, scales), apply(model, ops) as m:
                yield m
    return both
