"""Issue 17: `run` evaluates a plan with low-precision KV caches: the ops with the device's kernels, the caches' K and
V rounded with INC's static scales (``apply.fake.with_kv_cache``), their speed reported as not measured here."""

from __future__ import annotations

import json

import pytest

from inc_ipamp.records import Plan, Sensitivity


def test_run_evaluates_a_kv_cache_plan(tmp_path, capsys):
    from inc_ipamp import pipeline as P
    from inc_ipamp.apply.fake import split_kv, with_kv_cache
    from inc_ipamp.cli import main
    from inc_ipamp.evaluate import loss_change, sequence_losses
    from inc_ipamp.gains import get_backend
    from inc_ipamp.kvcache import static_scales

    out = tmp_path / "run"
    quick = ["--layers", "2", "--n-calib", "2", "--n-eval", "2", "--seq-len", "32", "--reps", "3", "--gain-seq-len",
             "32", "--decode-context", "16", "--threads", "1", "--no-lm-head"]
    # a budget that admits everything: the caches go to FP8 with the ops
    assert main(["run", "--out", str(out), *quick, "--formats", "fp32,fp8_e4m3", "--objective", "decode",
                 "--metric", "M", "--kv-cache", "fp8_e4m3", "--beta", "10"]) == 0
    printed = capsys.readouterr().out
    assert "evaluate: skipped" not in printed and "KV cache: 4 cache(s) in fp8_e4m3" in printed
    plan = Plan.load(out / "plan.json")
    ops, kv = split_kv(plan.assignment, plan.reference_format)
    assert len(kv) == 4 and ops  # K and V of both layers, and the ops
    ev = json.loads((out / "evaluation.json").read_text())
    ip = ev["plans"]["ip"]
    assert ip["measured_loss_mse"] > 0 and ip["measured_prefill_s"] > 0 and ip["measured_decode_step_s"] > 0
    assert "static scales" in ev["loss_numerics"] and ev["kv_cache"]["caches"] == sorted(kv)
    assert ev["kv_cache"]["speed"].startswith("not measured")
    # the measured loss is the plan's with its caches: the same plan without them measures another loss
    settings = P.RunSettings.load(out)
    model, tok = P.load(settings)
    backend = get_backend("cpu")
    backend.prepare(model, "fp32")
    blocks = P.blocks(tok, settings, "evaluation")
    ref = sequence_losses(model, blocks)
    sens = Sensitivity.load(out / "sensitivity.json")
    kv_applier = with_kv_cache(backend.apply, lambda kv: static_scales(sens, kv), "fp32")
    with_kv = loss_change(model, blocks, plan.assignment, ref, kv_applier)
    without = loss_change(model, blocks, ops, ref, backend.apply)
    assert with_kv["measured_loss_mse"] == pytest.approx(ip["measured_loss_mse"], rel=1e-6)
    assert with_kv["measured_loss_mse"] != pytest.approx(without["measured_loss_mse"], rel=1e-3)
