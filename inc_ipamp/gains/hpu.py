"""Gaudi backend: each op in FP8 through INC fp8_quant (MEASURE -> QUANTIZE) on an HPU, converted once and swapped in.

This is the paper's setting. It runs only where ``habana_frameworks`` imports and a Gaudi is visible; elsewhere
``check`` raises DeviceUnavailableError. Like the other backends, an op's low-precision module is made once per
(op, format) and cached; ``apply`` then only swaps cached modules in and out, so reference and configuration runs
pay the same overhead (a module walk and attribute swaps) and no timed call contains quantization.

Conversion (``configure``, entered by ``apply`` on first use, so before any timed run when the caller primes it):
deep copies of the ops still missing are put in an empty module tree under their own dotted names, INC's
``prepare`` (MEASURE) patches exactly them (settings from ``export.fp8.fp8_settings``, engine "inc": an allowlist
of their names), they are called on their inputs captured from one forward of the real model on ``calib_ids``,
``finalize_calibration`` writes the statistics, and ``convert`` (QUANTIZE) yields INC's patched FP8 modules. The
model itself is never touched by INC (its convert is in place and cannot be undone). Statistics are per op and
taken on the high-precision model, as in INC's own MEASURE pass over the whole model.

The INC settings (``scale_method``, ``use_qdq``, ``hp_dtype``) are constructor arguments: on a Gaudi the defaults
(maxabs_hw, real FP8 kernels, bf16); the tests run this same flow on CPU with INC's Q/DQ mode through a subclass
that only replaces the device methods. Not timed in this project's CI (no Gaudi); Gaudi numbers come back to CPU
machines through the table backend.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..apply.hpu import require_patched
from ..errors import DeviceUnavailableError, IpampError
from ..export.fp8 import FP8_FORMATS, fp8_settings
from ..formats import Format, get_format
from ..ops import Matmul
from ..records import Plan
from .base import Backend


def _htcore():
    try:
        import habana_frameworks.torch.core as htcore  # noqa: F401
    except ImportError:
        raise DeviceUnavailableError("the hpu backend requires a Gaudi (habana_frameworks not importable); "
                                     "replay Gaudi measurements here with --device table") from None
    return htcore


def _shell(mods: dict[str, nn.Module]) -> nn.Module:
    """An otherwise empty module tree holding ``mods`` under their dotted names (so INC sees the model's names)."""
    root = nn.Module()
    for name, mod in mods.items():
        parent = root
        *path, leaf = name.split(".")
        for p in path:
            if p not in parent._modules:
                parent.add_module(p, nn.Module())
            parent = parent._modules[p]
        parent.add_module(leaf, mod)
    return root


class HpuBackend(Backend):
    name = "hpu"
    version = "hpu-inc-fp8-2"
    reference_formats = ("bf16",)
    local_ops = False  # INC converts whole ops and the graph compiler fuses the casts across them

    def __init__(self, calib_ids: torch.Tensor | None = None, *, scale_method: str = "maxabs_hw",
                 use_qdq: bool = False, hp_dtype: str = "bf16") -> None:
        super().__init__()
        self.calib_ids = calib_ids
        self.scale_method = scale_method
        self.use_qdq = use_qdq
        self.hp_dtype = hp_dtype
        self._inputs: dict[int, tuple] = {}  # id(op module) -> args of its first call in the calibration forward
        self.inc_passes = 0  # INC MEASURE -> QUANTIZE passes run so far (one per configure that had work)

    def check(self) -> None:
        _htcore()
        if not torch.hpu.is_available():  # type: ignore[attr-defined]
            raise DeviceUnavailableError("habana_frameworks imports but no Gaudi device is visible")

    def device(self) -> torch.device:
        return torch.device("hpu")

    def device_string(self) -> str:
        name = torch.hpu.get_device_name() if hasattr(torch, "hpu") else "hpu"  # type: ignore[attr-defined]
        return f"hpu; {name}; torch {torch.__version__}; INC fp8_quant {self.scale_method}"

    def synchronize(self) -> None:
        htcore = _htcore()
        htcore.mark_step()
        torch.hpu.synchronize()  # type: ignore[attr-defined]

    def convert(self, mod: nn.Module, kind: str, fmt: Format) -> nn.Module:
        raise IpampError("the hpu backend converts ops in INC passes (configure), before apply swaps them in")

    def _capture(self, model: nn.Module, mods: list[nn.Module]) -> None:
        """Record the first-call args of ``mods`` in one forward of ``model`` on the calibration ids."""
        hooks = []

        def hook(m: nn.Module, args: tuple) -> None:
            self._inputs.setdefault(id(m), tuple(a.detach() if torch.is_tensor(a) else a for a in args))

        for m in mods:
            hooks.append(m.register_forward_pre_hook(hook))
        vocab = getattr(getattr(model, "config", None), "vocab_size", 100)
        ids = self.calib_ids if self.calib_ids is not None else torch.randint(
            0, vocab, (1, 128), generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                model(ids.to(self.device()), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        missed = [m for m in mods if id(m) not in self._inputs]
        if missed:
            raise IpampError(f"{len(missed)} ops were not called in the calibration forward; cannot calibrate them")

    def configure(self, model: nn.Module, assignment: dict[str, str]) -> None:
        """Convert every FP8 (op, format) of ``assignment`` not converted yet, one INC pass per FP8 format.

        Call it (or enter ``apply`` once) before timing: this is where INC runs.
        """
        mods = dict(model.named_modules())
        todo: dict[str, dict[str, nn.Module]] = {}
        for op, fmt in assignment.items():
            if fmt in self.reference_formats or get_format(fmt).kind == "ref":
                continue
            if fmt not in FP8_FORMATS:
                raise DeviceUnavailableError(f"INC fp8_quant runs {', '.join(FP8_FORMATS)} against bf16, not {fmt}")
            if op not in mods:
                raise KeyError(f"no module named {op!r} in the model")
            if (id(mods[op]), fmt) not in self._converted:
                todo.setdefault(fmt, {})[op] = mods[op]
        if not todo:
            return
        self.check()
        need = [m for ops in todo.values() for m in ops.values() if id(m) not in self._inputs]
        if need:
            self._capture(model, need)
        from neural_compressor.torch.quantization import convert, finalize_calibration, prepare

        for fmt, ops in todo.items():
            plan = Plan("hpu-backend", dict.fromkeys(ops, fmt), self.reference_formats[0], "ET", None, 0.0, 0.0)
            with tempfile.TemporaryDirectory(prefix="inc_ipamp_hpu_") as tmp:
                kw = dict(dump_stats_path=str(Path(tmp) / "measure"), scale_method=self.scale_method,
                          hp_dtype=self.hp_dtype, use_qdq=self.use_qdq)
                q = prepare(_shell({op: copy.deepcopy(m) for op, m in ops.items()}),
                            fp8_settings(plan, "inc", "MEASURE", **kw).config())
                require_patched(q, ops)
                with torch.no_grad():
                    for op, m in ops.items():
                        q.get_submodule(op)(*self._inputs[id(m)])
                finalize_calibration(q)
                q = convert(q, fp8_settings(plan, "inc", "QUANTIZE", **kw).config())
            self.inc_passes += 1
            require_patched(q, ops)
            for op, m in ops.items():
                new = q.get_submodule(op)
                kind = "bgemm" if isinstance(m, Matmul) else "linear"
                self._converted[(id(m), fmt)] = new
                self.paths[f"{kind}:{fmt}"] = f"INC fp8_quant {type(new).__name__} ({self.scale_method}" + (
                    ", Q/DQ)" if self.use_qdq else ")")

    @contextlib.contextmanager
    def apply(self, model: nn.Module, assignment: dict[str, str]) -> Iterator[nn.Module]:
        """Swap in INC's FP8 modules for the assigned ops (converted once, by ``configure``), then restore."""
        self.configure(model, assignment)
        with super().apply(model, assignment) as m:
            yield m
