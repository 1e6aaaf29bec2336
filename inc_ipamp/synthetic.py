"""SYNTHETIC records shaped like production models, for the solver's scale benchmark and tests (never the pipeline).

Why: the integer program's size is set by the model's shape (layers x groups x configs per group), not by its
numbers; a 70B model cannot be calibrated on this machine, but the solver can be run on an instance of its
exact shape. The records are the real classes (Sensitivity, Partition, Gains), so ``solver.frontier`` runs on them
unchanged. Every number in them is seeded random (sensitivities log-normal with mean-shift sums, as
``calibrate(curvature=True)`` records them; ET gains ~ MACs x a per-format speedup with interaction noise); the
model names say SYNTHETIC, and nothing made here may be reported as a measurement of a model.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .formats import get_format
from .records import Gains, Group, GroupGains, OperandStats, OpSensitivity, Partition, Sensitivity


@dataclass(frozen=True)
class Shape:
    """Dimensions of a Llama/Mixtral-family decoder (``experts`` = 0: dense MLP)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    experts: int = 0
    top_k: int = 2


#: Llama-3-70B (config.json of meta-llama/Meta-Llama-3-70B): 80 layers, GQA 64/8 heads of 128, MLP 28672.
LLAMA_70B = Shape("llama-70b", 80, 8192, 64, 8, 128, 28672, 128256)
#: Mixtral-8x7B (config.json of mistralai/Mixtral-8x7B-v0.1): 32 layers, GQA 32/8, 8 experts of 14336, top-2.
MIXTRAL_8X7B = Shape("mixtral-8x7b", 32, 4096, 32, 8, 128, 14336, 32000, experts=8, top_k=2)
#: SmolLM2-135M, the size every earlier benchmark ran at (for the growth column).
SMOLLM2_135M = Shape("smollm2-135m", 30, 576, 9, 3, 64, 1536, 49152)
SHAPES = {s.name: s for s in (LLAMA_70B, MIXTRAL_8X7B, SMOLLM2_135M)}

#: relative speed of each format against the reference on a synthetic accelerator (inputs, not measurements)
_SPEED = {"fp8_e4m3": 1.6, "fp8_e5m2": 1.6, "int8": 1.5, "int8_pc": 1.45, "bf16": 1.0, "fp32": 1.0}
#: typical input SQNR (dB) per format, spread ±6 dB per op, so the 25 dB guard removes some configs as on real models
_SQNR = {"fp8_e4m3": 31.0, "fp8_e5m2": 25.0, "int8": 24.0, "int8_pc": 33.0, "bf16": 48.0}
#: noise relative to FP8-E4M3 (2^(-2m) per mantissa bit; integers by their SQNR)
_NOISE = {"fp8_e4m3": 1.0, "fp8_e5m2": 4.0, "int8": 3.0, "int8_pc": 0.7, "bf16": 1 / 256}


