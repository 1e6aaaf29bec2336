"""Gain backends, sub-graph timing with reuse, TT/M arithmetic, the resumable cache and table replay."""

from __future__ import annotations

import json
import math

import pytest
import torch

import inc_ipamp.gains.measure as measure_mod
from inc_ipamp.apply.kernels import EmulatedMatmul, ScaledMMLinear
from inc_ipamp.errors import ArtifactError, DeviceUnavailableError, IpampError
from inc_ipamp.formats import get_format, quantize
from inc_ipamp.gains import MeasurementCache, bootstrap_ci, compare_prefill, get_backend, measure_gains, time_prefill
from inc_ipamp.gains.cpu import CpuBackend
from inc_ipamp.ops import Matmul
from inc_ipamp.partition import default_example_ids, partition_model
from inc_ipamp.records import Gains

FORMATS = ["fp32", "int8"]
# retries=0: no adaptive re-measurement, so the numbers of timed runs below are exact (test_quality covers it)
# measure_emulated: time the emulated INT8 BGEMM configs too, so every config of the tiny model is timed
# probe_rounds=0: no speed probe, so gains reused from the cache compare equal
FAST = dict(seq_len=8, reps=2, warmup=0, progress=False, reference_reps=2, retries=0, measure_emulated=True,
            probe_rounds=0)


class Fused(CpuBackend):
    """The CPU backend declared non-local, as a graph-compiling backend (hpu) is: configs timed on enclosing modules,
    all configs of a signature against one shared reference."""

    local_ops = False


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return tiny_llama, partition_model(tiny_llama)


def test_cpu_apply_swaps_and_restores(tiny) -> None:
    model, part = tiny
    be = get_backend("cpu")
    ids = default_example_ids(model, 1, 8)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    q = "model.layers.0.self_attn.q_proj"
    orig = model.get_submodule(q)
    a = {q: "int8", "model.layers.0.self_attn.matmul_qk": "int8", "model.layers.1.mlp.down_proj": "fp8_e4m3"}
    with torch.no_grad(), be.apply(model, a) as m:
        assert m.get_submodule(q) is not orig
        assert isinstance(m.get_submodule("model.layers.0.self_attn.matmul_qk"), EmulatedMatmul)
        low = m(ids, use_cache=False).logits
    assert model.get_submodule(q) is orig and type(model.get_submodule("model.layers.0.self_attn.matmul_qk")) is Matmul
    err = (low - ref).norm() / ref.norm()
    assert 0 < err < 0.1  # really quantised, but close
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, ref)
    assert "torch.ao dynamic int8" in be.paths["linear:int8"] and "emulated" in be.paths["bgemm:int8"]


def test_apply_rejects_unknown_op(tiny) -> None:
    model, _ = tiny
    with pytest.raises(KeyError, match="no module named"), get_backend("cpu").apply(model, {"nope": "int8"}):
        pass


def test_scaled_mm_linear_matches_fp8_rounding() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(3, 5, 64)
    fmt = get_format("fp8_e4m3")
    y = ScaledMMLinear(lin, fmt)(x)
    expect = torch.nn.functional.linear(quantize(x, fmt), quantize(lin.weight.detach(), fmt), lin.bias)
    assert y.shape == (3, 5, 32)
    torch.testing.assert_close(y, expect, rtol=1e-4, atol=1e-4)


def test_emulated_matmul_quantises_both_operands() -> None:
    a, b = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 16, 8)
    fmt = get_format("int8_pc")
    out = EmulatedMatmul(fmt)(a, b)
    torch.testing.assert_close(out, quantize(a, fmt, -1) @ quantize(b, fmt, -2))
    assert not torch.allclose(out, a @ b)


