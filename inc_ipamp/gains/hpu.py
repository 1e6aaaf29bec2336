"""Gaudi backend: INC fp8_quant (MEASURE → QUANTIZE) on an HPU through habana_frameworks.

This is the paper's setting. It runs only where ``habana_frameworks`` imports; elsewhere ``check`` raises
DeviceUnavailableError. ``apply`` quantises a deep copy of the model with an allowlist of exactly the ops
the assignment puts in FP8 (anchored regexes, see INC_NOTES.md), calibrated on the example ids, and yields
that copy: INC's convert is in place and cannot be undone, so the caller's model is never touched.
Not executed in this project's CI (no Gaudi); its numbers come back to CPU machines through the table backend.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import DeviceUnavailableError
from ..formats import Format, get_format
from .base import Backend

FP8_NAMES = {"fp8_e4m3": "E4M3", "fp8_e5m2": "E5M2"}


def _htcore():
    try:
        import habana_frameworks.torch.core as htcore  # noqa: F401
    except ImportError:
        raise DeviceUnavailableError("the hpu backend requires a Gaudi (habana_frameworks not importable); "
                                     "replay Gaudi measurements here with --backend table") from None
    return htcore


class HpuBackend(Backend):
    name = "hpu"
    version = "hpu-inc-fp8-1"
    reference_formats = ("bf16",)

    def __init__(self, calib_ids: torch.Tensor | None = None) -> None:
        super().__init__()
        self.calib_ids = calib_ids
        self.scale_method = "maxabs_hw"

    def check(self) -> None:
        _htcore()
        if not torch.hpu.is_available():  # type: ignore[attr-defined]
            raise DeviceUnavailableError("habana_frameworks imports but no Gaudi device is visible")

    def device(self) -> torch.device:
        return torch.device("hpu")

    def device_string(self) -> str:
        name = torch.hpu.get_device_name() if hasattr(torch, "hpu") else "hpu"  # type: ignore[attr-defined]
        return f"hpu; {name}; torch {torch.__version__}"

    def synchronize(self) -> None:
        htcore = _htcore()
        htcore.mark_step()
        torch.hpu.synchronize()  # type: ignore[attr-defined]

    def convert(self, mod: nn.Module, kind: str, fmt: Format) -> nn.Module:
        raise NotImplementedError("the hpu backend converts whole models through INC, see apply()")

    @contextlib.contextmanager
    def apply(self, model: nn.Module, assignment: dict[str, str]) -> Iterator[nn.Module]:
        """Yield an INC-FP8 copy of ``model`` with exactly the assigned ops in FP8 (others stay bf16)."""
        self.check()
        fp8 = {op: f for op, f in assignment.items() if get_format(f).kind != "ref" and f != "bf16"}
        if not fp8:
            yield model
            return
        kinds = {FP8_NAMES.get(f) for f in fp8.values()}
        if None in kinds or len(kinds) != 1:
            raise DeviceUnavailableError(
                f"INC fp8_quant runs one FP8 format per model (E4M3 or E5M2); got {sorted(set(fp8.values()))}")
        from neural_compressor.torch.quantization import FP8Config, convert, finalize_calibration, prepare

        names = [f"^{re.escape(op)}$" for op in fp8]
        common = dict(fp8_config=kinds.pop(), allowlist={"names": names, "types": ("Linear", "Matmul")},
                      scale_method=self.scale_method, dump_stats_path="./hqt_output/ipamp_measure")
        q = copy.deepcopy(model)
        q = prepare(q, FP8Config(mode="MEASURE", **common))
        ids = self.calib_ids if self.calib_ids is not None else torch.randint(0, 100, (1, 128))
        with torch.no_grad():
            q(ids.to(self.device()), use_cache=False)
        finalize_calibration(q)
        q = convert(q, FP8Config(mode="QUANTIZE", **common))
        self.paths["linear:fp8"] = self.paths["bgemm:fp8"] = "INC fp8_quant (Gaudi FP8 kernels)"
        try:
            yield q
        finally:
            del q
