"""The ``ip_empirical_time`` tuning strategy in INC's 2.x API (``neural-compressor`` 3.7.1, its last release).

``import inc_ipamp.inc2`` registers the strategy in INC's 2.x registry, so both spellings run the whole method::

    conf = PostTrainingQuantConfig(tuning_strategy="ip_empirical_time")                       # our keyword
    conf = PostTrainingQuantConfig(quant_level=1, tuning_criterion=TuningCriterion(strategy="ip_empirical_time"))
    q = quantization.fit(model, conf, calib_dataloader=loader, eval_func=eval_fn)

The strategy reads token ids from INC's ``calib_dataloader``, runs calibrate -> partition -> measure (CPU,
torch.ao dynamic INT8 with per-channel weights, ``int8_pc``: the kernels INC's 2.x dynamic path builds, and the only
ones it builds, ``INC2_FORMAT``) -> solve (``inc.method.run_method``, in a
content-hashed workspace that a second call reuses), and yields the frontier points most aggressive first as
INC tuning configs; INC evaluates each with ``eval_func`` and stops at the first within its accuracy criterion.

INC has no ``tuning_strategy=`` keyword, its ``TuningCriterion.strategy`` setter accepts a fixed list and its
``fit`` logs and swallows every exception raised while tuning (returning None), so importing this module installs
three small hooks (``install()``; ``uninstall()`` restores INC exactly):

* ``TuningCriterion.strategy``'s setter also accepts the names registered here (any other name goes to INC's own
  check unchanged);
* ``PostTrainingQuantConfig.__init__`` accepts ``tuning_strategy=NAME``, which sets ``tuning_criterion.strategy``.
  With our strategy, a ``quant_level`` not given becomes 1 (INC's default "auto" silently replaces any strategy;
  an explicit other level is an error) and an ``approach`` not given becomes "dynamic" (the gains are measured
  for dynamic INT8; "static" is refused by the strategy);
* ``neural_compressor.quantization.fit`` re-raises the one error our strategy raised inside it (bad ``eval_func``
  score, nothing to quantize), instead of INC's "Unexpected exception" log and a None result. Code that bound
  ``fit`` by name before importing this module keeps INC's original.

Where INC cannot place an op, it stays FP32 and is listed as such: the attention BGEMMs (INC 2.x has no op for
them) and any Linear absent from INC's tuning space. INC names the Linears it wraps in place ``<name>.module``
(e.g. ``model.layers.0.self_attn.q_proj.module``, ``lm_head.module``); those map to our ``<name>``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

from neural_compressor import config as _inc_config
from neural_compressor.strategy.strategy import STRATEGIES, TuneStrategy
from neural_compressor.strategy.utils.tuning_structs import OpTuningConfig

from .errors import IpampError
from .inc.method import (
    MethodResult,
    MethodSettings,
    NoQuantizableOpsError,
    TuningSetupError,
    check_score,
    ids_from_loader,
    run_method,
    tolerance_note,
    write_selected,
)
from .io import save_json
from .records import Plan

log = logging.getLogger(__name__)

NAME = "ip_empirical_time"
PLACEMENT = "inc2-torch.ao-dynamic-int8"
#: the one INT8 format INC's 2.x dynamic path builds. Its PyTorch adaptor (``adaptor/pytorch.py``, ``_cfg_to_qconfig``,
#: neural-compressor 3.7.1, torch >= 1.11) gives every dynamic Linear ``torch.quantization.per_channel_dynamic_qconfig``
#: whatever weight granularity the tuning config asks for: a per-tensor ``int8`` plan came back with per-channel
#: weights (SmolLM2-135M all-INT8: held-out loss 3.81 where the per-tensor plan it was solved for gives 3.88), so the
#: loss and gains the frontier was solved with were not those of the returned model. Per-channel weights are ``int8_pc``
#: (INC's observer takes amax/127.5 per channel where ``formats`` takes amax/127: scales 0.39% apart, ≤ 1 level).
INC2_FORMAT = "int8_pc"
#: INC 2.x's name for that format's weight granularity (its tuning-space key and ``op_name_dict``)
GRANULARITY = {INC2_FORMAT: "per_channel"}


def inc2_kwargs(strategy_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The strategy's options with the formats INC 2.x can build: fp32 + ``INC2_FORMAT`` by default; anything else
    (per-tensor ``int8`` included, which INC 2.x would return with per-channel weights) is refused."""
    kwargs = dict(strategy_kwargs or {})
    kwargs.setdefault("formats", ["fp32", INC2_FORMAT])
    fmts, dev = list(kwargs["formats"]), kwargs.get("device", "cpu")
    if dev != "cpu" or fmts != ["fp32", INC2_FORMAT]:
        raise TuningSetupError(
            f"INC's 2.x path is dynamic INT8 on CPU with per-channel weights (its adaptor builds every dynamic Linear "
            f"with per_channel_dynamic_qconfig, whatever granularity is asked): device must be 'cpu' and formats "
            f"['fp32', '{INC2_FORMAT}'] (got {dev!r}, {fmts})")
    return kwargs