def layer_layout(s: Shape, seq: int) -> list[tuple[str, list[tuple[str, str, int, int]]]]:
    """Groups of one decoder layer as the partition cuts them: (group suffix, [(op suffix, kind, MACs, |W|)]).

    Dense: {q,k,v,qk,av}, {o}, {gate,up}, {down}. MoE (Mixtral): {q,k,v,qk,av}, {o}, the router {gate}, and per
    expert {w1,w3}, {w2} (each expert its own groups: docs/SCALING.md says why), with MACs for the expected
    seq·top_k/experts routed tokens.
    """
    h, kvd, hd = s.hidden, s.kv_heads * s.head_dim, s.head_dim
    att = [("self_attn.q_proj", "linear", seq * h * h, h * h),
           ("self_attn.k_proj", "linear", seq * h * kvd, h * kvd),
           ("self_attn.v_proj", "linear", seq * h * kvd, h * kvd),
           ("self_attn.matmul_qk", "bgemm", s.heads * seq * seq * hd, 0),
           ("self_attn.matmul_av", "bgemm", s.heads * seq * seq * hd, 0)]
    out = [("attn", att), ("o_proj", [("self_attn.o_proj", "linear", seq * h * h, h * h)])]
    if not s.experts:
        return out + [("mlp_in", [("mlp.gate_proj", "linear", seq * h * s.inter, h * s.inter),
                                  ("mlp.up_proj", "linear", seq * h * s.inter, h * s.inter)]),
                      ("down_proj", [("mlp.down_proj", "linear", seq * s.inter * h, s.inter * h)])]
    tok = max(1, seq * s.top_k // s.experts)
    out.append(("router", [("block_sparse_moe.gate", "linear", seq * h * s.experts, h * s.experts)]))
    for e in range(s.experts):
        p = f"block_sparse_moe.experts.{e}"
        out.append((f"expert{e}_in", [(f"{p}.w1", "linear", tok * h * s.inter, h * s.inter),
                                      (f"{p}.w3", "linear", tok * h * s.inter, h * s.inter)]))
        out.append((f"expert{e}_out", [(f"{p}.w2", "linear", tok * s.inter * h, s.inter * h)]))
    return out


def per_sequence(rng: random.Random, n: int, lin: float, coh: float) -> list[float]:
    """``n`` per-sequence first-order changes with sum ``lin`` and sum of squares ``coh`` (where coh ≥ lin²/n),
    independent noise around their mean: what a record's ``seq`` holds, made up for a synthetic one."""
    z = [rng.gauss(0.0, 1.0) for _ in range(n)]
    mz = sum(z) / n
    sz = math.sqrt(sum((v - mz) ** 2 for v in z) / n) or 1.0
    m = lin / n
    sd = math.sqrt(max(coh / n - m * m, 0.0))
    return [m + sd * (v - mz) / sz for v in z]


def synthetic_records(s: Shape, formats: tuple[str, ...] = ("bf16", "fp8_e4m3", "fp8_e5m2"), seq: int = 2048,
                      n_samples: int = 32, mean_loss: float = 2.0, seed: int = 0,
                      layers: int | None = None) -> tuple[Sensitivity, Partition, Gains]:
    """SYNTHETIC (sensitivity, partition, gains) with ``s``'s op shapes and every group's full config table.

    ``formats[0]`` is the reference. ``layers`` keeps a prefix of the decoder (for small test instances).
    """
    rng = random.Random(seed)
    seq_rng = random.Random(seed + 1)  # the per-sequence lists draw from their own stream: the sums stay as they were
    ref, lows = formats[0], list(formats[1:])
    for f in formats:
        get_format(f)
    n_layers = s.layers if layers is None else layers
    sec_per_mac = 1.0 / 200e12  # a synthetic 200 TMAC/s reference device
    ops: dict[str, OpSensitivity] = {}
    macs_of: dict[str, int] = {}
    groups: list[Group] = []
    gains: dict[str, GroupGains] = {}

    def add_op(name: str, kind: str, macs: int, wnum: int, depth: float) -> None:
        operands = {}
        for opd in (("a", "b") if kind == "bgemm" else ("x", "w")):
            base = mean_loss**2 * 1e-6 * math.exp(rng.gauss(0, 1.2)) * depth
            st = OperandStats(xg2=n_samples * base * 300, g2=1.0, amax=10.0, x2=1.0, numel=1)
            for f in lows:
                term = n_samples * base * _NOISE[f] * math.exp(rng.gauss(0, 0.3))
                st.emp[f] = term
                st.err2[f] = 10 ** (-(_SQNR[f] + rng.uniform(-6, 6)) / 10)
                st.curv[f] = term * rng.uniform(0.5, 4.0) / seq
                if get_format(f).kind == "int":
                    st.int_uniform[f] = term * rng.uniform(0.8, 1.5)
                if opd != "w":
                    coh = term * rng.uniform(0.7, 1.3)
                    st.seq[f] = per_sequence(seq_rng, n_samples, term * rng.uniform(-0.5, 0.5), coh)
                    st.lin[f], st.coh[f] = sum(st.seq[f]), sum(v * v for v in st.seq[f])
            operands[opd] = st
        ops[name] = OpSensitivity(name, kind, calls=1, macs=macs, weight_numel=wnum, operands=operands)
        macs_of[name] = macs

    def add_group(gname: str, names: list[str], layer: int | None, signature: str) -> None:
        grp = Group(gname, names, layer=layer, signature=signature)
        groups.append(grp)
        cfgs = grp.configs(list(formats))
        et, tt, mem = [], [], []
        for cfg in cfgs:
            saved = sum(macs_of[o] * sec_per_mac * (1 - 1 / _SPEED[f]) for o, f in zip(names, cfg, strict=True)
                        if f != ref)
            tt.append(saved)
            # measured-like: fused ops interact (factor 0.6-1.1), timing noise of ~1% of the group's reference time
            t_ref = sum(macs_of[o] for o in names) * sec_per_mac
            et.append(0.0 if saved == 0 else saved * rng.uniform(0.6, 1.1) + rng.gauss(0, 0.01 * t_ref))
            mem.append(sum(ops[o].weight_numel * (get_format(ref).bytes - get_format(f).bytes)
                           for o, f in zip(names, cfg, strict=True)))
        gains[gname] = GroupGains(gname, [list(c) for c in cfgs], {"ET": et, "TT": tt, "M": mem},
                                  source={"ET": "SYNTHETIC", "TT": "SYNTHETIC", "M": "SYNTHETIC"})

    layout = layer_layout(s, seq)
    for layer in range(n_layers):
        depth = 2.0 if layer in (0, 1, n_layers - 1) else 1.0
        for gname, members in layout:
            names = [f"model.layers.{layer}.{m[0]}" for m in members]
            for (_, kind, macs, wnum), nm in zip(members, names, strict=True):
                add_op(nm, kind, macs, wnum, depth)
            add_group(f"model.layers.{layer}.{gname}", names, layer, gname.rstrip("0123456789") or gname)
    add_op("lm_head", "linear", seq * s.hidden * s.vocab, s.hidden * s.vocab, 5.0)
    add_group("lm_head", ["lm_head"], None, "lm_head")
    model = f"SYNTHETIC-{s.name}-shaped"
    sens = Sensitivity(model, n_samples, seq, mean_loss, list(formats), ops, data_source="synthetic")
    part = Partition(model, "synthetic", groups, notes=["SYNTHETIC: inc_ipamp.synthetic"])
    ref_time = sum(macs_of.values()) * sec_per_mac
    return sens, part, Gains(model, "synthetic", list(formats), 1, seq, ref_time, gains, notes=["SYNTHETIC"])
