"""The ``ip_empirical_time`` tuning strategy on INC 3.x: our Pareto frontier as INC's candidate configs.

INC 3.10 has no 2.x strategy registry; its tuning loop is ``neural_compressor.torch.quantization.autotune``:
expand the ``TuningConfig.config_set`` into candidates, visit them in the ``sampler``'s order, quantize each
with ``quantize(model, config)`` (which dispatches on ``config.name`` to a function registered with
``register_algo``), evaluate with the user's ``eval_fn``, stop at the first within ``tolerable_loss``. So:

* ``IPEmpiricalTimeConfig`` (registered as algo ``ip_empirical_time``) expands into one config per frontier
  point, most aggressive (largest predicted gain) first. Without a frontier file (the usual case) the points are
  ranks of a frontier not yet made: the first trial's ``quantize`` records the batches INC's ``run_fn`` feeds the
  model, runs the whole method on them (``inc.method.run_method``: calibrate -> partition -> measure -> solve, in
  a content-hashed workspace that a second call reuses) and applies rank 0; later trials apply ranks 1, 2, ...
  With ``frontier=`` a frontier.json made by the CLI is replayed instead;
* ``IPEmpiricalTimeSampler`` orders any set of them the same way (gain descending, then loss ascending);
* ``ip_empirical_time_entry`` applies one point for the device: on CPU, INT8 points by default with the torch.ao
  dynamic INT8 Linears the gains were measured with (``cpu_kernels="torch.ao"``; INC's own PT2E graph, option
  ``cpu_kernels="pt2e"``, ran slower than fp32 in eager mode here), frontier replays through
  ``apply.cpu.apply_cpu`` (PT2E dynamic INT8, or FP8 Q/DQ), on Gaudi the FP8 MEASURE/QUANTIZE passes with the
  exported blocklist (``apply.hpu``). FP8 is driven with ``prepare``/``finalize_calibration``/``convert`` rather
  than ``quantize(model, FP8Config)``, which crashes in INC 3.10 (the config is swapped for a JSON path).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from neural_compressor.common.base_config import register_config
from neural_compressor.common.base_tuning import Sampler, TuningConfig
from neural_compressor.common.utils import Mode
from neural_compressor.torch.quantization.config import FRAMEWORK_NAME, TorchBaseConfig
from neural_compressor.torch.utils import register_algo

from ..export.fp8 import ExportError
from ..records import Plan
from ..solver import load_frontier
from .method import (
    CPU_KERNELS,
    MethodResult,
    MethodSettings,
    TuningSetupError,
    aggressive_key,
    check_score,
    ids_from_run_fn,
    run_method,
    tolerance_note,
    write_selected,
)

log = logging.getLogger(__name__)

ALGO = "ip_empirical_time"
DEVICES = ("auto", "cpu", "hpu")
#: candidates offered without a frontier file: the β sweep (solver.default_betas) yields at most 21 distinct points
MAX_POINTS = 21
#: INC 3.x's PT2E dynamic INT8 quantizer annotates Linear modules only
PLACEMENT = "inc3-pt2e-dynamic-int8-linear"

#: frontiers made by a first trial, by the session id its sibling configs share (read by the sampler and the
#: later trials of the same autotune call)
_SESSIONS: dict[str, MethodResult] = {}


@lru_cache(maxsize=8)
def _frontier(path: str, mtime: float) -> tuple[Plan, ...]:
    return tuple(load_frontier(path))


def frontier_points(path: str | Path) -> list[Plan]:
    """The frontier's plans in file order (cached per file version: every trial needs one)."""
    p = Path(path)
    if not p.exists():
        raise TuningSetupError(f"frontier file not found: {p} (write it with `inc-ipamp solve` or "
                               "solver.save_frontier)")
    return list(_frontier(str(p.resolve()), p.stat().st_mtime))


