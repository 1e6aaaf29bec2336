"""Issue 3: the Taylor sensitivity collector against independent computations and real measurements."""

from __future__ import annotations

import copy
import dataclasses
import random

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from inc_ipamp.apply.fake import fake_quant
from inc_ipamp.errors import SensitivityError
from inc_ipamp.evaluate import measured_loss_mse, sequence_losses
from inc_ipamp.formats import FORMATS, quantize, quantize_weight
from inc_ipamp.sensitivity import calibrate, sequence_loss


def test_weight_sums_match_autograd_param_grads(small_model, calib_blocks, small_sensitivity):
    """Σ_n (W⊙∂loss_n/∂W)² from the hooks equals the same sum from ordinary parameter gradients."""
    model = small_model[0]
    op = "model.layers.1.mlp.down_proj"
    w = dict(model.named_modules())[op].weight
    w.requires_grad_(True)
    try:
        total = 0.0
        for ids in calib_blocks:
            w.grad = None
            sequence_loss(model, ids).sum().backward()
            total += float(((w.detach() * w.grad) ** 2).sum(dtype=torch.float64))
    finally:
        w.requires_grad_(False)
        w.grad = None
    assert small_sensitivity.ops[op].operands["w"].xg2 == pytest.approx(total, rel=1e-3)


def test_activation_sums_are_per_consumer(small_model, calib_blocks, small_sensitivity):
    """q, k and v read the same tensor; each must see only its own gradient share (not the sum)."""
    model = small_model[0]
    attn = model.model.layers[0].self_attn
    captured = {}

    def grab(name):
        def pre(mod, args):
            x = args[0].detach().requires_grad_(True)
            captured.setdefault(name, []).append(x)
            return (x,)
        return pre

    hs = [getattr(attn, n).register_forward_pre_hook(grab(n)) for n in ("q_proj", "k_proj")]
    try:
        want = {"q_proj": 0.0, "k_proj": 0.0}
        for ids in calib_blocks:
            captured.clear()
            loss = sequence_loss(model, ids).sum()
            grads = torch.autograd.grad(loss, [captured["q_proj"][0], captured["k_proj"][0]])
            for n, x, g in zip(want, (captured["q_proj"][0], captured["k_proj"][0]), grads, strict=True):
                want[n] += float(((x * g) ** 2).sum(dtype=torch.float64))
    finally:
        for h in hs:
            h.remove()
    for n in want:
        got = small_sensitivity.ops[f"model.layers.0.self_attn.{n}"].operands["x"].xg2
        assert got == pytest.approx(want[n], rel=1e-3)
    assert want["q_proj"] != pytest.approx(want["k_proj"], rel=0.05)


def test_every_op_reached_with_shapes_and_macs(small_sensitivity):
    s = small_sensitivity
    assert not s.unreached and s.n_samples == 4 and 1 < s.mean_loss < 6
    qk = s.ops["model.layers.0.self_attn.matmul_qk"]
    assert qk.shapes["a"] == [1, 9, 64, 64] and qk.shapes["b"] == [1, 9, 64, 64]
    assert qk.macs == 9 * 64 * 64 * 64
    q = s.ops["model.layers.0.self_attn.q_proj"]
    assert q.macs == 64 * 576 * 576 and q.weight_numel == 576 * 576
    for op in s.ops.values():
        assert set(op.operands) == ({"x", "w", "y"} if op.kind == "linear" else {"a", "b", "y"})
        for k, st in op.operands.items():  # the output operand: for the formats whose kernel rounds it (bf16)
            assert st.g2 > 0 and set(st.emp) == ({"bf16"} if k == "y" else set(s.formats))


def test_prediction_is_additive_and_zero_for_reference(small_sensitivity):
    s = small_sensitivity
    ops = list(s.ops)[:5]
    assert s.predict({o: "fp32" for o in ops}) == 0.0
    # second moments add over ops; with the shift on, the variances add and the mean shifts add before squaring
    parts = sum(s.predict({o: "int8"}, shift=False) for o in ops)
    assert s.predict(dict.fromkeys(ops, "int8"), shift=False) == pytest.approx(parts)
    var = sum(s.term(o, "int8") for o in ops)
    assert s.predict(dict.fromkeys(ops, "int8")) == pytest.approx(var + sum(s.shift(o, "int8") for o in ops) ** 2)
    # fewer mantissa bits => more noise, for both noise models
    for noise in ("uniform", "empirical"):
        assert s.predict({ops[0]: "bf16"}, noise) < s.predict({ops[0]: "fp8_e4m3"}, noise) < s.predict(
            {ops[0]: "fp8_e5m2"}, noise)


def test_single_op_bf16_prediction_matches_measurement(small_model, calib_blocks, small_sensitivity):
    """BF16 noise is small, so the first-order model must be close for single ops: the median over ops of several
    kinds and depths. One op alone on 4 sequences of 64 tokens is not a test: over 4-article sets and block
    positions the 7 ops' ratios scattered 0.09-7.8 (medians 0.5-2.1); layer 0's down_proj measured 0.085x its
    prediction on these 4 article openings, 1.16x on 4 consecutive blocks of one article."""
    model = small_model[0]
    ref = sequence_losses(model, calib_blocks)
    ops = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.matmul_av", "model.layers.5.mlp.down_proj",
           "model.layers.10.self_attn.q_proj", "model.layers.15.mlp.up_proj", "model.layers.20.self_attn.matmul_qk",
           "model.layers.25.self_attn.o_proj"]
    ratios = {op: measured_loss_mse(model, calib_blocks, {op: "bf16"}, ref) / small_sensitivity.predict({op: "bf16"})
              for op in ops}
    assert 0.33 < float(np.median(list(ratios.values()))) < 3, ratios
    assert all(0.02 < r < 50 for r in ratios.values()), ratios


