"""Exporters against INC's own parsers and a real model's module names (no mocks)."""

from __future__ import annotations

import json

import pytest
import torch

from inc_ipamp.export import ExportError, apply_cpu, export_cpu, export_gaudi, load_cpu_config, map_plan
from inc_ipamp.export.gaudi import ALLOWLIST_TYPES
from inc_ipamp.records import Plan

N_LAYERS = 12  # layers.1 and layers.10/11 both exist, so an unanchored "layers.1" would be caught


@pytest.fixture(scope="module")
def names12() -> list[str]:
    """All module names of a real 12-layer default model with attention routed through Matmul modules."""
    from inc_ipamp.models import load_model
    from inc_ipamp.ops import install_attention

    model, _ = load_model("default", num_layers=N_LAYERS)
    install_attention(model)
    return [n for n, _ in model.named_modules()]


def _ops(names: list[str]) -> list[str]:
    leaves = ("_proj", "matmul_qk", "matmul_av")
    return [n for n in names if n.endswith(leaves) or n == "lm_head"]


def _plan(ops: list[str], bf16: set[str], ref: str = "bf16", low: str = "fp8_e4m3") -> Plan:
    return Plan("default", {op: (ref if op in bf16 else low) for op in ops}, ref, "ET", 0.1, 0.0, 0.0)


