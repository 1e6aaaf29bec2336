"""Partition a model's quantizable ops into sequential single-entry/single-exit groups.

Why groups: inside a group, kernels overlap, fuse and reorder, so per-op time gains do not add up; between
groups every path goes through one node, so group gains do (METHOD.md, "Partition").

How: trace the model to a data-flow DAG (``torch.export``; a module-level data-flow trace if export
fails), keep only nodes that depend on the input ids and reach the logits, contract each quantizable op's
nodes into one node, then walk the ops in topological order. A group G is closed once its *exit* — the
nearest common post-dominator p of G's ops (every path from any op of G to the logits passes through p,
p may be an op of G) — is upstream of every op not yet grouped (all of them are strict descendants of p)
and no path from the previous group's exit to the next op bypasses p (this keeps a BGEMM together with
the parallel branch that skips it, e.g. v around q·kᵀ).
Residual connections make "every input→output path passes through a node" impossible inside a decoder
layer (the skip path bypasses the block), so the cut is defined on the paths *leaving* the group; this
gives exactly {q,k,v,qk,av}, {o}, {gate,up}, {down} for a Llama layer and {c_attn}, {qk,av}, {attn.c_proj},
{c_fc}, {mlp.c_proj} for GPT-2 (its fused c_attn emits one tensor that every path to qk/av passes: a cut).
(A dominator-based variant — "the nearest common dominator of all later ops is dominated by every op of G" —
never cuts on a residual network: the residual stream, not the block's output, dominates everything later.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .errors import UnsupportedModelError
from .ops import OpInfo, decoder_layer_index, find_ops, install_attention, layer_part, linear_weight
from .records import Group, Partition

log = logging.getLogger(__name__)

SOURCE = "__source__"
SINK = "__sink__"


@dataclass
class DataflowGraph:
    """A DAG over tensor-producing calls: ``edges`` u->v when v consumes u's output; each node's module path."""

    graph: nx.DiGraph
    module_of: dict[str, str] = field(default_factory=dict)
    order: dict[str, int] = field(default_factory=dict)  # execution (topological) position


def model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "") or type(model).__name__)


def default_example_ids(model: nn.Module, batch: int = 1, seq_len: int = 16) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 256) or 256)
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq_len), generator=g)


# -- tracers ------------------------------------------------------------------------------------------
_AT = re.compile(r"@\d+$")
#: torch.export names a module reached through a sliced ModuleList (transformers 5's Mixtral/Qwen2-MoE loop over
#: ``self.layers[: config.num_hidden_layers]``) ``model.layers.slice(None, 2, None).0``: the slice is not a module
_SLICE = re.compile(r"\.slice\([^)]*\)")


def trace_export(model: nn.Module, ids: torch.Tensor) -> DataflowGraph:
    """Data-flow DAG from ``torch.export`` (static shapes); module paths from ``nn_module_stack``."""
    with torch.no_grad():
        ep = torch.export.export(model, (ids,), kwargs={"use_cache": False})
    g = nx.DiGraph()
    dfg = DataflowGraph(g)
    inputs = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs]
    ids_nodes = [n for n in inputs if n.name == "input_ids"] or inputs[:1]
    if not ids_nodes:
        raise UnsupportedModelError("exported graph has no input_ids placeholder")
    g.add_edge(SOURCE, ids_nodes[0].name)
    for i, n in enumerate(ep.graph.nodes):
        dfg.order[n.name] = i
        if n.op == "output":
            leaves, _ = tree_flatten(n.args)
            for a in leaves[:1]:  # the first user output: the logits
                if isinstance(a, torch.fx.Node):
                    g.add_edge(a.name, SINK)
            continue
        if n.op != "call_function":
            continue
        stack = n.meta.get("nn_module_stack") or {}
        dfg.module_of[n.name] = _SLICE.sub("", _AT.sub("", list(stack.values())[-1][0])) if stack else ""
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    dfg.order[SINK] = len(dfg.order)
    return dfg


class _Recorder(torch.overrides.TorchFunctionMode):
    """Records every torch call's input/output tensors with the innermost running module's name."""

    def __init__(self, dfg: DataflowGraph, stack: list[str]):
        super().__init__()
        self.dfg, self.stack = dfg, stack
        self.producer: dict[int, str] = {}
        self.keep: list[torch.Tensor] = []  # keep tensors alive so their id() is never reused

    def mark(self, t: torch.Tensor, node: str) -> None:
        self.producer[id(t)] = node
        self.keep.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [self.producer[id(t)] for t in tree_flatten((args, kwargs))[0]
               if isinstance(t, torch.Tensor) and id(t) in self.producer]
        if ins:
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            if outs:
                node = f"n{len(self.dfg.order)}"
                self.dfg.order[node] = len(self.dfg.order)
                self.dfg.module_of[node] = self.stack[-1] if self.stack else ""
                for u in dict.fromkeys(ins):
                    self.dfg.graph.add_edge(u, node)
                for t in outs:
                    self.mark(t, node)
        return out


def trace_dataflow(model: nn.Module, ids: torch.Tensor) -> DataflowGraph:
    """Fallback tracer: run the model eagerly and record which call consumed which call's output."""
    dfg = DataflowGraph(nx.DiGraph())
    stack: list[str] = []
    handles = []

    def push(m, a, n):
        stack.append(n)

    def pop(m, a, o):
        stack.pop()

    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: push(m, a, n)))
        handles.append(mod.register_forward_hook(pop))
    rec = _Recorder(dfg, stack)
    ids = ids.clone()
    rec.mark(ids, SOURCE)
    dfg.order[SOURCE] = -1
    try:
        with torch.no_grad(), rec:
            out = model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    logits = out.logits if hasattr(out, "logits") else out[0]
    if id(logits) not in rec.producer:
        raise UnsupportedModelError("data-flow trace lost the path from input ids to logits")
    dfg.graph.add_edge(rec.producer[id(logits)], SINK)
    dfg.order[SINK] = len(dfg.order)
    return dfg


