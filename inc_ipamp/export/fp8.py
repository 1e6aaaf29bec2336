"""The one translation of a Plan into INC fp8_quant settings, per engine, failing closed.

INC 3.10 decides per module with ``should_quantize`` (fp8_quant/_core/utils.py): the module's class name must
be in the patched-module table minus ``blocklist.types``; then ``allowlist.types`` **or** an ``allowlist.names``
regex (``re.search`` on the dotted module name) must admit it, unless the allowlist is completely empty, which
admits everything; and no ``blocklist.names`` regex may match. A type in the allowlist therefore admits every
module of that type whatever the names say, and a blocklist of exact names blocks nothing once an engine puts
a prefix in front of them. So the settings here are:

* ``allowlist.types`` empty and ``allowlist.names`` = one regex per module the plan runs in FP8, anchored at
  the end and at a dot boundary, ``(^|\\.)model\\.layers\\.3\\.self_attn\\.q_proj$``: a wrapper prefix
  (``_orig_mod.``, ``module.``) still matches, ``layers.1`` never matches ``layers.10``, and a suffix (a LoRA
  ``.base_layer``) does not match, so it stays high precision. A plan with no FP8 module gets the never-matching
  regex ``(?!)`` (an empty allowlist would admit every module).
* ``blocklist.names`` = the same regexes for the modules the plan keeps in high precision (belt and braces).

Which modules an engine has, read from its sources (tests/data/engine_modules/ lists them with their origin):

* ``inc``: the Hugging Face module names the plan uses (INC applied to the model the plan was made on).
* ``optimum-habana`` (GaudiLlama/Qwen2/Mixtral): HF names, plus ``self_attn.qkv_proj`` when the model was built
  with ``fused_qkv`` (FP8 only if q, k and v all are), attention helpers ``k_cache``, ``v_cache`` and
  ``fused_scaled_dot_product_attention``, and for Mixtral the ``GaudiMixtralSparseMoeBlock`` (INC quantizes all
  its experts in one fused op, so the block is FP8 only if every expert Linear of it in the plan is, and the
  expert Linears themselves are never listed: INC's MoE op reads their weights). Under DeepSpeed tensor
  parallelism the same names hold other classes (LinearLayer, LinearAllreduce, ScopedLinearAllReduce,
  LmHeadLinearAllreduce); names, not types, decide here, so the plan applies to them too.
* ``vllm-gaudi`` (vLLM's Llama with vllm-gaudi's HPUAttentionImpl): fused ``qkv_proj`` and ``gate_up_proj``
  (one format for their parts), attention ops under ``self_attn.attn.impl`` (``matmul_qk``, ``matmul_av``,
  ``softmax``, ``batch2block_matmul``, ``block2batch_matmul``, ``k_cache``, ``v_cache``,
  ``fused_scaled_dot_product_attention``). MoE experts (vLLM's FusedMoE) are not exported: they stay BF16.

Attention helpers follow the BGEMM whose operand they carry (K cache and Q·Kᵀ; V cache, softmax and P·V) and the
fused kernels doing both products need both: nothing runs FP8 that the plan did not put in FP8. A plan that decides
the KV cache itself (``<attention>.k_cache``/``.v_cache``, ``inc_ipamp.kvcache``) sets those modules as it says
(under ``self_attn.attn.impl`` for vLLM-Gaudi); a transformers model has no such module, so for engine ``inc`` the
note says the cache stays high precision there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import IpampError
from ..formats import FORMATS, get_format
from ..records import Plan

ENGINES = ("inc", "optimum-habana", "vllm-gaudi")
#: INC ``fp8_config`` per plan format that INC's fp8_quant runs (derived from formats.Format, the one source).
FP8_FORMATS: dict[str, str] = {n: f.inc_fp8_config for n, f in FORMATS.items() if f.inc_fp8_config}
#: Plan formats INC keeps in the high-precision dtype (``hp_dtype``).
HIGH_PRECISION = ("bf16", "fp32")
#: A regex that matches no module name: the allowlist of a plan without FP8 modules (an empty one admits all).
NO_MODULE = "(?!)"
CONFLICT_POLICIES = ("bf16", "error")
MODES = ("MEASURE", "QUANTIZE")

#: Per engine: fused module leaf -> the plan's op leaves it computes (all must be FP8 for it to be FP8).
FUSED = {
    "inc": {},
    "optimum-habana": {"qkv_proj": ("q_proj", "k_proj", "v_proj")},  # config.fused_qkv (GaudiLlamaAttention)
    "vllm-gaudi": {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
}
#: Per engine: attention helper module -> the BGEMMs whose format it follows (all must be FP8).
HELPERS = {
    "inc": {},
    "optimum-habana": {"k_cache": ("matmul_qk",), "v_cache": ("matmul_av",),
                       "fused_scaled_dot_product_attention": ("matmul_qk", "matmul_av")},
    "vllm-gaudi": {"k_cache": ("matmul_qk",), "v_cache": ("matmul_av",), "softmax": ("matmul_av",),
                   "batch2block_matmul": ("matmul_qk", "matmul_av"), "block2batch_matmul": ("matmul_qk", "matmul_av"),
                   "fused_scaled_dot_product_attention": ("matmul_qk", "matmul_av")},
}
#: Where the attention BGEMMs live, relative to the plan's ``...self_attn`` prefix.
ATTENTION_HOME = {"inc": "", "optimum-habana": "", "vllm-gaudi": ".attn.impl"}
_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.\d+\.[^.]+$")


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
        return sorted(m for m, f in self.modules.items() if f == "bf16")

    @property
    def quantized(self) -> list[str]:
        return sorted(m for m, f in self.modules.items() if f == "fp8")


def name_regex(name: str) -> str:
    """Regex for INC's ``re.search`` that matches ``name`` under any dotted prefix and nothing else."""
    return rf"(^|\.){re.escape(name)}$"


