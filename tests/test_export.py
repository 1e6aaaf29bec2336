"""Exporters against INC's own parsers and a real model's module names (no mocks)."""

from __future__ import annotations

import json

import pytest
import torch

from inc_ipamp.apply.cpu import apply_cpu
from inc_ipamp.export import ExportError, export_cpu, export_gaudi, load_cpu_config, map_plan
from inc_ipamp.records import Plan

N_LAYERS = 12  # layers.1 and layers.10/11 both exist, so an unanchored "layers.1" would be caught


@pytest.fixture(scope="module")
def names12() -> tuple[list[str], list[str]]:
    """All module names of a real 12-layer default model with attention routed through Matmul modules."""
    from inc_ipamp.models import load_model
    from inc_ipamp.ops import install_attention

    model, _ = load_model("default", num_layers=N_LAYERS)
    install_attention(model)
    return [n for n, _ in model.named_modules()], [type(m).__name__ for _, m in model.named_modules()]


def _ops(names: list[str]) -> list[str]:
    """The plan's ops among the module names: projections, the attention BGEMMs and the head."""
    leaves = ("_proj", "matmul_qk", "matmul_av")
    return [n for n in names if n.endswith(leaves) or n == "lm_head"]


def _plan(ops: list[str], bf16: set[str], ref: str = "bf16", low: str = "fp8_e4m3") -> Plan:
    return Plan("default", {op: (ref if op in bf16 else low) for op in ops}, ref, "ET", 0.1, 0.0, 0.0)


#: Ops kept in BF16 by the test plan: layer 1's q, gate+up, down; layer 10's Q·Kᵀ; the head.
BF16 = {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj", "model.layers.10.self_attn.matmul_qk", "lm_head"}


@pytest.mark.parametrize("engine", ["inc", "optimum-habana"])
def test_inc_quantizes_exactly_the_planned_modules_of_the_real_model(names12, tmp_path, engine):
    """On the real HF model's module names (with their classes), INC's own should_quantize admits exactly the ops the
    plan puts in FP8; the Gaudi engines' own module lists are in test_fp8_config.py."""
    from neural_compressor.torch.algorithms.fp8_quant._core.utils import should_quantize
    from neural_compressor.torch.algorithms.fp8_quant._quant_common.quant_config import Fp8cfg

    from inc_ipamp.export import fp8_settings

    names, classes = names12
    ops = _ops(names)
    assert len(ops) == 9 * N_LAYERS + 1
    s = fp8_settings(_plan(ops, BF16), engine, dump_stats_path=str(tmp_path / "m"))
    cfg = Fp8cfg.parse({**s.json, "use_qdq": True, "scale_method": "maxabs_pow2"})
    cfg.cfg["mod_dict"].update({"Linear": "linear", "Matmul": "matmul"})  # Gaudi's table has both
    for prefix in ("", "_orig_mod."):
        got = {n for n, c in zip(names, classes, strict=True) if should_quantize(cfg, c, prefix + n)}
        assert got == set(ops) - BF16
    assert "model.layers.1.self_attn.k_proj" in got and "model.layers.10.self_attn.matmul_qk" not in got


def test_gaudi_refuses_formats_it_cannot_run(tmp_path):
    ops = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    with pytest.raises(ExportError, match="int8"):
        export_gaudi(_plan(ops, set(), ref="fp32", low="int8"), tmp_path)
    mixed = Plan("m", {ops[0]: "fp8_e4m3", ops[1]: "fp8_e5m2"}, "bf16", "ET", None, 0.0, 0.0)
    with pytest.raises(ExportError, match="mixes"):
        map_plan(mixed, "optimum-habana")
    e5 = map_plan(_plan(ops, set(), low="fp8_e5m2"), "optimum-habana")
    assert e5.fp8_config == "E5M2" and "lm_head" in e5.blocked  # absent head = reference
    assert e5.modules["model.layers.0.self_attn.qkv_proj"] == "bf16"  # fused_qkv variant: k, v not in the plan


def test_quantized_ops_leave_out_the_reference_and_fp32():
    """What an engine's config lists (CPU export, INC 2.x): never the reference, never fp32 (in a bf16 plan an fp32
    op runs above the reference); bf16 in an fp32 plan is a low-precision choice and is listed."""
    plan = Plan("m", {"a": "int8", "b": "bf16", "c": "fp32", "d": "int8_pc"}, "fp32", "ET", None, 0.0, 0.0)
    assert plan.quantized_ops() == {"a": "int8", "b": "bf16", "d": "int8_pc"}
    hp = Plan("m", {"a": "fp8_e4m3", "b": "bf16", "c": "fp32"}, "bf16", "ET", None, 0.0, 0.0)
    assert hp.quantized_ops() == {"a": "fp8_e4m3"} and sorted(hp.low_precision_ops()) == ["a", "c"]


# ---------------------------------------------------------------------------------------------- CPU
@pytest.fixture(scope="module")
def model2():
    from inc_ipamp.models import load_model
    from inc_ipamp.ops import install_attention

    model, _ = load_model("default", num_layers=2)
    install_attention(model)
    return model


def _cpu_plan(model, low: str, layer: str = "layers.0") -> Plan:
    ops = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or n.endswith("matmul_qk")]
    return Plan("default", {op: (low if layer in op else "fp32") for op in ops}, "fp32", "ET", 0.1, 0.0, 0.0)


