"""Validate the roofline metric RT against measured ET on this CPU (INT8 vs FP32): Spearman rank correlation.

Reads a measured ``gains.json`` (and its ``partition.json``) from an ``inc-ipamp measure`` run, captures the ops'
prefill shapes on the same model, measures this CPU's own roofline figures (fp32 GEMM peak, fbgemm dynamic-INT8
Linear effective peak, copy bandwidth; one thread, as the gains), and compares per (group signature, config):

* RT-peak: ``theory.roofline_gain`` with INT8 at its measured peak for every INT8 op (what a device with INT8
  kernels for every op would give);
* RT-kernels: the same, but INT8 attention BGEMMs (no INT8 batched GEMM on this CPU: quantize-dequantize + fp32
  matmul) at the fp32 peak with their cast traffic, i.e. the kernels that really run;
* TT (MAC-based, from gains.json) for reference.

    OMP_NUM_THREADS=1 python benchmarks/bench_roofline.py --run /tmp/rl --layers 8 \
        --md benchmarks/results/roofline_cpu.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from inc_ipamp.apply.kernels import dynamic_int8_linear
from inc_ipamp.gains.theory import RooflineDevice, capture_op_shapes, roofline_gain
from inc_ipamp.models import load_model
from inc_ipamp.ops import find_ops, install_attention
from inc_ipamp.partition import default_example_ids
from inc_ipamp.records import Gains, Partition

sys.path.insert(0, str(Path(__file__).parent))
from provenance import finish, header, provenance  # noqa: E402


def _best(fn, reps: int = 7) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def measure_cpu_device() -> tuple[RooflineDevice, dict[str, float]]:
    """This CPU's roofline figures, measured (best of 7): fp32 GEMM, fbgemm dynamic-INT8 Linear, copy bandwidth."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    t = _best(lambda: torch.mm(a, b))
    fp32 = 2 * 1024**3 / t / 1e12
    lin = torch.nn.Linear(2048, 2048)
    q = dynamic_int8_linear(lin, per_channel=False)
    x = torch.randn(512, 2048, generator=g)
    t = _best(lambda: q(x))
    int8 = 2 * 512 * 2048 * 2048 / t / 1e12
    src = torch.randn(64 * 2**20 // 4 * 4, generator=g)  # 256 MB, far beyond the caches
    dst = torch.empty_like(src)
    t = _best(lambda: dst.copy_(src), reps=5)
    bw = 2 * src.numel() * 4 / t / 1e12  # read + write
    figs = {"fp32_tflops": fp32, "int8_tops_effective": int8, "copy_tb_s": bw}
    dev = RooflineDevice("this CPU (measured)", {"fp32": fp32, "int8": int8, "int8_pc": int8}, bw,
                         "measured by benchmarks/bench_roofline.py at 1 thread")
    return dev, figs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="folder with gains.json and partition.json (inc-ipamp measure)")
    ap.add_argument("--layers", type=int, default=None, help="the --layers the run used")
    ap.add_argument("--md", default="benchmarks/results/roofline_cpu.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    prov = provenance(__file__)
    run = Path(args.run)
    gains = Gains.load(run / "gains.json")
    part = Partition.load(run / "partition.json")
    model, _ = load_model(num_layers=args.layers)
    install_attention(model)
    kinds = {o.name: o.kind for o in find_ops(model, ordered=False)}
    ids = default_example_ids(model, gains.batch, gains.seq_len)
    shapes = capture_op_shapes(model, kinds, ids)
    dev, figs = measure_cpu_device()
    ref = gains.formats[0]
    rows = []
    seen = set()
    for grp in part.groups:
        gg = gains.groups[grp.name]
        if "reused" in gg.source.get("ET", "") or grp.signature in seen:
            continue  # one row per signature: the 8 layers share one measurement
        seen.add(grp.signature)
        for i, cfg in enumerate(gg.configs):
            if all(f == ref for f in cfg):
                continue
            low = [(op, f) for op, f in zip(grp.ops, cfg, strict=True) if f != ref]
            rt_peak = sum(roofline_gain(kinds[op], shapes[op], ref, f, dev) for op, f in low)
            rt_kern = 0.0
            for op, f in low:
                if kinds[op] == "bgemm":  # emulated: fp32 matmul + Q/DQ casts of both operands
                    dq = RooflineDevice(dev.name, {**dev.peak_tflops, f: dev.peak_tflops[ref]}, dev.mem_tb_s, "")
                    rt_kern += roofline_gain(kinds[op], shapes[op], ref, f, dq)
                else:
                    rt_kern += roofline_gain(kinds[op], shapes[op], ref, f, dev)
            rows.append({"group": grp.name, "config": "/".join(cfg), "ET": gg.gains["ET"][i],
                         "ci": gg.ci.get("ET", [0.0] * len(gg.configs))[i], "RT_peak": rt_peak, "RT_kernels": rt_kern,
                         "TT": gg.gains.get("TT", [float("nan")] * len(gg.configs))[i],
                         "has_bgemm": any(kinds[op] == "bgemm" for op, _ in low), "usable": gg.usable("ET", i)})
    et = [r["ET"] for r in rows]

    def rho(key: str, sel=lambda r: True) -> tuple[float, int]:
        sub = [r for r in rows if sel(r)]
        return float(spearmanr([r["ET"] for r in sub], [r[key] for r in sub]).statistic), len(sub)

    results = {k: rho(k) for k in ("RT_peak", "RT_kernels", "TT")}
    linear_only = {k: rho(k, lambda r: not r["has_bgemm"]) for k in ("RT_peak", "RT_kernels", "TT")}
    passing = {k: rho(k, lambda r: r["usable"]) for k in ("RT_peak", "RT_kernels", "TT")}
    finish(prov)
    lines = [
        "# Roofline RT vs measured ET on this CPU (INT8 vs FP32)", "", *header(prov), "",
        f"- gains from `{run / 'gains.json'}` ({gains.device}; batch {gains.batch}, seq {gains.seq_len}); CPU "
        f"{platform.processor() or platform.machine()} (cores shared with other jobs)",
        f"- this CPU's roofline figures, measured here at 1 thread: fp32 GEMM {figs['fp32_tflops'] * 1e3:.1f} GFLOPS, "
        f"fbgemm dynamic-INT8 Linear {figs['int8_tops_effective'] * 1e3:.1f} GOPS effective, copy bandwidth "
        f"{figs['copy_tb_s'] * 1e3:.1f} GB/s", "",
        f"Spearman ρ(ET, metric) over {len(rows)} (signature, config) pairs:", "",
        "| metric | all configs | configs without INT8 BGEMMs | configs passing the quality checks |",
        "|---|---|---|---|",
    ]
    for k in ("RT_peak", "RT_kernels", "TT"):
        lines.append(f"| {k} | {results[k][0]:.3f} (n={results[k][1]}) | {linear_only[k][0]:.3f} "
                     f"(n={linear_only[k][1]}) | {passing[k][0]:.3f} (n={passing[k][1]}) |")
    lines += ["", "| group | config | ET ms (±CI) | quality | RT-peak ms | RT-kernels ms | TT |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["group"], -r["ET"])):
        lines.append(f"| {r['group']} | {r['config']} | {r['ET'] * 1e3:.3f} (±{r['ci'] * 1e3:.3f}) | "
                     f"{'ok' if r['usable'] else 'flagged'} | {r['RT_peak'] * 1e3:.3f} | {r['RT_kernels'] * 1e3:.3f} | "
                     f"{r['TT']:.3g} |")
    lines += ["", f"median |ET| {statistics.median(abs(e) for e in et) * 1e3:.3f} ms per group call."]
    Path(args.md).write_text("\n".join(lines) + "\n")
    Path(args.md).with_suffix(".json").write_text(json.dumps(
        {"provenance": prov, "figures": figs, "spearman": results, "spearman_linear_only": linear_only,
         "spearman_passing": passing, "rows": rows}, indent=1))
    print("\n".join(lines[:16]))


if __name__ == "__main__":
    main()
