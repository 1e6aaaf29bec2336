"""The whole method behind INC's own calls: calibration batches in, a Pareto frontier (most aggressive first) out.

Both INC entry points (the 3.x ``autotune`` config in ``inc.strategy`` and the 2.x tuning strategy in
``inc_ipamp.inc2``) hand the batches INC would calibrate on to ``run_method``, which calls the pipeline's own
stages (``sensitivity.calibrate``, ``pipeline.stage_partition``/``stage_measure``/``stage_solve``) in a workspace
folder named by a content hash of the model (architecture and weights), the calibration token ids and the
settings: a second call with the same three finds ``frontier.json`` there and does not recalibrate.

Ops the INC path cannot place (the attention BGEMMs: neither INC's PT2E X86 quantizer nor its 2.x torch.ao path
quantizes them; for 2.x also any Linear missing from INC's tuning space) are taken out of the partition before
gains are measured, so every frontier point is a plan INC can build exactly; they are listed in
``workspace/placement.json`` and in each report as staying FP32.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import IpampError
from ..io import load_json, save_json
from ..models import model_content_hash
from ..ops import is_bgemm_name
from ..pipeline import RunSettings
from ..records import Plan

log = logging.getLogger(__name__)

#: bump when a change here makes old workspaces wrong
WORKSPACE_VERSION = 1


class TuningSetupError(IpampError):
    """The INC tuning call was set up wrongly (no calibration data, unknown strategy, bad eval_fn, ...)."""


class NoQuantizableOpsError(TuningSetupError):
    """The model has no op that both we and INC's path can put in low precision."""


#: the CLI's defaults are the method's defaults
_D = RunSettings()


#: options of the INC strategy that choose how a point is applied, outside MethodSettings (and the workspace key)
APPLY_OPTIONS = {"workspace", "cpu_kernels"}
#: ``cpu_kernels``: "torch.ao" applies a CPU INT8 point with the torch.ao dynamic INT8 Linears the gains were measured
#: with (the fast CPU path, what INC 2.x's dynamic path builds); "pt2e" with INC 3.x's own PT2E dynamic INT8 graph,
#: which ran at 0.81x of fp32 in eager mode on a 2-core CPU (inc_native.md as of a94df6b; inc_cpu.md) and is meant to
#: be torch.compile'd on CPUs with fast INT8 instructions
CPU_KERNELS = ("torch.ao", "pt2e")


@dataclass
class MethodSettings:
    """What the in-INC method needs beyond the model and the calibration batches (all part of the workspace key).

    ``op_filter``: a regex; only ops whose names match are candidates (e.g. a few layers in a quick test, the
    model itself stays whole). ``max_calib``: use at most this many calibration sequences (None: all).
    """

    device: str = "cpu"
    formats: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    calib_batch: int = _D.calib_batch
    curvature: bool = _D.curvature
    curvature_share: float = _D.curvature_share
    include_lm_head: bool = _D.include_lm_head
    noise: str = _D.noise
    min_sqnr_db: float | None = _D.min_sqnr_db
    metric: str = _D.metric
    beta: float | None = _D.beta
    batch: int = _D.batch
    gain_seq_len: int = _D.gain_seq_len
    reps: int = _D.reps
    span: int | None = _D.span
    op_filter: str | None = None
    max_calib: int | None = None

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any] | None) -> MethodSettings:
        kwargs = dict(kwargs or {})
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(kwargs) - known - APPLY_OPTIONS)
        if bad:
            raise TuningSetupError(f"unknown ip_empirical_time option(s) {bad}; known: {', '.join(sorted(known))}, "
                                   + ", ".join(sorted(APPLY_OPTIONS)))
        for k in APPLY_OPTIONS:  # how a point is applied, not what is measured: not part of the workspace key
            kwargs.pop(k, None)
        return cls(**kwargs)

    def run_settings(self, model_name: str) -> RunSettings:
        return RunSettings(model=model_name, device=self.device, formats=list(self.formats),
                           calib_batch=self.calib_batch, curvature=self.curvature,
                           curvature_share=self.curvature_share, include_lm_head=self.include_lm_head,
                           noise=self.noise, min_sqnr_db=self.min_sqnr_db, metric=self.metric, beta=self.beta,
                           batch=self.batch, gain_seq_len=self.gain_seq_len, reps=self.reps, span=self.span)


