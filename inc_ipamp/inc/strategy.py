"""The ``ip_empirical_time`` tuning strategy on INC 3.x: our Pareto frontier as INC's candidate configs.

INC 3.10 has no 2.x strategy registry; its tuning loop is ``neural_compressor.torch.quantization.autotune``:
expand the ``TuningConfig.config_set`` into candidates, visit them in the ``sampler``'s order, quantize each
with ``quantize(model, config)`` (which dispatches on ``config.name`` to a function registered with
``register_algo``), evaluate with the user's ``eval_fn``, stop at the first within ``tolerable_loss``. So:

* ``IPEmpiricalTimeConfig`` (registered as algo ``ip_empirical_time``) expands into one config per frontier
  point (frontier.json from ``solver.save_frontier``), most aggressive (largest predicted gain) first;
* ``IPEmpiricalTimeSampler`` orders any set of them the same way (gain descending, then loss ascending);
* ``ip_empirical_time_entry`` applies one point through INC's real backend for the device: on CPU
  ``export.cpu.apply_cpu`` (PT2E dynamic INT8, or FP8 Q/DQ), on Gaudi the FP8 MEASURE/QUANTIZE passes with the
  exported blocklist (``inc.hpu``). FP8 is driven with ``prepare``/``finalize_calibration``/``convert`` rather
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

from ..errors import IpampError
from ..records import Plan
from ..solver import load_frontier

log = logging.getLogger(__name__)

ALGO = "ip_empirical_time"
DEVICES = ("auto", "cpu", "hpu")


class TuningSetupError(IpampError):
    """The INC tuning call was set up wrongly (no frontier, no example inputs, unknown strategy, ...)."""


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
    """One frontier point (``point`` = its index in frontier.json), or all of them (``point=None`` / a list).

    ``device``: "auto" runs on Gaudi when habana_frameworks is present, else on CPU.
    """

    name = ALGO

    def __init__(self, frontier: str | None = None, point: int | list[int] | None = None, device: str = "auto",
                 predicted_gain: float | None = None, predicted_loss_mse: float | None = None, **kwargs: Any):
        super().__init__(white_list=None)
        self.frontier = None if frontier is None else str(frontier)
        self.point = point
        self.device = device
        self.predicted_gain = predicted_gain
        self.predicted_loss_mse = predicted_loss_mse
        if device not in DEVICES:
            raise TuningSetupError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")

    # -- candidates -------------------------------------------------------------------------------
    def expand(self) -> list[IPEmpiricalTimeConfig]:
        """One config per selected frontier point, most aggressive first (INC calls this on the config set)."""
        if self.frontier is None:
            raise TuningSetupError("IPEmpiricalTimeConfig needs frontier='…/frontier.json'")
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
        return sorted(out, key=_aggressive_first)

    def plan(self) -> Plan:
        if not isinstance(self.point, int):
            raise TuningSetupError("expand() the config first: one trial applies one frontier point")
        return frontier_points(self.frontier)[self.point]

    @classmethod
    def get_config_set_for_tuning(cls) -> list:
        return []  # needs a frontier: there is no default candidate set

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


def _aggressive_first(cfg: IPEmpiricalTimeConfig) -> tuple[float, float, int]:
    gain = cfg.predicted_gain if cfg.predicted_gain is not None else float("-inf")
    loss = cfg.predicted_loss_mse if cfg.predicted_loss_mse is not None else float("inf")
    return (-gain, loss, cfg.point if isinstance(cfg.point, int) else 0)


class IPEmpiricalTimeSampler(Sampler):
    """Visit candidates by predicted gain, largest first (ties: smaller predicted loss first)."""

    def __init__(self, config_source) -> None:
        self.config_source = config_source
        self._order = sorted(range(len(config_source)), key=lambda i: _sort_key(config_source[i], i))

    def __iter__(self) -> Iterator[int]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


def _sort_key(cfg: Any, i: int) -> tuple:
    if isinstance(cfg, IPEmpiricalTimeConfig):
        return (0, *_aggressive_first(cfg), i)
    return (1, 0.0, 0.0, 0, i)  # other INC configs keep their given order, after ours


def _habana_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("habana_frameworks") is not None


@register_algo(ALGO)
@torch.no_grad()
def ip_empirical_time_entry(model: torch.nn.Module, configs_mapping: dict, mode: Mode = Mode.QUANTIZE,
                            *args: Any, **kwargs: Any) -> torch.nn.Module:
    """Apply one frontier point with INC's real backend (what ``quantize`` calls for our config)."""
    from ..export.cpu import apply_cpu

    if mode != Mode.QUANTIZE:
        raise TuningSetupError("ip_empirical_time runs as a whole (quantize/autotune), not as prepare/convert")
    cfg = next(c for c in configs_mapping.values() if getattr(c, "name", None) == ALGO)
    plan = cfg.plan()
    run_fn, run_args = kwargs.get("run_fn"), kwargs.get("run_args") or ()
    example = kwargs.get("example_inputs")
    device = cfg.device
    if device == "auto":
        device = "hpu" if _habana_available() else "cpu"
    if device == "hpu":
        from .hpu import apply_hpu

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


def tuning_config(frontier: str | Path, tolerable_loss: float = 0.01, max_trials: int = 100,
                  device: str = "auto") -> TuningConfig:
    """INC TuningConfig trying every frontier point, most aggressive first."""
    return TuningConfig(config_set=[IPEmpiricalTimeConfig(str(frontier), device=device)],
                        sampler=IPEmpiricalTimeSampler, tolerable_loss=tolerable_loss, max_trials=max_trials)


def autotune(model: torch.nn.Module, eval_fn: Callable[[torch.nn.Module], float], frontier: str | Path,
             example_inputs: Any = None, tolerable_loss: float = 0.01, max_trials: int = 100,
             run_fn: Callable | None = None, run_args: tuple | None = None, device: str = "auto",
             tuning_strategy: str = ALGO) -> torch.nn.Module | None:
    """INC's ``autotune`` over our frontier: the most aggressive point whose ``eval_fn`` is within tolerance.

    ``eval_fn(model) -> float`` must be higher-is-better and positive (INC accepts a trial when
    ``score >= baseline * (1 - tolerable_loss)``; e.g. ``exp(-loss)`` or accuracy, not ``-loss``).
    ``tuning_strategy`` exists for users of the INC 2.x keyword; only ``"ip_empirical_time"`` is offered.
    Returns the quantized model (``.ipamp_plan`` = the chosen Plan), or None when no point passed.
    """
    from neural_compressor.torch.quantization import autotune as inc_autotune

    if tuning_strategy != ALGO:
        raise TuningSetupError(f"tuning_strategy must be {ALGO!r} (INC 3.x has no other strategies), "
                               f"got {tuning_strategy!r}")
    cfg = tuning_config(frontier, tolerable_loss, max_trials, device)
    return inc_autotune(model, cfg, eval_fn, run_fn=run_fn, run_args=run_args, example_inputs=example_inputs)
