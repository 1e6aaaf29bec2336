"""Per-layer greedy baselines (METHOD.md "Baselines"; paper Sec. 3.1), scored on the IP's own gain tables.

Each baseline is an ordering of the ops. Walking the order, an op is switched to the low-precision format
if the predicted loss MSE stays ≤ ε_max = (β·L̄)²; an op that would exceed the budget is *skipped and the
walk continues* (rather than stopping), which gives every baseline its best chance under its ordering.
The resulting per-op assignment is turned into one config per group and scored with ``GroupGains``, so a
baseline and the IP are compared on identical gain numbers.

Orders: "random" (seeded), "prefix" (network order), "sqnr" (PGQ: highest input SQNR first, so the
budget acts as the SQNR threshold), and the adversarial reversals "prefix_reversed" and "sqnr_reversed".
"""

from __future__ import annotations

import math
import random
import time

from .errors import ArtifactError
from .lossmodel import DEFAULT_MIN_SQNR_DB, DEFAULT_NOISE
from .records import Gains, Partition, Plan, Sensitivity
from .solver import BudgetSpecError, Instance, build_instance, plan_from_choice

BASELINES = ("random", "prefix", "sqnr", "prefix_reversed", "sqnr_reversed")


def op_order(name: str, sensitivity: Sensitivity, ops: list[str], low_format: str, seed: int = 0) -> list[str]:
    """The order in which a baseline tries to switch ops to ``low_format`` (``ops`` in network order)."""
    if name == "random":
        order = list(ops)
        random.Random(seed).shuffle(order)
        return order
    base = name.removesuffix("_reversed")
    if base == "prefix":
        order = list(ops)
    elif base == "sqnr":
        # Stable sort: equal SQNRs keep network order, so the result is deterministic.
        order = sorted(ops, key=lambda op: -sensitivity.sqnr_db(op, low_format))
    else:
        raise BudgetSpecError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    return order[::-1] if name.endswith("_reversed") else order


def _default_low_format(inst: Instance) -> str:
    """The first non-reference format of the gains record (the paper's setting has exactly one)."""
    for g in inst.groups:
        for cfg in g.configs:
            for f in cfg:
                if f != inst.reference_format:
                    return f
    raise ArtifactError("the gains record has no low-precision configs")


def baseline(
    name: str,
    sensitivity: Sensitivity,
    partition: Partition,
    gains: Gains,
    beta: float,
    metric: str = "ET",
    seed: int = 0,
    noise: str = DEFAULT_NOISE,
    low_format: str | None = None,
    min_sqnr_db: float | None = DEFAULT_MIN_SQNR_DB,
    shift: bool = True,
) -> Plan:
    """Greedy per-op baseline ``name`` under the loss budget (β·L̄)², scored with the group gain tables."""
    if name not in BASELINES:
        raise BudgetSpecError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    if not (beta >= 0 and math.isfinite(beta)):
        raise BudgetSpecError(f"beta must be a finite number ≥ 0, got {beta}")
    t0 = time.perf_counter()
    inst = build_instance(sensitivity, partition, gains, metric, noise, min_sqnr_db, shift)
    low = low_format or _default_low_format(inst)
    if low == inst.reference_format:
        raise BudgetSpecError(f"low_format {low} is the reference format")
    eps_max = 0.0 if beta == 0 else (beta * inst.mean_loss) ** 2

    # Per group: the index of each allowed config, to check that a switch is representable and to score it.
    where = {op: (gi, k) for gi, g in enumerate(inst.groups) for k, op in enumerate(g.ops)}
    index = [{cfg: ci for ci, cfg in enumerate(g.configs)} for g in inst.groups]
    current = [list(g.configs[g.ref_index]) for g in inst.groups]
    candidates = [op for op in inst.ops if op in sensitivity.ops and op not in sensitivity.unreached]
    order = op_order(name, sensitivity, candidates, low, seed)

    noise_mse, shift, switched, skipped = 0.0, 0.0, [], []
    use_shift = inst.uses_shift
    for op in order:
        gi, k = where[op]
        trial = list(current[gi])
        trial[k] = low
        if tuple(trial) not in index[gi]:  # the gains record has no such config (e.g. restricted configs)
            skipped.append(op)
            continue
        term = sensitivity.term(op, low, noise)
        b = sensitivity.shift(op, low) if use_shift else 0.0
        if noise_mse + term + (shift + b) ** 2 > eps_max:  # the IP's own loss model: noise adds, shifts add
            skipped.append(op)
            continue
        noise_mse += term
        shift += b
        current[gi] = trial
        switched.append(op)
    choice = [index[gi][tuple(cfg)] for gi, cfg in enumerate(current)]
    info = {
        "status": "baseline",
        "termination": "greedy order exhausted",
        "gap": None,
        "wall_s": time.perf_counter() - t0,
        "baseline": name,
        "seed": seed if name == "random" else None,
        "low_format": low,
        "order": order,
        "n_switched": len(switched),
        "n_skipped": len(skipped),
        "rule": "skip an op that would exceed the budget and continue",
    }
    return plan_from_choice(inst, choice, beta, eps_max, info)
