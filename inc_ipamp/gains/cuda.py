"""CUDA backend: FP8-E4M3/E5M2 Linear through ``torch._scaled_mm`` on Hopper-class GPUs (compute capability ≥ 8.9).

Reference format bf16 (or fp32). Attention BGEMMs in FP8 have no batched scaled-mm in torch, so they are
emulated (quantize-dequantize around the bf16 matmul) and that path is named in the record's notes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DeviceUnavailableError
from ..formats import Format
from .base import Backend, CastLinear, CastMatmul, EmulatedLinear, EmulatedMatmul, ScaledMMLinear

MIN_CAPABILITY = (8, 9)


class CudaBackend(Backend):
    name = "cuda"
    version = "cuda-1"
    reference_formats = ("bf16", "fp32")

    def check(self) -> None:
        if not torch.cuda.is_available():
            raise DeviceUnavailableError("the cuda backend needs an NVIDIA GPU, but torch.cuda.is_available() is "
                                         f"False (torch {torch.__version__})")
        cap = torch.cuda.get_device_capability()
        if cap < MIN_CAPABILITY:
            raise DeviceUnavailableError(
                f"the cuda backend needs FP8 tensor cores (compute capability ≥ 8.9, Ada/Hopper); "
                f"{torch.cuda.get_device_name()} has {cap[0]}.{cap[1]}")

    def device(self) -> torch.device:
        return torch.device("cuda")

    def device_string(self) -> str:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        return f"cuda; {name}; torch {torch.__version__}; cuda {torch.version.cuda}"

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def convert(self, mod: nn.Module, kind: str, fmt: Format) -> nn.Module:
        if kind == "linear":
            w = mod.weight
            if fmt.kind == "float" and fmt.max_value is not None and all(d % 16 == 0 for d in w.shape):
                return ScaledMMLinear(mod, fmt).to(w.device)
            if fmt.kind == "float" and fmt.max_value is None:
                return CastLinear(mod, getattr(torch, fmt.torch_dtype)).to(w.device)
            return EmulatedLinear(mod, fmt).to(w.device)
        if fmt.kind == "float" and fmt.max_value is None:
            return CastMatmul(getattr(torch, fmt.torch_dtype))
        return EmulatedMatmul(fmt)
