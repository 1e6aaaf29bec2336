"""Validate the sensitivity model (issue 3) on the real SmolLM2-135M and time its calibration.

1. Predicted vs measured loss MSE over >= 30 random and structured assignments per format, for each noise
   model (uniform = analytic, empirical = Σg²(Q(x)-x)², coherent = Σ_n(Σ g·e)², auto = the default choice),
   first order alone and with the mean shift (first-order mean + curvature ½eᵀHe, squared after summing):
   Spearman rho, median measured/predicted and the fraction of assignments within 2x.
2. Calibration wall time and peak RSS vs a plain fwd+bwd (parameter gradients on) over the same
   batches, each in its own subprocess so peak RSS is its own.

    python benchmarks/bench_sensitivity.py [--layers N] [--n-calib 8] [--seq-len 128]
Writes benchmarks/results/sensitivity.json and .md.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

RESULTS = Path(__file__).parent / "results"
NOISES = ("uniform", "empirical", "coherent", "auto")
MODELS = NOISES + tuple(f"{n}+shift" for n in NOISES)


def assignments(ops: list[str], fmt: str, n_random: int, rng: random.Random) -> list[tuple[str, dict[str, str]]]:
    """Structured (by op type, by depth) and random assignments of one format."""
    def pick(pred):
        return {o: fmt for o in ops if pred(o)}
    out = [("all", pick(lambda o: True)),
           ("attention_bgemms", pick(lambda o: "matmul_" in o)),
           ("qkv", pick(lambda o: o.endswith(("q_proj", "k_proj", "v_proj")))),
           ("o_proj", pick(lambda o: o.endswith("o_proj"))),
           ("mlp", pick(lambda o: ".mlp." in o)),
           ("down_proj", pick(lambda o: o.endswith("down_proj"))),
           ("lm_head", pick(lambda o: o == "lm_head")),
           ("first_half", {o: fmt for o in ops[: len(ops) // 2]}),
           ("second_half", {o: fmt for o in ops[len(ops) // 2:]})]
    for i in range(n_random):
        p = rng.choice([0.05, 0.1, 0.2, 0.4, 0.7])
        a = {o: fmt for o in ops if rng.random() < p} or {rng.choice(ops): fmt}
        out.append((f"random{i}_p{p}", a))
    return [(n, a) for n, a in out if a]


def child(mode: str, layers: int | None, n: int, seq: int, batch: int) -> None:
    """Run one calibration flavour and print its wall time and peak RSS as JSON."""
    from inc_ipamp.data import load_blocks
    from inc_ipamp.models import load_model
    from inc_ipamp.ops import install_attention
    from inc_ipamp.sensitivity import calibrate, rebatch, sequence_loss

    torch.manual_seed(0)
    model, tok = load_model(num_layers=layers)
    install_attention(model)
    blocks = load_blocks(tok, "calibration", n, seq)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if mode == "plain":
        for p in model.parameters():
            p.requires_grad_(True)
        for ids in rebatch(blocks, batch):  # the same batches as calibrate
            sequence_loss(model, ids).sum().backward()
    elif mode == "calibrate_int8":  # the one searched format on CPU, first order only (--no-curvature)
        calibrate(model, blocks, ["int8"], progress=False, batch_size=batch)
    elif mode == "calibrate_int8_curv":  # what `inc-ipamp run` on CPU calibrates by default
        calibrate(model, blocks, ["int8"], progress=False, batch_size=batch, curvature=True)
    else:
        calibrate(model, blocks, progress=False, batch_size=batch)
    wall = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "wall_s": wall, "peak_rss_mb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": rss0 / 1024}))


def validate(a: argparse.Namespace, formats: list[str]) -> dict:
    """Predicted vs measured loss MSE over structured and random assignments, per format and noise model."""
    from inc_ipamp.data import load_blocks
    from inc_ipamp.evaluate import fake_quant, sequence_losses
    from inc_ipamp.models import load_model
    from inc_ipamp.sensitivity import calibrate

    model, tok = load_model(num_layers=a.layers)
    blocks = load_blocks(tok, "calibration", a.n_calib, a.seq_len)
    sens = calibrate(model, blocks, formats, progress=False, curvature=True)
    ref = sequence_losses(model, blocks)
    ops = [o for o in sens.ops if o not in sens.unreached]
    rng = random.Random(0)
    validation: dict = {}

    def stats(p: np.ndarray, m: np.ndarray) -> dict:
        r = m / p
        return {"spearman": float(spearmanr(p, m)[0]), "median_measured_over_predicted": float(np.median(r)),
                "within_2x": float(np.mean((r >= 0.5) & (r <= 2.0)))}

    for fmt in formats:
        rows = []
        for name, asg in assignments(ops, fmt, a.n_random, rng):
            with fake_quant(model, asg):
                d = sequence_losses(model, blocks) - ref
            row = {"name": name, "n_ops": len(asg), "measured": float((d**2).mean()),
                   "measured_shift": float(d.mean()), "predicted_shift": sum(sens.shift(o, fmt) for o in asg),
                   "min_sqnr_db": min(sens.sqnr_db(o, fmt) for o in asg)}
            for noise in NOISES:
                row[noise] = sens.predict(asg, noise, shift=False)
                row[noise + "+shift"] = sens.predict(asg, noise)
            rows.append(row)
        m = np.array([r["measured"] for r in rows])
        summary = {"n_assignments": len(rows)}
        ok = np.array([r["min_sqnr_db"] >= 25 for r in rows])  # the solver's default regime guard
        summary["n_within_guard"] = int(ok.sum())
        for model_name in MODELS:
            p = np.array([r[model_name] for r in rows])
            summary[model_name] = stats(p, m)
            if ok.sum() >= 3:
                summary[model_name + "_guard25"] = stats(p[ok], m[ok])
        validation[fmt] = {"summary": summary, "rows": rows}
        print(fmt, json.dumps(summary))
    return validation


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int)
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="sequences per fwd+bwd, for both flavours")
    ap.add_argument("--n-random", type=int, default=24)
    ap.add_argument("--formats", default="fp8_e4m3,fp8_e5m2,int8,int8_pc,bf16")
    ap.add_argument("--child")
    ap.add_argument("--cost-only", action="store_true", help="re-measure the cost, keep the saved validation")
    ap.add_argument("--skip-cost", action="store_true",
                    help="validation only (keeps the stem's saved cost, if any), e.g. one format on more sequences")
    ap.add_argument("--stem", default="sensitivity", help="results file name in benchmarks/results (no suffix)")
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.layers, a.n_calib, a.seq_len, a.batch)


    res: dict = {"layers": a.layers or "all", "n_calib": a.n_calib, "seq_len": a.seq_len, "batch": a.batch,
                 "torch": torch.__version__,
                 "threads": torch.get_num_threads()}
    # -- cost: alternate the two flavours twice, each in a fresh process ----------------------------
    base = [sys.executable, __file__, "--n-calib", str(a.n_calib), "--seq-len", str(a.seq_len), "--batch", str(a.batch)]
    if a.layers:
        base += ["--layers", str(a.layers)]
    runs = []
    for _ in range(0 if a.skip_cost else 2):
        for mode in ("plain", "calibrate", "calibrate_int8", "calibrate_int8_curv"):
            out = subprocess.run(base + ["--child", mode], capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))

    def best(mode: str, key: str) -> float:
        return min(r[key] for r in runs if r["mode"] == mode)

    saved = RESULTS / f"{a.stem}.json"  # --skip-cost keeps the cost measured by an earlier run of this stem
    res["cost"] = (json.loads(saved.read_text()).get("cost", {}) if saved.exists() else {}) if a.skip_cost else {
                   "runs": runs,
                   "time_ratio": best("calibrate", "wall_s") / best("plain", "wall_s"),
                   "peak_rss_ratio": best("calibrate", "peak_rss_mb") / best("plain", "peak_rss_mb"),
                   "time_ratio_int8_only": best("calibrate_int8", "wall_s") / best("plain", "wall_s"),
                   "peak_rss_ratio_int8_only": best("calibrate_int8", "peak_rss_mb") / best("plain", "peak_rss_mb"),
                   "time_ratio_int8_curvature": best("calibrate_int8_curv", "wall_s") / best("plain", "wall_s"),
                   "peak_rss_ratio_int8_curvature": best("calibrate_int8_curv", "peak_rss_mb") / best(
                       "plain", "peak_rss_mb")}
    if res["cost"]:
        print("cost:", json.dumps({k: v for k, v in res["cost"].items() if k != "runs"}))

    # -- accuracy of the prediction ---------------------------------------------------------------------
    formats = a.formats.split(",")
    if a.cost_only:  # keep the validation of the previous run, re-measure only the cost
        res["validation"] = json.loads((RESULTS / f"{a.stem}.json").read_text())["validation"]
    else:
        res["validation"] = validate(a, formats)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.stem}.json").write_text(json.dumps(res, indent=1))
    c = res["cost"]
    cost_line = "Cost: not measured in this run." if not c else (
        f"Calibration cost vs plain fwd+bwd with parameter gradients (same batches of {a.batch}, best of 2, "
        f"separate processes): all 5 formats: time x{c['time_ratio']:.2f}, peak RSS "
        f"x{c['peak_rss_ratio']:.2f}; int8 only: time x{c['time_ratio_int8_only']:.2f}, peak RSS "
        f"x{c['peak_rss_ratio_int8_only']:.2f}; int8 + curvature (what `inc-ipamp run` on CPU does): time "
        f"x{c.get('time_ratio_int8_curvature', float('nan')):.2f}, peak RSS "
        f"x{c.get('peak_rss_ratio_int8_curvature', float('nan')):.2f}")
    lines = [f"# Sensitivity validation (SmolLM2-135M, layers={res['layers']}, {a.n_calib}x{a.seq_len} tokens)", "",
             cost_line, "",
             "Per format and loss model: Spearman rho / median measured/predicted / fraction of assignments with "
             "measured/predicted in [0.5, 2]. `+shift`: noise + (Σ predicted mean shift)², the default with "
             "curvature; `auto`: the default noise model per format. guard25 = only the assignments whose every "
             "op has input SQNR >= 25 dB (the solver's default --min-sqnr-db).", "",
             "| format | model | n | all: rho / med / in 2x | n guard25 | guard25: rho / med / in 2x |",
             "|---|---|---|---|---|---|"]
    for fmt, v in res["validation"].items():
        s = v["summary"]

        def cell(key: str, s=s) -> str:
            d = s.get(key)
            return (f"{d['spearman']:.3f} / {d['median_measured_over_predicted']:.2f} / "
                    f"{d.get('within_2x', float('nan')):.0%}") if d else "-"
        for mname in MODELS:
            if mname in s:
                lines.append(f"| {fmt} | {mname} | {s['n_assignments']} | {cell(mname)} | {s['n_within_guard']} | "
                             f"{cell(mname + '_guard25')} |")
    (RESULTS / f"{a.stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