# -- cut algorithm --------------------------------------------------------------------------------------
def _owner(module: str, op_names: set[str]) -> str | None:
    """The quantizable op whose module contains a node (the node's module or one of its ancestors)."""
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        cand = ".".join(parts[:k])
        if cand in op_names:
            return cand
    return None


def contract(dfg: DataflowGraph, ops: list[OpInfo]) -> tuple[nx.DiGraph, list[str], list[str]]:
    """Keep the data path (reachable from the source and reaching the sink) and merge each op's nodes.

    Returns the contracted DAG, the reached ops in topological order and the ops that were not reached.
    """
    g = dfg.graph
    if SOURCE not in g or SINK not in g:
        raise UnsupportedModelError("traced graph has no path from the input ids to the logits")
    keep = (nx.descendants(g, SOURCE) | {SOURCE}) & (nx.ancestors(g, SINK) | {SINK})
    names = {o.name for o in ops}
    rep = {n: (_owner(dfg.module_of.get(n, ""), names) or n) for n in keep}
    h = nx.DiGraph()
    h.add_nodes_from(set(rep.values()))
    for u, v in g.subgraph(keep).edges:
        if rep[u] != rep[v]:
            h.add_edge(rep[u], rep[v])
    if not nx.is_directed_acyclic_graph(h):
        raise UnsupportedModelError("contracting the quantizable ops' nodes created a cycle")
    first: dict[str, int] = {}
    for n in keep:
        r = rep[n]
        first[r] = min(first.get(r, 1 << 60), dfg.order.get(n, 0))
    reached = sorted((o.name for o in ops if o.name in h), key=lambda n: first[n])
    missing = [o.name for o in ops if o.name not in h]
    return h, reached, missing