def fp8_dtype(plan: Plan) -> str:
    """The plan's one INC ``fp8_config`` ("E4M3" if it has no FP8 op); ExportError for non-FP8 low formats."""
    low = {f for f in plan.assignment.values() if f not in HIGH_PRECISION and f != plan.reference_format}
    for f in low:
        get_format(f)  # unknown formats fail loudly
    bad = sorted(f for f in low if f not in FP8_FORMATS)
    if bad:
        raise ExportError(
            f"the plan uses {', '.join(bad)}, which INC's fp8_quant cannot run (it runs {', '.join(FP8_FORMATS)} "
            f"against {'/'.join(HIGH_PRECISION)}); solve with formats bf16,fp8_e4m3")
    kinds = {FP8_FORMATS[f] for f in low}
    if len(kinds) > 1:
        raise ExportError("the plan mixes fp8_e4m3 and fp8_e5m2, but INC's fp8_config is one dtype per model")
    return kinds.pop() if kinds else "E4M3"


def _target(op: str, engine: str) -> tuple[str | None, str | None]:
    """(engine module running ``op``, its attention prefix if ``op`` is a BGEMM); None: no module of its own."""
    prefix, _, leaf = op.rpartition(".")
    if leaf in ("matmul_qk", "matmul_av") and prefix:
        return f"{prefix}{ATTENTION_HOME[engine]}.{leaf}", prefix
    if leaf in ("k_cache", "v_cache") and prefix:  # a KV-cache decision of the plan (inc_ipamp.kvcache)
        return f"{prefix}{ATTENTION_HOME[engine]}.{leaf}", None
    expert = _EXPERT.match(op)
    if expert and engine == "optimum-habana":
        # GaudiMixtralSparseMoeBlock runs all its experts in one INC op. transformers 5 names Mixtral's block `mlp`;
        # optimum-habana (transformers 4.x) calls it `block_sparse_moe`, the name its w1/w2/w3 experts identify
        block = expert["block"]
        if leaf in ("w1", "w2", "w3") and block.endswith(".mlp"):
            block = block[: -len(".mlp")] + ".block_sparse_moe"
        return block, None
    if expert and engine == "vllm-gaudi":
        return None, None
    if engine == "vllm-gaudi" and prefix:  # optimum-habana's optional qkv_proj is added beside q/k/v in map_plan
        for fused, parts in FUSED[engine].items():
            if leaf in parts:
                return f"{prefix}.{fused}", None
    return op, None


def _complete_experts(block: str, ops: list[str]) -> bool:
    """True unless ``ops`` are a MoE block's expert ops with a gap: every expert 0..max must have every leaf seen.

    A plan that leaves out the last experts entirely cannot be told from a model with fewer experts; plans made by
    inc_ipamp list every op of the model.
    """
    grid = {(int(m["e"]), m["leaf"]) for o in ops if (m := re.match(rf"^{re.escape(block)}\.experts\.(?P<e>\d+)\."
                                                                     r"(?P<leaf>[^.]+)$", o))}
    if not grid:
        return True
    experts = {e for e, _ in grid}
    leaves = {leaf for _, leaf in grid}
    return experts == set(range(max(experts) + 1)) and len(grid) == len(experts) * len(leaves)