def test_predicted_ranks_measured_over_random_assignments(small_model, calib_blocks, small_sensitivity):
    model = small_model[0]
    ref = sequence_losses(model, calib_blocks)
    ops = list(small_sensitivity.ops)
    rng = random.Random(1)
    pred, meas = [], []
    for fmt in ("fp8_e4m3", "int8_pc"):
        for _ in range(6):
            a = {o: fmt for o in ops if rng.random() < rng.choice([0.1, 0.3, 0.7])} or {ops[0]: fmt}
            pred.append(small_sensitivity.predict(a))
            meas.append(measured_loss_mse(model, calib_blocks, a, ref))
    rho = spearmanr(pred, meas)[0]
    ratio = np.median(np.array(meas) / np.array(pred))
    assert rho > 0.75, rho
    assert 0.25 < ratio < 4, ratio


def test_fake_quant_restores_weights(small_model, calib_blocks):
    model = small_model[0]
    up = model.model.layers[0].mlp.up_proj
    before = up.weight.detach().clone()
    with fake_quant(model, {"model.layers.0.mlp.up_proj": "int8"}):
        assert not torch.equal(up.weight, before)
        assert torch.equal(up.weight, quantize_weight(before, FORMATS["int8"]))
    assert torch.equal(up.weight, before)


def test_fake_quant_of_lm_head_leaves_tied_embedding_alone(small_model):
    """SmolLM2 ties lm_head to the input embedding: quantising lm_head must not quantise the embedding."""
    model = small_model[0]
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight is emb
    before = emb.detach().clone()
    with fake_quant(model, {"lm_head": "fp8_e4m3"}):
        assert torch.equal(model.get_input_embeddings().weight, before)
        assert not torch.equal(model.lm_head.weight, before)
    assert model.lm_head.weight is emb and torch.equal(emb, before)


def test_quantize_formats_are_real():
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.equal(quantize(x, "fp32"), x)
    q = quantize(x, "fp8_e4m3")
    s = x.abs().max() / 448
    assert torch.equal(((q / s).to(torch.float8_e4m3fn).float() * s), q) and not torch.equal(q, x)
    qi = quantize_weight(x, "int8")
    steps = qi / (x.abs().max() / 127)
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 127 + 1e-4
    pc = quantize_weight(x, "int8_pc")
    assert (pc - x).abs().max() <= (qi - x).abs().max() + 1e-6
    # activations: an affine grid of 128 levels from min to max (the CPU kernel's reduce_range uint8)
    qa = quantize(x, "int8")
    step = float((x.max() - x.min()) / 127)
    assert len(qa.unique()) <= 128 and float((qa - x).abs().max()) <= step / 2 + 1e-6


def test_nan_weights_give_clear_error(small_model, calib_blocks):
    model = small_model[0]
    w = model.model.layers[1].mlp.up_proj.weight
    saved = w.detach().clone()
    w.data[0, 0] = float("nan")
    try:
        with pytest.raises(SensitivityError, match="non-finite calibration loss"):
            calibrate(model, calib_blocks, ["int8"], progress=False)
    finally:
        w.data.copy_(saved)


def test_non_finite_gradient_names_the_op(small_model, calib_blocks):
    model = small_model[0]
    h = model.model.layers[1].register_full_backward_pre_hook(lambda m, g: (g[0] * float("inf"),))
    try:
        with pytest.raises(SensitivityError, match=r"model\.layers\.\d\."):
            calibrate(model, calib_blocks, ["int8"], progress=False)
    finally:
        h.remove()


