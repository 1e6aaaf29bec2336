"""KV-cache precision as a decision of the attention group (issue 17).

What a KV-cache quantisation perturbs, read from the engines' sources: optimum-habana's ``GaudiLlamaAttention`` writes
K (after RoPE, before the GQA repeat) and V through its ``k_cache``/``v_cache`` modules (class ``KVCache``) and
attends to what their update returns, in the prefill as well as in decode; INC's ``PatchedKVCache`` quantises the
new states with a per-tensor scale measured in MEASURE, stores them in FP8 and dequantises what the update returns.
The attention therefore reads rounded K and V at every query position: exactly the ``b`` operands of the attention
BGEMMs (``matmul_qk``'s b is Kᵀ, ``matmul_av``'s b is V), per tensor, with the GQA copies already folded back by the
collector (one stored copy, one rounding error). So the loss term of a KV cache in format f is the ``b`` operand's
term of ``matmul_qk`` (K) and ``matmul_av`` (V) in f — noise and mean shift — from the calibration sums as they
are. Not modelled: INC's scale is static (from calibration) where the sums use a per-sequence one (for FP8 the
relative rounding error does not depend on the scale except at saturation and subnormals); when the BGEMM itself
runs in the same format it re-rounds the dequantised cache with (nearly) the same scale, so that ``b`` error is
charged once, not twice (a different format is charged again).

Gains: per layer the cache holds batch × kv heads × context × head dim elements of K and as many of V (read from a
real decode step's cache, ``gains.decode.kv_geometry``). M: the bytes a format saves; RT: the time to read them once
per decode step at a roofline device's bandwidth. ET is only what was measured, and no KV-cache precision was
measured as a real, faster path on CPU, so an ET (or TT) plan with a KV-cache decision is refused rather than
given a gain nobody measured.
The decision's names are the engines' module names (``<attention>.k_cache``/``.v_cache``), so a plan exports as is.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ArtifactError, IpampError
from .formats import get_format
from .gains.theory import roofline_device
from .ops import KV_LEAVES, decoder_layer_index, kv_bgemm
from .records import Gains, Sensitivity

#: formats a KV cache can take: INC patches KVCache for FP8 only (``PatchedKVCache`` allocates float8_e4m3fn)
KV_FORMATS = ("fp8_e4m3",)


@dataclass
class KVCacheSpec:
    """What the IP may choose for each layer's cache and what it saves: ``numel[layer]`` elements of K (and of V)."""

    formats: list[str]
    numel: dict[int, int]
    rt_device: str | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def bytes_saved(self, layer: int, ref: str, fmt: str) -> float:
        if fmt == ref:
            return 0.0
        return self.numel[layer] * (get_format(ref).bytes - get_format(fmt).bytes)


def kv_spec(decode_gains: Gains, formats: list[str], rt_device: str | None = None) -> KVCacheSpec:
    """The spec from a decode gains record's ``quality.kv_cache`` (the geometry of the real cache it was timed with)."""
    geo = (decode_gains.quality or {}).get("kv_cache")
    if not geo:
        raise ArtifactError("the decode gains record has no KV-cache geometry: rerun `inc-ipamp measure`")
    bad = [f for f in formats if f not in KV_FORMATS]
    if bad or not formats:
        raise IpampError(f"a KV cache can be stored in {', '.join(KV_FORMATS)} (INC's KVCache patch is FP8 only), "
                         f"not {', '.join(bad) or 'nothing'}")
    if rt_device is not None:
        roofline_device(rt_device)
    first = next(iter(geo.values()))
    return KVCacheSpec(list(formats), {int(k): int(v["numel"]) for k, v in geo.items()}, rt_device,
                       f"batch {first['batch']}, context {first['context']}, {first['kv_heads']} kv heads x "
                       f"{first['head_dim']} per layer")


def attention_prefixes(ops: list[str]) -> list[str]:
    """Attention modules whose two BGEMMs are both in ``ops`` (one group holds q, k, v, qk, av)."""
    qk = {op.rpartition(".")[0] for op in ops if op.endswith(".matmul_qk")}
    return sorted(p for p in qk if f"{p}.matmul_av" in ops)


def kv_ops(prefix: str) -> list[str]:
    return [f"{prefix}.{leaf}" for leaf in KV_LEAVES]


