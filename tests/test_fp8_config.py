"""The plan -> INC FP8 translation fails closed, proven with INC's own matcher over the engines' real module lists.

Module lists: tests/data/engine_modules/*.json, read from optimum-habana, transformers 4.55, DeepSpeed, vLLM and
vllm-gaudi sources (origin in each file; build_lists.py cites the lines). Matching: INC 3.10's
``fp8_quant._core.utils.should_quantize`` on the config INC's own parser (``Fp8cfg.parse``) builds, with the
Gaudi patched-module table read from INC's ``patching_common.py`` (the CPU build only registers Linear/Conv2d/
EmbeddingBag; DeepSpeed's tensor-parallel types are registered there only when deepspeed imports).
"""

from __future__ import annotations

import ast
import json
import random
import re
from pathlib import Path

import pytest

from inc_ipamp.export import ExportError, export_gaudi, fp8_settings, map_plan
from inc_ipamp.export.fp8 import NO_MODULE, name_regex
from inc_ipamp.records import Plan

DATA = Path(__file__).parent / "data" / "engine_modules"
LISTS = sorted(p.stem for p in DATA.glob("*.json"))
PREFIXES = ("", "_orig_mod.", "module.", "_orig_mod.module.")


def _load(stem: str) -> dict:
    return json.loads((DATA / f"{stem}.json").read_text())


def _gaudi_table() -> set[str]:
    """Class names INC patches on Gaudi: ``_mod_default_dict`` plus the DeepSpeed-only block, read from INC's source."""
    from neural_compressor.torch.algorithms.fp8_quant._core import patching_common

    tree = ast.parse(Path(patching_common.__file__).read_text())
    keys: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "_mod_default_dict":
            keys |= {k.value for k in node.value.keys}
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "deepspeed_exists":
            for st in node.body:
                keys |= {k.value for k in st.value.args[0].keys}
    return keys


TABLE = _gaudi_table()


def _inc_config(settings_json: dict, tmp_path: Path):
    """INC's parsed config for a settings dict, as prepare() would see it on Gaudi (mod_dict = the Gaudi table).

    The CPU build refuses non-QDQ configs, so use_qdq / a CPU scale method are flipped; names/types are untouched.
    """
    from neural_compressor.torch.algorithms.fp8_quant._quant_common.quant_config import Fp8cfg

    raw = {**json.loads(json.dumps(settings_json)), "use_qdq": True, "scale_method": "maxabs_pow2",
           "dump_stats_path": str(tmp_path / "stats" / "measure")}
    cfg = Fp8cfg.parse(raw)
    cfg.cfg["mod_dict"].update({k: "x" for k in TABLE})
    return cfg


def _inc_quantizes(cfg, modules: list[list[str]], prefix: str = "") -> set[str]:
    from neural_compressor.torch.algorithms.fp8_quant._core.utils import should_quantize

    return {name for name, cls in modules if should_quantize(cfg, cls, prefix + name)}


# -- the plan side: HF op names (what inc_ipamp plans are made of) ------------------------------------------------
def _hf_ops(mods: list[list[str]]) -> list[str]:
    """The ops a plan of the HF model has: q/k/v/o, the Q·Kᵀ/P·V BGEMMs, MLP or expert Linears, router, lm_head."""
    layers = sorted({int(m.group(1)) for n, _ in mods if (m := re.match(r"model\.layers\.(\d+)$", n))})
    names = {n for n, _ in mods}
    ops = ["lm_head"]
    for i in layers:
        L = f"model.layers.{i}"
        ops += [f"{L}.self_attn.{x}_proj" for x in "qkvo"] + [f"{L}.self_attn.matmul_qk", f"{L}.self_attn.matmul_av"]
        if f"{L}.block_sparse_moe" in names:
            experts = sorted({int(m.group(1)) for n in names
                              if (m := re.match(rf"{re.escape(L)}\.block_sparse_moe\.experts\.(\d+)$", n))})
            ops += [f"{L}.block_sparse_moe.gate"]
            ops += [f"{L}.block_sparse_moe.experts.{e}.w{j}" for e in experts for j in (1, 2, 3)]
        else:
            ops += [f"{L}.mlp.{x}_proj" for x in ("gate", "up", "down")]
    return ops


