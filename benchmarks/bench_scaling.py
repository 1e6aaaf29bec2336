"""How every stage's cost grows with the model: 135M (real SmolLM2) -> ~360M -> ~1.1B (random-weight Llamas).

Per model, each step in a fresh process, one after another (peak RSS = ru_maxrss of that process; the machine is
shared, so the 1-minute load average is recorded before and after every step):

* ``calib``: ``sensitivity.calibrate`` (formats int8 against fp32, curvature on, 1 sequence per fwd+bwd, as the
  pipeline on CPU) on ``--n-calib`` x ``--seq-len`` token ids; ``plain``: a plain fwd+bwd with parameter gradients on
  the same sequences (the baseline of benchmarks/bench_sensitivity.py). Same memory strategy for both: the whole fp32
  model in RAM, one sequence per pass, nothing offloaded (2 x 256 tokens need no activation checkpointing).
* ``partition``: ``partition_model`` on the whole model; ``measure``: ``measure_gains`` (ET on the CPU, fp32 vs int8)
  on a ``--prefix``-layer prefix (the whole model is too slow to time here; the timed runs per layer do not depend on
  the depth, every layer of a signature shares one measurement).
* ``frontier``: ``solver.frontier`` on a SYNTHETIC instance of the model's full shape (``inc_ipamp.synthetic``:
  fp32/int8, SQNR guard 25 dB); only its time is a measurement.

The ~360M and ~1.1B models have RANDOM weights built from the public configs of SmolLM2-360M and TinyLlama-1.1B
(numbers copied below); their costs are real, their sensitivities are not of any trained model. Token ids are random
(seeded) for every model, so each model does the same work.

    python benchmarks/bench_scaling.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from provenance import finish, fresh_process, header, provenance  # noqa: E402

#: public configs (config.json of HuggingFaceTB/SmolLM2-360M and TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T)
CONFIGS = {
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0,
                           tie_word_embeddings=False, max_position_embeddings=2048),
}
MODELS = ["smollm2-135m", "smollm2-360m", "tinyllama-1.1b"]

CHILD = r"""
import json, resource, sys, time
import torch
name, step, n, T, prefix, threads, configs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), int(sys.argv[6]), json.loads(sys.argv[7])
torch.set_num_threads(threads)
from inc_ipamp.ops import install_attention

def build(layers=None):
    if name == "smollm2-135m":
        from inc_ipamp.models import load_model
        return load_model(num_layers=layers)[0]
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(configs[name])
    if layers:
        cfg["num_hidden_layers"] = layers
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()

