"""CPU: a Plan as an INC 3.x config with per-op settings (``apply.cpu.apply_cpu`` runs it through INC).

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

import logging
import tempfile
from pathlib import Path

from ..io import load_json, save_json
from ..ops import is_bgemm_name
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
    low = set(plan.quantized_ops().values())
    if not low:
        return "none"
    if low <= set(INT8):
        return "pt2e_dynamic_int8"
    if low <= set(FP8) and len({FP8[f] for f in low}) == 1:
        return "fp8_qdq"
    raise ExportError(
        f"INC's CPU paths run either INT8 (int8, int8_pc) or one FP8 dtype per model; the plan mixes "
        f"{', '.join(sorted(low))}")


def inc_config_for_plan(plan: Plan, dump_stats_path: str | None = None, mode: str = "QUANTIZE"):
    """The INC 3.x config object for the plan (see the module docstring) and the notes on what differs."""
    from neural_compressor.torch.quantization import DynamicQuantConfig

    path = cpu_path(plan)
    low = plan.quantized_ops()
    notes: list[str] = []
    if path in ("none", "pt2e_dynamic_int8"):
        cfg = DynamicQuantConfig(w_dtype="fp32", act_dtype="fp32")  # global: leave everything fp32
        skipped = sorted(op for op in low if is_bgemm_name(op))
        if skipped:
            notes.append(f"{len(skipped)} INT8 attention BGEMMs stay fp32: INC's PT2E X86 quantizer "
                         "annotates Linear only")
        if any(f == "int8_pc" for f in low.values()):
            notes.append("int8_pc: per-channel weights, but per-tensor dynamic activations (X86 quantizer)")
        for op, f in low.items():
            if not is_bgemm_name(op):
                cfg.set_local(op, DynamicQuantConfig(w_dtype="int8", w_sym=True, w_granularity=INT8[f],
                                                     act_dtype="uint8", act_sym=False, act_algo="minmax"))
        return cfg, notes
    bgemms = sorted(op for op in low if is_bgemm_name(op))
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