def test_measure_gains_structure_reuse_tt_m(tiny, tmp_path) -> None:
    model, part = tiny
    g = measure_gains(model, part, FORMATS, batch=1, cache_path=tmp_path / "c.jsonl", **FAST)
    assert set(g.groups) == {gr.name for gr in part.groups}
    n_sig = len({gr.signature for gr in part.groups})
    n_cfg = sum(len(gr.configs(FORMATS)) - 1 for gr in {gr.signature: gr for gr in part.groups}.values())
    assert n_sig == 5 and n_cfg == 31 + 1 + 3 + 1 + 1
    # CPU ops are local: only the 5 + 1 + 2 + 1 + 1 single-op configs are timed, each on its own op against its own
    # reference run; default span: each timed run calls the op in both layers (lm_head: one); 2 rounds of 2 runs
    assert g.subgraph_calls == 2 * 2 * (2 * (5 + 1 + 2 + 1) + 1)
    assert len(MeasurementCache(tmp_path / "c.jsonl")) == 5 + 1 + 2 + 1 + 1
    # a multi-op config is the sum of its ops' gains, their CIs in quadrature
    att = g.groups[part.groups[0].name]
    single = {c.index("int8"): i for i, c in enumerate(att.configs) if c.count("int8") == 1}
    for i, c in enumerate(att.configs):
        on = [j for j, f in enumerate(c) if f == "int8"]
        if len(on) > 1:
            assert att.gains["ET"][i] == pytest.approx(sum(att.gains["ET"][single[j]] for j in on))
            assert att.ci["ET"][i] == pytest.approx(math.sqrt(sum(att.ci["ET"][single[j]] ** 2 for j in on)))
    assert "mean over 2 groups" in g.groups[part.groups[0].name].source["ET"]
    assert g.reference_time_s and g.reference_time_s > 0
    l0, l1 = part.groups[0].name, part.groups[4].name  # attention of layer 0 and layer 1
    assert g.groups[l0].gains["ET"] == g.groups[l1].gains["ET"]
    assert "reused from" in g.groups[l1].source["ET"] and "reused" not in g.groups[l0].source["ET"]
    for gg in g.groups.values():
        assert gg.gains["ET"][0] == 0.0 and gg.gains["TT"][0] == 0.0 and gg.gains["M"][0] == 0.0
        assert len(gg.gains["ET"]) == len(gg.configs) == len(gg.ci["ET"])
        assert all(math.isfinite(v) for v in gg.gains["ET"])
    # memory: down_proj (128 -> 64) in int8 saves 3 bytes per weight
    down = next(n for n in g.groups if n.endswith("[down_proj]"))
    assert g.groups[down].gains["M"] == [0.0, 128 * 64 * 3.0]
    # theory: 8 tokens x 128 x 64 MACs x 2 flops x (1/1 - 1/1.2) / 1e12
    assert g.groups[down].gains["TT"][1] == pytest.approx(2 * 8 * 128 * 64 * (1 - 1 / 1.2) / 1e12)
    # the attention BGEMM q·kᵀ: batch 1 x 4 heads x 8 x 16 x 8 MACs, no weights
    att = g.groups[l0]
    i = att.configs.index(["fp32", "fp32", "fp32", "int8", "fp32"])
    assert att.gains["M"][i] == 0.0
    assert att.gains["TT"][i] == pytest.approx(2 * 4 * 8 * 16 * 8 * (1 - 1 / 1.2) / 1e12)
    assert any("emulated" in n for n in g.notes)
    assert Gains.from_json(json.loads(json.dumps(g.to_json()))) == g


def test_gains_record_saved_with_the_old_timed_runs_name_still_loads(tmp_path) -> None:
    """``subgraph_calls`` was saved as ``timed_runs`` (same count) before the rename: such files still load."""
    g = Gains("m", "cpu", ["fp32", "int8"], 1, 8, 0.01, {}, subgraph_calls=42, notes=["n"])
    old = {k: v for k, v in g.to_json().items() if k != "subgraph_calls"} | {"timed_runs": 42}
    path = tmp_path / "gains.json"
    path.write_text(json.dumps({"record": "gains", **old}))
    assert Gains.load(path) == g and Gains.load(g.save(tmp_path / "new.json")) == g


