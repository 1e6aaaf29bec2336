"""Apply a per-op format assignment for real and measure what it does to the loss.

Measured loss MSE uses the same definition the prediction uses: mean over sequences of
(loss_n(quantised) − loss_n(reference))², loss_n = mean next-token cross-entropy of sequence n.

An *applier* puts an assignment on a model for the duration of a ``with`` block: ``applier(model, assignment)`` is a
context manager yielding the model to call. Two exist: a device backend's ``apply`` (the very kernels that were timed:
on CPU torch.ao dynamic INT8, ``torch._scaled_mm`` FP8, bf16 casts — what a user deploys; the pipeline measures with
it) and ``fake_quant`` (round-and-back with the same numerics, tests/test_numerics.py, for formats the machine has no
kernel for, such as a Gaudi plan evaluated on a CPU).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from .formats import get_format, quantize, quantize_weight
from .ops import Matmul, install_attention
from .sensitivity import sequence_loss

#: puts an assignment on a model inside a ``with`` block (see the module docstring)
Applier = Callable[[nn.Module, dict[str, str]], contextlib.AbstractContextManager[nn.Module]]


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


@torch.no_grad()
def sequence_losses(model: nn.Module, blocks: Iterable[torch.Tensor], batch_size: int = 1) -> torch.Tensor:
    """Per-sequence mean cross-entropy over all blocks (float64 vector); equal-length rows run ``batch_size`` at a
    time (the same numbers; 1 by default: 4 rows of SmolLM2's 49k-word logits lifted the default run's peak
    memory from 1.9 to 2.2 GB)."""
    from .sensitivity import rebatch

    dev = next(model.parameters()).device  # the model may live on the measuring device (cuda, hpu)
    rows = (ids if ids.dim() == 2 else ids[None] for ids in blocks)
    out = [sequence_loss(model, b.to(dev)).double().cpu() for b in rebatch(rows, batch_size)]
    return torch.cat(out)


def loss_change(model: nn.Module, blocks: Iterable[torch.Tensor], assignment: dict[str, str],
                reference: torch.Tensor | None = None, apply: Applier | None = None) -> dict[str, float]:
    """One pass over ``blocks`` under the assignment (``apply``, default ``fake_quant``): the measured loss MSE
    E_n[(loss_n(assignment) − loss_n(reference))²] (the quantity the Taylor model predicts), the mean loss shift,
    and the perplexity under the assignment."""
    blocks = list(blocks)
    if reference is None:
        reference = sequence_losses(model, blocks)
    with (apply or fake_quant)(model, assignment) as m:
        q = sequence_losses(m, blocks)
    d = q - reference
    return {"measured_loss_mse": float((d ** 2).mean()), "measured_loss_shift": float(d.mean()),
            "perplexity": math.exp(float(q.mean()))}


def measured_loss_mse(model: nn.Module, blocks: Iterable[torch.Tensor], assignment: dict[str, str],
                      reference: torch.Tensor | None = None, apply: Applier | None = None) -> float:
    """E_n[(loss_n(assignment) − loss_n(reference))²], the quantity the Taylor model predicts."""
    return loss_change(model, blocks, assignment, reference, apply)["measured_loss_mse"]


def perplexity(model: nn.Module, blocks: Iterable[torch.Tensor], assignment: dict[str, str] | None = None) -> float:
    """exp(mean token cross-entropy) over equal-length blocks, optionally under fake-quantisation."""
    ctx = fake_quant(model, assignment) if assignment else contextlib.nullcontext()
    with ctx:
        losses = sequence_losses(model, blocks)
    return math.exp(float(losses.mean()))
