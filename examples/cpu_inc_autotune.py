"""Tune the default model's INT8 mixed precision on this CPU with INC's own autotune over our Pareto frontier.

1. the inc-ipamp pipeline (calibrate -> partition -> measure on CPU -> solve) writes frontier.json;
2. ``inc_ipamp.inc.autotune`` hands the frontier to ``neural_compressor.torch.quantization.autotune`` as
   the ``ip_empirical_time`` config set: INC quantizes each point with its PT2E dynamic INT8 path (most
   aggressive first), scores it with ``eval_fn`` and keeps the first within ``--tolerable-loss``;
3. the chosen point is exported for INC on CPU (INC 3.x JSON) and for Gaudi would be exported as FP8 JSON.

Runs here in a few minutes with the defaults (4 layers; a prefix of a model has a high perplexity, the
relative comparison is what matters):

    .venv/bin/python examples/cpu_inc_autotune.py --layers 4 --out /tmp/ipamp_example
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import inc_ipamp.inc as ipamp_inc  # registers the ip_empirical_time strategy with INC
from inc_ipamp import pipeline
from inc_ipamp.export import export_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default="ipamp_example")
    ap.add_argument("--tolerable-loss", type=float, default=0.01, help="relative drop of exp(-loss) INC accepts")
    ap.add_argument("--frontier", help="reuse a frontier.json instead of running the pipeline")
    a = ap.parse_args()

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = pipeline.RunSettings(layers=a.layers, n_calib=4, n_eval=4, seq_len=128, reps=5, gain_seq_len=128)
    settings.save(out)
    model, tok = pipeline.load(settings)
    frontier = Path(a.frontier) if a.frontier else out / "frontier.json"
    if not a.frontier:
        pipeline.stage_calibrate(out, settings, model, tok)
        pipeline.stage_partition(out, settings, model, tok)
        pipeline.stage_measure(out, settings, model, tok)
        pipeline.stage_solve(out, settings)
    points = ipamp_inc.frontier_points(frontier)
    print(f"frontier: {len(points)} points, predicted ET gain {points[0].predicted_gain:.3g} .. "
          f"{points[-1].predicted_gain:.3g} s")

    ev = pipeline.blocks(tok, settings, "evaluation").ids

    @torch.no_grad()
    def eval_fn(m) -> float:
        """exp(-mean token loss) on held-out text: positive and higher-is-better, as INC's criterion needs."""
        losses = []
        for ids in ev:
            o = m(ids[None])
            logits = o.logits if hasattr(o, "logits") else o[0]
            losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:]).item())
        loss = sum(losses) / len(losses)
        print(f"  eval: point {getattr(m, 'ipamp_point', 'fp32')}: loss {loss:.4f}, exp(-loss) {math.exp(-loss):.4e}")
        return math.exp(-loss)

    q = ipamp_inc.autotune(model, eval_fn, frontier, example_inputs=(ev[:1],), tolerable_loss=a.tolerable_loss)
    if q is None:
        print("no frontier point met the tolerance")
        return
    plan = q.ipamp_plan
    print(f"chosen point {q.ipamp_point}: {len(plan.low_precision_ops())} INT8 ops of {len(plan.assignment)}, "
          f"predicted ET gain {plan.predicted_gain:.3g} s")
    plan.save(out / "inc_chosen_plan.json")
    print("INC CPU config:", export_cpu(plan, out / "inc_chosen_cpu_config.json"))


if __name__ == "__main__":
    main()
