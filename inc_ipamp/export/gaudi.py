"""Gaudi FP8: a Plan as the INC fp8_quant JSON files optimum-habana (``QUANT_CONFIG``) and vLLM-Gaudi read.

INC's fp8_quant decides per module with ``should_quantize``: the module's class name must be in
``allowlist.types`` and no ``blocklist.names`` regex may ``re.search`` its dotted name. So a plan becomes
a type allowlist plus one anchored, escaped regex per module kept in BF16 (an unanchored ``layers.1``
would also block ``layers.10``). Module names differ by engine, so a plan is mapped per engine:

* optimum-habana (GaudiLlamaAttention & co.): the HF Linear names, plus ``self_attn.matmul_qk`` /
  ``matmul_av`` (what our ``ops.install_attention`` names them), ``k_cache`` / ``v_cache`` and
  ``fused_scaled_dot_product_attention``.
* vLLM-Gaudi: fused ``self_attn.qkv_proj`` and ``mlp.gate_up_proj``; attention ops under
  ``self_attn.attn.impl`` (``matmul_qk``, ``softmax``, ``matmul_av``, ``batch2block_matmul``,
  ``block2batch_matmul``, ``k_cache``, ``v_cache``, ``fused_scaled_dot_product_attention``); names as in
  vLLM-Gaudi's own ``inc_output_hooks_maxabs_*_mod_list.json``.

The attention helpers have no op of their own in a plan; they follow the BGEMM whose operand they
carry: the K cache and Q·Kᵀ, the V cache / softmax (probabilities) and P·V, and the fused-SDPA and
block-matmul kernels (which do both products) stay BF16 if either BGEMM does. That is conservative:
nothing runs in FP8 that the plan did not put in FP8.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IpampError
from ..formats import get_format
from ..io import save_json
from ..ops import decoder_layer_index
from ..records import Plan

log = logging.getLogger(__name__)

ENGINES = ("optimum-habana", "vllm-gaudi")
#: INC ``fp8_config`` value per plan format that Gaudi FP8 can run.
FP8_FORMATS = {"fp8_e4m3": "E4M3", "fp8_e5m2": "E5M2"}
#: Formats Gaudi keeps in the high-precision dtype (``hp_dtype`` bf16).
HIGH_PRECISION = {"bf16", "fp32"}

#: Module classes (``type(mod).__name__``, as INC's allowlist matches them) per engine, from INC's patched
#: module table (fp8_quant/_core/patching_common.py) and each engine's modeling code.
ALLOWLIST_TYPES = {
    "optimum-habana": ["Linear", "Matmul", "KVCache", "ModuleFusedSDPA"],
    "vllm-gaudi": ["QKVParallelLinear", "MergedColumnParallelLinear", "ColumnParallelLinear", "RowParallelLinear",
                   "ReplicatedLinear", "ParallelLMHead", "Linear", "Matmul", "B2BMatmul", "Softmax",
                   "VLLMKVCache"],
}
#: Fused projections in vLLM: our per-projection ops -> the one fused module.
VLLM_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
              "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
#: Attention helper modules and the BGEMMs whose format they follow (all of them must be FP8).
HELPERS = {
    "optimum-habana": {"k_cache": ("matmul_qk",), "v_cache": ("matmul_av",),
                       "fused_scaled_dot_product_attention": ("matmul_qk", "matmul_av")},
    "vllm-gaudi": {"k_cache": ("matmul_qk",), "v_cache": ("matmul_av",), "softmax": ("matmul_av",),
                   "batch2block_matmul": ("matmul_qk", "matmul_av"), "block2batch_matmul": ("matmul_qk", "matmul_av"),
                   "fused_scaled_dot_product_attention": ("matmul_qk", "matmul_av")},
}
CONFLICT_POLICIES = ("bf16", "error")


class ExportError(IpampError):
    """The plan cannot be expressed in the target's configuration format."""


@dataclass
class EngineMapping:
    """A plan in one engine's module names: module -> "fp8" or "bf16", the FP8 dtype, and what was changed."""

    engine: str
    modules: dict[str, str]
    fp8_config: str
    notes: list[str] = field(default_factory=list)

    @property
    def blocked(self) -> list[str]:
        return [m for m, f in self.modules.items() if f == "bf16"]

    @property
    def quantized(self) -> list[str]:
        return [m for m, f in self.modules.items() if f == "fp8"]


def _split_attention(op: str) -> tuple[str, str] | None:
    """``model.layers.3.self_attn.matmul_qk`` -> (``model.layers.3.self_attn``, ``matmul_qk``)."""
    prefix, _, leaf = op.rpartition(".")
    return (prefix, leaf) if leaf in ("matmul_qk", "matmul_av") else None


def _fp8_dtype(plan: Plan) -> str:
    low = {f for f in plan.assignment.values() if f not in HIGH_PRECISION}
    bad = sorted(f for f in low if f not in FP8_FORMATS)
    if bad:
        raise ExportError(
            f"the plan uses {', '.join(bad)}, which INC's Gaudi FP8 path cannot run (it runs "
            f"{', '.join(FP8_FORMATS)} against bf16); solve for Gaudi with formats bf16,fp8_e4m3")
    kinds = {FP8_FORMATS[f] for f in low}
    if len(kinds) > 1:
        raise ExportError("the plan mixes fp8_e4m3 and fp8_e5m2, but INC's fp8_config is one dtype per model")
    return kinds.pop() if kinds else "E4M3"


