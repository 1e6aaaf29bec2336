"""The pipeline stages as functions over an output folder: each reads the previous stage's JSON and
writes its own, so the CLI, the INC strategy and tests share one implementation."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import ArtifactError
from .io import load_json, save_json

log = logging.getLogger(__name__)

#: Reference and low-precision format of each target device (DESIGN.md: on this CPU the fast real
#: low-precision path is dynamic INT8 via fbgemm; Gaudi/Hopper run FP8-E4M3 against BF16).
DEVICE_FORMATS = {"cpu": ("fp32", "int8"), "cuda": ("bf16", "fp8_e4m3"), "hpu": ("bf16", "fp8_e4m3"),
                  "table": ("bf16", "fp8_e4m3")}


@dataclass
class RunSettings:
    """What every stage needs to rebuild the same model and data; saved as ``settings.json``."""

    model: str = "default"
    layers: int | None = None
    data: str | None = None
    n_calib: int = 16
    #: sequences per calibration fwd+bwd (statistics stay per sequence; larger = faster, more memory)
    calib_batch: int = 4
    #: second backward with sampled labels: predicts each op's mean loss shift, which adds linearly over ops
    #: (without it, INT8 plans measured ~5x their predicted loss MSE on SmolLM2; benchmarks/results/sensitivity.md)
    curvature: bool = True
    n_eval: int = 16
    seq_len: int = 256
    device: str = "cpu"
    formats: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    #: extra formats to calibrate beyond the search formats (each one costs a quantise per activation)
    calib_formats: list[str] = field(default_factory=list)
    include_lm_head: bool = True
    noise: str = "auto"
    #: measured on SmolLM2/INT8 (CPU): first-order plans without it measured 9-90x their predicted loss MSE, with
    #: it 3.5x; ops below it are where every noise model is off by large factors (benchmarks/results/sensitivity.md)
    min_sqnr_db: float | None = 25.0
    metric: str = "ET"
    beta: float | None = 0.05
    target_speedup: float | None = None
    batch: int = 1
    gain_seq_len: int = 256
    reps: int = 15
    #: groups of one signature timed together per run (None: all layers, as their weights stream in a prefill)
    span: int | None = None
    table: str | None = None
    engine: str = "optimum-habana"
    seed: int = 0
    #: offline lm-eval accuracy tasks for the evaluate stage (inc_ipamp.tasks; empty = perplexity only)
    tasks: list[str] = field(default_factory=list)
    acc_limit: int | None = 50

    def save(self, out: Path) -> None:
        save_json(asdict(self), out / "settings.json")

    @classmethod
    def load(cls, out: Path) -> RunSettings:
        d = load_json(out / "settings.json", "settings")
        try:
            return cls(**d)
        except TypeError as e:
            raise ArtifactError(f"{out / 'settings.json'} is not a settings file ({e})") from None


def load(settings: RunSettings):
    """Model (attention routed through Matmul modules) and tokenizer."""
    from .models import load_model
    from .ops import install_attention

    model, tok = load_model(settings.model, num_layers=settings.layers)
    install_attention(model)
    return model, tok


def blocks(tok, settings: RunSettings, split: str):
    from .data import load_blocks

    n = settings.n_calib if split == "calibration" else settings.n_eval
    return load_blocks(tok, split, n, settings.seq_len, settings.data)


def stage_calibrate(out: Path, settings: RunSettings, model=None, tok=None):
    from .sensitivity import calibrate

    if model is None:
        model, tok = load(settings)
    cal = blocks(tok, settings, "calibration")
    formats = sorted(set(settings.calib_formats) | {f for f in settings.formats[1:]})
    sens = calibrate(model, cal, formats, include_lm_head=settings.include_lm_head, model_name=settings.model,
                     batch_size=settings.calib_batch, curvature=settings.curvature,
                     data_source=f"{cal.source} ({cal.split}, {len(cal)}x{settings.seq_len} tokens)")
    sens.save(out / "sensitivity.json")
    log.info("calibrated %d ops on %d sequences in %.1f s (mean loss %.3f)", len(sens.ops), sens.n_samples,
             sens.wall_s, sens.mean_loss)
    return sens


def stage_partition(out: Path, settings: RunSettings, model=None, tok=None):
    from .partition import partition_model

    if model is None:
        model, tok = load(settings)
    part = partition_model(model)
    part.model = settings.model
    if not settings.include_lm_head:
        part.groups = [g for g in part.groups if not any(op == "lm_head" for op in g.ops)]
    part.save(out / "partition.json")
    log.info("partitioned into %d groups (%s)", len(part.groups), part.method)
    return part


def stage_measure(out: Path, settings: RunSettings, model=None, tok=None):
    from .gains import measure_gains
    from .records import Partition

    part = Partition.load(out / "partition.json")
    if model is None and settings.device != "table":
        model, tok = load(settings)
    gains = measure_gains(model, part, settings.formats, backend=settings.device, batch=settings.batch,
                          seq_len=settings.gain_seq_len, reps=settings.reps, cache_path=out / "gain_cache.jsonl",
                          table_path=settings.table, span=settings.span)
    gains.save(out / "gains.json")
    return gains


def stage_solve(out: Path, settings: RunSettings):
    from .records import Gains, Partition, Sensitivity
    from .report import plot_frontier
    from .solver import BudgetSpecError, frontier, save_frontier, solve

    sens = Sensitivity.load(out / "sensitivity.json")
    part = Partition.load(out / "partition.json")
    gains = Gains.load(out / "gains.json")
    t0 = time.perf_counter()
    guard = {"noise": settings.noise, "min_sqnr_db": settings.min_sqnr_db}
    front = frontier(sens, part, gains, metric=settings.metric, **guard)
    log.info("frontier: %d distinct points in %.2f s", len(front), time.perf_counter() - t0)
    save_frontier(front, out / "frontier.json")
    plot_frontier(front, out / "frontier.png")
    if settings.target_speedup is not None:
        if not settings.target_speedup > 1:
            raise BudgetSpecError(f"--target-speedup is a factor > 1 (1.1 = 10% faster), got {settings.target_speedup}")
        # The solver takes the fraction of prefill time saved: speedup S saves 1 - 1/S.
        plan = solve(sens, part, gains, metric=settings.metric, target_speedup=1 - 1 / settings.target_speedup,
                     **guard)
    else:
        plan = solve(sens, part, gains, metric=settings.metric, beta=settings.beta, **guard)
    plan.model = settings.model
    plan.save(out / "plan.json")
    return plan, front


def stage_export(out: Path, settings: RunSettings) -> dict[str, Any]:
    from .export import ExportError, export_cpu, export_gaudi
    from .records import Plan

    plan = Plan.load(out / "plan.json")
    files: dict[str, Any] = {}
    # A plan made for one device may use formats another cannot run (INT8 on Gaudi FP8): record why, go on.
    for engine in ("optimum-habana", "vllm-gaudi"):
        try:
            files[f"gaudi:{engine}"] = {k: str(v) for k, v in export_gaudi(plan, out / "export" / engine,
                                                                            engine=engine).items()}
        except ExportError as e:
            files[f"gaudi:{engine}"] = {"skipped": str(e)}
    try:
        files["cpu"] = str(export_cpu(plan, out / "export" / "cpu" / "inc_config.json"))
    except ExportError as e:
        files["cpu"] = {"skipped": str(e)}
    save_json(files, out / "export" / "files.json")
    return files


def stage_evaluate(out: Path, settings: RunSettings, model=None, tok=None) -> dict[str, Any]:
    """Measured loss MSE (fake-quant, calibration data), perplexity (held-out), and the measured
    end-to-end prefill speedup with the device's real kernels; baselines at the same budget."""
    from .baselines import baseline
    from .evaluate import measured_loss_mse, perplexity, sequence_losses
    from .records import Gains, Partition, Plan, Sensitivity

    if model is None:
        model, tok = load(settings)
    plan = Plan.load(out / "plan.json")
    sens = Sensitivity.load(out / "sensitivity.json")
    part = Partition.load(out / "partition.json")
    gains = Gains.load(out / "gains.json")
    cal = blocks(tok, settings, "calibration")
    ev = blocks(tok, settings, "evaluation")
    ref_losses = sequence_losses(model, cal)
    plans = {"ip": plan}
    if plan.beta is not None:
        for name in ("random", "prefix", "sqnr"):
            plans[name] = baseline(name, sens, part, gains, beta=plan.beta, metric=settings.metric,
                                   seed=settings.seed, noise=settings.noise, min_sqnr_db=settings.min_sqnr_db)
    def acc(assignment: dict[str, str] | None) -> dict[str, Any]:
        from .tasks import accuracy

        return {t: accuracy(model, tok, assignment, task=t, limit=settings.acc_limit) for t in settings.tasks}

    result: dict[str, Any] = {"reference": {"perplexity": perplexity(model, ev)}, "plans": {}}
    if settings.tasks:
        result["reference"]["accuracy"] = acc(None)
    timing = _timer(model, settings)
    for name, p in tqdm(plans.items(), desc="evaluate plans (loss, perplexity, timing)", unit="plan"):
        row = {"n_low_precision_ops": len(p.low_precision_ops()), "predicted_loss_mse": p.predicted_loss_mse,
               "measured_loss_mse": measured_loss_mse(model, cal, p.assignment, ref_losses),
               "perplexity": perplexity(model, ev, p.assignment), "predicted_gain": p.predicted_gain}
        if settings.tasks:
            row["accuracy"] = acc(p.assignment)
        if timing is not None:
            row.update(timing(p.assignment))
        result["plans"][name] = row
    plan.measured = result["plans"]["ip"]
    plan.save(out / "plan.json")
    save_json(result, out / "evaluation.json")
    return result