def map_plan(plan: Plan, engine: str, on_conflict: str = "bf16") -> EngineMapping:
    """Translate the plan's op names into ``engine``'s module names (see the module docstring).

    ``on_conflict``: what to do when ops fused in the engine (vLLM's q/k/v, gate/up; a MoE block's experts) got
    different formats: ``"bf16"`` keeps the fused module in BF16 (never less precise than planned) and records a
    note; ``"error"`` raises ExportError.
    """
    if engine not in ENGINES:
        raise ExportError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if on_conflict not in CONFLICT_POLICIES:
        raise ExportError(f"on_conflict must be one of {', '.join(CONFLICT_POLICIES)}, got {on_conflict!r}")
    fp8 = fp8_dtype(plan)
    side = {op: ("bf16" if f in HIGH_PRECISION or f == plan.reference_format else "fp8")
            for op, f in plan.assignment.items()}
    sources: dict[str, list[str]] = {}
    attention: dict[str, dict[str, str]] = {}
    dropped: list[str] = []
    for op in sorted(side):
        target, att = _target(op, engine)
        if target is None:
            dropped.append(op)
            continue
        sources.setdefault(target, []).append(op)
        if att is not None:
            attention.setdefault(att, {})[op.rpartition(".")[2]] = side[op]
    modules: dict[str, str] = {}
    notes: list[str] = []
    for target, ops in sources.items():
        sides = {side[o] for o in ops}
        modules[target] = "fp8" if sides == {"fp8"} else "bf16"
        parts = FUSED[engine].get(target.rpartition(".")[2])
        if modules[target] == "fp8" and parts and {o.rpartition(".")[2] for o in ops} != set(parts):
            modules[target] = "bf16"  # a part the plan does not list runs in this module too
            notes.append(f"{target}: the plan lists only {', '.join(ops)} of its parts: kept in BF16")
        if modules[target] == "fp8" and not _complete_experts(target, ops):
            modules[target] = "bf16"
            notes.append(f"{target}: the plan lists only some of its experts' ops, and INC runs all of them in one "
                         "op: kept in BF16")
        if len(sides) > 1:
            members = ", ".join(f"{o}={plan.assignment[o]}" for o in ops)
            msg = f"{target} fuses ops with different formats ({members})"
            if on_conflict == "error":
                raise ExportError(f"{msg}; {engine} runs them as one module, so they must share one format")
            notes.append(f"{msg}: kept in BF16")
    if dropped:
        notes.append(f"{len(dropped)} MoE expert ops have no {engine} module of their own here: kept in BF16")
    if engine == "optimum-habana":  # config.fused_qkv builds one qkv_proj instead of q/k/v
        prefixes = {op.rpartition(".")[0] for op in side if op.endswith(".q_proj")}
        for prefix in sorted(prefixes):
            parts = [side.get(f"{prefix}.{leaf}") for leaf in FUSED[engine]["qkv_proj"]]
            modules[f"{prefix}.qkv_proj"] = "fp8" if all(s == "fp8" for s in parts) else "bf16"
    for prefix, bgemms in attention.items():
        base = f"{prefix}{ATTENTION_HOME[engine]}"
        for helper, deps in HELPERS[engine].items():
            if f"{prefix}.{helper}" in side:  # the plan decided this cache itself
                continue
            modules[f"{base}.{helper}"] = "fp8" if all(bgemms.get(d) == "fp8" for d in deps) else "bf16"
    kv = sorted(op for op in side if op.rpartition(".")[2] in ("k_cache", "v_cache") and side[op] == "fp8")
    if kv and engine == "inc":
        notes.append(f"{len(kv)} KV-cache decision(s) in FP8 name optimum-habana's k_cache/v_cache modules: a "
                     "transformers model has none, so INC leaves its cache in high precision")
    if "lm_head" not in modules:  # plans made without the head leave it out: absent ops are reference
        modules["lm_head"] = "bf16"
        notes.append("lm_head is not in the plan: kept in BF16")
    return EngineMapping(engine, dict(sorted(modules.items())), fp8, notes)


@dataclass
class Fp8Settings:
    """INC fp8_quant settings for one plan, engine and mode: ``json`` is the file engines read as ``QUANT_CONFIG``
    and the keyword arguments of ``FP8Config``; ``mapping`` says which modules run FP8 and what the engine forced."""

    json: dict[str, Any]
    mapping: EngineMapping

    def config(self):
        """INC's ``FP8Config`` object for these settings (what ``FP8Config.from_json_file`` builds from ``json``)."""
        from neural_compressor.torch.quantization import FP8Config

        return FP8Config(**self.json)


def fp8_settings(plan: Plan, engine: str = "inc", mode: str = "QUANTIZE", *, dump_stats_path: str,
                 scale_method: str = "maxabs_hw", hp_dtype: str = "bf16", use_qdq: bool = False,
                 observer: str = "maxabs", on_conflict: str = "bf16") -> Fp8Settings:
    """The plan as INC fp8_quant settings for ``engine`` (see the module docstring): the one translation used by
    the Gaudi JSON export, the CPU FP8 Q/DQ apply and the HPU gain backend.

    ``mode`` must be MEASURE or QUANTIZE (engines do nothing with AUTO). On CPU INC needs ``use_qdq=True`` and a
    scale method other than ``maxabs_hw``.
    """
    if mode not in MODES:
        raise ExportError(f"mode must be MEASURE or QUANTIZE (engines do nothing with AUTO), got {mode!r}")
    mapping = map_plan(plan, engine, on_conflict)
    allow = [name_regex(m) for m in mapping.quantized] or [NO_MODULE]
    d: dict[str, Any] = {
        "mode": mode,
        "observer": observer,
        "scale_method": scale_method,
        "allowlist": {"types": [], "names": allow},
        "blocklist": {"types": [], "names": [name_regex(m) for m in mapping.blocked]},
        "dump_stats_path": dump_stats_path,
        "fp8_config": mapping.fp8_config,
        "hp_dtype": hp_dtype,
    }
    if use_qdq:
        d["use_qdq"] = True
    return Fp8Settings(d, mapping)
