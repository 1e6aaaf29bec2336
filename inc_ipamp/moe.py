"""Mixture-of-experts models: per-expert Linear modules, named as the serving engines name them.

Why: transformers ≥ 5 stores a MoE block's experts as two 3-D parameters (``experts.gate_up_proj`` [E, 2I, H],
``experts.down_proj`` [E, H, I]) inside one module, so no expert is a quantizable op: calibration hooks, groups,
gains and plans all work on ``nn.Linear`` modules. The engines that run FP8 MoE models (optimum-habana, pinned to
transformers 4.55) and transformers 4.x itself have one ``nn.Linear`` per expert and projection:
``experts.<e>.w1/w3/w2`` for Mixtral, ``experts.<e>.gate_proj/up_proj/down_proj`` for Qwen2-MoE.
``unfuse_experts`` rebuilds that layout from the fused weights (the same numbers, the same routing), so every
expert projection becomes an op with the engines' leaf names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

#: leaf names (gate, up, down) of one expert in transformers 4.x and the engines, by fused-experts class name
EXPERT_LEAVES = {"MixtralExperts": ("w1", "w3", "w2")}
DEFAULT_LEAVES = ("gate_proj", "up_proj", "down_proj")


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), with the leaf names of its engine."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act: nn.Module,
                 leaves: tuple[str, str, str]):
        super().__init__()
        self.leaves = leaves
        for name, mod in zip(leaves, (gate, up, down), strict=True):
            self.add_module(name, mod)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.leaves)
        return down(self.act_fn(gate(x)) * up(x))


class UnfusedExperts(nn.ModuleList):
    """A fused experts module's drop-in replacement: the same ``forward(hidden, top_k_index, top_k_weights)``.

    ``dense`` (set by ``dense_routing`` for tracing only): every expert runs on every token, weighted by its routing
    weight (0 where the token is not routed to it), so the traced graph has every expert on the data path whatever
    the example tokens route to; outputs are the same, only more work is done.
    """

    dense = False

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        n = len(self)
        if self.dense:
            out = torch.zeros_like(hidden_states)
            for e, expert in enumerate(self):
                w = (top_k_weights * (top_k_index == e)).sum(-1, keepdim=True)
                out = out + expert(hidden_states) * w.to(hidden_states.dtype)
            return out
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=n).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit:
            e = int(e[0])
            pos, tok = torch.where(mask[e])
            y = self[e](hidden_states[tok]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def _is_fused_experts(mod: nn.Module) -> bool:
    p = dict(mod.named_parameters(recurse=False))
    return ("gate_up_proj" in p and "down_proj" in p and p["gate_up_proj"].dim() == 3
            and p["down_proj"].dim() == 3 and hasattr(mod, "act_fn"))


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module by an ``UnfusedExperts`` of per-expert ``nn.Linear`` (idempotent).

    Returns the replaced module names. The weights are copied row blocks of the fused tensors (gate = the first I
    rows of ``gate_up_proj[e]``, up = the next I), so the model computes the same function up to float rounding of
    two GEMMs instead of one.
    """
    done = []
    for name, mod in list(model.named_modules()):
        if not _is_fused_experts(mod):
            continue
        gu, dn = mod.gate_up_proj.detach(), mod.down_proj.detach()
        n_exp, two_i, hidden = gu.shape
        inter = two_i // 2
        leaves = EXPERT_LEAVES.get(type(mod).__name__, DEFAULT_LEAVES)
        experts = []
        for e in range(n_exp):
            lin = []
            for w in (gu[e, :inter], gu[e, inter:], dn[e]):
                layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
                layer.weight.data.copy_(w)
                lin.append(layer)
            experts.append(ExpertMLP(*lin, act=mod.act_fn, leaves=leaves))
        new = UnfusedExperts(experts)
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, new)
        done.append(name)
    return done


@contextlib.contextmanager
def dense_routing(model: nn.Module) -> Iterator[bool]:
    """Within the block, every ``UnfusedExperts`` runs all its experts on all tokens (for tracing); yields whether
    the model has any."""
    mods = [m for m in model.modules() if isinstance(m, UnfusedExperts)]
    for m in mods:
        m.dense = True
    try:
        yield bool(mods)
    finally:
        for m in mods:
            m.dense = False