def add_kv_cache(inst: Any, sens: Sensitivity, spec: KVCacheSpec, min_sqnr_db: float | None = None) -> Any:
    """``solver.Instance`` with each attention group's configs crossed with its K and V cache formats (module
    docstring): noise, shift and gains of every combination; low-precision caches left out of ET and TT instances."""
    if inst.metric not in ("M", "RT"):
        raise IpampError(f"a KV-cache decision needs a metric that values the cache's bytes (M, or RT with "
                         f"--rt-device): no KV-cache time gain was measured, so {inst.metric} cannot rank it")
    if inst.metric == "RT" and spec.rt_device is None:
        raise IpampError("an RT plan with a KV-cache decision needs the roofline device (--rt-device)")
    ref = inst.reference_format
    use_shift = inst.uses_shift
    kv_choices = [ref, *spec.formats]
    groups = []
    for g in inst.groups:
        if spec.rt_device is None and "RT" in g.gain:  # the cache's RT is unknown without its device: no RT total
            g = replace(g, gain={m: v for m, v in g.gain.items() if m != "RT"})
        prefixes = attention_prefixes(g.ops)
        if not prefixes:
            groups.append(g)
            continue
        ops = list(g.ops)
        extra = []  # per prefix: (layer, k_cache op, v_cache op)
        for p in prefixes:
            layer = decoder_layer_index(p)
            if layer is None or layer not in spec.numel:
                raise ArtifactError(f"no KV-cache geometry for the attention {p} (layer {layer}): measure again")
            ops += kv_ops(p)
            extra.append((p, layer))
        configs, noises, shifts, gains = [], [], [], {m: [] for m in g.gain}
        ref_index = -1
        for ci, cfg in enumerate(g.configs):
            for combo in itertools.product(kv_choices, repeat=2 * len(extra)):
                add_noise, add_shift, ok = 0.0, 0.0, True
                saved = 0.0
                for j, (p, layer) in enumerate(extra):
                    for leaf, f in zip(KV_LEAVES, combo[2 * j: 2 * j + 2], strict=True):
                        if f == ref:
                            continue
                        mm = f"{p}.{KV_LEAVES[leaf]}"
                        if min_sqnr_db is not None and _operand_sqnr(sens, mm, "b", f) < min_sqnr_db:
                            ok = False
                        saved += spec.bytes_saved(layer, ref, f)
                        if cfg[g.ops.index(mm)] != f:  # the BGEMM does not already round b in this format
                            add_noise += sens.operand_term(mm, "b", f, inst.noise, centred=use_shift)
                            add_shift += sens.operand_shift(mm, "b", f) if use_shift else 0.0
                if not ok:
                    continue
                if all(f == ref for f in (*cfg, *combo)):
                    ref_index = len(configs)
                configs.append(tuple(cfg) + tuple(combo))
                noises.append(g.noise[ci] + add_noise)
                shifts.append(g.shift_of(ci) + add_shift)
                for m, vals in g.gain.items():
                    gains[m].append(vals[ci] + _kv_gain(m, saved, spec))
        groups.append(replace(g, ops=ops, configs=configs, noise=noises, gain=gains, ref_index=ref_index,
                              shift=shifts if g.shift else None))
    return replace(inst, groups=groups)


def _kv_gain(metric: str, saved_bytes: float, spec: KVCacheSpec) -> float:
    if metric == "M":
        return saved_bytes
    if metric == "RT":
        return saved_bytes / (roofline_device(spec.rt_device).mem_tb_s * 1e12)
    return 0.0  # other metrics of the record (ET beside an M or RT plan): the cache adds nothing measured


def _operand_sqnr(sens: Sensitivity, op: str, operand: str, fmt: str) -> float:
    import math

    st = sens.ops[op].operands[operand]
    e = st.err2.get(fmt, 0.0)
    return float("inf") if e <= 0 else 10 * math.log10(st.x2 / e)


def kv_loss(sens: Sensitivity, assignment: dict[str, str], noise: str = "auto") -> float:
    """Predicted loss MSE of KV caches alone in low precision ({``<attention>.k_cache``: format}, the BGEMMs and
    everything else in the reference): Σ b-operand noise + (Σ b-operand shift)², as ``Sensitivity.predict`` adds."""
    use_shift = sens.has_shift
    noise_sum, shift = 0.0, 0.0
    for op, f in assignment.items():
        if get_format(f).kind == "ref":
            continue
        mm = kv_bgemm(op)
        noise_sum += sens.operand_term(mm, "b", f, noise, centred=use_shift)
        shift += sens.operand_shift(mm, "b", f) if use_shift else 0.0
    return noise_sum + shift**2


def static_scales(sens: Sensitivity, assignment: dict[str, str]) -> dict[str, float]:
    """Per cache op: the per-tensor scale INC's MEASURE pass would give it (max |K| or |V| over the calibration / the
    format's max), from the b operand's ``amax`` in the sensitivity record."""
    out = {}
    for op, f in assignment.items():
        amax = sens.ops[kv_bgemm(op)].operands["b"].amax
        out[op] = max(amax / get_format(f).qmax, 1e-30)
    return out