def test_span_one_times_the_representative_alone(tiny, monkeypatch) -> None:
    model, part = tiny
    seen = []
    real = measure_mod.time_group_configs

    def spy(model, backend, groups, configs, inputs, reps, warmup, **kw):
        seen.append([g.name for g in groups])
        rs = real(model, backend, groups, configs, inputs, reps, warmup, **kw)
        assert all(r["span"] == len(groups) for r in rs)
        return rs

    monkeypatch.setattr(measure_mod, "time_group_configs", spy)
    one = measure_gains(model, part, FORMATS, metrics=("ET",), span=1, **FAST)
    assert one.subgraph_calls == 2 * 2 * (5 + 1 + 2 + 1 + 1) and all(len(s) == 1 for s in seen)
    seen.clear()
    both = measure_gains(model, part, FORMATS, metrics=("ET",), **FAST)
    att = [g.name for g in part.groups if "q_proj" in g.name]
    assert att in seen and len(att) == 2  # layers 0 and 1 timed together
    assert "mean over" not in one.groups[att[1]].source["ET"] and both.subgraph_calls > one.subgraph_calls
    with pytest.raises(IpampError, match="span"):
        measure_gains(model, part, FORMATS, metrics=("ET",), span=0, **FAST)


def test_cache_resume_after_interruption(tiny, tmp_path, monkeypatch) -> None:
    model, part = tiny
    path = tmp_path / "c.jsonl"
    real = measure_mod.time_group_configs
    calls = {"n": 0}

    def dies_after_2(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(measure_mod, "time_group_configs", dies_after_2)
    monkeypatch.setattr(measure_mod, "check_quality", lambda rec, med: "")  # flagged records are re-measured
    with pytest.raises(KeyboardInterrupt):
        measure_gains(model, part, FORMATS, cache_path=path, **FAST)
    assert len(path.read_text().splitlines()) == 2  # two single-op configs: q_proj and k_proj
    with open(path, "a") as f:  # a crash in the middle of a write
        f.write('{"key": "abc", "gain_')
    monkeypatch.setattr(measure_mod, "time_group_configs", real)
    g = measure_gains(model, part, FORMATS, cache_path=path, **FAST)
    # v, the two BGEMMs, o, gate, up, down (2-layer spans) and lm_head are left: 2 rounds of 2 runs each
    assert g.subgraph_calls == 2 * 2 * (2 * (3 + 1 + 2 + 1) + 1)
    assert any("skipped 1 corrupt line" in n for n in g.notes)
    again = measure_gains(model, part, FORMATS, cache_path=path, **FAST)
    assert again.subgraph_calls == 0
    assert {k: v.gains["ET"] for k, v in again.groups.items()} == {k: v.gains["ET"] for k, v in g.groups.items()}
    lines = path.read_text().splitlines()
    assert sum(1 for ln in lines if ln.startswith('{"key": "abc"')) == 1 and len(lines) == 10 + 1


def test_table_backend_json_and_csv(tiny, tmp_path) -> None:
    model, part = tiny
    measured = measure_gains(model, part, FORMATS, metrics=("ET",), **FAST)
    measured.save(tmp_path / "g.json")
    replay = measure_gains(model, part, FORMATS, backend="table", table_path=tmp_path / "g.json", metrics=("ET", "M"))
    for name, gg in measured.groups.items():
        assert replay.groups[name].gains["ET"] == gg.gains["ET"]
        assert replay.groups[name].source["ET"].startswith("replayed:")
    sigs = {gr.signature: gr for gr in part.groups}
    rows = ["group,config,gain_s,ci_s"]
    for sig, gr in sigs.items():
        for c in gr.configs(FORMATS)[1:]:
            rows.append(f"{sig},{'+'.join(c)},{0.001 * c.count('int8')},0.0001")
    (tmp_path / "g.csv").write_text("\n".join(rows) + "\n")
    rc = measure_gains(model, part, FORMATS, backend="table", table_path=tmp_path / "g.csv", metrics=("ET",))
    down = next(n for n in rc.groups if n.endswith("layers.1.mlp[down_proj]"))
    assert rc.groups[down].gains["ET"] == [0.0, 0.001]
    (tmp_path / "short.csv").write_text("\n".join(rows[:3]) + "\n")
    with pytest.raises(ArtifactError, match=r"no entry for group .* in config"):
        measure_gains(model, part, FORMATS, backend="table", table_path=tmp_path / "short.csv", metrics=("ET",))
    with pytest.raises(ArtifactError, match="not found"):
        measure_gains(model, part, FORMATS, backend="table", table_path=tmp_path / "none.csv")


def test_device_backends_fail_clearly_here(tiny) -> None:
    model, part = tiny
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="torch.cuda.is_available"):
            measure_gains(model, part, ["bf16", "fp8_e4m3"], backend="cuda", **FAST)
    try:
        import habana_frameworks  # noqa: F401
    except ImportError:
        with pytest.raises(DeviceUnavailableError, match="requires a Gaudi .habana_frameworks not importable"):
            measure_gains(model, part, ["bf16", "fp8_e4m3"], backend="hpu", **FAST)
    with pytest.raises(IpampError, match="unknown gain backend"):
        get_backend("tpu")
    with pytest.raises(DeviceUnavailableError, match="reference in fp32"):
        measure_gains(model, part, ["bf16", "int8"], backend="cpu", **FAST)


