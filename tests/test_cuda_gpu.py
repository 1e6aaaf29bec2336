"""The cuda backend on a real FP8-capable NVIDIA GPU (compute capability ≥ 8.9): skipped where there is none (CI),
run on a lent H100 (benchmarks/results/cuda_h100.md). What CPU tests cannot show: that ``torch._scaled_mm`` on the
GPU computes what ``formats.quantize`` says (the numerics the loss model and fake quantisation assume), for the
shapes a prefill and a decode step give it, and that measuring, applying and restoring work with the model on the
GPU in bf16."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from inc_ipamp.apply.kernels import EmulatedLinear, ScaledMMLinear
from inc_ipamp.formats import get_format, quantize
from inc_ipamp.gains import compare_prefill, get_backend, measure_gains
from inc_ipamp.ops import install_attention
from inc_ipamp.partition import default_example_ids, partition_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                reason="needs an NVIDIA GPU with FP8 tensor cores (compute capability >= 8.9)")


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("tokens", [1, 7, 128])
def test_cuda_backend_linear_on_gpu_computes_the_formats_numerics(fmt, tokens):
    """Fresh random operands; the reference is float64 arithmetic on the operands ``formats.quantize`` rounds to, so
    the only differences left are the GPU's accumulation order and the bf16 output (≈ 4e-3 relative at most). E4M3
    runs ``torch._scaled_mm``; E5M2 is emulated (Hopper has no E5M2 x E5M2 GEMM) with the same numerics."""
    g = torch.Generator(device="cuda").manual_seed(tokens)
    lin = torch.nn.Linear(576, 1536, bias=False).to("cuda", torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, device="cuda") * 0.05)
    x = torch.randn(2, tokens, 576, generator=g, device="cuda").to(torch.bfloat16)
    mod = get_backend("cuda").convert(lin, "linear", get_format(fmt))
    assert isinstance(mod, ScaledMMLinear if fmt == "fp8_e4m3" else EmulatedLinear)
    out = torch.full((2, tokens, 1536), float("nan"), device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out.copy_(mod(x))
    f = get_format(fmt)
    ref = torch.nn.functional.linear(quantize(x.float(), f).double(), quantize(lin.weight.float(), f).double())
    assert torch.isfinite(out).all()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err
    # and not the unquantised product: FP8 rounding must be visible at this size
    plain = torch.nn.functional.linear(x.double(), lin.weight.double())
    assert ((ref - plain).norm() / plain.norm()).item() > 1e-3


def test_cuda_backend_measures_applies_and_restores_on_the_gpu(tiny_llama, tmp_path):
    install_attention(tiny_llama)
    be = get_backend("cuda")
    be.check()
    assert torch.cuda.get_device_name() in be.device_string()
    part = partition_model(tiny_llama)
    part = dataclasses.replace(part, groups=part.groups[:4])
    g = measure_gains(tiny_llama, part, ["bf16", "fp8_e4m3"], backend="cuda", seq_len=32, reps=3, warmup=1,
                      progress=False, reference_reps=3, cache_path=tmp_path / "c.jsonl")
    assert next(tiny_llama.parameters()).device.type == "cuda"
    assert next(tiny_llama.parameters()).dtype == torch.bfloat16
    assert set(g.groups) == {gr.name for gr in part.groups}
    assert all(len(gg.gains["ET"]) == len(gg.configs) for gg in g.groups.values())
    q = "model.layers.0.self_attn.q_proj"
    ids = default_example_ids(tiny_llama, 1, 32)
    r = compare_prefill(tiny_llama, ids, be, {q: "fp8_e4m3"}, reps=3)
    assert r["t_ref_s"] > 0 and r["t_cfg_s"] > 0
    assert not isinstance(tiny_llama.get_submodule(q), ScaledMMLinear)  # restored after the timed calls
    assert "_scaled_mm" in be.paths["linear:fp8_e4m3"]
