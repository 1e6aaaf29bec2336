"""Measure what an applied assignment does to the loss.

Measured loss MSE uses the same definition the prediction uses: mean over sequences of
(loss_n(quantised) − loss_n(reference))², loss_n = mean next-token cross-entropy of sequence n. The assignment is put
on the model by an *applier* (``inc_ipamp.apply``): a device backend's ``apply`` (the very kernels that were timed;
the pipeline measures with it) or ``apply.fake.fake_quant`` (the same numerics, for formats the machine has no
kernel for).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .apply import Applier
from .apply.fake import fake_quant
from .sensitivity import sequence_loss


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
                reference: torch.Tensor | None = None, apply: Applier | None = None,
                per_sequence: bool = False) -> dict[str, Any]:
    """One pass over ``blocks`` under the assignment (``apply``, default ``fake_quant``): the measured loss MSE
    E_n[(loss_n(assignment) − loss_n(reference))²] (the quantity the Taylor model predicts), the mean loss shift,
    and the perplexity under the assignment; with ``per_sequence`` also each sequence's change ("loss_changes"), for
    a bootstrap over the evaluation sequences."""
    blocks = list(blocks)
    if reference is None:
        reference = sequence_losses(model, blocks)
    with (apply or fake_quant)(model, assignment) as m:
        q = sequence_losses(m, blocks)
    d = q - reference
    out: dict[str, Any] = {"measured_loss_mse": float((d ** 2).mean()), "measured_loss_shift": float(d.mean()),
                           "perplexity": math.exp(float(q.mean()))}
    if per_sequence:
        out["loss_changes"] = d.tolist()
    return out


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