def test_tt_and_m_need_no_device(tiny) -> None:
    model, part = tiny
    g = measure_gains(model, part, ["bf16", "fp8_e4m3"], backend="hpu", seq_len=16, metrics=("TT", "M"))
    down = next(n for n in g.groups if n.endswith("[down_proj]"))
    assert g.groups[down].gains["TT"][1] == pytest.approx(2 * 16 * 128 * 64 * (1 / 432 - 1 / 865) / 1e12)
    assert g.groups[down].gains["M"][1] == 128 * 64 * 1.0 and g.subgraph_calls == 0


def test_prefill_timers(tiny) -> None:
    model, _ = tiny
    be = get_backend("cpu")
    ids = default_example_ids(model, 1, 8)
    r = time_prefill(model, ids, be, {"lm_head": "int8"}, reps=3, warmup=1)
    assert r["reps"] == 3 and len(r["times_s"]) == 3 and r["median_s"] > 0 and r["ci_s"] >= 0
    c = compare_prefill(model, ids, be, {"lm_head": "int8"}, reps=2, warmup=0)
    assert set(c) >= {"gain_s", "ci_s", "t_ref_s", "t_cfg_s"}
    assert bootstrap_ci([1.0] * 5) == 0.0 and bootstrap_ci([1.0, 2.0, 3.0]) > 0


# -- adaptive repetitions with one shared reference per round (base.interleaved_times) --------------------------------
def _fake_clock(seconds):
    """A timer that calls nothing: each 'function' is a key whose next duration ``seconds(key, call_no)`` gives."""
    counts: dict = {}

    def timer(fn, sync):
        counts[fn] = counts.get(fn, 0) + 1
        return seconds(fn, counts[fn])
    return timer, counts


def test_interleaved_times_share_one_reference_run_per_round() -> None:
    from inc_ipamp.gains.base import interleaved_times

    # the machine gets twice as slow from the 4th run of each callable on: the pairs stay in step
    timer, counts = _fake_clock(lambda fn, n: {"ref": 10.0, "a": 6.0, "b": 8.0}[fn] * (2 if n > 3 else 1))
    out = interleaved_times("ref", ["a", "b"], reps=6, warmup=0, timer=timer)
    assert counts == {"ref": 6, "a": 6, "b": 6}  # 18 runs; one reference per config run would be 24
    for (t_ref, t_cfg), frac in zip(out, (0.6, 0.8), strict=True):
        assert len(t_ref) == 6 and [c / r for r, c in zip(t_ref, t_cfg, strict=True)] == pytest.approx([frac] * 6)


def test_adaptive_repetitions_stop_a_settled_config_early() -> None:
    from inc_ipamp.gains.base import interleaved_times

    noisy = iter([1.0, 9.0] * 50)
    timer, counts = _fake_clock(lambda fn, n: {"ref": 10.0, "steady": 5.0}.get(fn) or next(noisy))
    out = interleaved_times("ref", ["steady", "noisy"], reps=10, warmup=1, min_reps=4, timer=timer,
                            settled=lambda tr, tc: measure_mod.precise_enough(measure_mod.gain_stats(tr, tc)))
    assert [len(t) for t, _ in out] == [4, 10]  # the steady gain stops at min_reps, the noisy one runs to reps
    assert counts == {"ref": 11, "steady": 5, "noisy": 11}  # 1 warm-up round
    # without a stopping rule every config runs reps rounds
    out = interleaved_times("ref", ["steady"], reps=7, warmup=0, min_reps=4, timer=_fake_clock(lambda f, n: 1.0)[0])
    assert len(out[0][0]) == 7


