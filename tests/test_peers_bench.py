"""The peer benchmark's plan translation and comparison helpers (benchmarks/bench_peers.py), offline: no peer
package is imported; the inputs are shaped like ModelOpt's search state and AutoRound's layer_config."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_peers",
                                               Path(__file__).parents[1] / "benchmarks" / "bench_peers.py")
bp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bp)


class _Recipe:  # ModelOpt's QuantRecipe prints as e.g. "CUSTOM_0(effective-bits: 8.0)" or "NONE(...)"
    def __init__(self, s):
        self.s = s

    def __str__(self):
        return self.s


def test_modelopt_tied_decisions_expand_to_every_module():
    stats = {"model.layers.0.self_attn.q_proj.quant_recipe": {"module_names": [
                 "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                 "model.layers.0.self_attn.v_proj"]},
             "model.layers.0.mlp.down_proj.quant_recipe": {"module_names": ["model.layers.0.mlp.down_proj"]},
             "lm_head.quant_recipe": {"module_names": ["lm_head"]}}
    recipe = {"model.layers.0.self_attn.q_proj.quant_recipe": _Recipe("CUSTOM_0(effective-bits: 8.0)"),
              "model.layers.0.mlp.down_proj.quant_recipe": _Recipe("NONE(effective-bits: 16.0)"),
              "lm_head.quant_recipe": _Recipe("CUSTOM_0(effective-bits: 8.0)")}
    a = bp.modelopt_assignment(recipe, stats, "int8")
    assert a == {"model.layers.0.self_attn.q_proj": "int8", "model.layers.0.self_attn.k_proj": "int8",
                 "model.layers.0.self_attn.v_proj": "int8", "lm_head": "int8"}


def test_autoscheme_keeps_only_low_bit_layers():
    lc = {"model.layers.0.mlp.up_proj": {"bits": 8}, "model.layers.0.mlp.down_proj": {"bits": 16}}
    assert bp.autoscheme_assignment(lc, "int8_pc") == {"model.layers.0.mlp.up_proj": "int8_pc"}


def test_bits_budget_matches_parameter_share():
    assert bp.bits_budget(0, 100) == 16.0
    assert bp.bits_budget(50, 100) == 12.0
    assert bp.bits_budget(200, 100) == 8.0


def test_speedup_ci_brackets_the_speedup():
    r = bp.speedup_with_ci([1.0, 1.02, 0.98, 1.01, 0.99], [0.8, 0.82, 0.79, 0.81, 0.8])
    assert r["speedup"] == pytest.approx(1.0 / 0.8)
    assert r["speedup_lo"] <= r["speedup"] <= r["speedup_hi"]


def test_equal_loss_comparison_interpolates_in_log_loss():
    def row(name, loss, s, ci=0.01):
        return {"plan": name, "measured_loss_mse": loss, "speedup": s, "speedup_lo": s - ci, "speedup_hi": s + ci}

    theirs = [row("a", 1e-4, 1.1), row("b", 1e-2, 1.3)]
    ours = [row("x", 1e-3, 1.3), row("y", 1e-5, 2.0), row("z", 1e-3, 1.2)]
    c = bp.compare_at_equal_loss(ours, theirs)
    assert [x["plan"] for x in c] == ["x", "z"]  # y lies outside their range
    assert c[0]["theirs"] == pytest.approx(1.2)
    assert c[0]["verdict"] == "ahead" and c[1]["verdict"] == "level"


def test_equal_loss_bootstrap_carries_the_loss_measurements_noise():
    """``bootstrap_equal_loss``: with quiet per-sequence loss changes the joint interval is about the timing's and the
    verdict "ahead"; the same plans with loud per-sequence changes (same MSEs) get a wide interval that includes 0 —
    the timing CIs alone would still say "ahead". The interval brackets the point difference."""
    import numpy as np

    rng = np.random.default_rng(0)
    n_seq, rounds = 24, 40
    ref = list(1.0 + 0.005 * rng.standard_normal(rounds))

    def plan(name, mse, speed, loud):
        d = rng.standard_normal(n_seq) * (3.0 if loud else 0.05) + 1.0
        d = d * np.sqrt(mse / np.mean(d ** 2))  # exactly this loss MSE
        t = [r / speed * (1 + 0.002 * e) for r, e in zip(ref, rng.standard_normal(rounds), strict=True)]
        return {"plan": name, "measured_loss_mse": float(np.mean(d ** 2)), "loss_changes": d.tolist()}, t

    for loud, want in ((False, "ahead"), (True, "level")):
        rows, times = [], {"reference": ref}
        for name, mse, speed in (("a", 1e-4, 1.10), ("b", 1e-2, 1.30), ("x", 1e-3, 1.225)):
            r, t = plan(name, mse, speed, loud)
            r.update(bp.speedup_with_ci(ref, t))
            rows.append(r)
            times[name] = t
        c = bp.bootstrap_equal_loss(rows[2:], rows[:2], times, n_boot=400)
        assert len(c) == 1 and c[0]["theirs"] == pytest.approx(1.2, abs=0.01)
        assert c[0]["diff"] > c[0]["timing_ci"]  # the timing CIs alone: ahead
        assert c[0]["lo"] <= c[0]["diff"] <= c[0]["hi"] and c[0]["verdict"] == want, c[0]


def test_autoscheme_per_tensor_candidate_follows_our_int8_record():
    from inc_ipamp.formats import get_format

    f = get_format("int8")
    d = bp.autoscheme_fields("int8")
    assert d["bits"] == f.bits and d["group_size"] == 0 and d["act_dynamic"] and d["act_group_size"] == 0
    assert bp.autoscheme_fields("int8_pc") == "INT8"


def test_dominance_compares_each_peer_plan_with_our_fastest_plan_of_no_more_loss():
    """``dominance``: a zero-loss IP-ET plan (the reference, at budgets where no op gains) that is faster than a peer
    plan is "ahead" of it; a peer plan faster than every IP-ET plan of no more loss is "inconclusive", never
    "behind" (IP-ET spent less loss); a peer plan with less loss than any IP-ET plan gets no row."""
    import numpy as np

    rng = np.random.default_rng(1)
    n_seq, rounds = 16, 40
    ref = list(1.0 + 0.005 * rng.standard_normal(rounds))

    def plan(name, mse, speed):
        d = np.zeros(n_seq) if mse == 0 else rng.standard_normal(n_seq) * 0.1 + 1.0
        if mse:
            d = d * np.sqrt(mse / np.mean(d ** 2))
        t = [r / speed * (1 + 0.002 * e) for r, e in zip(ref, rng.standard_normal(rounds), strict=True)]
        row = {"plan": name, "measured_loss_mse": float(np.mean(d ** 2)), "loss_changes": d.tolist(),
               **bp.speedup_with_ci(ref, t)}
        return row, t

    times = {"reference": ref}
    rows = {}
    for name, mse, speed in (("ours0", 0.0, 1.0), ("ours1", 1e-3, 1.05), ("slow", 1e-4, 0.8), ("fast", 2e-3, 1.3),
                             ("tiny", 1e-6, 0.9)):
        rows[name], times[name] = plan(name, mse, speed)
    c = {r["plan"]: r for r in bp.dominance([rows["ours0"], rows["ours1"]],
                                            [rows["slow"], rows["fast"], rows["tiny"]], times, n_boot=300)}
    assert c["slow"]["verdict"] == "ahead" and c["slow"]["ours_plan"] == "ours0" and c["slow"]["lo"] > 0
    assert c["fast"]["verdict"] == "inconclusive" and c["fast"]["ours_plan"] == "ours1" and c["fast"]["hi"] < 0
    assert c["tiny"]["ours_plan"] == "ours0" and c["tiny"]["verdict"] == "ahead"
    without_reference = bp.dominance([rows["ours1"]], [rows["slow"]], times, n_boot=300)
    assert without_reference == []  # no IP-ET plan with no more loss than 1e-4


def test_compare_treats_a_plan_that_changes_no_op_as_the_reference_program():
    """``compare``: IP-ET's empty plan (no op gains at its budget) is the reference program, so its speedup is 1 by
    identity; what it measured when timed apart is kept as the noise floor, and the peer is judged against 1."""
    import numpy as np

    rng = np.random.default_rng(2)
    ref = list(1.0 + 0.01 * rng.standard_normal(40))
    apart = [t * 1.03 for t in ref]  # the same program, timed apart, 3% slower by chance
    peer = [t / 0.95 for t in ref]
    res = {"tracks": ["fp8"], "timing": {"prefill": {"times_s": {"reference": ref, "IP-ET fp8 reference": apart,
                                                                 "ModelOpt fp8 #1": peer}}},
           "plans": [{"track": "fp8", "method": "IP-ET", "plan": "IP-ET fp8 reference", "assignment": {},
                      "measured_loss_mse": 0.0, "loss_changes": [0.0] * 8},
                     {"track": "fp8", "method": "ModelOpt", "plan": "ModelOpt fp8 #1", "assignment": {"x": "fp8_e4m3"},
                      "measured_loss_mse": 1e-4, "loss_changes": [0.01] * 8}]}
    bp.compare(res, seed=0)
    ours = res["plans"][0]
    assert ours["speedup"] == 1.0 and ours["speedup_lo"] == ours["speedup_hi"] == 1.0
    assert res["noise_floor"]["IP-ET fp8 reference"]["speedup"] == pytest.approx(1 / 1.03, rel=1e-6)
    d = [c for c in res["dominance"] if c["peer"] == "ModelOpt"]
    assert len(d) == 1 and d[0]["verdict"] == "ahead" and d[0]["diff"] == pytest.approx(0.05, abs=1e-6)