def test_batching_does_not_change_the_statistics():
    """Per-sequence scales, losses and weight gradients: batches of 4 (+ a remainder of 2) give the record of
    batches of one. A float64 model, because in float32 the batched GEMMs' last-bit differences flip a few
    roundings and move the coherent sums by ~1-20% (measured on SmolLM2), which would hide a real bug."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from inc_ipamp.ops import install_attention

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(cfg).eval().double()
    install_attention(model)
    ids = torch.randint(0, 256, (6, 32))
    one = calibrate(model, [ids], progress=False, batch_size=1, noise="all")
    four = calibrate(model, [ids], progress=False, batch_size=4, noise="all")
    assert one.n_samples == four.n_samples == 6 and one.mean_loss == pytest.approx(four.mean_loss, rel=1e-6)
    for name, op in four.ops.items():
        assert op.shapes == one.ops[name].shapes and op.macs == one.ops[name].macs
        for operand, st in op.operands.items():
            o = one.ops[name].operands[operand]
            assert o.amax == st.amax and o.numel == st.numel
            for field in ("xg2", "g2", "x2"):
                assert getattr(o, field) == pytest.approx(getattr(st, field), rel=1e-9), (name, operand, field)
            for field in ("emp", "coh", "err2", "int_uniform"):
                got, want = getattr(o, field), getattr(st, field)
                assert got.keys() == want.keys() and (want or field == "int_uniform" or operand == "w")
                for f, v in want.items():
                    assert got[f] == pytest.approx(v, rel=1e-9), (name, operand, field, f)
    with pytest.raises(SensitivityError, match="batch size"):
        calibrate(model, [ids], progress=False, batch_size=0)


def test_unreached_op_is_reported(small_model, calib_blocks):
    model = small_model[0]
    model.model.unused_proj = nn.Linear(4, 4)
    try:
        s = calibrate(model, list(calib_blocks)[:1], ["int8"], progress=False)
    finally:
        del model.model.unused_proj
    assert s.unreached == ["model.unused_proj"]


def test_streamed_blocks_and_record_roundtrip(tmp_path, small_model, calib_blocks, small_sensitivity):
    from inc_ipamp.records import Sensitivity

    s = calibrate(small_model[0], (b for b in calib_blocks), progress=False, noise="all")  # a generator, no len()
    assert s.n_samples == 4
    op = "model.layers.1.mlp.gate_proj"
    assert s.term(op, "int8") == pytest.approx(small_sensitivity.term(op, "int8"), rel=1e-6)
    path = s.save(tmp_path / "sens.json")
    again = Sensitivity.load(path)
    assert again.term(op, "fp8_e4m3", "uniform") == s.term(op, "fp8_e4m3", "uniform")
    path.write_text(path.read_text()[:100])
    from inc_ipamp.errors import ArtifactError

    with pytest.raises(ArtifactError, match="corrupt"):
        Sensitivity.load(path)


def test_mean_shifts_match_in_sample(small_model, calib_blocks, monkeypatch):
    """On the calibration sequences, each op's mean shift (first-order sample mean of both operands + its own
    curvature term: ``FIRST_ORDER_SHIFT`` on, ``FIRST_ORDER_ESTIMATE`` "own", as in-sample the sample mean is the right
    estimate) is its measured mean loss change, and a large guarded INT8 plan's loss MSE is within 3x of noise +
    (Σ shift)²; switched off, the shift is the curvature part alone. Out of sample and across domains, with the
    type-level default: benchmarks/results/sensitivity_int8_v5.md."""
    from inc_ipamp import lossmodel
    from inc_ipamp.apply.fake import fake_quant
    from inc_ipamp.evaluate import sequence_losses

    model = small_model[0]
    s = calibrate(model, calib_blocks, ["int8"], progress=False, curvature_share=1.0)
    op = "model.layers.1.mlp.down_proj"
    monkeypatch.setattr(lossmodel, "FIRST_ORDER_SHIFT", False)
    curv_only = s.shift(op, "int8")  # switched off: ½ curvature alone, never negative
    assert curv_only == pytest.approx(0.5 * sum(st.curv["int8"] for st in s.ops[op].operands.values())
                                      / s.n_curvature) and curv_only > 0
    monkeypatch.setattr(lossmodel, "FIRST_ORDER_SHIFT", True)
    monkeypatch.setattr(lossmodel, "FIRST_ORDER_ESTIMATE", "own")
    assert s.has_curvature and s.n_curvature == s.n_samples
    assert all(st.curv and st.lin for op in s.ops.values() for st in op.operands.values())
    plan = {o: "int8" for o in s.op_names if s.sqnr_db(o, "int8") >= 25}
    assert 80 < len(plan) < len(s.ops)
    ref = sequence_losses(model, calib_blocks)
    for op in sorted(plan, key=lambda o: -abs(s.shift(o, "int8")))[:4]:
        with fake_quant(model, {op: "int8"}):
            measured = float((sequence_losses(model, calib_blocks) - ref).mean())
        assert 0.5 < measured / s.shift(op, "int8") < 2, op
    with fake_quant(model, plan):
        d = sequence_losses(model, calib_blocks) - ref
    # ~100 INT8 ops: 3.45x on these 4 article openings (cross terms between ops are not modelled: docs/METHOD.md,
    # "Known limitations"), under 3x on 4 consecutive blocks of one article
    assert 1 / 4 < float((d ** 2).mean()) / s.predict(plan) < 4
    # a record without curvature still has the first-order mean shift, and only that
    plain = calibrate(model, list(calib_blocks)[:1], ["int8"], progress=False, curvature=False)
    st = plain.ops["lm_head"].operands
    assert not plain.has_curvature and plain.shift("lm_head", "int8") == pytest.approx(
        (st["x"].lin["int8"] + st["w"].lin["int8"]) / plain.n_samples)


# -- the loss model's terms, each against an independent computation (issue 13) --------------------------------------
def _tiny(seed: int = 0) -> nn.Module:
    """2-layer random Llama in float64 (4 query heads over 2 KV heads: GQA), attention routed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from inc_ipamp.ops import install_attention

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(cfg).eval().double()
    install_attention(model)
    return model


def test_weight_first_order_change_per_sequence_matches_autograd():
    """d_n = Σ ∂loss_n/∂W ⊙ (Q(W) − W): the weight's error is fixed, so its effect on a sequence is one coherent sum;
    its Σ_n d_n (mean shift) and Σ_n d_n² (second moment) come from ordinary parameter gradients here."""
    from inc_ipamp.formats import quantize_weight

    model = _tiny()
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    s = calibrate(model, [ids], ["int8", "fp8_e4m3"], progress=False, curvature=False)
    op = "model.layers.1.mlp.up_proj"
    w = dict(model.named_modules())[op].weight
    w.requires_grad_(True)
    try:
        dia: dict[str, float] = {}
        for fmt in ("int8", "fp8_e4m3"):
            e = quantize_weight(w.detach(), fmt) - w.detach()
            d = []
            for row in ids:
                (g,) = torch.autograd.grad(sequence_loss(model, row[None]).sum(), [w])
                d.append(float((g * e).sum()))
                dia[fmt] = dia.get(fmt, 0.0) + float(((g * e) ** 2).sum())  # the weight gradient's terms
            st = s.ops[op].operands["w"]
            assert st.lin[fmt] == pytest.approx(sum(d), rel=1e-6, abs=1e-12)
            assert st.seq[fmt] == pytest.approx(d, rel=1e-6, abs=1e-12)  # each sequence's, in calibration order
            assert st.coh[fmt] == pytest.approx(sum(v * v for v in d), rel=1e-6)
            assert st.dia[fmt] == pytest.approx(dia[fmt], rel=1e-6)
    finally:
        w.requires_grad_(False)