@register_config(framework_name=FRAMEWORK_NAME, algo_name=ALGO, priority=0)
class IPEmpiricalTimeConfig(TorchBaseConfig):
    """The ip_empirical_time strategy as an INC 3.x config.

    Without ``frontier`` (the usual case) ``autotune`` runs the whole method on the batches its ``run_fn`` feeds
    the model; ``options`` are ``inc.method.MethodSettings`` fields (reps, gain_seq_len, op_filter, ...),
    ``workspace`` the root of the content-hashed workspaces (default ``~/.cache/inc_ipamp/inc_workspaces``).
    With ``frontier='…/frontier.json'`` that file's points are replayed (``point`` = one index or a list).
    ``device``: "auto" runs on Gaudi when habana_frameworks is present, else on CPU.
    """

    name = ALGO

    def __init__(self, frontier: str | None = None, point: int | list[int] | None = None, device: str = "auto",
                 predicted_gain: float | None = None, predicted_loss_mse: float | None = None,
                 workspace: str | None = None, options: dict[str, Any] | None = None, rank: int | None = None,
                 session: str | None = None, max_points: int = MAX_POINTS, **kwargs: Any):
        super().__init__(white_list=None)
        self.frontier = None if frontier is None else str(frontier)
        self.point = point
        self.device = device
        self.predicted_gain = predicted_gain
        self.predicted_loss_mse = predicted_loss_mse
        self.workspace = None if workspace is None else str(workspace)
        self.options = dict(options or {})
        self.rank = rank
        self.session = session
        self.max_points = max_points
        if device not in DEVICES:
            raise TuningSetupError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        MethodSettings.from_kwargs(self.options)  # unknown options fail here, not in the first trial

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IPEmpiricalTimeConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable, compared by value

    # -- candidates -------------------------------------------------------------------------------
    def expand(self) -> list[IPEmpiricalTimeConfig]:
        """One config per frontier point, most aggressive first (INC calls this on the config set)."""
        if self.frontier is None:
            if self.rank is not None:
                return [self]
            import uuid

            session = self.session or uuid.uuid4().hex
            return [IPEmpiricalTimeConfig(None, None, self.device, workspace=self.workspace, options=self.options,
                                          rank=r, session=session, max_points=self.max_points)
                    for r in range(self.max_points)]
        plans = frontier_points(self.frontier)
        if isinstance(self.point, int):
            idx = [self.point]
        elif self.point is None:
            idx = list(range(len(plans)))
        else:
            idx = list(self.point)
        bad = [i for i in idx if not 0 <= i < len(plans)]
        if bad:
            raise TuningSetupError(f"frontier {self.frontier} has {len(plans)} points; no point {bad[0]}")
        out = [IPEmpiricalTimeConfig(self.frontier, i, self.device, plans[i].predicted_gain,
                                     plans[i].predicted_loss_mse) for i in idx]
        return sorted(out, key=_candidate_key)

    def plan(self) -> Plan:
        if self.frontier is None:
            res = _SESSIONS.get(self.session or "")
            if res is None or self.rank is None:
                raise TuningSetupError("this ip_empirical_time candidate has no frontier yet: its first trial makes it")
            return res.points[min(self.rank, len(res.points) - 1)]
        if not isinstance(self.point, int):
            raise TuningSetupError("expand() the config first: one trial applies one frontier point")
        return frontier_points(self.frontier)[self.point]

    @classmethod
    def get_config_set_for_tuning(cls) -> list:
        return [cls()]

    @classmethod
    def register_supported_configs(cls) -> list:
        return []

    # -- INC's quantize() plumbing ----------------------------------------------------------------
    @staticmethod
    def get_model_info(model: torch.nn.Module, example_inputs: Any = None) -> list[tuple[str, str]]:
        from ..ops import Matmul, is_linear

        return [(n, type(m).__name__) for n, m in model.named_modules() if is_linear(m) or isinstance(m, Matmul)]

    def to_config_mapping(self, config_list: list | None = None, model_info: list | None = None) -> OrderedDict:
        """Every quantizable op maps to this config, so ``quantize`` dispatches the whole model to our algo."""
        info = model_info or [("", "model")]
        return OrderedDict(((name, kind), self) for name, kind in info)


def _candidate_key(cfg: IPEmpiricalTimeConfig) -> tuple[float, float, int]:
    return (*aggressive_key(cfg.predicted_gain, cfg.predicted_loss_mse), cfg.point if isinstance(cfg.point, int) else 0)


