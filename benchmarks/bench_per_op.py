"""Per-op prefill timing against the protocol it replaced, in one process, alternating (issue 14, item 3).

Since a3b5e97 a backend whose ops are local (cpu, cuda) times only single-op configurations, each on its op alone,
and a configuration that changes several ops is the sum of its ops' gains (``measure.per_op_timing``, ``sum_parts``).
Before it, every configuration of a signature was timed itself, each run calling all the ops some configuration of
the signature changes (q/k/v for the 7 {q,k,v} configurations). This script runs ``measure_gains`` both ways on one
partition of SmolLM2-135M (CPU, fp32 vs INT8, 1 thread, reps 10), alternating ``--rounds`` times, and reports per
run the wall time, the timed sub-graph calls, and layer 0's gain ± CI for every timed configuration, so the sums can
be read against the directly timed multi-op configurations of the same minutes.

    python benchmarks/bench_per_op.py                # writes benchmarks/results/per_op.{md,json}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from provenance import finish, header, provenance  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def former_protocol() -> None:
    """Switch ``measure`` to the protocol before a3b5e97 (every config timed on all its signature's changed ops)."""
    import inc_ipamp.gains.measure as mm
    from inc_ipamp.gains.base import Backend

    real = mm.timed_modules

    def changed_ops(backend, groups, configs, ref, streaming=False):  # type: ignore[no-untyped-def]
        if streaming or not (backend.local_ops and type(backend).apply is Backend.apply):
            return real(backend, groups, configs, ref, streaming)
        pos = [i for i in range(len(groups[0].ops)) if any(c[i] != ref for c in configs)]
        return [g.ops[i] for g in groups for i in pos] if pos else real(backend, groups, configs, ref, streaming)

    mm.per_op_timing = lambda backend: False
    mm.timed_modules = changed_ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS / "per_op"))
    a = ap.parse_args()

    import inc_ipamp.gains.measure as mm
    from inc_ipamp.gains import get_backend, measure_gains
    from inc_ipamp.models import load_model
    from inc_ipamp.partition import partition_model
    from inc_ipamp.runtime import set_threads

    set_threads(1)
    prov = provenance(__file__)
    model, _ = load_model("default")
    part = partition_model(model)
    be = get_backend("cpu")
    per_op = (mm.per_op_timing, mm.timed_modules)
    first = {}
    for g in part.groups:
        first.setdefault(g.signature, g)
    runs = []
    for r in range(a.rounds):
        for mode in ("per-op", "former"):
            if mode == "former":
                former_protocol()
            else:
                mm.per_op_timing, mm.timed_modules = per_op
            t0 = time.perf_counter()
            g = measure_gains(model, part, ["fp32", "int8"], backend=be, reps=a.reps, progress=False, metrics=("ET",))
            wall = time.perf_counter() - t0
            rows = {}
            for grp in first.values():
                gg = g.groups[grp.name]
                for c, x, ci, f in zip(gg.configs, gg.gains["ET"], gg.ci["ET"], gg.flags["ET"], strict=True):
                    if any(v != "fp32" for v in c) and not f.startswith(mm.EMULATED):
                        rows[f"{grp.name} {'+'.join(c)}"] = {"gain_s": x, "ci_s": ci, "flag": f}
            runs.append({"mode": mode, "round": r, "measure_s": wall, "subgraph_calls": g.subgraph_calls,
                         "reference_prefill_s": g.reference_time_s, "configs": rows,
                         "flagged": g.quality.get("flagged_configs")})
            print(f"{mode} {r}: {wall:.1f} s, {g.subgraph_calls} calls", flush=True)
    prov = finish(prov)
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps({"provenance": prov, "runs": runs}, indent=1))
    md = ["# Per-op prefill timing vs the former protocol (SmolLM2-135M, CPU fp32 vs INT8, 1 thread)", "",
          *header(prov), "",
          f"{a.rounds} rounds, each `measure_gains(reps={a.reps})` per-op then former, in one process on one "
          "partition. Per-op: single-op configurations timed each on its op alone, multi-op ones summed (CIs in "
          "quadrature). Former: every configuration timed itself, each run calling all the ops some configuration "
          "of its signature changes.", "",
          "| run | measure s | timed sub-graph calls | flagged | reference prefill ms |", "|---|---|---|---|---|"]
    md += [f"| {x['mode']} {x['round']} | {x['measure_s']:.1f} | {x['subgraph_calls']} | {x['flagged']} | "
           f"{x['reference_prefill_s'] * 1e3:.1f} |" for x in runs]
    for mode in ("per-op", "former"):
        ws = [x["measure_s"] for x in runs if x["mode"] == mode]
        md.append(f"\n{mode}: median {statistics.median(ws):.1f} s over {len(ws)} runs")
    names = list(runs[0]["configs"])
    md += ["", "## Layer 0's gains, ms ± 95% CI (lm_head: the whole op)", "",
           "| config | " + " | ".join(f"{x['mode']} {x['round']}" for x in runs) + " |",
           "|---|" + "---|" * len(runs)]
    for n in names:
        cells = []
        for x in runs:
            v = x["configs"].get(n)
            cells.append("–" if v is None else f"{v['gain_s'] * 1e3:.3f} ± {v['ci_s'] * 1e3:.3f}"
                         + (" (flagged)" if v["flag"] else ""))
        md.append(f"| {n} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out}.md/.json")


if __name__ == "__main__":
    main()