def test_weight_changes_from_output_errors_equal_those_from_weight_gradients(monkeypatch):
    """One format with the curvature pass takes d_n = Σ_t g_y,t·(E x_t) (one GEMM per format, made in the forward)
    instead of Σ g_W,n ⊙ E (one GEMM per backward pass): the same first-order and curvature sums, and against
    ordinary parameter gradients."""
    from inc_ipamp.formats import quantize_weight
    from inc_ipamp.sensitivity import _Collector

    model = _tiny()
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(5))
    seen = []
    by_output = _Collector._by_output
    monkeypatch.setattr(_Collector, "_by_output", lambda self: seen.append(by_output(self)) or seen[-1])
    fast = calibrate(model, [ids], ["int8"], progress=False, batch_size=2)
    assert any(seen)  # the output-error route was taken
    monkeypatch.setattr(_Collector, "_by_output", lambda self: False)
    slow = calibrate(model, [ids], ["int8"], progress=False, batch_size=2)
    for op, rec in slow.ops.items():
        if rec.kind != "linear":
            continue
        a, b = fast.ops[op].operands["w"], rec.operands["w"]
        for field in ("coh", "lin", "curv"):
            assert getattr(a, field)["int8"] == pytest.approx(getattr(b, field)["int8"], rel=1e-4, abs=1e-12), \
                (op, field)
        assert a.err2 == pytest.approx(b.err2) and a.x2 == pytest.approx(b.x2)
    op = "model.layers.0.self_attn.o_proj"
    w = dict(model.named_modules())[op].weight
    e = quantize_weight(w.detach(), "int8") - w.detach()
    w.requires_grad_(True)
    try:
        d = [float((torch.autograd.grad(sequence_loss(model, row[None]).sum(), [w])[0] * e).sum()) for row in ids]
    finally:
        w.requires_grad_(False)
    st = fast.ops[op].operands["w"]
    assert st.lin["int8"] == pytest.approx(sum(d), rel=1e-5, abs=1e-12)
    assert st.seq["int8"] == pytest.approx(d, rel=1e-5, abs=1e-12)
    assert st.coh["int8"] == pytest.approx(sum(v * v for v in d), rel=1e-5)
    # the diagonal sum of this route squares the output's terms g_y ⊙ E x (the gradient route's: g_W ⊙ E)
    dia = 0.0
    for row in ids:
        (x, y), (gy,) = _input_output_grad(model, op, row[None], "output")
        dia += float(((gy * (x @ e.t())) ** 2).sum())
    assert st.dia["int8"] == pytest.approx(dia, rel=1e-5)


def _input_output_grad(model, op: str, ids: torch.Tensor, wrt: str):
    """(input, output) of module ``op`` in one forward of ``ids`` and the loss gradient w.r.t. the ``wrt`` one."""
    got = []
    h = dict(model.named_modules())[op].register_forward_hook(lambda m, a, out: got.append((a[0], out)))
    try:
        loss = sequence_loss(model, ids).sum()
    finally:
        h.remove()
    x, y = got[0]
    return (x.detach(), y.detach()), torch.autograd.grad(loss, [x if wrt == "input" else y])


def test_activation_diagonal_sum_matches_autograd():
    """An activation's diagonal sum is Σ_n Σ (g_x ⊙ e_x)², the terms of its coherent d_n squared before adding
    (per-sequence scales), against gradients w.r.t. the op's input taken by autograd one sequence at a time."""
    from inc_ipamp.formats import quantize

    model = _tiny()
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(4))
    s = calibrate(model, [ids], ["int8"], progress=False)
    op = "model.layers.1.mlp.down_proj"
    dia = coh = 0.0
    seq: list[float] = []
    for row in ids:
        (x, _), (gx,) = _input_output_grad(model, op, row[None], "input")
        ge = gx * (quantize(x, "int8", -1, per_sample=True) - x)
        dia += float((ge ** 2).sum())
        coh += float(ge.sum()) ** 2
        seq.append(float(ge.sum()))
    st = s.ops[op].operands["x"]
    assert st.seq["int8"] == pytest.approx(seq, rel=1e-6)  # an activation's d_n, sequence by sequence
    assert st.coh["int8"] == pytest.approx(coh, rel=1e-6)
    assert st.dia["int8"] == pytest.approx(dia, rel=1e-6)


def test_gqa_copies_share_one_rounding_error(monkeypatch):
    """K/V heads are repeated before the products: the diagonal sum must use the gradient of the un-repeated tensor
    (Σ over copies), which autograd gives directly when the tensor is captured before ``_repeat_kv``."""
    import inc_ipamp.ops as ops_mod

    model = _tiny()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    s = calibrate(model, [ids], ["fp8_e4m3", "int8_pc"], progress=False, curvature=False, noise="all")
    captured: list[torch.Tensor] = []
    orig = ops_mod._repeat_kv

    def capture(x, n_rep):  # layer 0's key and value only: a leaf in a later layer would cut the paths through it
        if len(captured) < 2:
            x = x.detach().requires_grad_(True)
            captured.append(x)
        return orig(x, n_rep)

    monkeypatch.setattr(ops_mod, "_repeat_kv", capture)
    want = {("matmul_qk", f): 0.0 for f in s.formats} | {("matmul_av", f): 0.0 for f in s.formats}
    for row in ids:
        captured.clear()
        loss = sequence_loss(model, row[None]).sum()
        key, value = captured[0], captured[1]  # layer 0: key then value
        gk, gv = torch.autograd.grad(loss, [key, value])
        for f in s.formats:
            ek = quantize(key.detach().transpose(-1, -2), f, -2).transpose(-1, -2) - key.detach()
            ev = quantize(value.detach(), f, -2) - value.detach()
            want["matmul_qk", f] += float(((gk * ek) ** 2).sum())
            want["matmul_av", f] += float(((gv * ev) ** 2).sum())
    for (op, f), v in want.items():
        assert s.ops[f"model.layers.0.self_attn.{op}"].operands["b"].emp[f] == pytest.approx(v, rel=1e-6), (op, f)