def test_precise_enough_rule() -> None:
    rec = {"gain_s": 2e-3, "ci_s": 0.3e-3, "t_ref_s": 10e-3}
    assert measure_mod.precise_enough(rec)  # CI within 20% of the gain
    assert not measure_mod.precise_enough({**rec, "ci_s": 0.5e-3})  # 25% of the gain, 5% of t_ref
    assert measure_mod.precise_enough({**rec, "gain_s": 0.0, "ci_s": 0.05e-3})  # about nothing, known to 0.5%
    assert not measure_mod.precise_enough({**rec, "ci_s": float("nan")})


def test_measure_gains_times_a_signature_in_one_batch(tiny, monkeypatch) -> None:
    """Where ops fuse (``local_ops`` False) all configs of a signature go to one shared-reference batch, with the
    adaptive floor passed on; where they are local, each op's single-op configs do."""

    model, part = tiny
    seen = []
    real = measure_mod.time_group_configs

    def spy(model, backend, groups, configs, inputs, reps, warmup, **kw):
        seen.append((len(configs), kw.get("min_reps")))
        return real(model, backend, groups, configs, inputs, reps, warmup, **kw)

    monkeypatch.setattr(measure_mod, "time_group_configs", spy)
    measure_gains(model, part, FORMATS, metrics=("ET",), backend=Fused(), **{**FAST, "measure_emulated": False})
    assert seen == [(7, measure_mod.MIN_REPS), (1, 5), (3, 5), (1, 5), (1, 5)]
    seen.clear()
    measure_gains(model, part, ["fp32", "int8", "int8_pc"], metrics=("ET",), **{**FAST, "measure_emulated": False})
    assert seen == [(2, 5)] * (3 + 1 + 2 + 1 + 1)  # q, k, v, o, gate, up, down, lm_head; two formats each


def test_speed_probe_times_every_signature_in_each_round() -> None:
    order = []

    def timer(fn, sync):
        order.append(fn)
        return {"a": 1.0, "b": 2.0, "c": 3.0}[fn] * (10 if len(order) == 5 else 1)  # one disturbed call

    med = measure_mod.speed_probe({"a": "a", "b": "b", "c": "c"}, rounds=3, timer=timer)
    assert med == {"a": 1.0, "b": 2.0, "c": 3.0}  # medians shrug off the disturbed call
    assert len(order) == 3 * 3 and all(sorted(order[i:i + 3]) == ["a", "b", "c"] for i in range(0, 9, 3))


def test_align_to_probe_brings_a_signature_to_the_common_speed() -> None:
    recs = [{"gain_s": 2.279e-3, "ci_s": 0.4e-3, "t_ref_s": 3.43e-3, "t_cfg_s": 1.151e-3}]
    f = measure_mod.align_to_probe(recs, 1.53e-3)  # o_proj measured at 2.2x the speed of the end of the run
    assert f == pytest.approx(1.53 / 3.43) and recs[0]["t_ref_s"] == pytest.approx(1.53e-3)
    assert recs[0]["gain_s"] / recs[0]["t_ref_s"] == pytest.approx(2.279 / 3.43)  # the measured fraction is kept
    assert recs[0]["measured"]["gain_s"] == 2.279e-3
    same = [{"gain_s": 1e-3, "ci_s": 1e-4, "t_ref_s": 3e-3, "t_cfg_s": 2e-3}]
    assert measure_mod.align_to_probe(same, 3.5e-3) == 1.0 and same[0]["gain_s"] == 1e-3  # within MAX_REF_DRIFT
    assert measure_mod.align_to_probe(same, 10e-3) == 0.0 and same[0]["gain_s"] == 1e-3  # beyond MAX_RESCALE


