"""Scale (issue 16): the solver's fast path gives the Pyomo path's plans; MoE models partition into per-expert groups
whose export uses the engines' MoE module names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inc_ipamp import solver
from inc_ipamp.synthetic import LLAMA_70B, MIXTRAL_8X7B, synthetic_records

ENGINE_MODULES = Path(__file__).parent / "data" / "engine_modules"


@pytest.mark.parametrize("shape, layers, formats", [
    (LLAMA_70B, 3, ("bf16", "fp8_e4m3", "fp8_e5m2")),
    (MIXTRAL_8X7B, 1, ("bf16", "fp8_e4m3", "fp8_e5m2", "int8_pc")),
])
def test_fast_path_returns_the_pyomo_plans(shape, layers, formats):
    """Same frontier, plan for plan, and the same dual/memory-budget answers (small SYNTHETIC instances)."""
    sens, part, gains = synthetic_records(shape, formats, layers=layers, seed=3)
    kw = {"noise": "auto", "min_sqnr_db": 25.0}
    fast = solver.frontier(sens, part, gains, **kw, fast=True)
    slow = solver.frontier(sens, part, gains, **kw, fast=False)
    assert len(fast) == len(slow) > 3
    assert [p.assignment for p in fast] == [p.assignment for p in slow]
    assert [p.predicted_loss_mse for p in fast] == [p.predicted_loss_mse for p in slow]
    mid = fast[len(fast) // 2]
    target = 0.5 * mid.predicted_gain
    a = solver.solve(sens, part, gains, target_gain=target, **kw, fast=True)
    b = solver.solve(sens, part, gains, target_gain=target, **kw, fast=False)
    assert a.assignment == b.assignment
    ref_bytes = solver.build_instance(sens, part, gains, "ET", **kw).reference_weight_bytes
    a = solver.solve(sens, part, gains, beta=mid.beta, memory_budget_bytes=0.8 * ref_bytes, **kw, fast=True)
    b = solver.solve(sens, part, gains, beta=mid.beta, memory_budget_bytes=0.8 * ref_bytes, **kw, fast=False)
    assert a.assignment == b.assignment


def test_fast_path_is_interruptible_and_time_limited():
    sens, part, gains = synthetic_records(LLAMA_70B, layers=1)
    ip = solver.GroupChoiceIP(solver.build_instance(sens, part, gains), time_limit_s=7.0)
    assert ip.opt._solver_model.HandleKeyboardInterrupt is True and ip.opt.config.time_limit == 7.0
    assert ip.opt._solver_model.getOptionValue("time_limit")[1] == 7.0
