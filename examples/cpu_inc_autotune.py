"""INC 3.x: ``autotune`` with the ip_empirical_time strategy runs the whole method from INC's calibration hook.

No frontier file and no CLI run first: the first trial records the batches ``run_fn`` feeds the model, then
calibrates, partitions, measures the INT8 gains on this CPU and solves the Pareto frontier (in a workspace named by a
content hash of model, data and settings: run the script twice and the second call reuses it); INC then quantizes
the frontier points most aggressive first (``--cpu-kernels``: torch.ao dynamic INT8 Linears, the kernels the gains were
measured with, by default; ``pt2e``: INC 3.x's own PT2E dynamic INT8 graph), scores each with ``eval_fn`` and keeps
the first within ``--tolerable-loss``. The accepted point's plan, INC config and report land in
``<workspace>/selected/``; the script then measures the returned model's prefill time and loss against fp32.

    .venv/bin/python examples/cpu_inc_autotune.py                       # full default model, all ops (minutes)
    .venv/bin/python examples/cpu_inc_autotune.py --op-filter 'layers\\.[0-3]\\.' --reps 3   # a quick look
    .venv/bin/python examples/cpu_inc_autotune.py --frontier ipamp_out/frontier.json         # replay a CLI run

On this CPU, INC's PT2E INT8 graph runs Q/DQ in eager mode and is slower than fp32 (benchmarks/results/inc_cpu.md;
inc_native.md as of a94df6b); the fast CPU path is torch.ao's dynamic INT8 (also what INC's 2.x API builds, there with
per-channel weights: examples/inc2_post_training_quant.py), hence the default.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from neural_compressor.torch.quantization import TuningConfig, autotune

import inc_ipamp.inc as ipamp_inc  # registers the ip_empirical_time config and algorithm with INC
from inc_ipamp.data import load_blocks
from inc_ipamp.inc.method import compare_with_fp32
from inc_ipamp.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-calib", type=int, default=8, help="calibration sequences run_fn feeds the model")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=4, help="held-out sequences eval_fn scores")
    ap.add_argument("--tolerable-loss", type=float, default=0.01, help="relative drop of exp(-loss) INC accepts")
    ap.add_argument("--reps", type=int, default=5, help="timing reps per measured group config")
    ap.add_argument("--op-filter", default=None, help="regex: only these ops are candidates (the model stays whole)")
    ap.add_argument("--workspace", default="ipamp_inc3_workspace")
    ap.add_argument("--frontier", help="replay a frontier.json from `inc-ipamp solve` instead")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cpu-kernels", choices=["torch.ao", "pt2e"], default="torch.ao",
                    help="how INT8 points are applied: torch.ao dynamic INT8 Linears (measured kernels) or INC's PT2E")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    model, tok = load_model("default")
    cal = load_blocks(tok, "calibration", a.n_calib, a.seq_len).ids
    ev = load_blocks(tok, "evaluation", a.n_eval, a.seq_len).ids

    def run_fn(m: torch.nn.Module) -> None:
        """INC's calibration hook: run the model on real text (the strategy records these token ids)."""
        for ids in cal.split(4):
            m(ids)

    @torch.no_grad()
    def eval_fn(m: torch.nn.Module) -> float:
        """exp(-mean token loss) on held-out text: positive and higher-is-better, as INC's criterion needs."""
        losses = []
        for ids in ev:
            o = m(ids[None])
            logits = o.logits if hasattr(o, "logits") else o[0]
            losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:]).item())
        loss = sum(losses) / len(losses)
        print(f"  eval: point {getattr(m, 'ipamp_point', 'fp32')}: loss {loss:.4f}, exp(-loss) {math.exp(-loss):.5f}")
        return math.exp(-loss)

    options = {"reps": a.reps, "gain_seq_len": a.seq_len, "op_filter": a.op_filter, "cpu_kernels": a.cpu_kernels}
    cfg = ipamp_inc.IPEmpiricalTimeConfig(frontier=a.frontier, workspace=a.workspace,
                                          options={k: v for k, v in options.items() if v is not None})
    t0 = time.perf_counter()
    q = autotune(model, TuningConfig(config_set=[cfg], tolerable_loss=a.tolerable_loss), eval_fn, run_fn=run_fn,
                 example_inputs=(ev[:1],))
    wall = time.perf_counter() - t0
    if q is None:
        print("no frontier point met the tolerance")
        return
    plan = q.ipamp_plan
    got = ipamp_inc.quantized_ops(q)
    print(f"autotune: {wall:.0f} s; accepted point {q.ipamp_point}: {len(plan.low_precision_ops())} INT8 ops of "
          f"{len(plan.assignment)}, predicted gain {plan.predicted_gain * 1e3:.2f} ms, loss MSE "
          f"{plan.predicted_loss_mse:.3g}; INT8 Linears in the returned model ({a.cpu_kernels}): {len(got)} "
          f"({'exactly the plan' if got == set(plan.low_precision_ops()) else 'DIFFERENT from the plan'})")
    ws = getattr(q, "ipamp_workspace", None)
    if ws is not None:
        print("phases (s):", json.loads((Path(ws) / "phases.json").read_text()))
        print("trials:", json.loads((Path(ws) / "trials.json").read_text())["trials"])
        print("files:", sorted(str(p) for p in (Path(ws) / "selected").iterdir()))
    ref = load_model("default")[0]
    r = compare_with_fp32(q, ref, ev, ev[:1])
    print(f"returned model vs fp32 (1 x {a.seq_len} prefill, {torch.get_num_threads()} thread(s), eager): speedup "
          f"{r['prefill_speedup']:.3f}x ({r['prefill_fp32_s'] * 1e3:.0f} -> {r['prefill_quantized_s'] * 1e3:.0f} ms); "
          f"held-out loss {r['loss_fp32']:.4f} -> {r['loss_quantized']:.4f} ({r['loss_delta']:+.4f})")


if __name__ == "__main__":
    main()