def test_first_order_means_are_shrunk_toward_their_op_types_mean(monkeypatch):
    """``FIRST_ORDER_ESTIMATE`` "shrunk" (loss model v4): empirical Bayes over the layers (``lossmodel.shrink``),
    against numbers computed by hand: 30 layers whose per-sequence first-order changes are noise around one true mean
    come out at the pooled mean; layers whose means differ by far more than their standard errors keep their own; a
    single op (lm_head) keeps its sample mean."""
    from inc_ipamp import lossmodel

    monkeypatch.setattr(lossmodel, "FIRST_ORDER_ESTIMATE", "shrunk")
    from inc_ipamp.records import OperandStats, OpSensitivity, Sensitivity

    rng = random.Random(0)
    n = 8

    def record(true_means: list[float], sd: float) -> Sensitivity:
        ops = {}
        for i, mu in enumerate(true_means + [0.5]):
            name = f"model.layers.{i}.mlp.down_proj" if i < len(true_means) else "lm_head"
            d = [mu + rng.gauss(0.0, sd) for _ in range(n)]
            st = OperandStats(coh={"int8": sum(x * x for x in d)}, lin={"int8": sum(d)}, curv={"int8": 0.0})
            ops[name] = OpSensitivity(name, "linear", operands={"x": st})
        return Sensitivity("m", n, 16, 3.0, ["int8"], ops, n_curvature=n)

    same = record([0.01] * 30, sd=0.05)
    raw = [st.lin["int8"] / n for o, st in ((o, o.operands["x"]) for o in same.ops.values()) if o.name != "lm_head"]
    se2 = [(same.ops[f"model.layers.{i}.mlp.down_proj"].operands["x"].coh["int8"] / n - m * m) / (n - 1)
           for i, m in enumerate(raw)]
    mu = sum(raw) / 30
    tau2 = max(sum((m - mu) ** 2 for m in raw) / 29 - sum(se2) / 30, 0.0)
    by_hand = [mu + tau2 / (tau2 + e) * (m - mu) for m, e in zip(raw, se2, strict=True)]
    got = [same.first_order_mean(f"model.layers.{i}.mlp.down_proj", "x", "int8") for i in range(30)]
    assert got == pytest.approx(by_hand, rel=1e-9, abs=1e-15)
    assert max(got) - min(got) < 0.3 * (max(raw) - min(raw))  # the noise is mostly gone
    assert same.first_order_mean("lm_head", "x", "int8") == same.ops["lm_head"].operands["x"].lin["int8"] / n
    apart = record([0.01 * i for i in range(30)], sd=0.001)
    for i in range(30):
        op = f"model.layers.{i}.mlp.down_proj"
        assert apart.first_order_mean(op, "x", "int8") == pytest.approx(
            apart.ops[op].operands["x"].lin["int8"] / n, rel=0.02, abs=1e-4)
    lossmodel_shift = same.shift("model.layers.3.mlp.down_proj", "int8")
    assert lossmodel_shift == pytest.approx(got[3])  # the shift uses it (no curvature in this record)


def _seq_record(seqs: dict[str, list[float]], n: int, curv: dict[str, float] | None = None):
    from inc_ipamp.records import OperandStats, OpSensitivity, Sensitivity

    ops = {name: OpSensitivity(name, "linear", operands={"x": OperandStats(
        coh={"int8": sum(v * v for v in d)}, lin={"int8": sum(d)}, seq={"int8": d},
        curv={"int8": (curv or {}).get(name, 0.0)})}) for name, d in seqs.items()}
    return Sensitivity("m", n, 16, 3.0, ["int8"], ops, n_curvature=n)


def test_first_order_mean_is_tested_on_the_types_per_sequence_totals(monkeypatch):
    """The default (``FIRST_ORDER_ESTIMATE`` "tested"): one estimate per op type, m·max(0, 1 − λ²SE²/m²) with m the
    type's mean, SE from its per-sequence totals and λ² = 2 ln(number of types), spread over the type's ops by their
    curvature terms, against numbers computed by hand. Layers whose changes share one per-sequence noise (the
    calibration sequences are the same for every layer) around a true mean of 0 get 0, though the layers agree with
    each other on it; layers with a real common mean keep most of it, the ones with small curvature less; a single op
    is a type of its own. (v4's per-op shrinkage took the layers' pooled mean as exact: with the noise common to all
    layers, it kept the shared noise whole.)"""
    import math
    import statistics

    from inc_ipamp import lossmodel
    from inc_ipamp.errors import ArtifactError

    assert lossmodel.FIRST_ORDER_ESTIMATE == "tested"
    rng = random.Random(3)
    n = 8
    common = [rng.gauss(0.0, 0.01) for _ in range(n)]
    common = [c - statistics.fmean(common) + 0.003 for c in common]  # sample mean 0.003, true mean 0
    seqs = {f"model.layers.{i}.mlp.gate_proj": [c + rng.gauss(0.0, 0.0005) for c in common] for i in range(30)}
    seqs |= {f"model.layers.{i}.self_attn.v_proj": [-0.002 + rng.gauss(0.0, 0.0003) + 0.0002 * c for c in common]
             for i in range(30)}
    seqs["lm_head"] = [0.01 * (k % 2) + 0.004 for k in range(n)]
    curv = {f"model.layers.{i}.self_attn.v_proj": 0.001 * (i + 1) for i in range(30)}
    rec = _seq_record(seqs, n, curv)
    lam2 = 2 * math.log(3)  # three types

    def by_hand(names):
        tot = [sum(seqs[x][k] for x in names) for k in range(n)]
        m = statistics.fmean(tot) / len(names)
        se2 = statistics.variance(tot) / (n * len(names) ** 2)
        return m * max(0.0, 1.0 - lam2 * se2 / m ** 2)

    gates = [x for x in seqs if x.endswith("gate_proj")]
    assert [rec.first_order_mean(x, "x", "int8") for x in gates] == [0.0] * 30  # within λ SEs: counts as 0
    assert by_hand(gates) == 0.0
    vs = [x for x in seqs if x.endswith("v_proj")]
    want = by_hand(vs)
    assert want == pytest.approx(-0.002, rel=0.05)
    got = [rec.first_order_mean(x, "x", "int8") for x in vs]
    assert got == pytest.approx([want * 30 * curv[x] / sum(curv.values()) for x in vs], rel=1e-12)
    assert rec.first_order_mean("lm_head", "x", "int8") == pytest.approx(by_hand(["lm_head"]), rel=1e-12)
    assert 0 < by_hand(["lm_head"]) < 0.009  # one op, 8 sequences: a real mean 0.009, shrunk a little
    monkeypatch.setattr(lossmodel, "FIRST_ORDER_ESTIMATE", "shrunk")
    shrunk = _seq_record(seqs, n).first_order_mean(gates[0], "x", "int8")
    monkeypatch.setattr(lossmodel, "FIRST_ORDER_ESTIMATE", "tested")
    assert shrunk == pytest.approx(0.003, rel=0.1)  # per-op shrinkage keeps the shared noise
    no_seq = _seq_record(seqs, n)
    no_seq.ops[gates[0]].operands["x"].seq = {}
    with pytest.raises(ArtifactError, match="rerun calibrate"):
        no_seq.first_order_mean(gates[0], "x", "int8")


