"""Time the β sweep (Pareto frontier) and the baselines on a SmolLM2-sized group-choice problem.

Without ``--run-dir`` the instance is SYNTHETIC (seeded random numbers shaped like SmolLM2-135M: 30 layers
× 4 groups with 32/2/4/2 configs, plus lm_head as its own group); only the solver timings it prints are
measured. With ``--run-dir`` holding a real run's sensitivity.json, partition.json and gains.json, those
records are used instead.

    python benchmarks/bench_solver.py [--run-dir DIR] [--points 20] [--metric ET] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

from inc_ipamp.baselines import BASELINES, baseline
from inc_ipamp.records import Gains, Group, GroupGains, OperandStats, OpSensitivity, Partition, Sensitivity
from inc_ipamp.solver import build_instance, default_betas, frontier, save_frontier, solve

sys.path.insert(0, str(Path(__file__).parent))
from provenance import finish, provenance  # noqa: E402

# SmolLM2-135M: hidden 576, 9 heads / 3 KV heads of 64, intermediate 1536, vocab 49152, 30 layers.
HID, HEADS, KV, HD, INTER, VOCAB, LAYERS = 576, 9, 3, 64, 1536, 49152, 30


def synthetic_smollm2(seq: int = 512, formats=("fp32", "fp8_e4m3"), seed: int = 0):
    """SYNTHETIC records with SmolLM2-135M's op shapes; sensitivities log-normal (with mean-shift sums, so the
    IP carries its shift constraints), ET gains ~ MACs with noise."""
    rng = random.Random(seed)
    ref, low = formats[0], formats[1]
    shapes = {  # op -> (kind, MACs per sequence, weight elements)
        "self_attn.q_proj": ("linear", seq * HID * HID, HID * HID),
        "self_attn.k_proj": ("linear", seq * HID * KV * HD, HID * KV * HD),
        "self_attn.v_proj": ("linear", seq * HID * KV * HD, HID * KV * HD),
        "self_attn.matmul_qk": ("bgemm", HEADS * seq * seq * HD, 0),
        "self_attn.matmul_av": ("bgemm", HEADS * seq * seq * HD, 0),
        "self_attn.o_proj": ("linear", seq * HID * HID, HID * HID),
        "mlp.gate_proj": ("linear", seq * HID * INTER, HID * INTER),
        "mlp.up_proj": ("linear", seq * HID * INTER, HID * INTER),
        "mlp.down_proj": ("linear", seq * INTER * HID, INTER * HID),
    }
    layout = [("attn_in", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.matmul_qk",
                           "self_attn.matmul_av"]),
              ("o_proj", ["self_attn.o_proj"]), ("mlp_in", ["mlp.gate_proj", "mlp.up_proj"]),
              ("down_proj", ["mlp.down_proj"])]
    n, mean_loss = 8, 3.1
    ops, groups, ggains = {}, [], {}
    sec_per_mac = 1.0 / 60e9  # ~60 GMAC/s reference throughput, low precision ~1.3x faster
    macs_of: dict[str, int] = {}

    def add_op(name: str, kind: str, macs: int, wnum: int, depth: float) -> None:
        operands = {}
        for opd in (("a", "b") if kind == "bgemm" else ("x", "w")):
            term = mean_loss**2 * 1e-5 * math.exp(rng.gauss(0, 1.2)) * depth
            operands[opd] = OperandStats(xg2=n * term * 30, x2=1.0, numel=1, emp={low: n * term},
                                         err2={low: 10 ** (-rng.uniform(2.0, 4.5))},
                                         # mean-shift sums, as calibrate(curvature=True) records them
                                         curv={low: n * term * rng.uniform(0.5, 4.0) / seq},
                                         lin={low: n * term * rng.uniform(-0.5, 0.5)})
        ops[name] = OpSensitivity(name, kind, calls=1, macs=macs, weight_numel=wnum, operands=operands)
        macs_of[name] = macs

    def add_group(gname: str, names: list[str], layer: int | None) -> None:
        grp = Group(gname, names, layer=layer, signature=gname.split(".")[-1])
        groups.append(grp)
        cfgs = grp.configs(list(formats))
        et, tt, mem = [], [], []
        for cfg in cfgs:
            lowm = sum(macs_of[o] for o, f in zip(names, cfg, strict=True) if f != ref)
            tt.append(lowm * sec_per_mac * (1 - 1 / 1.3))
            # Measured-like: fused ops interact (factor 0.6–1.1) and there is timing noise of ~20 µs.
            et.append(0.0 if lowm == 0 else tt[-1] * rng.uniform(0.6, 1.1) + rng.gauss(0, 2e-5))
            mem.append(sum(ops[o].weight_numel * 3 for o, f in zip(names, cfg, strict=True) if f != ref))
        ggains[gname] = GroupGains(gname, [list(c) for c in cfgs], {"ET": et, "TT": tt, "M": mem},
                                   source={"ET": "synthetic"})

    for layer in range(LAYERS):
        depth = 2.0 if layer in (0, 1, LAYERS - 1) else 1.0
        for gname, members in layout:
            names = [f"model.layers.{layer}.{m}" for m in members]
            for m, nm in zip(members, names, strict=True):
                kind, macs, wnum = shapes[m]
                add_op(nm, kind, macs, wnum, depth)
            add_group(f"layers.{layer}.{gname}", names, layer)
    add_op("lm_head", "linear", seq * HID * VOCAB, HID * VOCAB, 5.0)
    add_group("lm_head", ["lm_head"], None)
    sens = Sensitivity("SYNTHETIC-SmolLM2-135M-shaped", n, seq, mean_loss, list(formats), ops,
                       data_source="synthetic (bench_solver.py)")
    part = Partition(sens.model, "synthetic", groups)
    ref_time = sum(macs_of.values()) * sec_per_mac
    gains = Gains(sens.model, "synthetic", list(formats), 1, seq, ref_time, ggains, notes=["SYNTHETIC"])
    return sens, part, gains


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, help="folder with sensitivity.json, partition.json, gains.json")
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--metric", default="ET", choices=["ET", "TT", "M"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--noise", default="auto", help="noise model, as `inc-ipamp solve --noise` (default auto)")
    ap.add_argument("--min-sqnr-db", type=float, default=25.0, help="SQNR guard as in the pipeline (<0: none)")
    ap.add_argument("--out", type=Path, help="write frontier.json / frontier.png / results json here")
    a = ap.parse_args()
    prov = provenance(__file__)

    if a.run_dir:
        sens = Sensitivity.load(a.run_dir / "sensitivity.json")
        part = Partition.load(a.run_dir / "partition.json")
        gains = Gains.load(a.run_dir / "gains.json")
        source = f"real run: {a.run_dir}"
    else:
        sens, part, gains = synthetic_smollm2()
        source = "SYNTHETIC SmolLM2-shaped instance (seeded random sensitivities and gains)"

    kw = {"noise": a.noise, "min_sqnr_db": None if a.min_sqnr_db < 0 else a.min_sqnr_db}
    t0 = time.perf_counter()
    inst = build_instance(sens, part, gains, a.metric, **kw)
    t_build = time.perf_counter() - t0
    betas = default_betas(inst, a.points)
    sweeps = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        plans = frontier(sens, part, gains, metric=a.metric, betas=betas, **kw)
        sweeps.append(time.perf_counter() - t0)
    mid = betas[len(betas) // 2]
    t0 = time.perf_counter()
    single = solve(sens, part, gains, metric=a.metric, beta=mid, **kw)
    t_single = time.perf_counter() - t0
    base = {}
    for name in BASELINES:
        t0 = time.perf_counter()
        p = baseline(name, sens, part, gains, beta=mid, metric=a.metric, **kw)
        base[name] = {"gain": p.predicted_gain, "loss_mse": p.predicted_loss_mse, "wall_s": time.perf_counter() - t0}

    result = {
        "source": source,
        "provenance": finish(prov),
        "cpu": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}".strip(),
        "groups": len(inst.groups),
        "binaries": sum(len(g.configs) for g in inst.groups),
        "configs_per_group": sorted({len(g.configs) for g in inst.groups}),
        "metric": a.metric, "noise": a.noise, "min_sqnr_db": kw["min_sqnr_db"],
        "betas": len(betas),
        "instance_build_s": t_build,
        "frontier_sweep_s": sweeps,
        "frontier_points_after_dedup": len(plans),
        "solver_time_in_sweep_s": sum(p.solver["wall_s"] for p in plans),
        "single_solve_s (build + 2-phase solve)": t_single,
        "mid_beta": mid,
        "loss_model": "noise + shift² (tangent cutting planes)" if inst.uses_shift else "noise only",
        "ip_at_mid_beta": {"gain": single.predicted_gain, "loss_mse": single.predicted_loss_mse,
                           "status": single.solver["status"], "gap": single.solver["gap"]},
        "baselines_at_mid_beta": base,
    }
    print(json.dumps(result, indent=1))
    if a.out:
        from inc_ipamp.report import plot_frontier

        a.out.mkdir(parents=True, exist_ok=True)
        save_frontier(plans, a.out / "frontier.json", metric=a.metric, source=source)
        kind = "real run" if a.run_dir else "SYNTHETIC instance"
        plot_frontier(plans, a.out / "frontier.png", title=f"IP-{a.metric} frontier ({kind})")
        (a.out / "bench_solver.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