def default_workspace_root() -> Path:
    from ..models import cache_dir

    return cache_dir() / "inc_workspaces"


# -- calibration data ------------------------------------------------------------------------------------
def input_ids_of(batch: Any) -> torch.Tensor:
    """The token ids in one calibration batch: a LongTensor, ``(ids, label)``, or a dict with ``input_ids``."""
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise TuningSetupError(f"a calibration batch is a dict without 'input_ids' (keys: {sorted(batch)})")
        batch = batch["input_ids"]
    elif isinstance(batch, (tuple, list)):
        if not batch:
            raise TuningSetupError("a calibration batch is an empty tuple")
        batch = batch[0]
    if not (isinstance(batch, torch.Tensor) and not batch.is_floating_point() and batch.dim() in (1, 2)):
        raise TuningSetupError("calibration batches must be token ids (a (batch, seq) integer tensor, a tuple whose "
                               f"first item is one, or a dict with 'input_ids'); got {type(batch).__name__}")
    return (batch if batch.dim() == 2 else batch[None]).detach().cpu().long()


def ids_from_loader(loader: Iterable | None, max_sequences: int | None = None) -> list[torch.Tensor]:
    """Token-id batches from a calibration dataloader (INC 2.x ``calib_dataloader``)."""
    if loader is None:
        raise TuningSetupError("ip_empirical_time calibrates on your data: pass calib_dataloader= (batches of "
                               "token ids from real text)")
    out, n = [], 0
    for batch in loader:
        ids = input_ids_of(batch)
        out.append(ids)
        n += ids.shape[0]
        if max_sequences is not None and n >= max_sequences:
            break
    if not out:
        raise TuningSetupError("the calibration dataloader yielded no batch")
    return _cap(out, max_sequences)