def map_plan(plan: Plan, engine: str, on_conflict: str = "bf16") -> EngineMapping:
    """Translate the plan's op names into ``engine``'s module names (see the module docstring).

    ``on_conflict``: what to do when ops fused in the engine (vLLM's q/k/v, gate/up) got different formats:
    ``"bf16"`` keeps the fused module in BF16 (never less precise than planned) and records a note;
    ``"error"`` raises ExportError.
    """
    if engine not in ENGINES:
        raise ExportError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if on_conflict not in CONFLICT_POLICIES:
        raise ExportError(f"on_conflict must be one of {', '.join(CONFLICT_POLICIES)}, got {on_conflict!r}")
    fp8 = _fp8_dtype(plan)
    for f in plan.assignment.values():
        get_format(f)  # unknown formats fail loudly
    side = {op: ("bf16" if f in HIGH_PRECISION else "fp8") for op, f in plan.assignment.items()}
    modules: dict[str, str] = {}
    sources: dict[str, list[str]] = {}
    notes: list[str] = []
    conflicts: set[str] = set()
    attention: dict[str, dict[str, str]] = {}
    for op, s in side.items():
        att = _split_attention(op)
        if att is not None:
            prefix, leaf = att
            attention.setdefault(prefix, {})[leaf] = s
            target = f"{prefix}.attn.impl.{leaf}" if engine == "vllm-gaudi" else op
        elif engine == "vllm-gaudi":
            prefix, _, leaf = op.rpartition(".")
            target = f"{prefix}.{VLLM_FUSED[leaf]}" if leaf in VLLM_FUSED and prefix else op
        else:
            target = op
        sources.setdefault(target, []).append(op)
        if target in modules and modules[target] != s:
            conflicts.add(target)
            s = "bf16"
        modules[target] = "bf16" if modules.get(target) == "bf16" else s
    for target in sorted(conflicts):
        members = ", ".join(f"{o}={plan.assignment[o]}" for o in sources[target])
        msg = f"{target} fuses ops with different formats ({members})"
        if on_conflict == "error":
            raise ExportError(f"{msg}; {engine} runs them as one module, so they must share one format")
        notes.append(f"{msg}: kept in BF16")
    for prefix, bgemms in attention.items():
        base = f"{prefix}.attn.impl" if engine == "vllm-gaudi" else prefix
        for helper, deps in HELPERS[engine].items():
            modules[f"{base}.{helper}"] = "fp8" if all(bgemms.get(d) == "fp8" for d in deps) else "bf16"
    if "lm_head" not in modules:  # plans made without the head leave it out: absent ops are reference
        modules["lm_head"] = "bf16"
        notes.append("lm_head is not in the plan: kept in BF16")
    return EngineMapping(engine, modules, fp8, notes)


def anchored(name: str) -> str:
    """Exact-match regex for INC's ``re.search`` on module names (``layers.1`` must not block ``layers.10``)."""
    return f"^{re.escape(name)}$"


def fp8_json(mapping: EngineMapping, mode: str, dump_stats_path: str,
             scale_method: str = "maxabs_hw") -> dict[str, Any]:
    """One INC fp8_quant JSON config (MEASURE or QUANTIZE) for the mapped plan."""
    if mode not in ("MEASURE", "QUANTIZE"):
        raise ExportError(f"mode must be MEASURE or QUANTIZE (engines do nothing with AUTO), got {mode!r}")
    return {
        "mode": mode,
        "observer": "maxabs",
        "scale_method": scale_method,
        "allowlist": {"types": list(ALLOWLIST_TYPES[mapping.engine]), "names": []},
        "blocklist": {"types": [], "names": [anchored(m) for m in mapping.blocked]},
        "dump_stats_path": dump_stats_path,
        "fp8_config": mapping.fp8_config,
        "hp_dtype": "bf16",
    }


def export_gaudi(plan: Plan, folder: str | Path, engine: str = "optimum-habana", on_conflict: str = "bf16",
                 dump_stats_path: str | None = None, scale_method: str = "maxabs_hw") -> dict[str, Path]:
    """Write ``maxabs_measure.json`` and ``maxabs_quant.json`` for ``engine`` into ``folder``.

    Statistics go to ``dump_stats_path`` (default ``<folder>/stats/measure``, a folder of its own: INC's
    MEASURE moves files there that share the dump prefix into a backup folder). Returns name -> path,
    including ``notes`` (what the engine forced to differ from the plan, and the module lists).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mapping = map_plan(plan, engine, on_conflict)
    if dump_stats_path is None:
        stats = folder.resolve() / "stats"
        stats.mkdir(parents=True, exist_ok=True)  # INC checks that the folder is writable
        dump_stats_path = str(stats / "measure")
    for note in mapping.notes:
        log.warning("%s: %s", engine, note)
    out = {kind: save_json(fp8_json(mapping, mode, dump_stats_path, scale_method), folder / name)
           for kind, mode, name in (("measure", "MEASURE", "maxabs_measure.json"),
                                    ("quant", "QUANTIZE", "maxabs_quant.json"))}
    layers = sorted({i for i in map(decoder_layer_index, mapping.modules) if i is not None})
    out["notes"] = save_json({"engine": engine, "fp8_config": mapping.fp8_config, "notes": mapping.notes,
                              "n_layers_covered": len(layers), "fp8_modules": mapping.quantized,
                              "bf16_modules": mapping.blocked}, folder / "export_notes.json")
    return out
