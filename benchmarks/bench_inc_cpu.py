"""Speed of a plan applied through INC's real CPU paths vs fp32, on the default model (one run, interleaved).

Rows (all prefill of one (batch, seq) input; ``--reps`` rounds, every row once per round in rotated order, so
load from other jobs hits every row alike; ratios = best fp32-eager time / best row time, from this one run):
  fp32 eager | fp32 eager on a deep copy (control) | fp32 torch.compile (the fair reference for compiled INT8)
  INC PT2E dynamic INT8 (DynamicQuantConfig + per-op set_local): Q/DQ graph eager, and torch.compile'd
  INC FP8 Q/DQ (FP8Config use_qdq=True, maxabs_pow2, per-op blocklist), eager
The plan: ``--plan plan.json`` (an INT8 plan from `inc-ipamp solve --device cpu`), else every decoder Linear in
INT8 and lm_head fp32 (the most aggressive CPU point); the FP8 row uses the same ops in fp8_e4m3.

    python benchmarks/bench_inc_cpu.py --layers 30 --seq-len 256 --reps 9
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

# Inductor's default pool of compile worker processes keeps competing for the 2 cores after compiling
# and slowed every row ~3x here; compile in-process instead.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

from inc_ipamp.export.cpu import apply_cpu, cpu_path  # noqa: E402
from inc_ipamp.models import load_model  # noqa: E402
from inc_ipamp.records import Plan  # noqa: E402

OUT = Path(__file__).parent / "results"


def default_plan(model, fmt: str) -> Plan:
    ops = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return Plan("default", {op: ("fp32" if op == "lm_head" else fmt) for op in ops}, "fp32", "ET", None, 0.0, 0.0)


def as_fp8(plan: Plan) -> Plan:
    return Plan(plan.model, {op: ("fp8_e4m3" if f in ("int8", "int8_pc") else f) for op, f in plan.assignment.items()},
                plan.reference_format, plan.metric, plan.beta, plan.predicted_loss_mse, plan.predicted_gain)


def logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--plan", default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (minutes on 2 cores)")
    ap.add_argument("--out", default=str(OUT / "inc_cpu"))
    a = ap.parse_args()

    model, _ = load_model("default", num_layers=a.layers)
    model.config.use_cache = False
    ids = torch.randint(0, model.config.vocab_size, (1, a.seq_len), generator=torch.Generator().manual_seed(0))
    plan = Plan.load(a.plan) if a.plan else default_plan(model, "int8")
    if cpu_path(plan) != "pt2e_dynamic_int8":
        raise SystemExit(f"--plan must be an INT8 (CPU) plan; its INC path is {cpu_path(plan)}")
    n_low = len(plan.low_precision_ops())
    ref = logits(model(ids))

    rows: dict[str, dict] = {}
    calls: dict[str, object] = {}

    def add(name: str, fn, build_s: float, note: str) -> None:
        t0 = time.perf_counter()
        out = logits(fn(ids))  # first call (compilation for compiled rows)
        first = time.perf_counter() - t0
        rows[name] = {"build_s": round(build_s, 2), "first_call_s": round(first, 2), "note": note,
                      "max_abs_logit_diff_vs_fp32": float((out - ref).abs().max())}
        calls[name] = fn

    add("fp32 eager", model, 0.0, "reference")
    # control: the quantized rows run on deep copies (fresh anonymous memory); so does this fp32 row
    add("fp32 eager (deep copy)", copy.deepcopy(model), 0.0, "control for memory placement of the weights")
    t0 = time.perf_counter()
    q8 = apply_cpu(model, plan, [ids], dynamic=False)
    b8 = time.perf_counter() - t0
    add("INC PT2E dynamic int8, Q/DQ eager", q8, b8, "DynamicQuantConfig + set_local per op")
    t0 = time.perf_counter()
    fp8 = apply_cpu(model, as_fp8(plan), [ids])
    add("INC FP8 QDQ (maxabs_pow2) eager", fp8, time.perf_counter() - t0, "FP8Config use_qdq=True, blocklist per op")
    if not a.no_compile:
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True
        add("fp32 torch.compile", torch.compile(model), 0.0, "inductor, freezing")
        add("INC PT2E dynamic int8 + torch.compile", torch.compile(q8), b8, "inductor, freezing: INT8 kernels")

    for fn in calls.values():  # warm-up
        fn(ids)
    times: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for r in range(a.reps):  # rotate the order every round: no row always runs first (or after a given row)
        for k in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            calls[k](ids)
            times[k].append(time.perf_counter() - t0)
    # Other jobs share the 2 cores: load only ever adds time, so the best of the interleaved rounds is the
    # robust estimate; medians are reported next to it.
    base, base_med = min(times["fp32 eager"]), statistics.median(times["fp32 eager"])
    for k, ts in times.items():
        rows[k].update(best_s=min(ts), median_s=statistics.median(ts), speedup_vs_fp32_eager=base / min(ts),
                       speedup_vs_fp32_eager_median=base_med / statistics.median(ts), times_s=[round(t, 4) for t in ts])
    if "fp32 torch.compile" in times:
        rows["INC PT2E dynamic int8 + torch.compile"]["speedup_vs_fp32_compiled"] = \
            min(times["fp32 torch.compile"]) / min(times["INC PT2E dynamic int8 + torch.compile"])

    result = {"model": "default (SmolLM2-135M)", "layers": a.layers, "batch": 1, "seq_len": a.seq_len, "reps": a.reps,
              "plan": a.plan or "all decoder Linear INT8, lm_head fp32", "n_low_precision_ops": n_low,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
              "rows": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    threads = torch.get_num_threads()
    lines = [f"# INC CPU paths vs fp32 ({a.layers} layers, batch 1, seq {a.seq_len}, {threads} threads)",
             "", f"Plan: {result['plan']} ({n_low} ops). One run, {a.reps} rounds, order rotated each round. "
             "Speedup = best fp32-eager time / best row time (load from other jobs only adds time); the median "
             "ratio is shown too.", "",
             "| path | best s | median s | × vs fp32 eager (best) | × (median) | × vs fp32 compiled | build s | "
             "first call s | max abs Δlogit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        vc = r.get("speedup_vs_fp32_compiled")
        lines.append(f"| {k} | {r['best_s']:.3f} | {r['median_s']:.3f} | {r['speedup_vs_fp32_eager']:.2f} | "
                     f"{r['speedup_vs_fp32_eager_median']:.2f} | {'' if vc is None else f'{vc:.2f}'} | "
                     f"{r['build_s']} | {r['first_call_s']} | {r['max_abs_logit_diff_vs_fp32']:.3g} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
