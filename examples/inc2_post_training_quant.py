"""INC 2.x: ``quantization.fit`` with ``PostTrainingQuantConfig(tuning_strategy="ip_empirical_time")``.

Runs in the second environment (INC 2.x API = neural-compressor 3.7.1, see requirements-inc2.txt):

    .venv-inc2/bin/python examples/inc2_post_training_quant.py                  # full default model (minutes)
    .venv-inc2/bin/python examples/inc2_post_training_quant.py --spelling criterion   # INC's own spelling

The strategy reads the token ids of ``calib_dataloader``, calibrates, partitions, measures the INT8 gains on this CPU
with torch.ao dynamic INT8 with per-channel weights (``int8_pc``: the kernels INC's 2.x dynamic path builds) and
solves the frontier; INC quantizes its points most aggressive first, scores them with ``eval_func`` and keeps the
first within the accuracy criterion. The accepted plan, INC's ``op_name_dict`` for it and a report land in
``<workspace>/<hash>/selected/``. The script then
measures the returned model's prefill time and loss against fp32.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import time
from pathlib import Path

import torch
from neural_compressor import quantization
from neural_compressor.config import AccuracyCriterion, PostTrainingQuantConfig, TuningCriterion

import inc_ipamp.inc2 as inc2  # registers the strategy with INC's 2.x registry
from inc_ipamp.data import load_blocks
from inc_ipamp.inc.method import compare_with_fp32
from inc_ipamp.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spelling", choices=["tuning_strategy", "criterion"], default="tuning_strategy")
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=4)
    ap.add_argument("--tolerable-loss", type=float, default=0.01)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--op-filter", default=None)
    ap.add_argument("--workspace", default="ipamp_inc2_workspace")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    model, tok = load_model("default")
    cal = load_blocks(tok, "calibration", a.n_calib, a.seq_len).ids
    ev = load_blocks(tok, "evaluation", a.n_eval, a.seq_len).ids
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(cal), batch_size=4)

    @torch.no_grad()
    def eval_func(m: torch.nn.Module) -> float:
        losses = []
        for ids in ev:
            o = m(ids[None])
            logits = o.logits if hasattr(o, "logits") else o[0]
            losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:]).item())
        loss = sum(losses) / len(losses)
        print(f"  eval: loss {loss:.4f}, exp(-loss) {math.exp(-loss):.5f}")
        return math.exp(-loss)

    opts = {"reps": a.reps, "gain_seq_len": a.seq_len, "workspace": a.workspace}
    if a.op_filter:
        opts["op_filter"] = a.op_filter
    acc = AccuracyCriterion(tolerable_loss=a.tolerable_loss)
    if a.spelling == "tuning_strategy":
        conf = PostTrainingQuantConfig(tuning_strategy="ip_empirical_time", accuracy_criterion=acc,
                                       tuning_criterion=TuningCriterion(strategy_kwargs=opts))
    else:
        conf = PostTrainingQuantConfig(quant_level=1, approach="dynamic", accuracy_criterion=acc,
                                       tuning_criterion=TuningCriterion(strategy="ip_empirical_time",
                                                                        strategy_kwargs=opts))
    t0 = time.perf_counter()
    q = quantization.fit(model, conf, calib_dataloader=loader, eval_func=eval_func)
    wall = time.perf_counter() - t0
    if q is None:
        print("no frontier point met the accuracy criterion")
        return
    plan = q.ipamp_plan
    got = inc2.quantized_formats(q)
    want = {op: plan.assignment[op] for op in plan.low_precision_ops()}
    print(f"fit: {wall:.0f} s; accepted point {q.ipamp_point}: {len(plan.low_precision_ops())} INT8 ops of "
          f"{len(plan.assignment)}; torch.ao INT8 Linears in the returned model: {len(got)} "
          f"({'exactly the plan, formats included' if got == want else 'DIFFERENT from the plan'}: "
          f"{', '.join(f'{n} {f}' for f, n in sorted(collections.Counter(got.values()).items()))})")
    ws = inc2.workspace_of(q)
    print("phases (s):", json.loads((ws / "phases.json").read_text()))
    print("trials:", json.loads((ws / "trials.json").read_text())["trials"])
    print("files:", sorted(str(p) for p in (Path(ws) / "selected").iterdir()))
    ref = load_model("default")[0]
    r = compare_with_fp32(q, ref, ev, ev[:1])
    print(f"returned model vs fp32 (1 x {a.seq_len} prefill, {torch.get_num_threads()} thread(s)): speedup "
          f"{r['prefill_speedup']:.3f}x ({r['prefill_fp32_s'] * 1e3:.0f} -> {r['prefill_quantized_s'] * 1e3:.0f} ms); "
          f"held-out loss {r['loss_fp32']:.4f} -> {r['loss_quantized']:.4f} ({r['loss_delta']:+.4f})")


if __name__ == "__main__":
    main()
