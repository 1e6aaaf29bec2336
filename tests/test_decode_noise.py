"""Issue 17: a decode config that stays noisy through its re-measurements is used at the lower end of its CI when its
measurements agree (``decode.noisy_lower_bound``), else kept out of plans; deterministic, with injected timers.

The decode measurement runs on the 2-layer random Llama; its sub-graph timing (``time_group_configs``) is replaced by
the real shared-reference schedule (``base.interleaved_times``) on a fake clock, so every gain and CI is exact.
"""

from __future__ import annotations

import pytest
import torch

from inc_ipamp.gains import decode as decode_mod
from inc_ipamp.gains.base import gain_stats, interleaved_times
from inc_ipamp.gains.decode import decode_quality, measure_decode_gains, noisy_lower_bound
from inc_ipamp.ops import install_attention
from inc_ipamp.partition import partition_model

MS = 1e-3


def _rec(gain: float, ci: float, t_ref: float = 1.0) -> dict:
    return {"gain_s": gain * MS, "ci_s": ci * MS, "t_ref_s": t_ref * MS, "t_cfg_s": (t_ref - gain) * MS, "reps": 10}


def test_noisy_lower_bound_uses_the_ci_lower_end_of_consistent_measurements() -> None:
    got = noisy_lower_bound([_rec(0.1, 0.2), _rec(0.12, 0.2), _rec(0.1, 0.075)])
    assert got is not None and got["flag"] == ""
    assert got["gain_s"] == pytest.approx(0.025 * MS)  # the last (longest) measurement's gain - CI
    assert got["ci_s"] == pytest.approx(0.075 * MS) and "3 consistent measurements" in got["lower_bound"]
    # a negative bound is kept: the solver then sees a config that costs time, never one that saves what it may not
    assert noisy_lower_bound([_rec(0.0, 0.2), _rec(0.01, 0.1)])["gain_s"] == pytest.approx(-0.09 * MS)


@pytest.mark.parametrize("ms", [
    [_rec(0.1, 0.2)],  # measured once: nothing says the noise is stationary
    [_rec(0.4, 0.25), _rec(-0.1, 0.2)],  # gains differ by more than their CIs together: the machine changed
    [_rec(0.4, 0.25), _rec(0.1, 0.075), _rec(-0.1, 0.2)],  # any two that disagree
    [_rec(0.1, 0.2), _rec(0.3, 0.01)],  # the last one is not noisy: nothing to bound
    [_rec(0.1, 0.2), {**_rec(0.1, 0.2), "ci_s": float("nan")}],
    [_rec(0.1, 0.2), _rec(0.1, 0.2, t_ref=0.0)],
])
def test_noisy_lower_bound_fails_closed(ms) -> None:
    assert noisy_lower_bound(ms) is None


def test_a_bounded_record_is_not_noisy_again_but_can_drift() -> None:
    bounded = noisy_lower_bound([_rec(0.1, 0.2), _rec(0.1, 0.075)])
    assert decode_quality(bounded, 1.0 * MS) == ""
    assert decode_quality(bounded, 2.0 * MS).startswith("reference drift")
    assert decode_quality(_rec(0.1, 0.2), 1.0 * MS).startswith("noisy")  # an ordinary record: prefill's checks


#: per config kind, the cycle of sub-graph times (ms) of its i-th measurement; the reference always takes 1 ms
CYCLES = {
    "consistent": [[0.5, 0.65, 0.8, 0.95, 1.1]] * 3,  # 0.2 ± 0.1875, ± 0.15, ± 0.15 ms: noisy, always agreeing
    "inconsistent": [[0.3, 0.5, 0.7, 0.9, 1.1], [0.9, 1.1, 1.3, 1.5, 1.7], [0.5, 0.7, 0.9, 1.1, 1.3]],  # 0.3, -0.3
    "clean": [[0.8]] * 3,  # 0.2 ± 0 ms at once
}


def _kind(groups, config) -> str:
    low = {op.rsplit(".", 1)[-1] for op, f in zip(groups[0].ops, config, strict=True) if f != "fp32"}
    return {frozenset({"q_proj"}): "consistent", frozenset({"k_proj"}): "inconsistent"}.get(frozenset(low), "clean")


@pytest.fixture
def fake_timing(monkeypatch):
    """``time_group_configs`` on a fake clock: the real interleaved schedule, times from ``CYCLES``."""
    calls: dict = {}

    def fake(model, backend, groups, configs, inputs, reps, warmup, min_reps=None, seed=0):
        fns = []
        for c in configs:
            key = (groups[0].signature, tuple(c))
            calls[key] = calls.get(key, 0) + 1
            fns.append((_kind(groups, c), calls[key] - 1))
        counts: dict = {}

        def timer(fn, sync):
            counts[fn] = counts.get(fn, 0) + 1
            if fn == "ref":
                return 1.0 * MS
            cyc = CYCLES[fn[0]][min(fn[1], 2)]
            return cyc[counts[fn] % len(cyc)] * MS

        timed = interleaved_times("ref", fns, reps, warmup, timer=timer, seed=seed)
        return [gain_stats(t_ref, t_cfg) | {"span": len(groups)} for t_ref, t_cfg in timed]

    monkeypatch.setattr(decode_mod, "time_group_configs", fake)
    return calls


@pytest.fixture
def llama(tiny_llama):
    install_attention(tiny_llama)
    torch.set_num_threads(1)
    return tiny_llama


def _measure(llama, **kw):
    part = partition_model(llama)
    g = measure_decode_gains(llama, part, ["fp32", "int8"], batch=1, context=8, reps=10, warmup=0, progress=False,
                             probe_rounds=0, **kw)
    grp = next(x for x in part.groups if any(op.endswith("q_proj") for op in x.ops))
    attn, ops = g.groups[grp.name], [op.rsplit(".", 1)[-1] for op in grp.ops]

    def row(*low):
        i = attn.configs.index(["int8" if op in low else "fp32" for op in ops])
        return attn.gains["ET"][i], attn.ci["ET"][i], attn.flags["ET"][i]
    return g, row


def test_decode_measurement_bounds_consistent_noise_and_flags_the_rest(llama, fake_timing) -> None:
    g, row = _measure(llama)
    gain, ci, flag = row("q_proj")  # noisy through 10 and 20 rounds, always 0.2 ms: usable at gain - CI
    assert flag == "" and gain == pytest.approx(0.05 * MS) and ci == pytest.approx(0.15 * MS)
    gain, _, flag = row("k_proj")  # noisy, and its measurements disagree (0.3 ms, then -0.3 ms): kept out of plans
    assert flag.startswith("noisy") and gain == pytest.approx(-0.3 * MS)
    assert row("v_proj")[:2] == (pytest.approx(0.2 * MS), 0.0) and row("v_proj")[2] == ""  # clean at once
    assert max(fake_timing.values()) == 1 + decode_mod.DECODE_RETRIES == 2  # one re-measurement of a noisy config
    q = g.quality
    assert len(q["lower_bound"]) == 1 and "q_proj" in q["lower_bound"][0] and "0.05 ms" in q["lower_bound"][0]
    assert any("k_proj" in f and "fp32+int8+fp32" in f for f in q["flagged"])
    assert any("used at the lower end of their 95% CI" in n for n in g.notes)


def test_one_noisy_measurement_alone_stays_flagged(llama, fake_timing) -> None:
    g, row = _measure(llama, retries=0)
    assert row("q_proj")[2].startswith("noisy") and g.quality["lower_bound"] == []