class IPEmpiricalTimeSampler(Sampler):
    """Visit candidates by predicted gain, largest first (ties: smaller predicted loss first); frontier ranks in
    rank order, stopping after the last point once the first trial has made the frontier."""

    def __init__(self, config_source) -> None:
        self.config_source = config_source
        self._order = sorted(range(len(config_source)), key=lambda i: _sort_key(config_source[i], i))

    def __iter__(self) -> Iterator[int]:
        for i in self._order:
            cfg = self.config_source[i]
            res = _SESSIONS.get(getattr(cfg, "session", None) or "")
            if res is not None and cfg.rank is not None and cfg.rank >= len(res.points):
                continue  # past the frontier's last (least aggressive) point
            yield i

    def __len__(self) -> int:
        return len(self._order)


def _sort_key(cfg: Any, i: int) -> tuple:
    if isinstance(cfg, IPEmpiricalTimeConfig) and cfg.rank is not None:
        return (0, float(cfg.rank), 0.0, 0, i)
    if isinstance(cfg, IPEmpiricalTimeConfig):
        return (0, *_candidate_key(cfg), i)
    return (1, 0.0, 0.0, 0, i)  # other INC configs keep their given order, after ours


def _habana_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("habana_frameworks") is not None


def _inc_tuning_monitor() -> Any:
    """INC 3.x ``autotune``'s TuningMonitor, read from its frame (None when quantize was called directly).

    Read only, to check INC's fp32 baseline score before the costly first trial and to log trial scores into the
    workspace: INC hands a config neither. Found by type name; absent on other INC versions, then skipped.
    """
    import sys

    f = sys._getframe(1)
    for _ in range(12):
        if f is None:
            return None
        mon = f.f_locals.get("tuning_monitor")
        if type(mon).__name__ == "TuningMonitor":
            return mon
        f = f.f_back
    return None


def _resolve(cfg: IPEmpiricalTimeConfig, model: torch.nn.Module, kwargs: dict[str, Any]) -> MethodResult:
    """The frontier for ``cfg``'s session: made by its first trial from INC's calibration batches."""
    res = _SESSIONS.get(cfg.session or "")
    if res is not None:
        return res
    mon = _inc_tuning_monitor()
    if mon is not None and mon.baseline is not None:
        check_score(mon.baseline, "eval_fn (INC's fp32 baseline)")
    settings = MethodSettings.from_kwargs(cfg.options)
    if settings.device != "cpu":
        raise TuningSetupError("inside INC's autotune the method measures gains on CPU (INT8); for Gaudi run "
                               "`inc-ipamp run --device hpu` and pass frontier=…/frontier.json")
    batches = ids_from_run_fn(model, kwargs.get("run_fn"), kwargs.get("run_args"), settings.max_calib)
    res = run_method(model, batches, settings, cfg.workspace, placeable=_pt2e_placeable(model), placement=PLACEMENT)
    _SESSIONS[cfg.session or ""] = res
    _example[cfg.session or ""] = batches[0][:1]
    return res


_example: dict[str, torch.Tensor] = {}


def _pt2e_placeable(model: torch.nn.Module):
    from ..ops import is_linear

    linear = {n for n, m in model.named_modules() if is_linear(m) and isinstance(m, torch.nn.Linear)}
    return lambda op: op in linear


def _log_trials(res: MethodResult, rank: int) -> None:
    """trials.json: the points INC has built so far, with INC's scores where its monitor has them."""
    from ..io import save_json

    mon = _inc_tuning_monitor()
    scores = {}
    if mon is not None:
        for rec in getattr(mon, "tuning_history", []):
            r = getattr(rec.quant_config, "rank", None)
            if r is not None:
                scores[r] = rec.trial_result
    path = res.workspace / "trials.json"
    built = [] if not path.exists() else [t for t in _load(path) if t["rank"] != rank]
    p = res.points[min(rank, len(res.points) - 1)]
    built.append({"rank": rank, "n_low_precision_ops": len(p.low_precision_ops()), "predicted_gain": p.predicted_gain,
                  "predicted_loss_mse": p.predicted_loss_mse})
    for t in built:
        if t["rank"] in scores:
            t["score"] = scores[t["rank"]]
    save_json({"record": "trials", "baseline": None if mon is None else mon.baseline, "trials": built}, path)