def test_noise_variance_is_its_types_ratio_times_its_diagonal_sum():
    """``POOL_NOISE``: an op's coherent variance is r_type · dia/N, r_type = Σ_type Var(d) / Σ_type dia/N, against
    numbers computed by hand; switched off, or for an op without a type (lm_head), its own sample variance."""
    from inc_ipamp import lossmodel
    from inc_ipamp.records import OperandStats, OpSensitivity, Sensitivity

    rng = random.Random(1)
    n, ops, own, dia = 8, {}, {}, {}
    for i in range(12):
        name = f"model.layers.{i}.self_attn.v_proj" if i < 11 else "lm_head"
        d = [rng.gauss(0.002, 0.01) for _ in range(n)]
        dia[name] = sum(x * x for x in d) * rng.uniform(0.5, 2.0)
        st = OperandStats(coh={"int8": sum(x * x for x in d)}, lin={"int8": sum(d)}, dia={"int8": dia[name]})
        own[name] = st.coh["int8"] / n - (st.lin["int8"] / n) ** 2
        ops[name] = OpSensitivity(name, "linear", operands={"x": st})
    rec = Sensitivity("m", n, 16, 3.0, ["int8"], ops, n_curvature=0)
    layers = [x for x in ops if x != "lm_head"]
    r = sum(own[x] for x in layers) / sum(dia[x] / n for x in layers)
    for x in layers:
        assert rec.noise_variance(x, "x", "int8") == pytest.approx(r * dia[x] / n, rel=1e-12)
        assert rec.term(x, "int8") == pytest.approx(r * dia[x] / n, rel=1e-12)
    assert rec.noise_variance("lm_head", "x", "int8") == pytest.approx(own["lm_head"])
    assert sum(rec.noise_variance(x, "x", "int8") for x in layers) == pytest.approx(sum(own[x] for x in layers))
    assert lossmodel.POOL_NOISE
    fresh = Sensitivity("m", n, 16, 3.0, ["int8"], ops, n_curvature=0)
    lossmodel.POOL_NOISE = False
    try:
        assert fresh.noise_variance(layers[0], "x", "int8") == pytest.approx(own[layers[0]])
    finally:
        lossmodel.POOL_NOISE = True


def test_a_copy_with_changed_sums_predicts_from_its_own():
    """The pooled estimators are cached per record; a deep copy (or pickle) starts without the cache, so changing the
    copy's sums after the original has predicted changes the copy's prediction (``LossModel.__getstate__``)."""
    import copy
    import pickle

    from inc_ipamp.records import OperandStats, OpSensitivity, Sensitivity

    n = 8
    seqs = [[0.02 * i + 0.01 * (k % 3) for k in range(n)] for i in range(4)]
    ops = {f"model.layers.{i}.mlp.up_proj": OpSensitivity(f"model.layers.{i}.mlp.up_proj", "linear", operands={
        "x": OperandStats(coh={"int8": sum(v * v for v in d)}, lin={"int8": sum(d)}, seq={"int8": d},
                          dia={"int8": 0.1})}) for i, d in enumerate(seqs)}
    rec = Sensitivity("m", n, 16, 3.0, ["int8"], ops, n_curvature=0)
    op = "model.layers.0.mlp.up_proj"
    before = (rec.first_order_mean(op, "x", "int8"), rec.noise_variance(op, "x", "int8"))
    for twin in (copy.deepcopy(rec), pickle.loads(pickle.dumps(rec))):
        for o in twin.ops.values():
            o.operands["x"].lin["int8"] *= 3.0
            o.operands["x"].seq["int8"] = [3.0 * v for v in o.operands["x"].seq["int8"]]
            o.operands["x"].coh["int8"] *= 2.0
        after = (twin.first_order_mean(op, "x", "int8"), twin.noise_variance(op, "x", "int8"))
        assert after[0] == pytest.approx(3.0 * before[0]) and after[1] != pytest.approx(before[1])
    assert (rec.first_order_mean(op, "x", "int8"), rec.noise_variance(op, "x", "int8")) == before


def test_mean_is_not_counted_twice():
    """A constant first-order change c on every sequence has E[Δ²] = c² (variance 0, mean c), not 2c²."""
    from inc_ipamp.records import OperandStats, OpSensitivity, Sensitivity

    n, c = 8, 0.03
    st = OperandStats(coh={"int8": n * c * c}, lin={"int8": n * c}, seq={"int8": [c] * n}, curv={"int8": 0.0},
                      emp={"int8": 1.0})
    rec = Sensitivity("m", n, 16, 3.0, ["int8"], {"op": OpSensitivity("op", "linear", operands={"x": st})},
                      n_curvature=n)
    assert rec.predict({"op": "int8"}, "coherent") == pytest.approx(c * c)
    assert rec.predict({"op": "int8"}, "coherent", shift=False) == pytest.approx(c * c)