def test_measure_gains_rescales_a_signature_measured_at_another_speed(tiny, monkeypatch) -> None:
    model, part = tiny
    o_sig = next(g.signature for g in part.groups if g.ops[-1].endswith("o_proj"))
    monkeypatch.setattr(measure_mod, "time_group_configs", lambda model, be, groups, configs, *a, **k: [
        {"gain_s": 1e-3, "ci_s": 1e-4, "t_ref_s": 4e-3, "t_cfg_s": 3e-3, "reps": 2, "span": len(groups)}
        for _ in configs])
    probed = {}

    def sig(key):  # a single-op timing's key is its signature's, "#", the op's position
        return key.rsplit("#", 1)[0]

    def probe(fns, rounds, sync):
        probed.update(fns)
        # every op's reference at the speed it was measured at (4 ms per group) but o_proj's at 2 ms
        span = {k: sum(g.signature == sig(k) for g in part.groups) for k in fns}  # groups per timed run
        return {k: (2e-3 if sig(k) == o_sig else 4e-3) * span[k] for k in fns}

    monkeypatch.setattr(measure_mod, "speed_probe", probe)
    g = measure_gains(model, part, FORMATS, metrics=("ET",), **{**FAST, "probe_rounds": 3})
    assert len(probed) == 5 + 1 + 2 + 1 + 1  # every op timed
    for gr in part.groups:
        want = 0.5e-3 if gr.signature == o_sig else 1e-3
        assert g.groups[gr.name].gains["ET"][1:2] == [pytest.approx(want)], gr.name
    assert list(g.quality["speed_probe_rescaled"].values()) == [pytest.approx(0.5)]
    assert any("speed probe (3 rounds): rescaled" in n for n in g.notes)


def test_a_timed_run_calls_exactly_the_ops_its_configs_change(tiny, monkeypatch) -> None:
    """CPU swaps ops module by module and runs them eagerly: each timed run calls one op that some config puts in
    INT8 (q, k or v, not the emulated BGEMMs or the softmax between them), in every layer spanned, and nothing else;
    a backend that fuses across ops (``local_ops`` False) times the enclosing module instead."""
    model, part = tiny
    seen: list[tuple[str, list[str], list[tuple[str, ...]]]] = []
    real = measure_mod.time_group_configs

    def spy(model, backend, groups, configs, calls, reps, warmup, **kw):
        seen.append((groups[0].name, [c[0] for c in calls], [tuple(c) for c in configs]))
        return real(model, backend, groups, configs, calls, reps, warmup, **kw)

    monkeypatch.setattr(measure_mod, "time_group_configs", spy)
    fast = FAST | {"measure_emulated": False}
    g = measure_gains(model, part, FORMATS, metrics=("ET",), **fast)
    att = [x for x in part.groups if len(x.ops) == 5]
    q_k_v = sorted(called for name, called, _ in seen if name == att[0].name)
    assert q_k_v == sorted([x.ops[i] for x in att] for i in range(3))  # both layers' q, then k, then v
    for name, called, cfgs in seen:  # one op per run, in both layers, the one its single-op configs change
        grp = next(x for x in part.groups if x.name == name)
        members = [x for x in part.groups if x.signature == grp.signature]
        assert all(c.count("fp32") == len(c) - 1 for c in cfgs)
        assert called == [x.ops[i] for x in members for i, f in enumerate(cfgs[0]) if f != "fp32"]
    assert "self_attn.q_proj+self_attn.k_proj+self_attn.v_proj" in g.groups[att[0].name].source["ET"]

    seen.clear()
    measure_gains(model, part, FORMATS, metrics=("ET",), backend=Fused(), **fast)
    assert seen[0][:2] == (att[0].name, ["model.layers.0.self_attn", "model.layers.1.self_attn"])


def test_a_signature_whose_every_config_is_emulated_is_not_timed(tiny) -> None:
    """Single-op timing with nothing to time in a signature (two INT8 BGEMMs, emulated on CPU): every config is
    flagged, none timed, and the record says why instead of naming a timed module."""
    from inc_ipamp.records import Group, Partition

    model, part = tiny
    ops = ["model.layers.0.self_attn.matmul_qk", "model.layers.0.self_attn.matmul_av"]
    only = Partition(part.model, part.method, [Group("bgemms", ops, 0, "b")])
    g = measure_gains(model, only, FORMATS, metrics=("ET",), **{**FAST, "measure_emulated": False})
    gg = g.groups["bgemms"]
    assert g.subgraph_calls == 0 and all(f.startswith("no real kernel") for f in gg.flags["ET"][1:])
    assert "no op (every config needs an emulated kernel)" in gg.source["ET"]