def _members(engine: str, module: str, ops: list[str]) -> list[str]:
    """Oracle, written from the engines' sources: the plan ops an engine module computes ([] = none of the plan's)."""
    prefix, _, leaf = module.rpartition(".")
    if engine == "vllm-gaudi":
        if module.endswith(".attn.impl." + leaf):
            att = module[: -len(".attn.impl." + leaf)]
            deps = {"matmul_qk": ["matmul_qk"], "matmul_av": ["matmul_av"], "k_cache": ["matmul_qk"],
                    "v_cache": ["matmul_av"], "softmax": ["matmul_av"]}.get(leaf, ["matmul_qk", "matmul_av"])
            return [f"{att}.{d}" for d in deps] if leaf != "impl" else []
        if leaf == "qkv_proj":
            return [f"{prefix}.{x}_proj" for x in "qkv"]
        if leaf == "gate_up_proj":
            return [f"{prefix}.gate_proj", f"{prefix}.up_proj"]
        return [module] if leaf in ("o_proj", "down_proj", "lm_head") else []
    if leaf == "qkv_proj":
        return [f"{prefix}.{x}_proj" for x in "qkv"]
    if leaf == "k_cache":
        return [f"{prefix}.matmul_qk"]
    if leaf == "v_cache":
        return [f"{prefix}.matmul_av"]
    if leaf == "fused_scaled_dot_product_attention":
        return [f"{prefix}.matmul_qk", f"{prefix}.matmul_av"]
    if leaf == "block_sparse_moe":
        return [o for o in ops if o.startswith(module + ".experts.")]
    if ".experts." in module:
        return []  # read by the MoE block's fused op, never quantized on their own
    return [module] if module in ops else []


def _expected(engine: str, plan: Plan, mods: list[list[str]], ops: list[str]) -> set[str]:
    fp8 = {op for op, f in plan.assignment.items() if f.startswith("fp8")}
    out = set()
    for name, cls in mods:
        m = _members(engine, name, ops)
        if m and all(o in fp8 for o in m) and cls in TABLE:
            out.add(name)
    return out


def _random_plans(ops: list[str], seed: int, n: int = 4) -> list[Plan]:
    rng = random.Random(seed)
    plans = [Plan("m", dict.fromkeys(ops, "fp8_e4m3"), "bf16", "ET", None, 0.0, 0.0),
             Plan("m", dict.fromkeys(ops, "bf16"), "bf16", "ET", None, 0.0, 0.0)]
    for _ in range(n):
        p_fp8 = rng.choice([0.3, 0.7, 0.95])
        a = {}
        for op in ops:
            r = rng.random()
            if r < 0.1:
                continue  # missing from the plan: never FP8
            a[op] = "fp8_e4m3" if rng.random() < p_fp8 else "bf16"
        plans.append(Plan("m", a, "bf16", "ET", None, 0.0, 0.0))
    return plans


@pytest.mark.parametrize("stem", LISTS)
def test_inc_runs_fp8_exactly_where_the_plan_says_under_any_prefix(stem, tmp_path):
    doc = _load(stem)
    engine, mods = doc["engine"], doc["modules"]
    assert doc["origin"] and all("repo" in o and "path" in o for o in doc["origin"])
    ops = _hf_ops(mods)
    assert len(ops) > 100
    for plan in _random_plans(ops, seed=len(stem)):
        s = fp8_settings(plan, engine, "QUANTIZE", dump_stats_path=str(tmp_path / "m"))
        assert s.json["allowlist"]["types"] == [] and s.json["blocklist"]["types"] == []
        cfg = _inc_config(s.json, tmp_path)
        want = _expected(engine, plan, mods, ops)
        for prefix in PREFIXES:
            got = _inc_quantizes(cfg, mods, prefix)
            assert got <= want, f"{stem} {prefix!r}: FP8 where the plan does not say so: {sorted(got - want)[:5]}"
            assert got == want, f"{stem} {prefix!r}: plan not applied to {sorted(want - got)[:5]}"
        if all(f == "fp8_e4m3" for f in plan.assignment.values()) and len(plan.assignment) == len(ops):
            assert want, stem  # the all-FP8 plan does reach the engine's modules (TP/MoE types included)