def test_curvature_is_weighted_by_each_sequences_length(monkeypatch):
    """Sequences of different lengths: the record of both is the sequence-weighted mean of each one's own (the sampled
    labels are seeded by each sequence's tokens, so they are the same in every run). Each op's own first-order mean
    (a sum, like the curvature's), not the type estimate, which is not additive over records."""
    from inc_ipamp import lossmodel

    monkeypatch.setattr(lossmodel, "FIRST_ORDER_ESTIMATE", "own")
    model = _tiny()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 256, (1, 40), generator=g), torch.randint(0, 256, (1, 12), generator=g)
    both = calibrate(model, [a, b], ["int8"], progress=False)
    sa = calibrate(model, [a], ["int8"], progress=False)
    sb = calibrate(model, [b], ["int8"], progress=False)
    for op in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.matmul_av", "lm_head"):
        assert both.shift(op, "int8") == pytest.approx((sa.shift(op, "int8") + sb.shift(op, "int8")) / 2, rel=1e-6)


def test_curvature_share_spreads_the_second_backward():
    model = _tiny()
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(4))
    full = calibrate(model, [ids], ["int8"], progress=False, curvature_share=1.0)
    quarter = calibrate(model, [ids], ["int8"], progress=False, curvature_share=0.25)
    assert full.n_curvature == 8 and quarter.n_curvature == 2 and quarter.n_samples == 8
    # fewer batches than 1/share: the first batch still gets the pass (no silent loss of the shift's second order)
    assert calibrate(model, [ids[:2]], ["int8"], progress=False, curvature_share=0.25).n_curvature == 1
    op = "model.layers.0.mlp.down_proj"
    assert quarter.ops[op].operands["x"].emp == full.ops[op].operands["x"].emp  # first pass untouched
    with pytest.raises(SensitivityError, match="curvature_share"):
        calibrate(model, [ids], ["int8"], progress=False, curvature_share=0.0)


def test_old_sensitivity_records_are_refused(tmp_path, tiny_llama):
    from inc_ipamp.errors import ArtifactError
    from inc_ipamp.io import load_json, save_json
    from inc_ipamp.records import Sensitivity

    model = _tiny()
    path = calibrate(model, [torch.randint(0, 256, (1, 8))], ["int8"], progress=False).save(tmp_path / "s.json")
    d = load_json(path, "s")
    del d["version"]
    save_json(d, path)
    with pytest.raises(ArtifactError, match="version 1.*rerun calibrate"):
        Sensitivity.load(path)