def cut_groups(h: nx.DiGraph, ops_in_order: list[str]) -> list[list[str]]:
    """Split the ops (topological order) into sequential groups using the post-dominator tree."""
    ipdom = nx.immediate_dominators(h.reverse(copy=False), SINK)
    depth: dict[str, int] = {SINK: 0}

    def d(n: str) -> int:
        path = []
        while n not in depth:
            path.append(n)
            n = ipdom[n]
        base = depth[n]
        for k, m in enumerate(reversed(path), 1):
            depth[m] = base + k
        return depth[path[0]] if path else base

    def lca(a: str, b: str) -> str:
        da, db = d(a), d(b)
        while da > db:
            a, da = ipdom[a], da - 1
        while db > da:
            b, db = ipdom[b], db - 1
        while a != b:
            a, b = ipdom[a], ipdom[b]
        return a

    groups: list[list[str]] = []
    cur: list[str] = []
    exit_node = None
    entry = SOURCE  # the previous group's exit
    remaining = set(ops_in_order)
    for k, op in enumerate(ops_in_order):
        cur.append(op)
        remaining.discard(op)
        exit_node = op if exit_node is None else lca(exit_node, op)
        nxt = ops_in_order[k + 1] if k + 1 < len(ops_in_order) else SINK
        if (remaining <= nx.descendants(h, exit_node)
                and not nx.has_path(nx.restricted_view(h, [exit_node], []), entry, nxt)):
            groups.append(cur)
            cur, entry, exit_node = [], exit_node, None
    if cur:
        groups.append(cur)
    return groups


_EXPERT = re.compile(r"^(?P<block>.+\.experts)\.(?P<e>\d+)\.")


def cut_groups_moe(h: nx.DiGraph, ops_in_order: list[str]) -> list[list[str]]:
    """``cut_groups`` for a graph that may hold MoE blocks: each expert gets its own sequential groups.

    The experts of a block are parallel branches between the router and the weighted sum, so the sequential walk
    never finds a cut between them and would close one group over the whole block and whatever follows it up to
    the next common exit (on a tiny Mixtral: all experts of layer 0 plus layer 1's attention). So each block's
    expert ops are first contracted into one node for the walk; the group holding that node is then split into
    branches (one per expert, one per other module, e.g. Qwen2-MoE's shared expert) and each branch is cut on its
    own, with the same rule (an expert {w1, w3, w2} gives {w1, w3}, {w2}, like a dense MLP).
    """
    block = {op: m["block"] for op in ops_in_order if (m := _EXPERT.match(op))}
    if not block:
        return cut_groups(h, ops_in_order)
    h2 = nx.relabel_nodes(h, block, copy=True)  # merging relabel: every expert op of a block becomes the block node
    order2 = list(dict.fromkeys(block.get(op, op) for op in ops_in_order))
    members: dict[str, list[str]] = {}
    for op in ops_in_order:
        if op in block:
            members.setdefault(block[op], []).append(op)
    pos = {op: i for i, op in enumerate(ops_in_order)}
    out: list[list[str]] = []
    for grp in cut_groups(h2, order2):
        if not any(n in members for n in grp):
            out.append(grp)
            continue
        branches: dict[str, list[str]] = {}
        for n in grp:
            for op in members.get(n, [n]):
                m = _EXPERT.match(op)
                key = f"{m['block']}.{m['e']}" if m else op.rpartition(".")[0]
                branches.setdefault(key, []).append(op)
        split = [g for ops in branches.values() for g in cut_groups(h, sorted(ops, key=pos.__getitem__))]
        out.extend(sorted(split, key=lambda g: pos[g[0]]))
    return out


# -- signatures -----------------------------------------------------------------------------------------
def suffix(op: str) -> str:
    """An op's name below its decoder layer (``self_attn.q_proj``): what makes two layers' groups comparable."""
    parts = op.split(".")
    i = layer_part(parts)  # the one parser of layer numbers (ops.py)
    return ".".join(parts[i + 1:]) or op if i is not None else op


def first_calls(model: nn.Module, names: Iterable[str], ids: torch.Tensor,
                record: Callable[[str, tuple, dict], Any]) -> dict[str, Any]:
    """``record(name, args, kwargs)`` of the first call of each named module in one no-grad forward on ``ids``.

    The one hook-and-forward helper behind shape capture (signatures, MACs) and sub-graph input capture."""
    mods = dict(model.named_modules())
    got: dict[str, Any] = {}

    def pre(name: str, args: tuple, kwargs: dict) -> None:
        if name not in got:
            got[name] = record(name, args, kwargs)

    handles = [mods[n].register_forward_pre_hook(lambda m, a, k, n=n: pre(n, a, k), with_kwargs=True)
               for n in names if n]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for hd in handles:
            hd.remove()
    return got


