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


# -- MoE --------------------------------------------------------------------------------------------------------------
def _tiny_moe(kind: str):
    """A 2-layer random-weight MoE of transformers' own classes (built from a config: nothing downloaded)."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  num_experts_per_tok=2)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(intermediate_size=128, num_local_experts=4, **common)).eval()
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=64, num_experts=4, **common)).eval()


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def moe(request):
    from inc_ipamp.partition import partition_model

    model = _tiny_moe(request.param)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    part = partition_model(model)
    with torch.no_grad():
        after = model(ids).logits
    return request.param, model, part, before, after


def test_moe_unfused_model_computes_the_same(moe):
    _, model, part, before, after = moe
    from inc_ipamp.moe import UnfusedExperts

    assert torch.allclose(before, after, atol=1e-5)
    assert sum(isinstance(m, UnfusedExperts) for m in model.modules()) == 2
    assert any("rebuilt as one Linear per expert" in n for n in part.notes)


def test_moe_partition_gives_each_expert_its_own_groups(moe):
    """{q,k,v,qk,av}, {o}, per expert {gate,up}, {down} (Mixtral's w1/w3, w2), Qwen2-MoE's shared expert and its
    gate apart; experts of equal shape share one signature across experts and layers (one measurement)."""
    kind, _, part, _, _ = moe
    leaves = ("w1", "w3", "w2") if kind == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    names = {g.name: g for g in part.groups}
    for layer in (0, 1):
        p = f"model.layers.{layer}"
        assert f"{p}.self_attn[q_proj+k_proj+v_proj+matmul_qk+matmul_av]" in names
        for e in range(4):
            assert names[f"{p}.mlp.experts.{e}[{leaves[0]}+{leaves[1]}]"].ops == [
                f"{p}.mlp.experts.{e}.{leaves[0]}", f"{p}.mlp.experts.{e}.{leaves[1]}"]
            assert names[f"{p}.mlp.experts.{e}[{leaves[2]}]"].ops == [f"{p}.mlp.experts.{e}.{leaves[2]}"]
        if kind == "qwen2_moe":
            assert f"{p}.mlp.shared_expert[gate_proj+up_proj]" in names and f"{p}.mlp[shared_expert_gate]" in names
    expert_sigs = {g.signature for g in part.groups if ".experts." in g.ops[0]}
    assert len(expert_sigs) == 2
    assert all(len(g.ops) <= 5 for g in part.groups)  # no group swallows a block (4^12 configs would be unsolvable)


def _plan(ops: list[str], fp8: set[str]):
    from inc_ipamp.records import Plan

    return Plan("tiny-moe", {op: ("fp8_e4m3" if op in fp8 else "bf16") for op in ops}, "bf16", "ET", None, 0.0, 0.0)


def test_moe_experts_in_the_fp8_export(moe):
    """optimum-habana runs a MoE block's experts as one INC op: the block is FP8 iff all its experts are, and the
    expert Linears are never listed; vLLM-Gaudi's FusedMoE experts stay BF16."""
    from inc_ipamp.export.fp8 import map_plan

    _, _, part, _, _ = moe
    ops = [op for g in part.groups for op in g.ops]
    experts = {op for op in ops if ".experts." in op}
    mixtral = "model.layers.1.mlp.experts.2.w2" in experts
    block = "block_sparse_moe" if mixtral else "mlp"  # optimum-habana's names (transformers 4.x)
    m = map_plan(_plan(ops, set(ops)), "optimum-habana")
    assert {f"model.layers.0.{block}", f"model.layers.1.{block}"} <= set(m.quantized)
    assert not any(".experts." in n for n in m.modules)
    one_bf16 = map_plan(_plan(ops, set(ops) - {"model.layers.1.mlp.experts.2.w2" if mixtral
                                                 else "model.layers.1.mlp.experts.2.down_proj"}), "optimum-habana")
    assert f"model.layers.0.{block}" in one_bf16.quantized and f"model.layers.1.{block}" in one_bf16.blocked
    v = map_plan(_plan(ops, set(ops)), "vllm-gaudi")
    assert not any(".experts." in n for n in v.modules) and any("MoE expert ops" in n for n in v.notes)


def test_mixtral_moe_block_has_optimum_habanas_name():
    from inc_ipamp.export.fp8 import map_plan
    from inc_ipamp.partition import partition_model

    part = partition_model(_tiny_moe("mixtral"))
    ops = [op for g in part.groups for op in g.ops]
    engine = {n for n, _ in json.loads((ENGINE_MODULES / "optimum_habana_mixtral.json").read_text())["modules"]}
    blocks = {n for n in engine if n.endswith(".block_sparse_moe") and int(n.split(".")[2]) < 2}
    assert blocks == {"model.layers.0.block_sparse_moe", "model.layers.1.block_sparse_moe"}
    assert blocks <= set(map_plan(_plan(ops, set(ops)), "optimum-habana").quantized)


def test_pipeline_load_unfuses_experts_before_calibration(monkeypatch):
    """Every stage sees the per-expert Linears: the sensitivity record has the experts the partition groups."""
    from transformers import MixtralConfig, MixtralForCausalLM

    import inc_ipamp.models as models_mod
    from inc_ipamp import pipeline
    from inc_ipamp.sensitivity import calibrate

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=64, num_local_experts=4)
    monkeypatch.setattr(models_mod, "load_model", lambda name, num_layers=None: (MixtralForCausalLM(cfg).eval(), None))
    model, _ = pipeline.load(pipeline.RunSettings(model="tiny-mixtral"))
    s = calibrate(model, [torch.randint(0, 64, (1, 8))], ["int8"], progress=False, curvature=False)
    assert {f"model.layers.0.mlp.experts.{e}.{p}" for e in range(4) for p in ("w1", "w2", "w3")} <= set(s.ops)