def _timer(model, settings: RunSettings):
    """End-to-end prefill timing with the device backend's real kernels, or None where it cannot run."""
    from .errors import DeviceUnavailableError
    from .gains import compare_prefill, get_backend

    if settings.device == "table":
        return None
    try:
        backend = get_backend(settings.device)
        backend.check()
    except DeviceUnavailableError as e:
        log.warning("no end-to-end timing: %s", e)
        return None
    g = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(0, model.config.vocab_size, (settings.batch, settings.gain_seq_len), generator=g)

    def measure(assignment: dict[str, str]) -> dict[str, float]:
        r = compare_prefill(model, ids, backend, assignment, reps=settings.reps)
        return {"measured_prefill_s": r["t_cfg_s"], "reference_prefill_s": r["t_ref_s"],
                "measured_gain_s": r["gain_s"], "measured_gain_ci_s": r["ci_s"],
                "measured_speedup": r["t_ref_s"] / r["t_cfg_s"]}

    return measure


def stage_report(out: Path, settings: RunSettings) -> Path:
    from .records import Gains, Partition, Plan, Sensitivity
    from .report import write_report
    from .solver import load_frontier

    ev = load_json(out / "evaluation.json", "evaluation") if (out / "evaluation.json").exists() else None
    front = load_frontier(out / "frontier.json") if (out / "frontier.json").exists() else None
    path = out / "report.md"
    write_report(path, Plan.load(out / "plan.json"), Sensitivity.load(out / "sensitivity.json"),
                 Partition.load(out / "partition.json"), Gains.load(out / "gains.json"), frontier=front,
                 measured=ev)
    return path
