"""The fake-quantiser is the deployed kernel's numerics: what the loss model predicts and what evaluation measures
must be the arithmetic that runs (torch.ao dynamic INT8 on CPU, ``torch._scaled_mm`` FP8), not a cleaner cousin."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inc_ipamp.apply.kernels import ScaledMMLinear, dynamic_int8_linear
from inc_ipamp.formats import act_qparams, get_format, quantize, quantize_weight

_ACTS = {
    "gaussian": lambda g: torch.randn(1, 64, 96, generator=g) * 2 + 0.3,
    "outlier": lambda g: torch.randn(1, 64, 96, generator=g).index_put_((torch.tensor([0]), torch.tensor([5]),
                                                                        torch.tensor([7])), torch.tensor(60.0)),
    "positive": lambda g: torch.rand(1, 64, 96, generator=g) * 5,  # min > 0: the grid must still hold 0
    "negative": lambda g: -torch.rand(1, 64, 96, generator=g) * 5,
    "tiny": lambda g: torch.randn(1, 64, 96, generator=g) * 1e-7,  # below fbgemm's smallest scale
    "zeros": lambda g: torch.zeros(1, 64, 96),
}


@pytest.mark.parametrize("case", sorted(_ACTS))
def test_activation_qparams_are_fbgemms(case):
    """Scale and zero point equal torch's own choice for dynamic INT8 (reduce_range) on normal and edge inputs."""
    x = _ACTS[case](torch.Generator().manual_seed(1))
    s, zp = act_qparams(x, "int8")
    ref_s, ref_zp = torch._choose_qparams_per_tensor(x, True)
    assert float(s) == pytest.approx(ref_s, rel=1e-7) and int(zp) == ref_zp
    ours = quantize(x, "int8")
    theirs = torch.quantize_per_tensor(x, float(s), int(zp), torch.quint8).dequantize()
    assert torch.equal(ours, theirs)


def test_per_sample_qparams_equal_one_call_per_sequence():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 16, 8, generator=g) * torch.tensor([1.0, 10.0, 0.1]).view(3, 1, 1) + 0.5
    batched = quantize(x, "int8", per_sample=True)
    for i in range(3):
        assert torch.equal(batched[i:i + 1], quantize(x[i:i + 1], "int8"))


@pytest.mark.parametrize("fmt", ["int8", "int8_pc"])
def test_fake_quant_linear_is_the_torch_ao_kernel(fmt):
    """Operands bit-identical to the kernel's (weights: int_repr; activations: above); outputs then agree up to the
    float accumulation order, orders of magnitude below the quantisation error itself."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 200, bias=True)
    x = _ACTS["outlier"](torch.Generator().manual_seed(3))
    kernel = dynamic_int8_linear(lin, per_channel=fmt == "int8_pc")
    assert torch.equal(kernel.weight().dequantize(), quantize_weight(lin.weight.detach(), fmt))
    with torch.no_grad():
        y_kernel = kernel(x)
        y_fake = nn.functional.linear(quantize(x, fmt), quantize_weight(lin.weight, fmt), lin.bias)
        y_ref = lin(x)
    quant_err = float((y_ref - y_kernel).abs().max())
    assert quant_err > 1e-2 and float((y_fake - y_kernel).abs().max()) < 1e-3 * quant_err


def test_symmetric_fake_quant_would_not_be_the_kernel():
    """The check above can fail: symmetric int8 activations (the old numerics) differ from the kernel by the size of
    the quantisation error, not by rounding noise."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 200, bias=False)
    x = _ACTS["gaussian"](torch.Generator().manual_seed(3))
    with torch.no_grad():
        y_kernel = dynamic_int8_linear(lin, per_channel=False)(x)
        s = x.abs().amax() / 127
        x_sym = torch.round(x / s).clamp(-127, 127) * s
        y_sym = nn.functional.linear(x_sym, quantize_weight(lin.weight, "int8"))
    assert float((y_sym - y_kernel).abs().max()) > 1e-2


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fake_quant_fp8_is_scaled_mm(fmt):
    torch.manual_seed(0)
    lin = nn.Linear(96, 64, bias=False)
    x = _ACTS["gaussian"](torch.Generator().manual_seed(4))
    with torch.no_grad():
        y_kernel = ScaledMMLinear(lin, get_format(fmt))(x)
        y_fake = nn.functional.linear(quantize(x, fmt), quantize_weight(lin.weight, fmt))
    assert float((y_fake - y_kernel).abs().max()) < 1e-4
