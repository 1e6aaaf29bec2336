"""Quantizable ops: every Linear (and transformers' Conv1D) plus the attention batch-GEMMs.

HF models compute q·kᵀ and p·v inside a function, out of reach of module hooks and of INC. We register
an attention implementation ("ipamp") that routes both products through per-layer ``Matmul`` modules
named ``matmul_qk`` / ``matmul_av``, the names and class name optimum-habana's Gaudi modeling and
INC's fp8_quant use, so our op names are exactly the names an exported blocklist must carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError

ATTN_IMPL = "ipamp"
#: the attention BGEMMs' module names (leaves of the attention module's name)
BGEMM_LEAVES = ("matmul_qk", "matmul_av")
#: a KV cache op (``<attention>.k_cache``/``.v_cache``, kvcache.py) -> the BGEMM whose ``b`` operand reads that cache
KV_LEAVES = {"k_cache": "matmul_qk", "v_cache": "matmul_av"}


def is_kv_op(op: str) -> bool:
    """A KV-cache decision's name (``<attention>.k_cache``/``.v_cache``), not a module of the model."""
    return op.rpartition(".")[2] in KV_LEAVES


def kv_bgemm(op: str) -> str:
    """The BGEMM that reads the KV cache ``op`` as its ``b`` operand (``<attention>.k_cache`` -> ``….matmul_qk``)."""
    prefix, _, leaf = op.rpartition(".")
    return f"{prefix}.{KV_LEAVES[leaf]}"


class Matmul(nn.Module):
    """``a @ b`` as a module (class name ``Matmul`` as in optimum-habana / INC fp8_quant)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def ipamp_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs):
    """Eager attention with both products through the module's ``matmul_qk`` / ``matmul_av``."""
    n_rep = query.shape[1] // key.shape[1]
    # the sensitivity collector folds the repeated K/V heads back (their copies share one rounding error)
    module.matmul_qk.kv_repeat = module.matmul_av.kv_repeat = n_rep
    key = _repeat_kv(key, n_rep)
    value = _repeat_kv(value, n_rep)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = module.matmul_qk(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = module.matmul_av(probs, value)
    return out.transpose(1, 2).contiguous(), probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPL, ipamp_attention)
    AttentionMaskInterface.register(ATTN_IMPL, eager_mask)


def _is_attention(mod: nn.Module) -> bool:
    name = type(mod).__name__
    return name.endswith("Attention") and any(
        hasattr(mod, a) for a in ("q_proj", "c_attn", "qkv_proj", "query_key_value", "Wqkv"))


def install_attention(model: nn.Module) -> list[str]:
    """Add ``matmul_qk``/``matmul_av`` to every attention module and switch the model to them.

    Idempotent. Returns the attention module names. Raises for models whose attention we cannot route.
    """
    _register()
    names = []
    for name, mod in model.named_modules():
        if _is_attention(mod):
            if not hasattr(mod, "matmul_qk"):
                mod.matmul_qk = Matmul()
                mod.matmul_av = Matmul()
            names.append(name)
    if not names:
        raise UnsupportedModelError(
            f"no attention module found in {type(model).__name__}; supported: HF decoder models whose attention "
            "modules have q_proj/c_attn/qkv_proj projections")
    try:
        model.set_attn_implementation(ATTN_IMPL)
    except (ValueError, AttributeError) as e:
        raise UnsupportedModelError(f"{type(model).__name__} rejects a custom attention function: {e}") from None
    return names


@dataclass(frozen=True)
class OpInfo:
    """A quantizable op: its module name, kind and the names of its two operands."""

    name: str
    kind: str  # "linear" or "bgemm"

    @property
    def operands(self) -> tuple[str, str]:
        return ("x", "w") if self.kind == "linear" else ("a", "b")


def is_bgemm_name(op: str) -> bool:
    """Whether an op name is an attention BGEMM's (``…matmul_qk`` / ``…matmul_av``), for callers with names only."""
    return op.rsplit(".", 1)[-1] in BGEMM_LEAVES


def is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"


def linear_weight(mod: nn.Module) -> torch.Tensor:
    """Weight as (d_out, d_in) whatever the layout (transformers' Conv1D stores (d_in, d_out))."""
    return mod.weight.t() if type(mod).__name__ == "Conv1D" else mod.weight


def tied_linears(model: nn.Module) -> set[str]:
    """Linear ops whose weight tensor another module also holds (lm_head tied to the input embedding): a low-precision
    copy of such a weight frees nothing, since the shared full-precision tensor stays, and costs its own bytes."""
    holders: dict[int, int] = {}
    for _, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            holders[id(p)] = holders.get(id(p), 0) + 1
    return {name for name, mod in model.named_modules()
            if is_linear(mod) and holders.get(id(getattr(mod, "weight", None)), 0) > 1}


def find_ops(model: nn.Module, include_lm_head: bool = True, ordered: bool = True) -> list[OpInfo]:
    """Quantizable ops (every Linear/Conv1D and attention Matmul) in execution order (found by a 4-token forward),
    or in module-definition order with ``ordered=False`` (no forward). Call ``install_attention`` first."""
    ops = []
    for name, mod in model.named_modules():
        if isinstance(mod, Matmul):
            ops.append(OpInfo(name, "bgemm"))
        elif is_linear(mod):
            if not include_lm_head and mod is model.get_output_embeddings():
                continue
            ops.append(OpInfo(name, "linear"))
    if not any(o.kind == "bgemm" for o in ops):
        raise UnsupportedModelError("no attention batch-GEMM modules; call install_attention(model) first")
    if not ordered:
        return ops
    order = execution_order(model, [o.name for o in ops])
    return sorted(ops, key=lambda o: order.get(o.name, len(order)))


def execution_order(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Position of each named module's first call in a tiny forward pass."""
    mods = dict(model.named_modules())
    order: dict[str, int] = {}

    def hook(name: str):
        def record(mod: nn.Module, args: tuple) -> None:
            order.setdefault(name, len(order))
        return record

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(torch.zeros((1, 4), dtype=torch.long), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return order


def layer_part(parts: list[str]) -> int | None:
    """Index in a dotted name's parts of its decoder-layer number (``model.layers.3...``, GPT-2's ``h.3``)."""
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h", "layer", "blocks") and parts[i + 1].isdigit():
            return i + 1
    return None


def decoder_layer_index(op_name: str) -> int | None:
    """The decoder-layer number in an op name (``model.layers.3.mlp.up_proj`` -> 3), else None."""
    parts = op_name.split(".")
    i = layer_part(parts)
    return None if i is None else int(parts[i])


def op_type(op_name: str) -> str:
    """An op's name with its decoder layer's number replaced by ``*`` (``model.layers.*.mlp.up_proj``): the same op
    in every layer, over which the loss model pools its estimates."""
    parts = op_name.split(".")
    i = layer_part(parts)
    return op_name if i is None else ".".join([*parts[:i], "*", *parts[i + 1:]])