def test_cpu_config_round_trips_through_inc(model2, tmp_path):
    from neural_compressor.torch.quantization import DynamicQuantConfig

    plan = _cpu_plan(model2, "int8_pc")
    path = export_cpu(plan, tmp_path / "inc.json")
    d = json.loads(path.read_text())
    assert d["path"] == "pt2e_dynamic_int8" and d["algo"] == "pt2e_dynamic_quant"
    cfg = load_cpu_config(path)
    assert isinstance(cfg, DynamicQuantConfig) and cfg.to_dict() == d["config"]
    assert sorted(cfg.local_config) == sorted(op for op, f in plan.assignment.items()
                                              if f == "int8_pc" and not op.endswith("matmul_qk"))
    assert all(c.w_granularity == "per_channel" and c.w_dtype == "int8" for c in cfg.local_config.values())
    assert cfg.w_dtype == "fp32" and cfg.act_dtype == "fp32"  # global: nothing outside the plan is quantized
    assert any("BGEMM" in n for n in d["notes"])


@torch.no_grad()
def test_cpu_int8_quantizes_exactly_the_planned_linears(model2):
    plan = _cpu_plan(model2, "int8")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model2.config.vocab_size, (1, 32), generator=g)
    q = apply_cpu(model2, plan, [ids])
    quantized, plain = set(), set()
    for n in q.graph.nodes:
        if n.op == "call_function" and "linear" in str(n.target):
            name = list(n.meta["nn_module_stack"].values())[-1][0]
            (quantized if "dequantize" in str(getattr(n.args[1], "target", "")) else plain).add(name)
    want = {op for op, f in plan.assignment.items() if f == "int8" and op.endswith("_proj")}
    assert quantized == want and "lm_head" in plain
    ref = model2(ids, use_cache=False).logits
    other = torch.randint(0, model2.config.vocab_size, (1, 20), generator=g)  # dynamic sequence length
    assert q(other).logits.shape == (1, 20, model2.config.vocab_size)
    err = (q(ids).logits - ref).abs().max().item()
    assert 0 < err < 0.5 * ref.abs().max().item()


@torch.no_grad()
def test_cpu_fp8_patches_exactly_the_planned_linears(model2):
    plan = _cpu_plan(model2, "fp8_e4m3", layer="layers.1")
    ids = torch.randint(0, model2.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    q = apply_cpu(model2, plan, [ids])
    patched = {n for n, m in q.named_modules() if type(m).__name__ == "PatchedLinear"}
    assert patched == {op for op, f in plan.assignment.items() if f == "fp8_e4m3" and op.endswith("_proj")}
    assert type(model2.model.layers[1].mlp.down_proj).__name__ == "Linear"  # the original was not touched
    out, ref = q(ids, use_cache=False).logits, model2(ids, use_cache=False).logits
    assert 0 < (out - ref).abs().max().item() < 0.5 * ref.abs().max().item()


@torch.no_grad()
def test_cpu_fp8_refuses_a_planned_linear_inc_left_unpatched(model2, monkeypatch):
    """Fail closed: where INC's convert leaves a planned Linear as it was (INC picked a visible GPU as its
    accelerator, as on an H100 machine), apply_cpu says so and how to fix it instead of running it in fp32."""
    import neural_compressor.torch.quantization as incq

    for name in ("prepare", "convert"):
        monkeypatch.setattr(incq, name, lambda m, cfg: m)
    monkeypatch.setattr(incq, "finalize_calibration", lambda m: None)
    plan = _cpu_plan(model2, "fp8_e4m3", layer="layers.1")
    ids = torch.randint(0, model2.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ExportError, match="INC_TARGET_DEVICE=cpu"):
        apply_cpu(model2, plan, [ids])


def test_stage_export_writes_what_each_target_can_run(tmp_path):
    from inc_ipamp.pipeline import RunSettings, stage_export

    ops = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"]
    _plan(ops, {"lm_head"}, ref="fp32", low="int8").save(tmp_path / "plan.json")
    files = stage_export(tmp_path, RunSettings())
    assert "int8" in files["gaudi:vllm-gaudi"]["skipped"]  # Gaudi FP8 cannot run an INT8 plan: said, not faked
    assert json.loads(open(files["cpu"]).read())["path"] == "pt2e_dynamic_int8"
    _plan(ops, {"lm_head"}).save(tmp_path / "plan.json")  # bf16 / fp8_e4m3: every target
    files = stage_export(tmp_path, RunSettings())
    assert set(files["gaudi:optimum-habana"]) == {"measure", "quant", "notes"}
    assert json.loads(open(files["cpu"]).read())["path"] == "fp8_qdq"