out = {"model": name, "step": step}
t0 = time.perf_counter()
model = build(prefix if step == "measure" else None)
install_attention(model)
out["params"] = sum(p.numel() for p in model.parameters())
out["load_s"] = time.perf_counter() - t0
out["rss_after_load_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
vocab = model.config.vocab_size
g = torch.Generator().manual_seed(0)
blocks = [torch.randint(0, vocab, (1, T), generator=g) for _ in range(n)]
t0 = time.perf_counter()
if step == "calib":
    from inc_ipamp.sensitivity import calibrate
    sens = calibrate(model, blocks, ["int8"], batch_size=1, curvature=True, progress=False)
    out["ops"] = len(sens.ops)
elif step == "plain":
    from inc_ipamp.sensitivity import sequence_loss
    for p in model.parameters():
        p.requires_grad_(True)
    for ids in blocks:
        sequence_loss(model, ids).sum().backward()
elif step == "partition":
    from inc_ipamp.partition import partition_model
    part = partition_model(model)
    out["groups"], out["signatures"] = len(part.groups), len({x.signature for x in part.groups})
    out["method"] = part.method
elif step == "measure":
    from inc_ipamp.gains.measure import measure_gains
    from inc_ipamp.partition import partition_model
    part = partition_model(model)
    t0 = time.perf_counter()
    gains = measure_gains(model, part, ["fp32", "int8"], "cpu", seq_len=128, reps=10, metrics=("ET", "M"),
                          progress=False)
    out["subgraph_calls"], out["groups"] = gains.subgraph_calls, len(part.groups)
    out["flagged"] = gains.quality.get("flagged_configs")
    out["reference_prefill_s"] = gains.reference_time_s
elif step == "frontier":
    from inc_ipamp import solver
    from inc_ipamp.synthetic import SHAPES, Shape, synthetic_records
    c = configs.get(name)
    shape = SHAPES["smollm2-135m"] if c is None else Shape(name, c["num_hidden_layers"], c["hidden_size"],
        c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"] // c["num_attention_heads"],
        c["intermediate_size"], c["vocab_size"])
    sens, part, gains = synthetic_records(shape, ("fp32", "int8"), seq=T)
    t0 = time.perf_counter()
    plans = solver.frontier(sens, part, gains, "ET", noise="auto", min_sqnr_db=25.0)
    out["points"], out["groups"] = len(plans), len(part.groups)
    out["max_gap"] = max((p.solver.get("gap") or 0.0) for p in plans)
out["wall_s"] = time.perf_counter() - t0
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--steps", nargs="+", default=["calib", "plain", "partition", "measure", "frontier"])
    ap.add_argument("--n-calib", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prefix", type=int, default=2, help="decoder layers kept for the measure step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="runs of the calib and plain steps (the table: best)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scaling"))
    a = ap.parse_args()
    prov = provenance(__file__)
    rows = []
    jobs = [(name, step) for name in a.models for step in a.steps
            for _ in range(a.repeats if step in ("calib", "plain") else 1)]
    for name, step in jobs:
        row = {"model": name, "step": step, **fresh_process(CHILD, name, step, str(a.n_calib), str(a.seq_len),
                                                             str(a.prefix), str(a.threads), json.dumps(CONFIGS),
                                                             check=False)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        res = {"provenance": finish(prov), "threads": a.threads, "n_calib": a.n_calib, "seq_len": a.seq_len,
               "prefix": a.prefix, "rows": rows}
        out = Path(a.out)  # written after every step: a long run that is cut short keeps what it measured
        out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
        out.with_suffix(".md").write_text(render(res) + "\n")


def render(res: dict) -> str:
    """The Markdown table from the JSON rows (one row per model)."""
    by: dict[str, dict[str, dict]] = {}
    runs: dict[tuple[str, str], list[float]] = {}
    for r in res["rows"]:  # repeated steps: the fastest run (the least disturbed by other work on the cores)
        if "wall_s" in r:
            runs.setdefault((r["model"], r["step"]), []).append(r["wall_s"])
        old = by.setdefault(r["model"], {}).get(r["step"])
        if old is None or "error" in old or ("wall_s" in r and r["wall_s"] < old["wall_s"]):
            by[r["model"]][r["step"]] = r

    def cell(m: dict, step: str, key: str, fmt: str) -> str:
        r = m.get(step, {})
        return "error" if "error" in r else (format(r[key], fmt) if key in r and r[key] is not None else "–")

    md = ["# Cost growth: 135M (real) -> ~360M -> ~1.1B (random weights)", "", *header(res["provenance"]),
          f"Torch threads {res['threads']} in each step. Each cell is one fresh process, run one after another; "
          "peak RSS is that process's ru_maxrss (model load included). Calibration: "
          f"{res['n_calib']} x {res['seq_len']} random token ids, int8 vs fp32, curvature on, one sequence per "
          "fwd+bwd; plain = fwd+bwd with parameter gradients on the same ids, same strategy (whole fp32 model in RAM, "
          f"nothing offloaded). Measure: ET on this CPU on a {res['prefix']}-layer prefix (seq 128, 10 reps). "
          "Frontier: `solver.frontier` (21 β) on a SYNTHETIC instance of the model's full shape (fp32/int8). The "
          "360M and 1.1B models have RANDOM weights from public configs (SmolLM2-360M, TinyLlama-1.1B).", "",
          "| model | params | calib (s) | plain fwd+bwd (s) | time ratio | calib peak RSS (MiB) | plain peak RSS (MiB) "
          "| RSS ratio | partition (s) | groups / signatures | measure prefix (s) | sub-graph calls | frontier (s) | "
          "load avg (calib) |", "|" + "---|" * 14]
    for name, m in by.items():
        c, p = m.get("calib", {}), m.get("plain", {})
        ratio = f"{c['wall_s'] / p['wall_s']:.2f}" if "wall_s" in c and "wall_s" in p else "–"
        mem = f"{c['peak_rss_mb'] / p['peak_rss_mb']:.2f}" if "peak_rss_mb" in c and "peak_rss_mb" in p else "–"
        params = next((r["params"] for r in m.values() if r.get("step") != "measure" and "params" in r), None)
        part = m.get("partition", {})
        gs = f"{part['groups']} / {part['signatures']}" if "groups" in part else "–"
        md.append(f"| {name} | {params / 1e6:.0f}M | {cell(m, 'calib', 'wall_s', '.1f')} | "
                  f"{cell(m, 'plain', 'wall_s', '.1f')} | {ratio} | {cell(m, 'calib', 'peak_rss_mb', '.0f')} | "
                  f"{cell(m, 'plain', 'peak_rss_mb', '.0f')} | {mem} | {cell(m, 'partition', 'wall_s', '.1f')} | {gs} "
                  f"| {cell(m, 'measure', 'wall_s', '.1f')} | {cell(m, 'measure', 'subgraph_calls', 'd')} | "
                  f"{cell(m, 'frontier', 'wall_s', '.2f')} | {c.get('load_avg_before', '–')} / "
                  f"{c.get('load_avg_after', '–')} |" if params else f"| {name} | (no successful step) |")
    md += ["", "Calibration and plain runs, every repeat (s): " + "; ".join(
        f"{m} {s}: {', '.join(f'{t:.1f}' for t in ts)}" for (m, s), ts in runs.items() if s in ("calib", "plain"))
        + ". The table shows the fastest of each (peak RSS from that run)."]
    errors = [f"{r['model']} {r['step']}: {r['error']}" for r in res["rows"] if "error" in r]
    if errors:
        md += ["", "Errors: " + "; ".join(errors)]
    return "\n".join(md)


if __name__ == "__main__":
    main()