def inc_to_ours(inc_name: str) -> str:
    """INC 2.x wraps Linears it cannot trace in place as ``<name>.module``: the op is ``<name>``."""
    return inc_name[: -len(".module")] if inc_name.endswith(".module") else inc_name


class IPEmpiricalTimeTuneStrategy(TuneStrategy):
    """Frontier points of the whole method, most aggressive first, as INC 2.x tuning configs."""

    def __init__(self, model, conf, q_dataloader=None, *args, **kwargs):
        # INC builds the strategy outside fit()'s catch-all: set-up errors raised here reach the caller as they are
        super().__init__(model, conf, q_dataloader, *args, **kwargs)
        from torch import nn

        if self.config.approach != "post_training_dynamic_quant":
            raise TuningSetupError(
                f"ip_empirical_time measures and applies dynamic INT8 (torch.ao, INC's fast CPU path); approach "
                f"{self.config.approach!r} is not supported: pass approach='dynamic' (the default with this strategy)")
        MethodSettings.from_kwargs(inc2_kwargs(self.config.tuning_criterion.strategy_kwargs))
        if q_dataloader is None:
            raise TuningSetupError("ip_empirical_time calibrates on your data: pass calib_dataloader= (batches of "
                                   "token ids from real text) to quantization.fit")
        if not any(isinstance(m, nn.Linear) for m in self.model.model.modules()):
            raise NoQuantizableOpsError(f"{type(self.model.model).__name__} has no Linear layer: INC's 2.x dynamic "
                                        "INT8 path has nothing to quantize")

    def next_tune_cfg(self):
        try:
            yield from self._ipamp_points()
        except IpampError as e:  # fit() logs and swallows every exception: the fit hook re-raises this one
            _errors.append(e)
            raise

    def _ipamp_points(self):
        res, ops = self._ipamp_prepare()
        if self._not_tuning:  # no eval_func: nothing can check a point, so offer the method's own budgeted plan
            from .records import Plan as _Plan

            plan = _Plan.load(res.workspace / "plan.json")
            self._ipamp_rank = None
            self._ipamp_current = plan
            yield self._ipamp_cfg(plan, ops)
            return
        for rank, plan in enumerate(res.points):
            self._ipamp_rank = rank
            self._ipamp_current = plan
            yield self._ipamp_cfg(plan, ops)

    # -- set-up ---------------------------------------------------------------------------------------------
    def _ipamp_prepare(self) -> tuple[MethodResult, dict[str, tuple[str, str]]]:
        crit = self.config.accuracy_criterion
        if not self._not_tuning:
            acc = self.baseline[0] if self.baseline is not None else None
            for a in acc if isinstance(acc, list) else [acc]:
                if crit.criterion == "relative":
                    check_score(a, "eval_func (INC's fp32 baseline)")
                elif not (isinstance(a, (int, float)) and math.isfinite(a)):
                    raise TuningSetupError(f"eval_func returned {a!r}: it must return a finite number")
        kwargs = inc2_kwargs(self.config.tuning_criterion.strategy_kwargs)
        settings = MethodSettings.from_kwargs(kwargs)
        batches = ids_from_loader(self.calib_dataloader, settings.max_calib)
        _, _, init = self.initial_tuning_cfg()
        self._ipamp_init = init
        ops = {inc_to_ours(name): (name, kind) for (name, kind), c in init.items()
               if kind == "Linear" and c.op_quant_mode == "dynamic"}
        res = run_method(self.model.model, batches, settings, kwargs.get("workspace"),
                         placeable=lambda op: op in ops, placement=PLACEMENT)
        self._ipamp_result = res
        self._ipamp_trials: list[dict[str, Any]] = []
        self._ipamp_best: Plan | None = None
        self._ipamp_best_rank: int | None = None
        return res, ops

    def _ipamp_cfg(self, plan: Plan, ops: dict[str, tuple[str, str]]) -> OrderedDict:
        """INC's all-fp32 config with exactly the plan's low-precision ops set to dynamic INT8."""
        low = plan.quantized_ops()
        missing = sorted(set(low) - set(ops))
        if missing:  # cannot happen: run_method only offers placeable ops; fail closed if it ever does
            raise TuningSetupError(f"INC's tuning space has no op for {missing[:3]}")
        cfg = OrderedDict(calib_sampling_size=self.calib_sampling_size_lst[0])
        for key, c in self._ipamp_init.items():
            if not isinstance(key, tuple):
                cfg[key] = c
                continue
            ours = inc_to_ours(key[0])
            if ours in low and key == ops[ours]:
                kw = dict(c.kwargs)
                kw[("weight", "granularity")] = GRANULARITY[low[ours]]
                cfg[key] = OpTuningConfig(key[0], key[1], "dynamic", self.tuning_space, kwargs=kw)
            else:
                cfg[key] = OpTuningConfig(key[0], key[1], "fp32", self.tuning_space)
        return cfg

    # -- INC's loop hooks -----------------------------------------------------------------------------------
    def stop(self, timeout, trials_count):
        """INC's stop rule, plus the trial log and which point is INC's best so far."""
        need = super().stop(timeout, trials_count)
        if getattr(self, "_ipamp_result", None) is None:
            return need
        acc = self.last_tune_result[0] if self.last_tune_result else None
        self._ipamp_trials.append({"rank": self._ipamp_rank, "score": acc,
                                   "meets_criterion": bool(self.objectives.accuracy_meets()),
                                   "n_low_precision_ops": len(self._ipamp_current.low_precision_ops()),
                                   "predicted_gain": self._ipamp_current.predicted_gain,
                                   "predicted_loss_mse": self._ipamp_current.predicted_loss_mse})
        if self.best_qmodel is not None and self.best_qmodel is self.last_qmodel:
            self._ipamp_best, self._ipamp_best_rank = self._ipamp_current, self._ipamp_rank
        save_json({"record": "trials", "baseline": None if self.baseline is None else self.baseline[0],
                   "trials": self._ipamp_trials}, self._ipamp_result.workspace / "trials.json")
        return need

    def traverse(self):
        """INC's traversal; then the returned model carries its plan and the workspace gets its files."""
        super().traverse()
        res = getattr(self, "_ipamp_result", None)
        if res is None:
            return
        if self._not_tuning and self.best_qmodel is not None:
            self._ipamp_best, self._ipamp_best_rank = self._ipamp_current, None
        if self.best_qmodel is None or self._ipamp_best is None:
            log.warning("ip_empirical_time: no frontier point met INC's accuracy criterion (%d tried); see %s",
                        len(self._ipamp_trials), res.workspace / "trials.json")
            return
        plan = self._ipamp_best
        for m in (self.best_qmodel, getattr(self.best_qmodel, "model", None)):
            if m is not None:
                m.ipamp_plan, m.ipamp_point, m.ipamp_workspace = plan, self._ipamp_best_rank, str(res.workspace)
        crit = self.config.accuracy_criterion
        note = tolerance_note(res.points, self._ipamp_best_rank,
                              f"{crit.criterion} tolerable_loss {crit.tolerable_loss:g}")
        if note:
            log.warning("ip_empirical_time: %s", note)
        out = write_selected(res.workspace, plan, res.unplaced,
                             {"rank": self._ipamp_best_rank, "inc_path": PLACEMENT, "criterion_decided": note,
                              "baseline": None if self.baseline is None else self.baseline[0],
                              "criterion": {"criterion": crit.criterion, "tolerable_loss": crit.tolerable_loss,
                                            "higher_is_better": crit.higher_is_better},
                              "trials": self._ipamp_trials})
        save_json(inc2_config(plan, self._ipamp_init), out / "inc_config.json")