def test_tp_and_moe_types_are_reached(tmp_path):
    """TP classes (LinearLayer, ScopedLinearAllReduce, LinearAllreduce, LmHeadLinearAllreduce) and the Gaudi MoE block
    run FP8 when planned; the expert Linears never on their own (INC's MoE op reads their weights)."""
    for stem, classes in (("optimum_habana_llama_deepspeed_tp", {"LinearLayer", "ScopedLinearAllReduce",
                                                                  "LmHeadLinearAllreduce", "Matmul", "KVCache",
                                                                  "ModuleFusedSDPA"}),
                          ("optimum_habana_mixtral_deepspeed_tp", {"LinearLayer", "LinearAllreduce",
                                                                    "LmHeadLinearAllreduce", "Linear", "KVCache",
                                                                    "ModuleFusedSDPA", "GaudiMixtralSparseMoeBlock"}),
                          ("vllm_gaudi_llama", {"QKVParallelLinear", "RowParallelLinear", "MergedColumnParallelLinear",
                                                "ParallelLMHead", "Matmul", "B2BMatmul", "Softmax", "VLLMKVCache",
                                                "ModuleFusedSDPA"})):
        doc = _load(stem)
        ops = _hf_ops(doc["modules"])
        plan = Plan("m", dict.fromkeys(ops, "fp8_e4m3"), "bf16", "ET", None, 0.0, 0.0)
        cfg = _inc_config(fp8_settings(plan, doc["engine"], dump_stats_path="x/m").json, tmp_path)
        got = _inc_quantizes(cfg, doc["modules"], "_orig_mod.")
        cls = dict(map(tuple, doc["modules"]))
        assert {cls[n] for n in got} == classes, stem
        assert not any(".experts." in n for n in got)


def test_engine_classes_inc_does_not_patch_stay_high_precision(tmp_path):
    """vllm-gaudi's HPURowParallelLinear (VLLM_ROW_PARALLEL_CHUNKS > 1) is not in INC's table: never FP8 (so an FP8 plan
    does not apply to o_proj/down_proj there; said here rather than hidden)."""
    doc = _load("vllm_gaudi_llama_row_chunks")
    ops = _hf_ops(doc["modules"])
    plan = Plan("m", dict.fromkeys(ops, "fp8_e4m3"), "bf16", "ET", None, 0.0, 0.0)
    got = _inc_quantizes(_inc_config(fp8_settings(plan, "vllm-gaudi", dump_stats_path="x/m").json, tmp_path),
                         doc["modules"])
    assert "HPURowParallelLinear" not in TABLE
    assert got and not any(n.endswith(("o_proj", "down_proj")) for n in got)


def test_the_checker_catches_the_old_type_allowlist(tmp_path):
    """Negative control: the previous settings (allowlist types + exact names) put every Linear in FP8 whatever the
    plan said, and an exact-name blocklist blocks nothing under a prefix; the same matcher flags both."""
    doc = _load("optimum_habana_llama")
    ops = _hf_ops(doc["modules"])
    plan = Plan("m", {op: ("bf16" if "layers.1." in op else "fp8_e4m3") for op in ops}, "bf16", "ET", None, 0, 0)
    want = _expected("optimum-habana", plan, doc["modules"], ops)
    old_allow = {"mode": "QUANTIZE", "allowlist": {"types": ["Linear", "Matmul"], "names": [
        f"^{re.escape(op)}$" for op, f in plan.assignment.items() if f == "fp8_e4m3"]}}
    assert _inc_quantizes(_inc_config(old_allow, tmp_path), doc["modules"]) - want  # BF16 Linears in FP8
    old_block = {"mode": "QUANTIZE", "allowlist": {"types": ["Linear"], "names": []}, "blocklist": {
        "types": [], "names": [f"^{re.escape(op)}$" for op, f in plan.assignment.items() if f == "bf16"]}}
    cfg = _inc_config(old_block, tmp_path)
    assert not (_inc_quantizes(cfg, doc["modules"]) - want - {"lm_head"})
    assert _inc_quantizes(cfg, doc["modules"], "_orig_mod.") - want  # the prefix defeats the blocklist


