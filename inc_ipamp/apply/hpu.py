"""Gaudi: the plan's FP8 MEASURE -> QUANTIZE passes through INC on an HPU, and nothing anywhere else.

Without habana_frameworks every entry point raises ``GaudiUnavailableError`` with one sentence saying what to
do instead (export the JSON here, run it on a Gaudi machine); nothing is emulated under a Gaudi name.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import DeviceUnavailableError
from ..export.fp8 import fp8_settings
from ..records import Plan


class GaudiUnavailableError(DeviceUnavailableError):
    """A Gaudi-only step was asked for on a machine without Intel Gaudi software."""


def require_patched(q: torch.nn.Module, ops: dict[str, torch.nn.Module]) -> None:
    """INC skips module types it has no patch for on this device; such an op would silently stay high precision."""
    for op, m in ops.items():
        if not type(q.get_submodule(op)).__name__.startswith("Patched"):
            raise DeviceUnavailableError(
                f"INC fp8_quant did not patch {op} ({type(m).__name__}) on this device: it cannot run in FP8 here")


def require_gaudi(what: str = "this step") -> None:
    """Raise GaudiUnavailableError unless habana_frameworks (Intel Gaudi's PyTorch bridge) is importable."""
    if importlib.util.find_spec("habana_frameworks") is None:
        raise GaudiUnavailableError(
            f"{what} needs an Intel Gaudi (HPU) machine and habana_frameworks is not installed here; export the "
            "FP8 configs with inc_ipamp.export.export_gaudi (or `inc-ipamp export`) and run them on Gaudi.")
    import habana_frameworks.torch.core  # noqa: F401  (registers the hpu device)

    if not (hasattr(torch, "hpu") and torch.hpu.is_available()):
        raise GaudiUnavailableError(f"{what} needs an HPU, but habana_frameworks sees no Gaudi device")


def apply_hpu(model: torch.nn.Module, plan: Plan, run_fn: Callable | None = None, run_args: tuple = (),
              example_inputs: Any = None, engine: str = "inc", stats_dir: str | Path | None = None):
    """MEASURE (calibrate with ``run_fn(model, *run_args)`` or the example) then QUANTIZE, in place.

    Settings from ``export.fp8.fp8_settings`` (the same translation as the exported JSON): ``engine="inc"`` for a
    model with the plan's own (Hugging Face) module names, ``"optimum-habana"`` for a Gaudi-adapted one.
    """
    require_gaudi("FP8 quantization on Gaudi")
    from neural_compressor.torch.quantization import convert, finalize_calibration, prepare

    folder = Path(stats_dir) if stats_dir is not None else Path(tempfile.mkdtemp(prefix="inc_ipamp_hpu_"))
    folder.mkdir(parents=True, exist_ok=True)
    stats = str(folder.resolve() / "measure")
    model = model.to("hpu")
    m = prepare(model, fp8_settings(plan, engine, "MEASURE", dump_stats_path=stats).config())
    with torch.no_grad():
        if run_fn is not None:
            run_fn(m, *run_args)
        elif example_inputs is not None:
            ids = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
            m(ids.to("hpu"))
        else:
            raise GaudiUnavailableError("FP8 MEASURE needs calibration: pass run_fn or example_inputs")
    finalize_calibration(m)
    return convert(m, fp8_settings(plan, engine, "QUANTIZE", dump_stats_path=stats).config())