def inc2_config(plan: Plan, init: dict) -> dict[str, Any]:
    """The plan as INC 2.x ``PostTrainingQuantConfig`` keywords (``op_name_dict`` by INC's own op names)."""
    low = plan.quantized_ops()
    op_name_dict: dict[str, Any] = {}
    for key in init:
        if not isinstance(key, tuple):
            continue
        ours = inc_to_ours(key[0])
        if ours in low and key[1] == "Linear":
            op_name_dict[key[0]] = {"weight": {"granularity": [GRANULARITY[low[ours]]]}}
        else:
            op_name_dict[key[0]] = {"activation": {"dtype": ["fp32"]}, "weight": {"dtype": ["fp32"]}}
    return {"record": "inc2_config", "framework": "pytorch_fx", "approach": "dynamic", "op_name_dict": op_name_dict,
            "quantized_ops": sorted(low), "model": plan.model}


# -- registration and the hooks on INC's config classes and fit -------------------------------------------
_saved: dict[str, Any] = {}
#: errors our strategy raised inside fit(), which INC logs and turns into a None result
_errors: list[IpampError] = []


def _strategy_setter(orig: property):
    def fset(self, value):
        if isinstance(value, str) and value == NAME:
            self._strategy = value
        else:
            orig.fset(self, value)

    return fset


