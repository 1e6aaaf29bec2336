"""Putting a plan on a model for a CPU deployment, returning the model to run (INC's ``quantize`` contract).

* ``apply_torchao_int8``: the plan's INT8 Linears swapped for torch.ao dynamic INT8 Linears, the kernels the ``cpu``
  gain backend timed (so the plan's predicted speed-up is the one this model gets);
* ``apply_cpu``: INC 3.x's own CPU paths for the plan (``export.cpu`` builds the config): PT2E dynamic INT8, or FP8
  Q/DQ. FP8 is driven with ``prepare``/``finalize_calibration``/``convert`` because ``quantize(model, FP8Config)``
  crashes in INC 3.10.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..export.cpu import cpu_path, inc_config_for_plan
from ..export.fp8 import ExportError
from ..models import model_content_hash
from ..records import Plan
from .kernels import dynamic_int8_linear


def apply_torchao_int8(model: nn.Module, plan: Plan) -> nn.Module:
    """The plan's INT8 Linears swapped in place for torch.ao dynamic INT8 Linears (``int8``: per-tensor weights,
    ``int8_pc``: per-channel): exactly the kernels the ``cpu`` gain backend timed, so the plan's predicted speedup is
    the one this model gets. Everything else stays fp32."""
    mods = dict(model.named_modules())
    for op, fmt in plan.assignment.items():
        if fmt == plan.reference_format:
            continue
        if fmt not in ("int8", "int8_pc") or op not in mods or not isinstance(mods[op], nn.Linear):
            raise ExportError(f"torch.ao dynamic INT8 runs INT8 Linears only; the plan has {op} in {fmt}")
        parent, _, attr = op.rpartition(".")
        setattr(mods[parent] if parent else model, attr, dynamic_int8_linear(mods[op], per_channel=fmt == "int8_pc"))
    return model


def _low_modules(model: nn.Module, plan: Plan) -> dict[str, nn.Module]:
    """The plan's low-precision Linears (the modules INC's CPU FP8 path must patch)."""
    mods = dict(model.named_modules())
    return {op: mods[op] for op, f in plan.assignment.items()
            if f != plan.reference_format and op in mods and isinstance(mods[op], nn.Linear)}


def apply_cpu(model: nn.Module, plan: Plan, calib: Iterable[torch.Tensor], compile: bool = False,
              inplace: bool = False, dynamic: bool = True, reuse_export: bool = False) -> nn.Module:
    """Quantize ``model`` with INC's CPU path for ``plan``; ``calib`` = token-id batches (1, seq) for calibration.

    INT8: returns the PT2E-converted graph (call it with ``input_ids``; it returns the model's usual output),
    exported with a dynamic sequence length (``dynamic=False``: fixed to ``calib[0]``'s); ``compile=True`` wraps
    it in ``torch.compile`` (inductor lowers the Q/DQ pattern to INT8 kernels). ``reuse_export``: keep the last
    exported graph (keyed by a hash of the weights and the example's shape) and prepare a copy of it: a tuning loop's
    trials differ only in the per-op config, and the export is ~80% of a trial's build time on SmolLM2.
    FP8: returns the model with INC's patched Q/DQ Linear modules. Reference ops are untouched either way.
    """
    from neural_compressor.torch.quantization import convert, finalize_calibration, prepare

    calib = list(calib)
    if not calib:
        raise ExportError("apply_cpu needs at least one calibration batch")
    m = model if inplace else copy.deepcopy(model)
    path = cpu_path(plan)
    if path == "none":
        return m
    if path == "fp8_qdq":
        stats = Path(tempfile.mkdtemp(prefix="inc_ipamp_fp8_")) / "measure"
        measure, _ = inc_config_for_plan(plan, str(stats), mode="MEASURE")
        quant, _ = inc_config_for_plan(plan, str(stats), mode="QUANTIZE")
        m = prepare(m, measure)
        with torch.no_grad():
            for ids in calib:
                m(ids, use_cache=False)
        finalize_calibration(m)
        m = convert(m, quant)
        from ..errors import DeviceUnavailableError
        from .hpu import require_patched

        try:  # fail closed: an unpatched Linear would silently stay fp32 (BGEMMs stay fp32 by design: the notes say so)
            require_patched(m, _low_modules(model, plan))
        except DeviceUnavailableError as e:
            raise ExportError(f"{e}. INC picks its accelerator when it is imported and prefers a visible GPU; its CPU "
                              "FP8 Q/DQ path needs INC_TARGET_DEVICE=cpu in the environment before the start") from None
        return m
    from neural_compressor.torch.export import export

    cfg, _ = inc_config_for_plan(plan)
    m.config.use_cache = False
    seq = torch.export.Dim("seq", min=2, max=getattr(m.config, "max_position_embeddings", 8192))
    with torch.no_grad():
        key = None
        if reuse_export:
            key = (model_content_hash(m), tuple(calib[0].shape) if not dynamic else calib[0].shape[0], dynamic)
        if key is not None and _EXPORTED.get("key") == key:
            exported = _copy_graph(_EXPORTED["graph"])
        else:
            exported = export(m, (calib[0],), dynamic_shapes=({1: seq},) if dynamic else None)
            if key is not None:
                _EXPORTED.clear()
                _EXPORTED.update(key=key, graph=_copy_graph(exported))
        prepared = prepare(exported, cfg)
        for ids in calib:
            prepared(ids)
        q = convert(prepared)
    return _compiled(q) if compile else q


#: apply_cpu(reuse_export=True)'s single cached export: {"key": (weights hash, shape, dynamic), "graph": module}
_EXPORTED: dict[str, Any] = {}


def forget_export() -> None:
    """Drop ``apply_cpu(reuse_export=True)``'s cached export, which holds a copy of the weights (a tuning loop calls
    this when it is over)."""
    _EXPORTED.clear()


def _copy_graph(g: nn.Module) -> nn.Module:
    """Deep copy of an exported graph, with the plain attributes INC's export sets (``_exported``,
    ``dynamic_shapes``), which GraphModule's deepcopy drops."""
    c = copy.deepcopy(g)
    for k, v in vars(g).items():
        if k not in vars(c):
            setattr(c, k, v)
    return c


def _compiled(m: nn.Module) -> Callable:
    from torch._inductor import config as inductor_config

    inductor_config.freezing = True  # constant-folds the int8 weights: required for the fused INT8 kernels
    return torch.compile(m)