def test_regexes_are_exact_at_dot_boundaries():
    r = name_regex("model.layers.1.mlp.up_proj")
    assert re.search(r, "model.layers.1.mlp.up_proj") and re.search(r, "_orig_mod.model.layers.1.mlp.up_proj")
    for other in ("model.layers.11.mlp.up_proj", "xmodel.layers.1.mlp.up_proj", "model.layers.1.mlp.up_proj.base_layer",
                  "model.layers.1.mlp.up_projx", "model.layers.1XmlpXup_proj"):
        assert not re.search(r, other), other
    empty = fp8_settings(Plan("m", {"lm_head": "bf16"}, "bf16", "ET", None, 0, 0), "inc", dump_stats_path="x/m")
    assert empty.json["allowlist"]["names"] == [NO_MODULE]  # an empty allowlist would admit every module
    assert not re.search(NO_MODULE, "") and not re.search(NO_MODULE, "lm_head")


# -- the exported files, parsed by INC ----------------------------------------------------------------------------
@pytest.mark.parametrize("stem", ["optimum_habana_llama", "optimum_habana_mixtral_deepspeed_tp", "vllm_gaudi_llama"])
def test_export_files_parse_in_inc_and_match_the_plan(stem, tmp_path):
    from neural_compressor.torch.quantization import FP8Config

    doc = _load(stem)
    engine, mods = doc["engine"], doc["modules"]
    ops = _hf_ops(mods)
    plan = _random_plans(ops, seed=7, n=1)[-1]
    files = export_gaudi(plan, tmp_path / "out", engine=engine)
    want = _expected(engine, plan, mods, ops)
    for kind, mode in (("measure", "MEASURE"), ("quant", "QUANTIZE")):
        raw = json.loads(files[kind].read_text())
        assert raw["mode"] == mode and raw["scale_method"] == "maxabs_hw" and raw["hp_dtype"] == "bf16"
        assert Path(raw["dump_stats_path"]).parent != files[kind].parent.resolve()  # stats in their own folder
        cfg = FP8Config.from_json_file(str(files[kind]))  # what optimum-habana / vllm-gaudi call
        assert cfg.mode == mode and cfg.allowlist == raw["allowlist"] and cfg.blocklist == raw["blocklist"]
        for prefix in ("", "_orig_mod."):
            assert _inc_quantizes(_inc_config(raw, tmp_path), mods, prefix) == want
    notes = json.loads(files["notes"].read_text())
    assert notes["engine"] == engine and set(notes["fp8_modules"]).isdisjoint(notes["bf16_modules"])


def test_vllm_fused_conflicts_follow_the_policy(tmp_path):
    doc = _load("vllm_gaudi_llama")
    ops = _hf_ops(doc["modules"])
    plan = Plan("m", {op: ("bf16" if op.endswith("layers.1.self_attn.q_proj") else "fp8_e4m3") for op in ops}, "bf16",
                "ET", None, 0, 0)
    m = map_plan(plan, "vllm-gaudi")
    assert m.modules["model.layers.1.self_attn.qkv_proj"] == "bf16"
    assert m.modules["model.layers.2.self_attn.qkv_proj"] == "fp8"
    assert sum("qkv_proj" in n for n in m.notes) == 1
    with pytest.raises(ExportError, match="must share one format"):
        map_plan(plan, "vllm-gaudi", on_conflict="error")
    with pytest.raises(ExportError, match="unknown engine"):
        map_plan(plan, "tensorrt")