def tensor_shapes(args: tuple) -> list[list[int]]:
    return [list(a.shape) for a in args if isinstance(a, torch.Tensor)]


def capture_shapes(model: nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, list[list[int]]]:
    """Input shapes of each named module in one forward (the signature needs them)."""
    return first_calls(model, names, ids, lambda n, args, kwargs: tensor_shapes(args))


def group_signature(model: nn.Module, ops: list[str], kinds: dict[str, str],
                    shapes: dict[str, list[list[int]]]) -> str:
    """Hash of the group's structure and shapes: equal signatures => timings are interchangeable."""
    mods = dict(model.named_modules())
    desc = []
    for op in ops:
        w = list(linear_weight(mods[op]).shape) if kinds[op] == "linear" else []
        name = re.sub(r"\.experts\.\d+\.", ".experts.*.", suffix(op))  # experts of equal shape are interchangeable
        desc.append([name, kinds[op], w, shapes.get(op, [])])
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]


def _group_name(ops: list[str]) -> str:
    prefix = ops[0].rsplit(".", 1)[0] if "." in ops[0] else ""
    if prefix and all(o.startswith(prefix + ".") for o in ops):
        return f"{prefix}[{'+'.join(o[len(prefix) + 1:] for o in ops)}]"
    return "[" + "+".join(ops) + "]"


# -- entry point ----------------------------------------------------------------------------------------
def partition_model(model: nn.Module, example_ids: torch.Tensor | None = None, method: str = "auto") -> Partition:
    """Trace ``model`` and split its quantizable ops into sequential groups (a Partition record).

    ``method``: "auto" (torch.export, falling back to the data-flow trace and saying so in ``notes``),
    "torch.export" or "dataflow".
    """
    if method not in ("auto", "torch.export", "dataflow"):
        raise ValueError(f"method must be auto, torch.export or dataflow, got {method!r}")
    from .moe import dense_routing, unfuse_experts

    install_attention(model)
    model.eval()
    notes: list[str] = []
    unfused = unfuse_experts(model)
    if unfused:
        notes.append(f"{len(unfused)} fused MoE expert module(s) rebuilt as one Linear per expert and projection "
                     "(inc_ipamp.moe.unfuse_experts), e.g. " + unfused[0])
    with dense_routing(model) as moe:
        if moe:
            notes.append("MoE: traced with every expert on every token (dense routing), so that every expert is on "
                         "the traced path whatever the example tokens route to; each expert is its own groups")
        return _partition(model, example_ids, method, notes)


def _partition(model: nn.Module, example_ids: torch.Tensor | None, method: str, notes: list[str]) -> Partition:
    ids = default_example_ids(model) if example_ids is None else example_ids
    ops = find_ops(model, ordered=False)
    used = method
    if method in ("auto", "torch.export"):
        try:
            dfg = trace_export(model, ids)
            used = "torch.export"
        except Exception as e:  # noqa: BLE001 - any export failure means: fall back
            if method == "torch.export":
                raise UnsupportedModelError(f"torch.export failed on {type(model).__name__}: "
                                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            msg = (f"torch.export failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                   "used the module-level data-flow trace instead")
            log.warning(msg)
            notes.append(msg)
            used = "dataflow"
    if used == "dataflow":
        dfg = trace_dataflow(model, ids)
    h, order, missing = contract(dfg, ops)
    if missing:
        notes.append(f"{len(missing)} quantizable op(s) not on the input→logits data path, left out: "
                     + ", ".join(missing[:5]) + (" …" if len(missing) > 5 else ""))
    kinds = {o.name: o.kind for o in ops}
    shapes = capture_shapes(model, order, ids)
    groups = []
    for ops_g in cut_groups_moe(h, order):
        layer = decoder_layer_index(ops_g[0])
        groups.append(Group(_group_name(ops_g), ops_g, layer, group_signature(model, ops_g, kinds, shapes)))
    notes.append(f"traced with example ids of shape {list(ids.shape)}; {len(order)} ops in {len(groups)} groups, "
                 f"{len({g.signature for g in groups})} distinct signatures")
    return Partition(model_name(model), used, groups, notes)
