"""Accelerator backends' code executed on CPU: the cuda backend's torch._scaled_mm FP8 path (``cuda-on-cpu``) and the
hpu backend's INC fp8_quant MEASURE -> QUANTIZE flow (INC's Q/DQ mode, the only one INC runs on CPU), both with
their real numerics; conversion happens once per (op, format), never inside a timed call."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from inc_ipamp.apply.kernels import EmulatedLinear, ScaledMMLinear
from inc_ipamp.errors import DeviceUnavailableError
from inc_ipamp.formats import get_format, quantize
from inc_ipamp.gains import get_backend, measure_gains
from inc_ipamp.gains.base import paired_times
from inc_ipamp.gains.hpu import HpuBackend
from inc_ipamp.ops import install_attention
from inc_ipamp.partition import default_example_ids, partition_model

Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    install_attention(tiny_llama)
    return tiny_llama


class CpuQdqHpuBackend(HpuBackend):
    """The hpu backend with only its device methods on CPU; INC settings through the constructor (Q/DQ, pow2 scales)."""

    reference_formats = ("fp32",)

    def __init__(self) -> None:
        super().__init__(scale_method="maxabs_pow2", use_qdq=True, hp_dtype="fp32")

    def check(self) -> None:
        pass

    def device(self) -> torch.device:
        return torch.device("cpu")

    def synchronize(self) -> None:
        pass


# -- cuda-on-cpu ------------------------------------------------------------------------------------------------
def test_cuda_on_cpu_runs_scaled_mm_fp8_with_real_numerics(tiny):
    be = get_backend("cuda-on-cpu")
    be.check()
    assert be.name == "cuda-on-cpu" and be.device().type == "cpu" and "cuda-on-cpu" in be.device_string()
    ids = default_example_ids(tiny, 1, 16)
    with torch.no_grad():
        ref = tiny(ids, use_cache=False).logits
        lin = tiny.get_submodule(Q)
        x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(1))
        with be.apply(tiny, {Q: "fp8_e4m3", DOWN: "fp8_e5m2", "model.layers.0.self_attn.matmul_qk": "fp8_e4m3"}) as m:
            mod = m.get_submodule(Q)
            assert isinstance(mod, ScaledMMLinear)
            # Hopper's _scaled_mm has no E5M2 x E5M2 GEMM (an H100 refused it): emulated, and the record says so
            assert isinstance(m.get_submodule(DOWN), EmulatedLinear)
            fmt = get_format("fp8_e4m3")
            expect = torch.nn.functional.linear(quantize(x, fmt), quantize(lin.weight, fmt), lin.bias)
            torch.testing.assert_close(mod(x), expect, rtol=1e-4, atol=1e-4)  # exactly FP8 rounding + fp32 sums
            low = m(ids, use_cache=False).logits
        assert tiny.get_submodule(Q) is lin
        err = ((low - ref).norm() / ref.norm()).item()
        assert 0 < err < 0.2
    assert "_scaled_mm" in be.paths["linear:fp8_e4m3"] and "emulated" in be.paths["bgemm:fp8_e4m3"]
    assert "emulated" in be.paths["linear:fp8_e5m2"]


def test_cuda_backend_on_cuda_says_why_it_cannot_run_here():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceUnavailableError, match="NVIDIA GPU"):
        get_backend("cuda").check()


def test_measure_gains_through_cuda_on_cpu(tiny, tmp_path):
    """The measure stage runs end to end on the cuda backend's code (bf16 reference, FP8 via _scaled_mm)."""
    part = partition_model(tiny)
    part = dataclasses.replace(part, groups=[g for g in part.groups if not any("matmul" in o for o in g.ops)])
    g = measure_gains(tiny, part, ["bf16", "fp8_e4m3"], backend="cuda-on-cpu", seq_len=8, reps=2, warmup=1,
                      progress=False, reference_reps=2, cache_path=tmp_path / "c.jsonl")
    tiny.float()
    assert "cuda-on-cpu" in g.device and set(g.groups) == {gr.name for gr in part.groups}
    assert all(len(gg.gains["ET"]) == len(gg.configs) for gg in g.groups.values())


# -- hpu flow on CPU ---------------------------------------------------------------------------------------------
def test_hpu_backend_without_gaudi_says_so():
    with pytest.raises(DeviceUnavailableError, match="--device table"):
        get_backend("hpu").check()


def test_hpu_inc_flow_on_cpu_patches_exactly_the_assigned_ops(tiny):
    be = CpuQdqHpuBackend()
    ids = default_example_ids(tiny, 1, 16)
    a = {Q: "fp8_e4m3", DOWN: "fp8_e4m3", "model.layers.1.mlp.up_proj": "fp32"}
    q_orig, down_orig = tiny.get_submodule(Q), tiny.get_submodule(DOWN)
    with torch.no_grad():
        ref = tiny(ids, use_cache=False).logits
        with be.apply(tiny, a) as m:
            patched = {n for n, mod in m.named_modules() if type(mod).__name__.startswith("Patched")}
            assert patched == {Q, DOWN}
            x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
            y = m.get_submodule(Q)(x)
            low = m(ids, use_cache=False).logits
        assert tiny.get_submodule(Q) is q_orig and tiny.get_submodule(DOWN) is down_orig  # the model is restored
        assert not any(type(mod).__name__.startswith("Patched") for mod in tiny.modules())
        ref_y = q_orig(x)
        rel = ((y - ref_y).norm() / ref_y.norm()).item()
        assert 0 < rel < 0.15  # really FP8-rounded (E4M3: ~2-5% relative), not an fp32 pass-through
        err = ((low - ref).norm() / ref.norm()).item()
        assert 0 < err < 0.2
    assert "PatchedLinear" in be.paths["linear:fp8_e4m3"] and be.inc_passes == 1


