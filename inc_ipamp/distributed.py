"""Several processes or devices: calibration statistics summed over data-parallel ranks, measurements sharded.

Calibration: every statistic in a sensitivity record is a sum over calibration sequences (or a max, or a per-sequence
constant), so ranks that each calibrate a disjoint share of the sequences can be combined exactly: that is what
``merge_sensitivities`` does, field by field, and ``allreduce_sensitivity`` does it across a ``torch.distributed``
group. The rules are read off the dataclass fields, so a field added to the records later is summed, maxed or
checked by its type, and a field of a type with no rule stops the merge with its name (never silently dropped).

Measurement: ``shard`` deals the configurations to time round-robin to the ranks; each rank appends its timings to
one shared content-hashed cache (``gains.cache``, lines appended under a lock) and, after a barrier, every rank
reads the whole cache, so each assembles the same gains record from the same entries (``gains.measure``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

from .errors import IpampError
from .records import OperandStats, OpSensitivity, Sensitivity

T = TypeVar("T")


class MergeError(IpampError):
    """Ranks' records cannot be combined (a per-sequence constant differs, or a field has no merge rule)."""


#: OperandStats fields that are a maximum over sequences, not a sum
_MAX_FIELDS = {"amax"}
#: Sensitivity fields and how ranks combine them (every other field must be listed, or the merge fails loudly)
_SENS_RULES = {"model": "same", "seq_len": "same", "formats": "same", "version": "same", "data_source": "same",
               "n_samples": "sum", "n_curvature": "sum", "mean_loss": "mean", "wall_s": "max", "ops": "ops",
               "unreached": "unreached", "noise_models": "same"}
#: OpSensitivity fields: ``calls`` adds up; the rest are per-sequence properties of the op that every rank must share
_OP_RULES = {"name": "same", "kind": "same", "calls": "sum", "macs": "same", "weight_numel": "same", "shapes": "same",
             "operands": "operands"}


def _same(values: Sequence[Any], what: str) -> Any:
    other = next((v for v in values[1:] if v != values[0]), None)
    if other is not None:
        raise MergeError(f"{what} differs between ranks ({values[0]!r} vs {other!r}); every rank must calibrate the "
                         "same model with the same settings and sequence length")
    return values[0]


def _merge_operands(stats: Sequence[OperandStats], where: str) -> OperandStats:
    """Sum every number (max for ``amax``) and every {format: number} dict, key by key; concatenate every
    {format: per-sequence list} dict (``seq``: each rank calibrated its own sequences), in rank order."""
    out = {}
    for f in dataclasses.fields(OperandStats):
        vals = [getattr(s, f.name) for s in stats]
        v0 = vals[0]
        if isinstance(v0, bool):
            out[f.name] = _same(vals, f"{where}.{f.name}")
        elif isinstance(v0, (int, float)):
            out[f.name] = max(vals) if f.name in _MAX_FIELDS else sum(vals[1:], v0)
        elif isinstance(v0, dict) and all(isinstance(x, (int, float)) for d in vals for x in d.values()):
            acc: dict[str, float] = {}
            for d in vals:
                for k, x in d.items():
                    acc[k] = max(acc[k], x) if (f.name in _MAX_FIELDS and k in acc) else acc.get(k, 0.0) + x
            out[f.name] = acc
        elif isinstance(v0, dict) and all(isinstance(x, list) for d in vals for x in d.values()):
            keys = dict.fromkeys(k for d in vals for k in d)
            out[f.name] = {k: [x for d in vals for x in d.get(k, [])] for k in keys}
        else:
            raise MergeError(f"no merge rule for OperandStats.{f.name} ({type(v0).__name__}); add one to "
                             "inc_ipamp.distributed")
    return OperandStats(**out)