def install() -> None:
    """Register the strategy and install the two hooks (idempotent)."""
    if _saved:
        return
    STRATEGIES[NAME] = IPEmpiricalTimeTuneStrategy
    tc, ptq = _inc_config.TuningCriterion, _inc_config.PostTrainingQuantConfig
    _saved["strategy"], _saved["init"] = tc.__dict__["strategy"], ptq.__dict__["__init__"]
    orig: property = _saved["strategy"]
    tc.strategy = property(orig.fget, _strategy_setter(orig), orig.fdel, orig.__doc__)
    init = _saved["init"]
    sig = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, tuning_strategy: str | None = None, **kwargs):
        given = sig.bind_partial(self, *args, **kwargs).arguments
        crit = given.get("tuning_criterion")
        if tuning_strategy is not None:
            if tuning_strategy not in STRATEGIES or tuning_strategy == "":
                raise TuningSetupError(f"unknown tuning_strategy {tuning_strategy!r}; INC's registry has: "
                                       f"{', '.join(sorted(k for k in STRATEGIES if k))}")
            if crit is not None and crit.strategy not in ("basic", tuning_strategy):
                raise TuningSetupError(f"tuning_strategy={tuning_strategy!r} contradicts tuning_criterion's "
                                       f"strategy {crit.strategy!r}: give one of them")
            if crit is None:
                crit = _inc_config.TuningCriterion()
                kwargs["tuning_criterion"] = crit
            crit.strategy = tuning_strategy
        if crit is not None and crit.strategy == NAME:
            if "quant_level" not in given:
                kwargs["quant_level"] = 1
            elif given["quant_level"] != 1:
                raise TuningSetupError(f"quant_level={given['quant_level']!r} makes INC replace the tuning strategy; "
                                       "ip_empirical_time runs with quant_level=1 (the default with this strategy)")
            if "approach" not in given:
                kwargs["approach"] = "dynamic"
        init(self, *args, **kwargs)

    ptq.__init__ = __init__

    from neural_compressor import quantization

    fit = _saved["fit"] = quantization.fit

    @functools.wraps(fit)
    def fit_raising(*args, **kwargs):
        _errors.clear()
        try:
            return fit(*args, **kwargs)
        finally:
            if _errors:
                err = _errors.pop()
                _errors.clear()
                raise err

    quantization.fit = fit_raising


def uninstall() -> None:
    """Restore INC's classes and registry exactly as they were before ``install()``."""
    if not _saved:
        return
    _inc_config.TuningCriterion.strategy = _saved.pop("strategy")
    _inc_config.PostTrainingQuantConfig.__init__ = _saved.pop("init")
    from neural_compressor import quantization

    quantization.fit = _saved.pop("fit")
    STRATEGIES.pop(NAME, None)


def quantized_formats(model: Any) -> dict[str, str]:
    """Our name and format of each Linear INC turned into a torch.ao dynamic INT8 module in a ``fit`` result, read
    from its weight (``int8``: one scale per tensor, ``int8_pc``: per output channel): what the model runs, to compare
    with the plan's assignment."""
    import torch
    from torch.ao.nn.quantized import dynamic as nnqd

    per_tensor = (torch.per_tensor_affine, torch.per_tensor_symmetric)
    m = getattr(model, "model", model)
    return {inc_to_ours(n): "int8" if mod.weight().qscheme() in per_tensor else "int8_pc"
            for n, mod in m.named_modules() if isinstance(mod, nnqd.Linear)}


def quantized_ops(model: Any) -> list[str]:
    """Our names of the Linears INC turned into torch.ao dynamic INT8 modules in a ``fit`` result."""
    return sorted(quantized_formats(model))


def workspace_of(model: Any) -> Path | None:
    ws = getattr(model, "ipamp_workspace", None)
    return None if ws is None else Path(ws)


install()