#: Ops kept in BF16 by the test plan: layer 1's q (vLLM conflict), gate+up (no conflict), down; layer 10's Q·Kᵀ.
BF16 = {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj", "model.layers.10.self_attn.matmul_qk", "lm_head"}


def _vllm_names(n_layers: int) -> list[str]:
    """vLLM-Gaudi's Llama module names (as in its inc_output_hooks_maxabs_*_mod_list.json), with parents."""
    out = ["", "model", "model.embed_tokens", "model.layers", "model.norm", "lm_head"]
    impl = ["matmul_qk", "softmax", "matmul_av", "batch2block_matmul", "block2batch_matmul", "k_cache", "v_cache",
            "fused_scaled_dot_product_attention"]
    for i in range(n_layers):
        p = f"model.layers.{i}"
        out += [p, f"{p}.self_attn", f"{p}.self_attn.qkv_proj", f"{p}.self_attn.o_proj", f"{p}.self_attn.attn",
                f"{p}.self_attn.attn.impl", f"{p}.mlp", f"{p}.mlp.gate_up_proj", f"{p}.mlp.down_proj"]
        out += [f"{p}.self_attn.attn.impl.{m}" for m in impl]
    return out


def _blocked_by_inc(cfg: dict, names: list[str]) -> set[str]:
    from neural_compressor.torch.algorithms.fp8_quant._core.utils import is_re_match  # INC's own matcher

    return {n for n in names if is_re_match(cfg["blocklist"]["names"], n)}


def test_optimum_habana_blocklist_matches_exactly_the_bf16_modules(names12, tmp_path):
    ops = _ops(names12)
    assert len(ops) == 9 * N_LAYERS + 1
    files = export_gaudi(_plan(ops, BF16), tmp_path, engine="optimum-habana")
    quant = json.loads(files["quant"].read_text())
    blocked = _blocked_by_inc(quant, names12)
    # the plan's BF16 ops; layer 10's K cache / fused SDPA do not exist in the HF model, so only real names match
    assert blocked == BF16
    assert "model.layers.10.self_attn.matmul_qk" in blocked and "model.layers.1.self_attn.matmul_qk" not in blocked
    assert not any(n.startswith(("model.layers.10.mlp", "model.layers.11.mlp")) for n in blocked)
    regexes = set(quant["blocklist"]["names"])
    for helper in ("k_cache", "fused_scaled_dot_product_attention"):
        assert rf"^model\.layers\.10\.self_attn\.{helper}$" in regexes
    assert r"^model\.layers\.10\.self_attn\.v_cache$" not in regexes  # P·V stays FP8 in layer 10


def test_vllm_fuses_qkv_and_gate_up(tmp_path):
    names = _vllm_names(N_LAYERS)
    hf_ops = [f"model.layers.{i}.{m}" for i in range(N_LAYERS) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.matmul_qk",
        "self_attn.matmul_av", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head"]
    plan = _plan(hf_ops, BF16)
    files = export_gaudi(plan, tmp_path, engine="vllm-gaudi")
    quant = json.loads(files["quant"].read_text())
    p1, p10 = "model.layers.1", "model.layers.10.self_attn.attn.impl"
    expected = {f"{p1}.self_attn.qkv_proj", f"{p1}.mlp.gate_up_proj", f"{p1}.mlp.down_proj", "lm_head",
                f"{p10}.matmul_qk", f"{p10}.k_cache", f"{p10}.fused_scaled_dot_product_attention",
                f"{p10}.batch2block_matmul", f"{p10}.block2batch_matmul"}
    assert _blocked_by_inc(quant, names) == expected
    notes = json.loads(files["notes"].read_text())["notes"]
    assert sum("qkv_proj" in n and "BF16" in n for n in notes) == 1  # one note per fused module
    assert not any("gate_up_proj" in n for n in notes)  # gate and up agree: no conflict
    with pytest.raises(ExportError, match="must share one format"):
        export_gaudi(plan, tmp_path / "strict", engine="vllm-gaudi", on_conflict="error")
    assert quant["allowlist"]["types"] == ALLOWLIST_TYPES["vllm-gaudi"]


@pytest.mark.parametrize("engine", ["optimum-habana", "vllm-gaudi"])
def test_inc_accepts_every_file(names12, tmp_path, engine):
    from neural_compressor.torch.algorithms.fp8_quant._quant_common.quant_config import Fp8cfg, QuantMode
    from neural_compressor.torch.quantization import FP8Config

    files = export_gaudi(_plan(_ops(names12), BF16), tmp_path / engine, engine=engine)
    for kind, mode in (("measure", QuantMode.MEASURE), ("quant", QuantMode.QUANTIZE)):
        raw = json.loads(files[kind].read_text())
        stats_dir = raw["dump_stats_path"].rsplit("/", 1)[0]
        assert stats_dir != str(files[kind].parent.resolve())  # statistics never share the configs' folder
        cfg = FP8Config.from_json_file(str(files[kind]))
        assert cfg.mode == raw["mode"] and cfg.blocklist == raw["blocklist"] and cfg.scale_method == "maxabs_hw"
        assert cfg.fp8_config == "E4M3" and cfg.hp_dtype == "bf16" and cfg.observer == "maxabs"
        # INC's fp8 parser refuses non-QDQ configs on a CPU only after validating every key of the file ...
        with pytest.raises(ValueError, match="only QDQ mode is supported on CPU"):
            Fp8cfg.parse(dict(raw))
        # ... and parses the same file completely once the CPU-only switch is flipped
        parsed = Fp8cfg.parse({**raw, "use_qdq": True, "scale_method": "maxabs_pow2"}).cfg
        assert parsed["mode"] == mode
        assert parsed["blocklist"]["names"] == raw["blocklist"]["names"]
        assert parsed["allowlist"]["types"] == ALLOWLIST_TYPES[engine]
        assert parsed["fp8_config"] == torch.float8_e4m3fn and parsed["hp_dtype"] == torch.bfloat16


def test_gaudi_refuses_formats_it_cannot_run(tmp_path):
    ops = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    with pytest.raises(ExportError, match="int8"):
        export_gaudi(_plan(ops, set(), ref="fp32", low="int8"), tmp_path)
    mixed = Plan("m", {ops[0]: "fp8_e4m3", ops[1]: "fp8_e5m2"}, "bf16", "ET", None, 0.0, 0.0)
    with pytest.raises(ExportError, match="mixes"):
        map_plan(mixed, "optimum-habana")
    e5 = map_plan(_plan(ops, set(), low="fp8_e5m2"), "optimum-habana")
    assert e5.fp8_config == "E5M2" and e5.blocked == ["lm_head"]  # absent head = reference


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