def test_tied_lm_head_frees_no_memory():
    """SmolLM2 ties lm_head to the embedding: a low-precision lm_head adds its bytes, the shared fp32 tensor stays."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from inc_ipamp.gains.theory import memory_gain
    from inc_ipamp.ops import install_attention, tied_linears

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    install_attention(model)
    assert tied_linears(model) == {"lm_head"}
    s = calibrate(model, [torch.randint(0, 256, (1, 8))], ["int8"], progress=False, curvature=False)
    assert s.ops["lm_head"].tied and not s.ops["model.layers.0.mlp.up_proj"].tied
    assert memory_gain("linear", [[1, 8, 64], [256, 64]], "fp32", "int8", tied=True) == -256 * 64
    assert memory_gain("linear", [[1, 8, 64], [256, 64]], "fp32", "int8") == 256 * 64 * 3


def test_default_calibration_collects_only_what_auto_reads(small_model, calib_blocks, small_sensitivity):
    """The default (coherent) record skips the diagonal models' sums, leaves every sum it keeps as the full record's,
    and refuses a prediction with a model it did not collect, naming the fix."""
    from inc_ipamp.errors import ArtifactError

    s = calibrate(small_model[0], calib_blocks, progress=False)
    assert s.noise_models == ["coherent"] and small_sensitivity.noise_models == ["coherent", "empirical", "uniform"]
    for name, op in s.ops.items():
        for k, st in op.operands.items():
            full = small_sensitivity.ops[name].operands[k]
            for f in ("coh", "lin", "curv", "err2"):
                assert getattr(st, f) == pytest.approx(getattr(full, f), rel=1e-9, abs=1e-30), (name, k, f)
            assert (st.x2, st.amax) == pytest.approx((full.x2, full.amax), rel=1e-9)
            assert st.emp == {} and st.int_uniform == {} and st.g2 == 0.0
    ops = dict.fromkeys(list(s.ops)[:6], "int8")
    assert s.predict(ops) == pytest.approx(small_sensitivity.predict(ops), rel=1e-9)
    for noise in ("empirical", "uniform"):
        with pytest.raises(ArtifactError, match=f"rerun calibrate with --noise {noise}"):
            s.predict(ops, noise)
    with pytest.raises(SensitivityError, match="noise model must be one of"):
        calibrate(small_model[0], calib_blocks, progress=False, noise="gaussian")


def test_noise_models_survive_a_save(tmp_path, small_model):
    from inc_ipamp.records import Sensitivity

    s = calibrate(small_model[0], [torch.randint(0, 256, (1, 8))], ["int8"], progress=False, curvature=False)
    assert Sensitivity.load(s.save(tmp_path / "s.json")).noise_models == ["coherent"]


def test_bf16_output_rounding_is_a_term_of_its_own(small_model, calib_blocks, small_sensitivity):
    """A bf16 kernel returns its output in bf16: that rounding is an operand ("y") of the op. The term must be
    there, predict the measured loss change of the real cast kernel on lm_head (whose logits' rounding is most of
    it), and be absent for formats whose GEMMs return fp32."""
    from inc_ipamp.gains import get_backend

    s, model = small_sensitivity, small_model[0]
    y = s.operand_term("lm_head", "y", "bf16")
    assert y > s.operand_term("lm_head", "x", "bf16") + s.operand_term("lm_head", "w", "bf16")
    assert s.operand_term("lm_head", "y", "int8") == 0.0 == s.operand_term("lm_head", "y", "fp8_e4m3")
    backend = get_backend("cpu")
    measured = measured_loss_mse(model, calib_blocks, {"lm_head": "bf16"}, apply=backend.apply)
    # the y term is a sum of random roundings of ~3M logits per sequence (the real kernel's fp32 accumulation order
    # rounds some logits the other way than the calibration's), so over 4 sequences the ratio is a chi-square with
    # 4 degrees of freedom over 4: 95% of it within 0.12-2.8 (measured 2.58 here, within 0.5-2 on one article's blocks)
    assert 0.12 < measured / s.predict({"lm_head": "bf16"}) < 2.8
    without = copy.deepcopy(s)  # the record less the output operand: what the model predicted before
    for op in without.ops.values():
        op.operands.pop("y")
    inputs_only = without.predict({"lm_head": "bf16"})
    assert measured / inputs_only > 2 * measured / s.predict({"lm_head": "bf16"})  # the term is most of it


def test_per_sequence_sums_add_up_and_a_bootstrap_draw_rebuilds_them():
    """``cseq`` and ``dseq`` hold the curvature and diagonal sums per sequence (batch 1): they add up to ``curv`` and
    ``dia``, as ``seq`` does to ``lin`` and (squared) ``coh``. A bootstrap draw (``LossModel.bootstrap``) rebuilds
    every sum it redraws from the drawn sequences, in-bag and out-of-bag; with a quarter of the sequences getting the
    curvature pass, ``cseq`` has one entry per such batch."""
    import math

    model = _tiny()
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(5))
    s = calibrate(model, [ids], ["int8"], progress=False)
    sts = [st for o in s.ops.values() for st in o.operands.values()]
    for st in sts:
        for f in st.curv:
            assert len(st.cseq[f]) == 8 and math.fsum(st.cseq[f]) == pytest.approx(st.curv[f], rel=1e-9)
        for f in st.dia:
            assert len(st.dseq[f]) == 8 and math.fsum(st.dseq[f]) == pytest.approx(st.dia[f], rel=1e-9)
        for f, v in st.seq.items():
            assert math.fsum(v) == pytest.approx(st.lin[f], rel=1e-9, abs=1e-15)
            assert math.fsum(x * x for x in v) == pytest.approx(st.coh[f], rel=1e-9)
    rng = random.Random(0)
    inbag, left = s.bootstrap(rng)
    assert inbag.n_samples == 8 and inbag.n_curvature == 8 and 2 <= left.n_samples < 8
    for rec in (inbag, left):
        for st in (st for o in rec.ops.values() for st in o.operands.values()):
            for f in st.curv:
                assert math.fsum(st.cseq[f]) == pytest.approx(st.curv[f]) and len(st.seq[f]) == rec.n_samples
    plan = {"model.layers.0.mlp.up_proj": "int8", "model.layers.1.self_attn.o_proj": "int8"}
    assert inbag.predict(plan) != s.predict(plan)  # another sample, another estimate
    quarter = calibrate(model, [ids], ["int8"], progress=False, curvature_share=0.25)
    assert {len(v) for st in (st for o in quarter.ops.values() for st in o.operands.values())
            for v in st.cseq.values()} == {2}
    three = calibrate(model, [ids[:3]], ["int8"], progress=False)
    assert s.can_redraw and s.bootstrap(random.Random(1)) is not None
    assert not three.can_redraw and three.bootstrap(random.Random(1)) is None


def test_a_dominant_calibration_sequence_is_named(small_model, caplog):
    """Real text: the 56th 256-token calibration block of the default data (a Wikipedia article on Gershwin) carries
    over 1000x the median share of the coherent sums in per-tensor INT8, four ordinary articles under 3x. Calibration
    must say so (log and report), and must not name the ordinary ones."""
    import logging

    from inc_ipamp.data import load_blocks
    from inc_ipamp.sensitivity import calibrate, dominance_note, dominant_sequences

    model, tok = small_model
    b = load_blocks(tok, "calibration", 56, 256)
    blocks = [b.ids[i:i + 1] for i in (1, 2, 3, 4, 55)]
    with caplog.at_level(logging.WARNING, logger="inc_ipamp.sensitivity"):
        sens = calibrate(model, blocks, ["int8"], progress=False, curvature=False)
    ratios = dict(dominant_sequences(sens, factor=1.0))
    assert ratios[4] > 100
    assert all(r < 3 for i, r in ratios.items() if i != 4)
    assert [i for i, _ in dominant_sequences(sens)] == [4]
    note = dominance_note(sens)
    assert note is not None and note.startswith("calibration sequence(s) 4 (")
    assert note in caplog.text


def test_shared_roundings_change_no_statistic(monkeypatch):
    """q/k/v (gate/up) read one tensor and the curvature pass re-reads the gradient pass's: each activation is
    rounded once per batch and format (``_rounding``'s cache), and the record is exactly the one that rounds at
    every use. Counted: 2 layers × (7 Linears + 4 BGEMM operands) + lm_head = 23 uses per pass, of which 2 × 4 + 1
    Linear inputs and 2 × 4 BGEMM operands are distinct, so 17 roundings per batch instead of 46."""
    import inc_ipamp.sensitivity as S

    model = _tiny()
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    calls = {"n": 0}
    real = S.quantize

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(S, "quantize", counted)
    shared = calibrate(model, [ids], ["int8"], progress=False, noise="all")
    n_shared, calls["n"] = calls["n"], 0
    rounding = S._rounding
    monkeypatch.setattr(S, "_rounding", lambda x, fmt, dim, cache, wide=None: rounding(x, fmt, dim, None, wide))
    every = calibrate(model, [ids], ["int8"], progress=False, noise="all")
    assert (n_shared, calls["n"]) == (3 * 17, 3 * 46)
    shared.wall_s = every.wall_s
    assert dataclasses.asdict(shared) == dataclasses.asdict(every)