def _merge_op(ops: Sequence[OpSensitivity], name: str) -> OpSensitivity:
    out = {}
    for f in dataclasses.fields(OpSensitivity):
        vals = [getattr(o, f.name) for o in ops]
        rule = _OP_RULES.get(f.name, "same" if isinstance(vals[0], (bool, str)) else None)
        if rule == "same":
            out[f.name] = _same(vals, f"op {name}: {f.name}")
        elif rule == "sum":
            out[f.name] = sum(vals)
        elif rule == "operands":
            _same([sorted(v) for v in vals], f"op {name}: operands")
            out[f.name] = {k: _merge_operands([v[k] for v in vals], f"{name}.{k}") for k in vals[0]}
        else:
            raise MergeError(f"no merge rule for OpSensitivity.{f.name} ({type(vals[0]).__name__}); add one to "
                             "inc_ipamp.distributed._OP_RULES")
    return OpSensitivity(**out)


def _with_rank_sequences(op: OpSensitivity, ranks: Sequence[dict[str, OpSensitivity]], n: Sequence[int],
                         n_curv: Sequence[int]) -> OpSensitivity:
    """The merged op's per-sequence lists (``OperandStats.seq``, and ``dseq``/``cseq`` per (curvature) batch: per
    sequence at batch 1, the only case they are read) rank by rank, zeros for the sequences of a rank that does not
    have the op, so sequence i is the same sequence in every op's list."""
    for name, st in op.operands.items():
        for field, counts in (("seq", n), ("dseq", n), ("cseq", n_curv)):
            lists = getattr(st, field)
            for fmt in lists:
                lists[fmt] = [x for ops, k in zip(ranks, counts, strict=True) for x in (
                    (getattr(ops[op.name].operands[name], field).get(fmt, []) + [0.0] * k)[:k]
                    if op.name in ops and name in ops[op.name].operands else [0.0] * k)]
    return op


def merge_sensitivities(records: Sequence[Sensitivity]) -> Sensitivity:
    """One record for the union of the ranks' calibration sequences (the records in rank order).

    Sums add, ``amax`` is the max, ``n_samples`` adds and ``mean_loss`` is the sample-weighted mean; the op's shapes,
    MACs and weight size are per sequence and must agree. An op a rank never reached (a MoE expert no token of its
    share was routed to) is taken from the ranks that reached it; it stays ``unreached`` only if no rank reached it.
    """
    if not records:
        raise MergeError("nothing to merge")
    n = [r.n_samples for r in records]
    out: dict[str, Any] = {}
    for f in dataclasses.fields(Sensitivity):
        vals = [getattr(r, f.name) for r in records]
        rule = _SENS_RULES.get(f.name)
        if rule == "same":
            out[f.name] = _same(vals, f.name)
        elif rule == "sum":
            out[f.name] = sum(vals)
        elif rule == "max":
            out[f.name] = max(vals)
        elif rule == "mean":
            out[f.name] = sum(v * k for v, k in zip(vals, n, strict=True)) / max(sum(n), 1)
        elif rule == "unreached":
            out[f.name] = [op for op in vals[0] if all(op in v for v in vals)]
        elif rule == "ops":
            names = list(dict.fromkeys(op for v in vals for op in v))  # execution order of the first rank, then others'
            n_curv = [r.n_curvature for r in records]
            out[f.name] = {op: _with_rank_sequences(_merge_op([v[op] for v in vals if op in v], op), vals, n, n_curv)
                           for op in names}
        else:
            raise MergeError(f"no merge rule for Sensitivity.{f.name} ({type(vals[0]).__name__}); add one to "
                             "inc_ipamp.distributed._SENS_RULES")
    return Sensitivity(**out)


def allreduce_sensitivity(sens: Sensitivity, group: Any = None) -> Sensitivity:
    """Every rank of ``group`` (default: the world) gets the merge of all ranks' records (``merge_sensitivities``).

    An all-gather of the (small: scalars per op and operand) records followed by the same merge in rank order on every
    rank, rather than a tensor all-reduce: ranks may hold different op sets (MoE routing) and every rank ends with a
    bit-identical record.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    gathered: list[Sensitivity | None] = [None] * world
    dist.all_gather_object(gathered, sens, group=group)
    return merge_sensitivities([g for g in gathered if g is not None])


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's share of ``items``, dealt round-robin (neighbouring configs of one signature go to different
    ranks, so every rank gets a mix of cheap and expensive ones)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise IpampError(f"rank {rank} is not in a world of {world_size}")
    return list(items[rank::world_size])


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default ``torch.distributed`` group, (0, 1) when it is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