def test_hpu_inc_flow_refuses_ops_inc_does_not_patch_on_this_device(tiny):
    with pytest.raises(DeviceUnavailableError, match="did not patch"):
        with CpuQdqHpuBackend().apply(tiny, {"model.layers.0.self_attn.matmul_qk": "fp8_e4m3"}):
            pass
    assert type(tiny.get_submodule("model.layers.0.self_attn.matmul_qk")).__name__ == "Matmul"


def test_hpu_set_up_runs_once_and_never_inside_timed_calls(tiny, monkeypatch):
    """A fake-slow INC prepare (0.3 s): the first apply of an assignment pays it, later ones (the timed calls after the
    warm-up) only swap modules; the reference pays the same swap path, so the gain is not the set-up."""
    import neural_compressor.torch.quantization as incq

    real = incq.prepare
    slept = []

    def slow_prepare(*args, **kwargs):
        time.sleep(0.3)
        slept.append(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(incq, "prepare", slow_prepare)
    be = CpuQdqHpuBackend()
    ids = default_example_ids(tiny, 1, 8)
    a = {Q: "fp8_e4m3", DOWN: "fp8_e4m3"}

    def run(assign):
        def fn():
            with torch.no_grad(), be.apply(tiny, assign) as m:
                return m(ids, use_cache=False)
        return fn

    t0 = time.perf_counter()
    run(a)()
    assert time.perf_counter() - t0 >= 0.3 and be.inc_passes == 1
    assert len(slept) == 1  # the one MEASURE prepare of the one INC pass
    t_ref, t_cfg = paired_times(run({}), run(a), reps=4, warmup=1)
    assert be.inc_passes == 1 and len(slept) == 1  # cached: no INC call during warm-up or timed runs
    assert sorted(t_cfg)[2] - sorted(t_ref)[2] < 0.3  # so the gain does not contain the set-up
    with be.apply(tiny, {Q: "fp8_e4m3"}):  # a sub-assignment reuses the converted op
        pass
    assert be.inc_passes == 1


# -- roofline RT -------------------------------------------------------------------------------------------------
def test_roofline_gain_by_hand_on_h100():
    from inc_ipamp.gains.theory import roofline_gain, roofline_time

    x, w = [1, 2048, 4096], [4096, 4096]
    flops = 2 * 2048 * 4096 * 4096
    # bf16: compute-bound, 68.7 GFLOP / 989.4 TFLOPS; fp8: 1978.9 TFLOPS vs (x, w in 1 byte, y in 2, cast of x 3)
    t_bf16 = max(flops / 989.4e12, (2048 * 4096 * 2 + 4096 * 4096 * 2 + 2048 * 4096 * 2) / 3.35e12)
    t_fp8 = max(flops / 1978.9e12, (2048 * 4096 + 4096 * 4096 + 2048 * 4096 * 2 + 2048 * 4096 * 3) / 3.35e12)
    assert roofline_time("linear", [x, w], "bf16", "bf16", "h100") == pytest.approx(t_bf16)
    assert roofline_gain("linear", [x, w], "bf16", "fp8_e4m3", "h100") == pytest.approx(t_bf16 - t_fp8)
    # decode: one token, memory-bound: FP8 halves the weight traffic (H200's faster HBM shrinks the gain)
    dec = roofline_gain("linear", [x, w], "bf16", "fp8_e4m3", "h100", phase="decode")
    assert dec == pytest.approx((4096 * 4096 * 2 + 4096 * 2 + 4096 * 2 - (4096 * 4096 + 4096 + 4096 * 2 + 4096 * 3))
                                / 3.35e12)
    assert 0 < roofline_gain("linear", [x, w], "bf16", "fp8_e4m3", "h200", phase="decode") < dec
    assert roofline_gain("linear", [x, w], "bf16", "bf16", "h100") == 0.0


def test_roofline_devices_and_bgemm_decode():
    from inc_ipamp.errors import IpampError
    from inc_ipamp.gains.theory import ROOFLINE_DEVICES, phase_shapes, roofline_gain

    assert set(ROOFLINE_DEVICES) == {"gaudi2", "gaudi3", "h100", "h200"}
    assert all(d.source and d.mem_tb_s > 0 for d in ROOFLINE_DEVICES.values())
    qk = [[1, 8, 512, 128], [1, 8, 128, 512]]
    assert phase_shapes("bgemm", qk, "decode") == [[1, 8, 1, 128], [1, 8, 128, 512]]
    # Gaudi 3 runs BF16 and FP8 at the same peak: a compute-bound prefill GEMM gains nothing there, Gaudi 2 does
    big = [[1, 4096, 4096], [4096, 4096]]
    assert roofline_gain("linear", big, "bf16", "fp8_e4m3", "gaudi3") <= 0 < roofline_gain(
        "linear", big, "bf16", "fp8_e4m3", "gaudi2")
    with pytest.raises(IpampError, match="no published peak"):
        roofline_gain("linear", big, "bf16", "int8", "gaudi2")
    with pytest.raises(IpampError, match="phase"):
        roofline_gain("linear", big, "bf16", "fp8_e4m3", "h100", phase="train")
