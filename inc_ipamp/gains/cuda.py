"""CUDA backend: FP8-E4M3/E5M2 Linear through ``torch._scaled_mm`` on Hopper-class GPUs (compute capability ≥ 8.9).

Reference format bf16 (or fp32). Attention BGEMMs in FP8 have no batched scaled-mm in torch, so they are
emulated (quantize-dequantize around the bf16 matmul) and that path is named in the record's notes. So are
E5M2 Linears: ``torch._scaled_mm`` on Hopper multiplies E4M3 by E4M3 (or by E5M2), never E5M2 by E5M2 ("Multiplication
of two Float8_e5m2 matrices is not supported", torch 2.11 on an H100).

``CudaBackend(device="cpu")`` (backend name ``cuda-on-cpu``) runs this same code placed on the CPU: torch 2.13
implements ``torch._scaled_mm`` for CPU, so the FP8 modules, their numerics and the whole measure/evaluate flow
execute in CI without a GPU. Its timings are the CPU's (FP8 there is slower than fp32), never Hopper's.
"""

from __future__ import annotations

import torch
from torch import nn

from ..apply.kernels import CastLinear, CastMatmul, EmulatedLinear, EmulatedMatmul, ScaledMMLinear
from ..errors import DeviceUnavailableError, IpampError
from ..formats import Format
from .base import Backend

MIN_CAPABILITY = (8, 9)


class CudaBackend(Backend):
    name = "cuda"
    version = "cuda-1"
    reference_formats = ("bf16", "fp32")

    def __init__(self, device: str = "cuda") -> None:
        super().__init__()
        if device not in ("cuda", "cpu"):
            raise IpampError(f"the cuda backend runs on 'cuda' (or its code on 'cpu' for tests), not {device!r}")
        self._device = torch.device(device)
        if device == "cpu":
            self.name = "cuda-on-cpu"

    def check(self) -> None:
        if self._device.type == "cpu":
            try:  # the FP8 GEMM this backend is about must exist on this torch's CPU build
                one = torch.ones((), dtype=torch.float32)
                w = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
                torch._scaled_mm(w, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            except (RuntimeError, NotImplementedError, AttributeError) as e:
                raise DeviceUnavailableError(f"cuda-on-cpu needs torch._scaled_mm on CPU, which torch "
                                             f"{torch.__version__} does not run here ({e})") from None
            return
        if not torch.cuda.is_available():
            raise DeviceUnavailableError("the cuda backend needs an NVIDIA GPU, but torch.cuda.is_available() is "
                                         f"False (torch {torch.__version__})")
        cap = torch.cuda.get_device_capability()
        if cap < MIN_CAPABILITY:
            raise DeviceUnavailableError(
                f"the cuda backend needs FP8 tensor cores (compute capability ≥ 8.9, Ada/Hopper); "
                f"{torch.cuda.get_device_name()} has {cap[0]}.{cap[1]}")

    def device(self) -> torch.device:
        return self._device

    def device_string(self) -> str:
        if self._device.type == "cpu":
            return (f"cuda-on-cpu (the cuda backend's FP8 code on CPU: real numerics, CPU timings); torch "
                    f"{torch.__version__}; threads {torch.get_num_threads()}")
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        return f"cuda; {name}; torch {torch.__version__}; cuda {torch.version.cuda}"

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize()

    def convert(self, mod: nn.Module, kind: str, fmt: Format) -> nn.Module:
        if kind == "linear":
            w = mod.weight
            if (fmt.kind == "float" and fmt.max_value is not None and all(d % 16 == 0 for d in w.shape)
                    and fmt.torch_dtype != "float8_e5m2"):
                return ScaledMMLinear(mod, fmt).to(w.device)
            if fmt.kind == "float" and fmt.max_value is None:
                return CastLinear(mod, getattr(torch, fmt.torch_dtype)).to(w.device)
            return EmulatedLinear(mod, fmt).to(w.device)
        if fmt.kind == "float" and fmt.max_value is None:
            return CastMatmul(getattr(torch, fmt.torch_dtype))
        return EmulatedMatmul(fmt)