def _load(path: Path) -> list[dict]:
    from ..io import load_json

    return load_json(path, "trials")["trials"]


@register_algo(ALGO)
@torch.no_grad()
def ip_empirical_time_entry(model: torch.nn.Module, configs_mapping: dict, mode: Mode = Mode.QUANTIZE,
                            *args: Any, **kwargs: Any) -> torch.nn.Module:
    """Apply one frontier point with INC's real backend (what ``quantize`` calls for our config)."""
    from ..apply.cpu import apply_cpu, apply_torchao_int8
    from ..export.cpu import export_cpu

    if mode != Mode.QUANTIZE:
        raise TuningSetupError("ip_empirical_time runs as a whole (quantize/autotune), not as prepare/convert")
    cfg = next(c for c in configs_mapping.values() if getattr(c, "name", None) == ALGO)
    example = kwargs.get("example_inputs")
    if cfg.frontier is None:
        if cfg.rank is None:
            raise TuningSetupError("expand() the config first (autotune does): one trial applies one frontier rank")
        with torch.enable_grad():
            res = _resolve(cfg, model, kwargs)
        plan = res.points[min(cfg.rank, len(res.points) - 1)]
        ids = example[0] if isinstance(example, (tuple, list)) else example
        if ids is None:
            ids = _example[cfg.session or ""]
        kernels = (cfg.options or {}).get("cpu_kernels", "torch.ao")
        if kernels not in CPU_KERNELS:
            raise TuningSetupError(f"cpu_kernels must be one of {', '.join(CPU_KERNELS)}, got {kernels!r}")
        if not plan.low_precision_ops():
            q = model
        elif kernels == "torch.ao":
            try:
                q = apply_torchao_int8(model, plan)
            except ExportError as e:
                raise TuningSetupError(f"cpu_kernels='torch.ao': {e}: use cpu_kernels='pt2e' (INC's graph) for other "
                                       "formats") from None
        else:
            q = apply_cpu(model, plan, [ids], inplace=True, reuse_export=True)
        out = write_selected(res.workspace, plan, res.unplaced,
                             {"rank": cfg.rank, "inc_path": PLACEMENT, "cpu_kernels": kernels,
                              "note": "the point of the last model INC built; autotune returns that model"})
        export_cpu(plan, out / "inc_config.json")
        _log_trials(res, cfg.rank)
        log.info("ip_empirical_time: rank %d of %d (predicted gain %.4g, loss MSE %.4g, %d INT8 ops)", cfg.rank,
                 len(res.points), plan.predicted_gain, plan.predicted_loss_mse, len(plan.low_precision_ops()))
        q.ipamp_plan = plan
        q.ipamp_point = cfg.rank
        q.ipamp_workspace = str(res.workspace)
        q.ipamp_points = res.points  # the frontier in the order INC tries it (``tolerance_note``)
        return q
    plan = cfg.plan()
    run_fn, run_args = kwargs.get("run_fn"), kwargs.get("run_args") or ()
    device = cfg.device
    if device == "auto":
        device = "hpu" if _habana_available() else "cpu"
    if device == "hpu":
        from ..apply.hpu import apply_hpu

        q = apply_hpu(model, plan, run_fn=run_fn, run_args=run_args, example_inputs=example)
    else:
        if example is None:
            raise TuningSetupError("pass example_inputs=input_ids (a (1, seq) LongTensor): INC's CPU paths need "
                                   "one example to export or calibrate the model")
        ids = example[0] if isinstance(example, (tuple, list)) else example
        q = apply_cpu(model, plan, [ids], inplace=True)
    log.info("ip_empirical_time: frontier point %s (predicted gain %.4g, loss MSE %.4g, %d low-precision ops)",
             cfg.point, plan.predicted_gain, plan.predicted_loss_mse, len(plan.low_precision_ops()))
    q.ipamp_plan = plan
    q.ipamp_point = cfg.point
    return q


