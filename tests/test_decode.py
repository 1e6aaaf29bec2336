"""Issue 17: decode-step gains with a real KV cache, and the prefill / decode / mix objectives of the IP.

The decode machinery runs on the 2-layer random Llama (its structure, in milliseconds; no timing is asserted);
the objectives on the solver tests' synthetic records, solved by the real HiGHS.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from test_solver import MACHINERY, make_records

from inc_ipamp.errors import ArtifactError, IpampError
from inc_ipamp.gains.decode import compare_decode, decode_step, measure_decode_gains
from inc_ipamp.gains.measure import EMULATED
from inc_ipamp.ops import install_attention
from inc_ipamp.partition import partition_model
from inc_ipamp.pipeline import RunSettings
from inc_ipamp.records import Gains, GroupGains
from inc_ipamp.solver import (
    DEFAULT_MIX_WEIGHTS,
    BudgetSpecError,
    mix_gains,
    objective_gains,
    plan_gain,
    solve,
)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    install_attention(tiny_llama)
    return tiny_llama


def test_decode_step_uses_the_kv_cache_and_can_be_repeated(llama):
    step = decode_step(llama, batch=2, context=12, seed=3)
    first, again = step(llama), step(llama)
    assert torch.equal(first, again)  # the fixed slot: a repeated step attends to the same 12 cached tokens
    assert int(step.cache.layers[0].cumulative_length) == 13
    with torch.no_grad():
        full = llama(torch.cat([step.prompt, step.ids], 1), use_cache=False).logits[:, -1:]
    assert torch.allclose(first, full, atol=1e-5)  # the cached K/V are the prompt's: same as recomputing it all
    other = decode_step(llama, batch=2, context=12, seed=4)
    assert not torch.equal(other.prompt, step.prompt)


def test_decode_step_rejects_an_empty_context(llama):
    with pytest.raises(IpampError, match="context >= 1"):
        decode_step(llama, batch=1, context=0)


@pytest.fixture(scope="module")
def decode_gains(llama, tmp_path_factory):
    torch.set_num_threads(1)
    part = partition_model(llama)
    cache = tmp_path_factory.mktemp("dec") / "cache.jsonl"
    g = measure_decode_gains(llama, part, ["fp32", "int8"], batch=2, context=16, reps=3, warmup=1, cache_path=cache,
                             progress=False, probe_rounds=0)
    return part, g, cache


def test_decode_gains_record(decode_gains, tmp_path):
    part, g, cache = decode_gains
    assert g.phase == "decode" and g.seq_len == 16 and g.batch == 2 and g.reference_time_s > 0
    for grp in part.groups:
        gg = g.groups[grp.name]
        assert gg.configs == [list(c) for c in grp.configs(["fp32", "int8"])]
        assert gg.gains["ET"][0] == 0.0 and len(gg.gains["ET"]) == len(gg.configs)
        for cfg, flag in zip(gg.configs, gg.flags["ET"], strict=True):
            bgemm_low = any(f == "int8" and op.endswith(("matmul_qk", "matmul_av"))
                            for op, f in zip(grp.ops, cfg, strict=True))
            assert flag.startswith(EMULATED) == bgemm_low  # emulated BGEMMs never timed, never planned
    assert Gains.load(g.save(tmp_path / "d.json")).phase == "decode"
    keys = [json.loads(line) for line in cache.read_text().splitlines()]
    assert keys and all(k["key"] for k in keys)


def test_decode_gains_are_timed_on_the_enclosing_module_not_the_ops_alone(decode_gains):
    """A one-token Linear streams its weights and its time depends on the traffic around it, so decode times each
    group's block (o_proj's and down_proj's too: ``self_attn``, ``mlp``), where prefill on the same CPU backend times
    the changed ops alone."""
    part, g, _ = decode_gains
    for grp in part.groups:
        src = g.groups[grp.name].source["ET"]
        want = ({"self_attn", "mlp", "lm_head"} & set(grp.ops[0].split("."))).pop()  # o_proj, down_proj: theirs
        assert f"sub-graph {want}" in src and "_proj" not in src, (grp.name, src)


def test_decode_gains_are_reused_from_the_cache(llama, decode_gains):
    part, g, cache = decode_gains
    again = measure_decode_gains(llama, part, ["fp32", "int8"], batch=2, context=16, reps=3, warmup=1,
                                 cache_path=cache, progress=False, probe_rounds=0)
    assert any("from the cache" in n and " 0 config(s) from the cache" not in n for n in again.notes)
    # a group none of whose configs was re-timed (all trusted, or never timed) comes back exactly as it was; a config
    # used at its CI's lower bound is flagged in the cache (re-timed), so its signature's groups may differ
    sig = {x.name: x.signature or x.name for x in part.groups}
    bounded = {sig[b.split(" ")[0]] for b in g.quality["lower_bound"]}
    kept = [name for name, gg in g.groups.items() if all(not f or f.startswith(EMULATED) for f in gg.flags["ET"])
            and sig[name] not in bounded]
    assert kept and all(again.groups[name].gains["ET"] == g.groups[name].gains["ET"] for name in kept)


def test_compare_decode_restores_the_model(llama):
    from inc_ipamp.gains import get_backend

    step = decode_step(llama, batch=1, context=8)
    before = step(llama)
    r = compare_decode(llama, step, get_backend("cpu"), {"model.layers.0.mlp.down_proj": "int8"}, reps=3, warmup=1)
    assert {"gain_s", "ci_s", "t_ref_s", "t_cfg_s"} <= set(r) and r["t_ref_s"] > 0
    assert type(llama.model.layers[0].mlp.down_proj) is torch.nn.Linear  # fails closed: swapped back
    assert torch.equal(step(llama), before)


# -- objectives -------------------------------------------------------------------------------------------------
def _phase(gains: Gains, phase: str, scale: float, seed_flip: bool = False) -> Gains:
    """A copy of ``gains`` as another phase's record: ET scaled, and reversed within each group if ``seed_flip`` (so
    the phases disagree on which configs pay)."""
    groups = {}
    for k, gg in gains.groups.items():
        et = [x * scale for x in gg.gains["ET"]]
        if seed_flip:
            et = [0.0] + et[1:][::-1]
        groups[k] = GroupGains(k, gg.configs, {"ET": et, "M": list(gg.gains["M"])}, {"ET": [1e-5] * len(et)})
    return dataclasses.replace(gains, groups=groups, phase=phase, reference_time_s=gains.reference_time_s * scale,
                               quality={"consistent": True})


@pytest.fixture(scope="module")
def phases():
    sens, part, prefill = make_records(seed=5)
    return sens, part, prefill, _phase(prefill, "decode", 0.1, seed_flip=True)


def test_prefill_objective_is_the_prefill_record_itself(phases):
    sens, part, prefill, decode = phases
    assert objective_gains(prefill, decode, "prefill") is prefill
    assert objective_gains(prefill, None) is prefill
    assert RunSettings().objective == "prefill"


def test_mix_is_the_weighted_sum(phases):
    sens, part, prefill, decode = phases
    mix = objective_gains(prefill, decode, "mix", (2.0, 30.0))
    assert mix.phase == "mix"
    assert mix.reference_time_s == pytest.approx(2.0 * prefill.reference_time_s + 30.0 * decode.reference_time_s)
    for k, gg in mix.groups.items():
        for i, x in enumerate(gg.gains["ET"]):
            assert x == pytest.approx(2.0 * prefill.groups[k].gains["ET"][i] + 30.0 * decode.groups[k].gains["ET"][i])
        assert gg.gains["M"] == prefill.groups[k].gains["M"]


def test_objectives_pick_their_phase_plans(phases):
    sens, part, prefill, decode = phases
    beta = 0.8  # binds: neither phase's plan takes every op
    p = solve(sens, part, prefill, beta=beta, **MACHINERY)
    d = solve(sens, part, objective_gains(prefill, decode, "decode"), beta=beta, **MACHINERY)
    only_p = solve(sens, part, mix_gains(prefill, decode, (1.0, 0.0)), beta=beta, **MACHINERY)
    only_d = solve(sens, part, mix_gains(prefill, decode, (0.0, 1.0)), beta=beta, **MACHINERY)
    assert d.assignment != p.assignment  # the phases disagree here, so the objective matters
    assert only_p.assignment == p.assignment and only_d.assignment == d.assignment
    assert d.solver["objective"] == "decode" and p.solver["objective"] == "prefill"
    # each plan is the best of its own phase at this budget
    assert plan_gain(d.assignment, decode, part) >= plan_gain(p.assignment, decode, part) - 1e-12
    assert plan_gain(p.assignment, prefill, part) >= plan_gain(d.assignment, prefill, part) - 1e-12
    assert plan_gain(p.assignment, prefill, part) == pytest.approx(p.predicted_gain)
    for plan in (p, d):
        assert plan.predicted_loss_mse <= plan.budget_loss_mse * (1 + 1e-9)


def test_flag_in_either_phase_keeps_a_config_out_of_mix(phases):
    sens, part, prefill, decode = phases
    name = part.groups[0].name
    flags = [""] * len(decode.groups[name].configs)
    flags[1] = "noisy: test"
    groups = dict(decode.groups)
    groups[name] = dataclasses.replace(decode.groups[name], flags={"ET": flags})
    mix = mix_gains(prefill, dataclasses.replace(decode, groups=groups))
    assert not mix.groups[name].usable("ET", 1) and mix.groups[name].usable("ET", 0)
    assert "decode: noisy" in mix.groups[name].flags["ET"][1]


def test_bad_objective_input_is_one_clear_error(phases):
    sens, part, prefill, decode = phases
    with pytest.raises(ArtifactError, match="needs decode-step gains"):
        objective_gains(prefill, None, "decode")
    with pytest.raises(BudgetSpecError, match="objective must be one of"):
        objective_gains(prefill, decode, "tokens")
    with pytest.raises(ArtifactError, match="phases"):
        objective_gains(prefill, prefill, "mix")
    with pytest.raises(BudgetSpecError, match="mix weights"):
        mix_gains(prefill, decode, (0.0, 0.0))
    with pytest.raises(BudgetSpecError, match="mix weights"):
        mix_gains(prefill, decode, (1.0, math.nan))
    bad = dataclasses.replace(decode, quality={"consistent": False, "sum_best_gain_s": 1.0})
    with pytest.raises(ArtifactError, match="decode gains cannot be trusted"):
        objective_gains(prefill, bad, "decode")
    s = RunSettings(objective="decode", metric="TT")
    with pytest.raises(IpampError, match="--objective decode needs"):
        s.validate()
    with pytest.raises(IpampError, match="--mix-weights"):
        RunSettings(objective="mix", mix_weights=[1.0]).validate()
    assert DEFAULT_MIX_WEIGHTS == tuple(RunSettings().mix_weights)


# -- KV cache as a decision of the attention group -------------------------------------------------------------
@pytest.fixture(scope="module")
def kv_records(llama):
    from inc_ipamp.sensitivity import calibrate

    g = torch.Generator().manual_seed(1)
    blocks = [torch.randint(0, 256, (1, 16), generator=g) for _ in range(4)]
    sens = calibrate(llama, blocks, ["fp8_e4m3"], progress=False)
    part = partition_model(llama)
    dec = measure_decode_gains(llama, part, ["fp32", "fp8_e4m3"], batch=1, context=8, reps=3, warmup=1,
                               progress=False, roofline="h100")
    return sens, part, dec


def _attention(inst):
    return next(g for g in inst.groups if any(op.endswith("k_cache") for op in g.ops))


def _config(g, **formats):
    """Index of the config of attention group ``g`` with the given leaves in low precision, all else reference."""
    want = tuple(formats.get(op.rpartition(".")[2], "fp32") for op in g.ops)
    return g.configs.index(want)


def test_kv_cache_terms_are_the_bgemm_b_operands(kv_records):
    from inc_ipamp.kvcache import kv_spec
    from inc_ipamp.solver import build_instance

    sens, part, dec = kv_records
    assert all(len(gg.gains["RT"]) == len(gg.configs) for gg in dec.groups.values())  # roofline at decode shapes
    spec = kv_spec(dec, ["fp8_e4m3"], "h100")
    assert spec.numel == {0: 1 * 2 * 8 * 16, 1: 1 * 2 * 8 * 16}  # batch x kv heads x context x head dim, per layer
    inst = build_instance(sens, part, dec, "M", min_sqnr_db=None, kv_cache=spec)
    g = _attention(inst)
    qk = next(op for op in g.ops if op.endswith("matmul_qk"))
    assert g.ops[-2:] == [qk.replace("matmul_qk", "k_cache"), qk.replace("matmul_qk", "v_cache")]
    assert len(g.configs) == 2 ** 5 * 4
    f8 = "fp8_e4m3"
    k = _config(g, k_cache=f8)
    assert g.noise[k] == pytest.approx(sens.operand_term(qk, "b", f8))
    assert g.shift[k] == pytest.approx(sens.operand_shift(qk, "b", f8))
    assert g.noise[k] > 0 and sens.operand_shift(qk, "a", f8) != sens.operand_shift(qk, "b", f8)
    # the BGEMM in the same format already rounds K: the cache's error is charged once
    both, alone = _config(g, matmul_qk=f8, k_cache=f8), _config(g, matmul_qk=f8)
    assert g.noise[both] == pytest.approx(g.noise[alone]) and g.shift[both] == pytest.approx(g.shift[alone])
    kv = _config(g, k_cache=f8, v_cache=f8)
    assert g.gain["M"][kv] == pytest.approx(2 * 256 * 3)  # fp32 -> fp8 saves 3 bytes per element of K and V
    assert g.gain["RT"][kv] == pytest.approx(2 * 256 * 3 / 3.35e12)  # read once per decode step at H100's bandwidth
    plain = build_instance(sens, part, dec, "M", min_sqnr_db=None)
    assert [len(x.configs) * (4 if "matmul_qk" in x.name else 1) for x in plain.groups] == \
           [len(x.configs) for x in inst.groups]  # only attention groups gain the two cache choices


def test_kv_cache_plan_and_export(kv_records):
    from inc_ipamp.export.fp8 import map_plan
    from inc_ipamp.kvcache import kv_spec

    sens, part, dec = kv_records
    spec = kv_spec(dec, ["fp8_e4m3"], "h100")
    none = solve(sens, part, dec, metric="M", beta=0.0, kv_cache=spec, min_sqnr_db=None)
    assert all(f == "fp32" for op, f in none.assignment.items() if op.endswith(("k_cache", "v_cache")))
    full = solve(sens, part, dec, metric="M", beta=1e3, kv_cache=spec, min_sqnr_db=None)
    caches = {op: f for op, f in full.assignment.items() if op.endswith(("k_cache", "v_cache"))}
    assert len(caches) == 4 and set(caches.values()) == {"fp8_e4m3"}
    assert full.predicted_loss_mse <= full.budget_loss_mse
    assert full.predicted_gain == pytest.approx(plan_gain({k: v for k, v in full.assignment.items() if k not in caches},
                                                          dec, part, "M") + 4 * 256 * 3)
    with pytest.raises(IpampError, match="KV-cache decision needs a metric"):
        solve(sens, part, dec, metric="ET", beta=1.0, kv_cache=spec)
    # the engines' module names: the cache follows the plan's own decision, not its BGEMM's
    attn = "model.layers.0.self_attn"
    plan = dataclasses.replace(none, assignment={**none.assignment, f"{attn}.k_cache": "fp8_e4m3"},
                               reference_format="bf16")
    plan.assignment = {k: ("bf16" if v == "fp32" else v) for k, v in plan.assignment.items()}
    oh = map_plan(plan, "optimum-habana").modules
    assert oh[f"{attn}.k_cache"] == "fp8" and oh[f"{attn}.v_cache"] == "bf16" and oh[f"{attn}.matmul_qk"] == "bf16"
    vg = map_plan(plan, "vllm-gaudi").modules
    assert vg[f"{attn}.attn.impl.k_cache"] == "fp8" and vg[f"{attn}.attn.impl.v_cache"] == "bf16"
    assert any("KV-cache" in n for n in map_plan(plan, "inc").notes)


def test_kv_cache_settings_fail_with_one_sentence():
    for kw, msg in (({"kv_cache": "int8", "formats": ["fp32", "int8"], "objective": "decode", "metric": "M"},
                     "--kv-cache is a format"),
                    ({"kv_cache": "fp8_e4m3", "formats": ["fp32", "fp8_e4m3"], "objective": "prefill", "metric": "M"},
                     "--kv-cache needs"),
                    ({"kv_cache": "fp8_e4m3", "formats": ["fp32", "fp8_e4m3"], "objective": "decode", "metric": "ET"},
                     "--kv-cache needs")):
        with pytest.raises(IpampError, match=msg):
            RunSettings(**kw).validate()
    RunSettings(kv_cache="fp8_e4m3", formats=["fp32", "fp8_e4m3"], objective="decode", metric="M").validate()


def test_cli_mix_objective_end_to_end(tmp_path):
    """`run --objective mix` on a 2-layer prefix of the default model: both gains records, a frontier per objective,
    the decode step timed in evaluate, the report; then `solve --objective prefill` in the same folder is the
    prefill plan (scored on gains.json alone)."""
    from inc_ipamp.cli import main
    from inc_ipamp.records import Partition, Plan

    out = tmp_path / "run"
    # without lm_head, whose INT8 saves most of a 2-layer model's time: Σ best gains stay far below the reference
    # step whatever the load, so neither phase's consistency refusal can fire on a noisy machine
    quick = ["--layers", "2", "--n-calib", "2", "--n-eval", "2", "--seq-len", "32", "--reps", "3", "--gain-seq-len",
             "32", "--decode-context", "16", "--threads", "1", "--no-lm-head"]
    assert main(["run", "--out", str(out), *quick, "--objective", "mix", "--mix-weights", "1,64"]) == 0
    dec = Gains.load(out / "gains_decode.json")
    assert dec.phase == "decode" and dec.seq_len == 16 and dec.quality["kv_cache"]
    for obj in ("prefill", "decode", "mix"):
        assert json.loads((out / f"frontier_{obj}.json").read_text())["objective"] == obj
    plan = Plan.load(out / "plan.json")
    assert plan.solver["objective"] == "mix"
    ev = json.loads((out / "evaluation.json").read_text())
    ip = ev["plans"]["ip"]
    assert ip["measured_decode_step_s"] > 0 and "decode_speed_check" in ip
    assert ip["predicted_gain"] == pytest.approx(ip["predicted_prefill_gain"] + 64 * ip["predicted_decode_gain"])
    report = (out / "report.md").read_text()
    assert "## Frontier per objective" in report and "decode speedup measured" in report
    assert main(["solve", "--out", str(out), "--objective", "prefill"]) == 0
    pre = Plan.load(out / "plan.json")
    assert pre.solver["objective"] == "prefill"
    assert pre.predicted_gain == pytest.approx(plan_gain(pre.assignment, Gains.load(out / "gains.json"),
                                                         Partition.load(out / "partition.json")))


def test_kv_fake_quant_rounds_what_the_attention_reads(llama, kv_records):
    from inc_ipamp.apply.fake import fake_quant_kv
    from inc_ipamp.formats import get_format, quantize, quantize_with_scale
    from inc_ipamp.kvcache import kv_loss, kv_spec, static_scales
    from inc_ipamp.solver import build_instance

    sens, part, dec = kv_records
    attn = "model.layers.0.self_attn"
    qk = llama.get_submodule(f"{attn}.matmul_qk")
    seen: list[torch.Tensor] = []

    def capture(mod, args):
        seen.append(args[1])

    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    kv = {f"{attn}.k_cache": "fp8_e4m3"}
    scales = static_scales(sens, kv)
    assert scales[f"{attn}.k_cache"] == pytest.approx(sens.ops[f"{attn}.matmul_qk"].operands["b"].amax / 448)
    with torch.no_grad():
        h = qk.register_forward_pre_hook(capture)
        base = llama(ids, use_cache=False).logits
        h.remove()
        for sc in (None, scales):
            with fake_quant_kv(llama, kv, sc):
                h = qk.register_forward_pre_hook(capture)  # after the cache's hook: sees what the product reads
                out = llama(ids, use_cache=False).logits
                h.remove()
            assert not torch.equal(out, base)
        assert torch.equal(llama(ids, use_cache=False).logits, base)  # the hooks are gone
    raw, dynamic, static = seen
    f8 = get_format("fp8_e4m3")
    assert torch.equal(dynamic, quantize(raw, f8)) and not torch.equal(dynamic, raw)
    assert torch.equal(static, quantize_with_scale(raw, f8, torch.tensor(scales[f"{attn}.k_cache"])))
    # kv_loss is the IP's loss of the same choice (both layers' caches in FP8, everything else reference)
    inst = build_instance(sens, part, dec, "M", min_sqnr_db=None, kv_cache=kv_spec(dec, ["fp8_e4m3"]))
    caches = {op: "fp8_e4m3" for g in inst.groups for op in g.ops if op.endswith(("k_cache", "v_cache"))}
    choice = [g.configs.index(tuple(caches.get(op, "fp32") for op in g.ops)) for g in inst.groups]
    assert kv_loss(sens, caches) == pytest.approx(inst.loss_of(choice))


def test_cli_decode_objective_times_no_prefill(tmp_path, capsys):
    """`run --objective decode` plans on the decode step alone, so the prefill is not timed (no ET in gains.json,
    a note says so; TT, RT and M are computed): no prefill or mix frontier, no predicted prefill gain in the
    evaluation (the prefill is still measured there) and the report says "not timed". Solving for the prefill from
    that folder is one clear error naming the command that measures it."""
    from inc_ipamp.cli import main

    out = tmp_path / "run"
    quick = ["--layers", "2", "--n-calib", "2", "--n-eval", "2", "--seq-len", "32", "--reps", "3", "--gain-seq-len",
             "32", "--decode-context", "16", "--threads", "1", "--no-lm-head"]
    assert main(["run", "--out", str(out), *quick, "--objective", "decode"]) == 0
    pre = Gains.load(out / "gains.json")
    assert not pre.has("ET") and pre.has("TT") and pre.has("M") and pre.subgraph_calls == 0
    assert any(n.startswith("ET not measured") for n in pre.notes)
    assert Gains.load(out / "gains_decode.json").has("ET")
    assert (out / "frontier_decode.json").exists()
    assert not (out / "frontier_prefill.json").exists() and not (out / "frontier_mix.json").exists()
    ip = json.loads((out / "evaluation.json").read_text())["plans"]["ip"]
    assert ip["predicted_prefill_gain"] is None and ip["measured_speedup"] > 0 and ip["measured_decode_step_s"] > 0
    assert "speed_check" not in ip and "decode_speed_check" in ip
    assert "| not timed |" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["solve", "--out", str(out), "--objective", "prefill"]) != 0
    assert "rerun `inc-ipamp measure --objective prefill`" in capsys.readouterr().err
