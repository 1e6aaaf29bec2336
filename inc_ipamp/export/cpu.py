"""CPU: a Plan as an INC 3.x config with per-op settings, and applying it through INC's real CPU path.

Which INC path runs on this CPU (read from the installed INC 3.10 and run here):

* INT8 plans (``int8`` / ``int8_pc``, the CPU formats of ``pipeline.DEVICE_FORMATS``) -> ``DynamicQuantConfig``
  (INC's PT2E dynamic INT8: ``neural_compressor.torch.export.export`` -> ``prepare`` -> ``convert``, i.e.
  torchao's X86InductorQuantizer). The global config is fp32 (quantize nothing) and every planned INT8 op gets
  ``set_local(op_name, DynamicQuantConfig(...))``, which INC turns into ``set_module_name_qconfig``. The converted
  graph is Q/DQ; ``torch.compile`` (inductor) lowers it to INT8 kernels. Weights int8 symmetric per tensor
  (``int8``) or per output channel (``int8_pc``); activations uint8 asymmetric per tensor, computed per call
  (X86 quantizer's dynamic default; INC's PT2E granularities are per_tensor/per_channel, so no per-token option
  and ``int8_pc``'s activations are per tensor).
  Only Linear modules are annotated: INT8 attention BGEMMs in a plan stay fp32 here (recorded in the notes).
* FP8 plans -> ``FP8Config(use_qdq=True, scale_method="maxabs_pow2", hp_dtype="fp32")``: INC's fp8_quant runs on
  CPU only in Q/DQ mode with a non-hardware scale method; per-op choice is an allowlist of name regexes built by
  ``export.fp8.fp8_settings`` (engine "inc"; ``FP8Config`` has no per-op local settings). ``quantize()`` with
  FP8Config crashes in INC 3.10 (it swaps the config for a JSON path), so the MEASURE ->
  ``finalize_calibration`` -> QUANTIZE passes are driven here with ``prepare``/``convert``.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..formats import get_format
from ..io import load_json, save_json
from ..records import Plan
from .fp8 import FP8_FORMATS as FP8
from .fp8 import ExportError, fp8_settings

log = logging.getLogger(__name__)

CPU_PATHS = ("pt2e_dynamic_int8", "fp8_qdq", "none")
INT8 = {"int8": "per_tensor", "int8_pc": "per_channel"}
#: CPU-legal scale method (``maxabs_hw`` needs Gaudi-aligned scales).
CPU_FP8_SCALE_METHOD = "maxabs_pow2"


def cpu_path(plan: Plan) -> str:
    """The INC path that runs the plan's low-precision formats on CPU (one per plan)."""
    low = {f for f in plan.assignment.values() if get_format(f).kind != "ref" and f != plan.reference_format}
    if not low:
        return "none"
    if low <= set(INT8):
        return "pt2e_dynamic_int8"
    if low <= set(FP8) and len({FP8[f] for f in low}) == 1:
        return "fp8_qdq"
    raise ExportError(
        f"INC's CPU paths run either INT8 (int8, int8_pc) or one FP8 dtype per model; the plan mixes "
        f"{', '.join(sorted(low))}")


def _low_ops(plan: Plan) -> dict[str, str]:
    return {op: f for op, f in plan.assignment.items() if f != plan.reference_format and get_format(f).kind != "ref"}


def _is_bgemm(op: str) -> bool:
    return op.rsplit(".", 1)[-1] in ("matmul_qk", "matmul_av")


def inc_config_for_plan(plan: Plan, dump_stats_path: str | None = None, mode: str = "QUANTIZE"):
    """The INC 3.x config object for the plan (see the module docstring) and the notes on what differs."""
    from neural_compressor.torch.quantization import DynamicQuantConfig

    path = cpu_path(plan)
    low = _low_ops(plan)
    notes: list[str] = []
    if path in ("none", "pt2e_dynamic_int8"):
        cfg = DynamicQuantConfig(w_dtype="fp32", act_dtype="fp32")  # global: leave everything fp32
        skipped = sorted(op for op in low if _is_bgemm(op))
        if skipped:
            notes.append(f"{len(skipped)} INT8 attention BGEMMs stay fp32: INC's PT2E X86 quantizer "
                         "annotates Linear only")
        if any(f == "int8_pc" for f in low.values()):
            notes.append("int8_pc: per-channel weights, but per-tensor dynamic activations (X86 quantizer)")
        for op, f in low.items():
            if not _is_bgemm(op):
                cfg.set_local(op, DynamicQuantConfig(w_dtype="int8", w_sym=True, w_granularity=INT8[f],
                                                     act_dtype="uint8", act_sym=False, act_algo="minmax"))
        return cfg, notes
    bgemms = sorted(op for op in low if _is_bgemm(op))
    if bgemms:
        notes.append(f"{len(bgemms)} FP8 attention BGEMMs stay fp32: INC patches only Linear/Conv2d/EmbeddingBag "
                     "on CPU")
    if dump_stats_path is None:
        dump_stats_path = str(Path(tempfile.mkdtemp(prefix="inc_ipamp_fp8_")) / "measure")
    settings = fp8_settings(plan, "inc", mode, dump_stats_path=dump_stats_path, scale_method=CPU_FP8_SCALE_METHOD,
                            hp_dtype="fp32", use_qdq=True)
    return settings.config(), notes + settings.mapping.notes


def export_cpu(plan: Plan, path: str | Path) -> Path:
    """Write the plan's INC CPU config (INC's own ``to_dict``) plus which path and algorithm it is for."""
    cfg, notes = inc_config_for_plan(plan)
    return save_json({"record": "inc_cpu_config", "path": cpu_path(plan), "algo": cfg.name, "config": cfg.to_dict(),
                      "notes": notes, "model": plan.model}, path)


def load_cpu_config(path: str | Path):
    """Rebuild the INC config object from ``export_cpu``'s file (INC's own ``from_dict``)."""
    from neural_compressor.common.base_config import config_registry

    d = load_json(path, "INC CPU config")
    if d.get("record") != "inc_cpu_config":
        raise ExportError(f"{path} is not an inc_cpu_config file")
    cls = config_registry.get_cls_configs()["torch"][d["algo"]]
    return cls.from_dict(d["config"])


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
        return convert(m, quant)
    from neural_compressor.torch.export import export

    cfg, _ = inc_config_for_plan(plan)
    m.config.use_cache = False
    seq = torch.export.Dim("seq", min=2, max=getattr(m.config, "max_position_embeddings", 8192))
    with torch.no_grad():
        key = None
        if reuse_export:
            from ..inc.method import model_content_hash

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