def quantized_ops(q: torch.nn.Module) -> set[str]:
    """The ops the returned model actually runs in INT8, by their original module names: torch.ao dynamic INT8
    Linears, or (INC's PT2E graph) Linears whose weight reaches the linear op through a dequantize node."""
    from torch.ao.nn.quantized import dynamic as nnqd

    if not hasattr(q, "graph"):
        return {n for n, m in q.named_modules() if isinstance(m, nnqd.Linear)}
    return {list(n.meta["nn_module_stack"].values())[-1][0] for n in q.graph.nodes
            if "linear" in str(n.target) and len(n.args) > 1
            and "dequantize" in str(getattr(n.args[1], "target", ""))}


def tuning_config(frontier: str | Path | None = None, tolerable_loss: float = 0.01, max_trials: int = 100,
                  device: str = "auto", workspace: str | Path | None = None, **options: Any) -> TuningConfig:
    """INC TuningConfig trying every frontier point, most aggressive first (no frontier: the method runs in the
    first trial; ``options`` = ``inc.method.MethodSettings`` fields)."""
    cfg = IPEmpiricalTimeConfig(None if frontier is None else str(frontier), device=device,
                                workspace=None if workspace is None else str(workspace), options=options)
    return TuningConfig(config_set=[cfg], sampler=IPEmpiricalTimeSampler, tolerable_loss=tolerable_loss,
                        max_trials=max_trials)


def autotune(model: torch.nn.Module, eval_fn: Callable[[torch.nn.Module], float], frontier: str | Path | None = None,
             example_inputs: Any = None, tolerable_loss: float = 0.01, max_trials: int = 100,
             run_fn: Callable | None = None, run_args: tuple | None = None, device: str = "auto",
             tuning_strategy: str = ALGO, workspace: str | Path | None = None,
             **options: Any) -> torch.nn.Module | None:
    """INC's ``autotune`` with the ip_empirical_time strategy: the most aggressive point within tolerance.

    Without ``frontier`` the first trial runs the whole method on the batches ``run_fn(model, *run_args)`` feeds
    the model (required then); ``options`` are ``inc.method.MethodSettings`` fields.
    ``eval_fn(model) -> float`` must be higher-is-better and positive (INC accepts a trial when
    ``score >= baseline * (1 - tolerable_loss)``; e.g. ``exp(-loss)`` or accuracy, not ``-loss``): checked on every
    call. ``tuning_strategy`` exists for users of the INC 2.x keyword; only ``"ip_empirical_time"`` is offered.
    Returns the quantized model (``.ipamp_plan`` = the chosen Plan), or None when no point passed; without a
    frontier, ``workspace/selected/accepted.json`` records the scores.
    """
    from neural_compressor.torch.quantization import autotune as inc_autotune

    from ..io import save_json

    if tuning_strategy != ALGO:
        raise TuningSetupError(f"tuning_strategy must be {ALGO!r} (INC 3.x has no other strategies), "
                               f"got {tuning_strategy!r}")
    if frontier is None and run_fn is None:
        raise TuningSetupError("ip_empirical_time calibrates through INC's calibration hook: pass run_fn= (a "
                               "function that runs the model on real text) or frontier=…/frontier.json")
    scores: list[float] = []

    def checked(m: torch.nn.Module) -> float:
        s = check_score(eval_fn(m), "eval_fn")
        scores.append(s)
        return s

    cfg = tuning_config(frontier, tolerable_loss, max_trials, device, workspace, **options)
    try:
        q = inc_autotune(model, cfg, checked, run_fn=run_fn, run_args=run_args, example_inputs=example_inputs)
    finally:
        from ..apply.cpu import forget_export

        forget_export()
    ws = getattr(q, "ipamp_workspace", None)
    if ws is not None:
        base = scores[0]
        note = tolerance_note(q.ipamp_points, q.ipamp_point, f"relative tolerance {tolerable_loss:g}")
        if note:
            log.warning("ip_empirical_time: %s", note)
        save_json({"record": "accepted", "baseline_score": base, "trial_scores": scores[1:],
                   "tolerable_loss": tolerable_loss, "threshold": base * (1 - tolerable_loss),
                   "accepted_score": scores[-1], "within_tolerance": scores[-1] >= base * (1 - tolerable_loss),
                   "rank": q.ipamp_point, "n_points": len(q.ipamp_points),
                   "n_low_precision_ops": len(q.ipamp_plan.low_precision_ops()), "criterion_decided": note},
                  Path(ws) / "selected" / "accepted.json")
    return q