def ids_from_run_fn(model: nn.Module, run_fn: Callable | None, run_args: tuple | None = None,
                    max_sequences: int | None = None) -> list[torch.Tensor]:
    """Record the ``input_ids`` that INC's calibration function ``run_fn(model, *run_args)`` feeds the model.

    The forward runs as usual (INC's run_fn may read its outputs); only the inputs are kept.
    """
    if run_fn is None:
        raise TuningSetupError("ip_empirical_time calibrates through INC's calibration hook: pass run_fn= (a "
                               "function that runs the model on real text, as for INC's own static quantization)")
    seen: list[torch.Tensor] = []

    def hook(_mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise TuningSetupError("run_fn called the model without input_ids")
        seen.append(input_ids_of(ids))

    h = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run_fn(model, *(run_args or ()))
    finally:
        h.remove()
    if not seen:
        raise TuningSetupError("run_fn never called the model: it must run the model on calibration text")
    return _cap(seen, max_sequences)


def _cap(batches: list[torch.Tensor], max_sequences: int | None) -> list[torch.Tensor]:
    if max_sequences is None:
        return batches
    rows = torch.cat([b for b in batches if b.shape[1] == batches[0].shape[1]])[:max_sequences]
    return list(rows.split(1))


# -- workspace -------------------------------------------------------------------------------------------
def workspace_key(model: nn.Module, batches: list[torch.Tensor], settings: MethodSettings, placement: str) -> str:
    from .. import __version__

    h = hashlib.sha256()
    h.update(model_content_hash(model).encode())
    for b in batches:
        h.update(str(tuple(b.shape)).encode())
        h.update(b.numpy().tobytes())
    h.update(json.dumps({"settings": asdict(settings), "placement": placement, "version": WORKSPACE_VERSION,
                         "package": __version__}, sort_keys=True).encode())
    return h.hexdigest()[:20]


@dataclass
class MethodResult:
    """The frontier to offer (most aggressive first), where it lives, and what each phase cost."""

    workspace: Path
    points: list[Plan]
    reused: bool
    phases_s: dict[str, float]
    unplaced: list[str]


def run_method(model: nn.Module, batches: list[torch.Tensor], settings: MethodSettings,
               workspace_root: str | Path | None = None, placeable: Callable[[str], bool] | None = None,
               placement: str = "inc-cpu-int8-linear", model_name: str | None = None) -> MethodResult:
    """Calibrate -> partition -> measure -> solve on a private copy of ``model``; reuse a matching workspace.

    ``placeable(op)``: whether INC's path can put ``op`` in low precision (default: every Linear, no BGEMM);
    ``placement`` names that rule in the workspace key.
    """
    from .. import pipeline
    from ..ops import is_linear
    from ..sensitivity import calibrate
    from ..solver import load_frontier

    if not batches:
        raise TuningSetupError("no calibration batches")
    ok = placeable or (lambda op: not is_bgemm_name(op))
    if not any(ok(n) for n, m in model.named_modules() if is_linear(m)):
        raise NoQuantizableOpsError(f"{type(model).__name__} has no Linear layer that INC's {placement} path can "
                                    "quantize")
    root = Path(workspace_root) if workspace_root is not None else default_workspace_root()
    t0 = time.perf_counter()
    key = workspace_key(model, batches, settings, placement)
    ws = root / key
    phases: dict[str, float] = {"workspace_key_s": time.perf_counter() - t0}
    if (ws / "frontier.json").exists() and (ws / "placement.json").exists():
        points = load_frontier(ws / "frontier.json")
        unplaced = load_json(ws / "placement.json", "placement")["fp32_unplaceable"]
        log.info("ip_empirical_time: reusing workspace %s (%d frontier points)", ws, len(points))
        return MethodResult(ws, _aggressive_first(points), True, phases, unplaced)
    ws.mkdir(parents=True, exist_ok=True)
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    rs = settings.run_settings(str(name))
    rs.save(ws)
    save_json({"record": "ip_empirical_time_settings", **asdict(settings), "placement": placement,
               "calibration": {"batches": len(batches), "sequences": sum(int(b.shape[0]) for b in batches),
                               "seq_lens": sorted({int(b.shape[1]) for b in batches})}}, ws / "method.json")
    work = copy.deepcopy(model).float().eval()  # INC's model stays untouched (attention routing, dtype)
    try:
        t = time.perf_counter()
        formats = [f for f in settings.formats[1:]]
        rows = [r for b in batches for r in b.split(1)]  # one item per sequence (progress counts); rebatched inside
        sens = calibrate(work, rows, formats, include_lm_head=settings.include_lm_head, model_name=str(name),
                         batch_size=settings.calib_batch, curvature=settings.curvature,
                         curvature_share=settings.curvature_share, noise=settings.noise,
                         data_source=f"INC calibration data ({sum(int(b.shape[0]) for b in batches)} sequences)")
        sens.save(ws / "sensitivity.json")
        phases["calibrate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        part = pipeline.stage_partition(ws, rs, work)
        pattern = re.compile(settings.op_filter) if settings.op_filter else None
        unplaced = sorted(op for g in part.groups for op in g.ops if not ok(op))
        filtered = sorted(op for g in part.groups for op in g.ops if ok(op) and pattern and not pattern.search(op))
        for g in part.groups:
            g.ops = [op for op in g.ops if ok(op) and (pattern is None or pattern.search(op))]
        part.groups = [g for g in part.groups if g.ops]
        if not part.groups:
            raise NoQuantizableOpsError(
                f"{type(model).__name__} has no op that INC's {placement} path can quantize"
                + (f" and that matches op_filter {settings.op_filter!r}" if pattern else "")
                + (f" ({len(unplaced)} ops it cannot place stay FP32)" if unplaced else ""))
        if unplaced:
            part.notes.append(f"{len(unplaced)} ops INC's {placement} path cannot place were removed: they stay FP32")
        if filtered:
            part.notes.append(f"{len(filtered)} ops outside op_filter {settings.op_filter!r} stay FP32")
        part.save(ws / "partition.json")
        save_json({"record": "placement", "rule": placement, "fp32_unplaceable": unplaced,
                   "fp32_filtered": filtered}, ws / "placement.json.tmp")
        phases["partition_s"] = time.perf_counter() - t
        t = time.perf_counter()
        pipeline.stage_measure(ws, rs, work)
        phases["measure_s"] = time.perf_counter() - t
        t = time.perf_counter()
        front = _solve(ws, settings, sens, part)
        phases["solve_s"] = time.perf_counter() - t
    finally:
        del work
    # written last: its presence marks a complete workspace
    (ws / "placement.json.tmp").replace(ws / "placement.json")
    save_json({"record": "phases", **phases}, ws / "phases.json")
    log.info("ip_empirical_time: frontier of %d points in %s (%s)", len(front), ws,
             ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    return MethodResult(ws, _aggressive_first(front), False, phases, unplaced)


def _solve(ws: Path, settings: MethodSettings, sens, part) -> list[Plan]:
    """The Pareto frontier (frontier.json) and the plan at ``settings.beta`` (plan.json, used without eval)."""
    from ..records import Gains
    from ..solver import frontier, save_frontier, solve

    gains = Gains.load(ws / "gains.json")
    guard = {"noise": settings.noise, "min_sqnr_db": settings.min_sqnr_db}
    front = frontier(sens, part, gains, metric=settings.metric, **guard)
    save_frontier(front, ws / "frontier.json")
    plan = solve(sens, part, gains, metric=settings.metric, beta=settings.beta, **guard)
    plan.model = sens.model
    plan.save(ws / "plan.json")
    return front


def aggressive_key(gain: float | None, loss_mse: float | None) -> tuple[float, float]:
    """Sort key of a frontier point, most aggressive first: largest predicted gain, then smaller predicted loss (an
    unknown gain or loss sorts last). Plans here and INC candidates in ``strategy`` are ordered by it."""
    return (-gain if gain is not None else float("inf"), loss_mse if loss_mse is not None else float("inf"))


def _aggressive_first(points: list[Plan]) -> list[Plan]:
    """The all-reference point comes last."""
    return sorted(points, key=lambda p: aggressive_key(p.predicted_gain, p.predicted_loss_mse))


def tolerance_note(points: list[Plan], rank: int | None, criterion: str) -> str | None:
    """One sentence when INC's accuracy criterion, not the search, chose the result, or None.

    Why: INC tries the frontier most aggressive first and keeps the first point within its criterion; when that is
    the least aggressive point with any low-precision op (or the all-reference one), every faster plan failed the
    check, and a user reading only "accepted" would not know that the criterion (or the eval's noise) is the lever,
    not the method. ``points``: the frontier in the order INC tried it; ``rank``: the accepted point's index;
    ``criterion``: how to name it (e.g. "relative tolerance 0.01").
    """
    low = [i for i, p in enumerate(points) if p.low_precision_ops()]
    if rank is None or not low or rank == 0 or rank < low[-1]:
        return None
    if rank > low[-1]:
        return (f"INC's {criterion} accepted none of the {len(low)} frontier points with a low-precision op: the "
                "model stays in high precision, decided by the criterion, not the search")
    return (f"INC's {criterion} accepted only the frontier's least aggressive point (rank {rank} of {len(points)}, "
            f"{len(points[rank].low_precision_ops())} low-precision ops): all {rank} faster points failed it, so the "
            "criterion, not the search, chose this plan; a looser criterion or a less noisy eval is the lever")


# -- eval_fn conventions ---------------------------------------------------------------------------------
def check_score(score: Any, what: str = "eval_fn") -> float:
    """INC accepts a trial when ``score >= baseline * (1 - tolerable_loss)``: the score must be a finite positive
    number where higher is better (accuracy, exp(-loss)); a loss or a negative log-likelihood breaks that rule."""
    try:
        s = float(score)
    except (TypeError, ValueError):
        raise TuningSetupError(f"{what} must return a number (higher is better, > 0), got {type(score).__name__}") \
            from None
    if not math.isfinite(s) or s <= 0:
        raise TuningSetupError(
            f"{what} returned {s!r}: INC's relative tolerance (score >= baseline x (1 - tolerable_loss)) needs a "
            "finite, positive, higher-is-better score such as accuracy or exp(-loss), not a loss or -loss")
    return s


# -- what the accepted point leaves behind ---------------------------------------------------------------
def write_selected(ws: Path, plan: Plan, unplaced: list[str], extra: dict[str, Any] | None = None,
                   folder: str = "selected") -> Path:
    """The point INC built: plan.json, report.md and selected.json (what stayed FP32 and why, trial facts).

    The caller writes ``inc_config.json`` beside them with its INC version's own exporter."""
    from ..records import Gains, Partition, Sensitivity
    from ..report import write_report

    out = ws / folder
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.json")
    save_json({"record": "selected_point", "n_low_precision_ops": len(plan.low_precision_ops()),
               "predicted_gain": plan.predicted_gain, "predicted_loss_mse": plan.predicted_loss_mse,
               "fp32_unplaceable": unplaced, **(extra or {})}, out / "selected.json")
    try:
        write_report(out / "report.md", plan, Sensitivity.load(ws / "sensitivity.json"),
                     Partition.load(ws / "partition.json"), Gains.load(ws / "gains.json"))
    except (IpampError, OSError, KeyError, ValueError) as e:  # the plan and config are what users deploy
        log.warning("no report for the selected point: %s", e)
    return out


# -- what the returned model measures ---------------------------------------------------------------------
@torch.no_grad()
def compare_with_fp32(quantized: nn.Module, reference: nn.Module, text: torch.Tensor, prefill_ids: torch.Tensor,
                      reps: int = 9, warmup: int = 2) -> dict[str, float]:
    """Measured prefill speedup (interleaved timing, medians) and mean next-token loss of the model INC returned
    vs the fp32 model on held-out ``text`` ((n, T) token ids); ``quantized`` may be INC 2.x's wrapper (``.model``)."""
    from ..gains.base import gain_stats, paired_times

    q = quantized.model if type(quantized).__name__.startswith("PyTorch") else quantized  # INC 2.x: PyTorchFXModel

    def loss(m: nn.Module) -> float:
        vals = []
        for ids in text:
            o = m(ids[None])
            lg = o.logits if hasattr(o, "logits") else o[0]
            vals.append(float(torch.nn.functional.cross_entropy(lg[0, :-1], ids[1:])))
        return sum(vals) / len(vals)

    t_ref, t_q = paired_times(lambda: reference(prefill_ids), lambda: q(prefill_ids), reps, warmup)
    st = gain_stats(t_ref, t_q)
    lq, lr = loss(q), loss(reference)
    return {"prefill_fp32_s": st["t_ref_s"], "prefill_quantized_s": st["t_cfg_s"],
            "prefill_speedup": st["t_ref_s"] / st["t_cfg_s"], "prefill_gain_ci_s": st["ci_s"],
            "loss_fp32": lr, "loss_quantized": lq, "loss_delta": lq - lr, "perplexity_fp32": math.exp(lr),
            "perplexity_quantized": math.exp(lq)}
