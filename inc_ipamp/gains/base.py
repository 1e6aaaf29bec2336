"""The backend protocol and the timing statistics.

A backend answers two questions for the pipeline: how to run an op in a format (``apply``, an applier in the sense
of ``inc_ipamp.apply``: swap the op's module for a low-precision one from ``apply.kernels`` and restore it
afterwards) and how to time a call on its device. Everything else (which configs, reuse across layers, caching) is
backend-independent and lives in ``measure.py``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import DeviceUnavailableError
from ..formats import Format, get_format
from ..ops import Matmul, is_linear


# -- the protocol -------------------------------------------------------------------------------------
class Backend:
    """Base of the ``cpu``/``cuda``/``hpu`` backends: swap ops to low-precision modules and time calls."""

    name = "base"
    version = "1"
    reference_formats: tuple[str, ...] = ("fp32",)
    #: an op's time does not depend on its neighbours' formats (ops swapped one module at a time and run eagerly),
    #: so a prefill config is timed on the ops it changes alone (``measure.timed_modules``; decode never is); False
    #: where a graph compiler fuses casts and kernels across ops, whose gains need the whole group's enclosing module
    local_ops = True

    def __init__(self) -> None:
        self._converted: dict[tuple[int, str], nn.Module] = {}
        self.paths: dict[str, str] = {}  # "kind:fmt" -> which kernel path was used (for the record's notes)

    # device
    def check(self) -> None:
        """Raise DeviceUnavailableError with one clear sentence when this backend cannot run here."""

    def device(self) -> torch.device:
        return torch.device("cpu")

    def device_string(self) -> str:
        return f"{self.name}; torch {torch.__version__}"

    def synchronize(self) -> None:
        pass

    def prepare(self, model: nn.Module, reference: str) -> nn.Module:
        """Put the model on the device in the reference format (in place)."""
        if reference not in self.reference_formats:
            raise DeviceUnavailableError(
                f"the {self.name} backend runs the reference in {'/'.join(self.reference_formats)}, "
                f"not {reference}: put one of those first in the format list")
        dtype = getattr(torch, get_format(reference).torch_dtype)
        return model.to(device=self.device(), dtype=dtype)

    # ops
    def convert(self, mod: nn.Module, kind: str, fmt: Format) -> nn.Module:
        """The module that runs ``mod`` in ``fmt`` on this backend."""
        raise NotImplementedError

    def _converted_module(self, mod: nn.Module, kind: str, fmt: str) -> nn.Module:
        key = (id(mod), fmt)
        if key not in self._converted:
            new = self.convert(mod, kind, get_format(fmt))
            self._converted[key] = new
            self.paths[f"{kind}:{fmt}"] = getattr(new, "path", type(new).__name__)
        return self._converted[key]

    @contextlib.contextmanager
    def apply(self, model: nn.Module, assignment: dict[str, str]) -> Iterator[nn.Module]:
        """Run the ops in ``assignment`` ({op name: format}) in low precision inside the block, then restore.

        Yields the model to call (the same object for module-swapping backends). Reference-format entries are
        ignored. Converted modules are cached, so entering the block again costs only attribute swaps.
        """
        mods = dict(model.named_modules())
        swapped: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            for op, fmt in assignment.items():
                f = get_format(fmt)
                if f.kind == "ref" or fmt == self.reference_formats[0] and op in mods:
                    continue
                if op not in mods:
                    raise KeyError(f"no module named {op!r} in the model")
                mod = mods[op]
                kind = "bgemm" if isinstance(mod, Matmul) else "linear" if is_linear(mod) else None
                if kind is None:
                    raise KeyError(f"{op!r} is not a quantizable op (Linear/Conv1D/Matmul)")
                parent_name, _, attr = op.rpartition(".")
                parent = mods[parent_name] if parent_name else model
                new = self._converted_module(mod, kind, fmt)
                setattr(parent, attr, new)
                swapped.append((parent, attr, mod))
            yield model
        finally:
            for parent, attr, mod in reversed(swapped):
                setattr(parent, attr, mod)


# -- timing ---------------------------------------------------------------------------------------------
def prime(backend: Backend, model: nn.Module, assignment: dict[str, str]) -> None:
    """Enter ``apply`` once before any timing: backends convert (quantize, calibrate, compile) on first use and
    cache the result, so set-up cost never lands inside a timed call (a gain would then measure quantization)."""
    with torch.no_grad(), backend.apply(model, assignment):
        pass


def _timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def bootstrap_ci(a: list[float], b: list[float] | None = None, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> float:
    """Half-width of a percentile bootstrap interval of median(a) (or median(a) − median(b), pairs resampled)."""
    x = np.asarray(a)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    stat = np.median(x[idx], axis=1)
    if b is not None:
        stat = stat - np.median(np.asarray(b)[idx], axis=1)
    lo, hi = np.quantile(stat, [(1 - level) / 2, (1 + level) / 2])
    return float((hi - lo) / 2)


def paired_times(fn_ref: Callable[[], object], fn_cfg: Callable[[], object], reps: int, warmup: int,
                 sync: Callable[[], None] = lambda: None) -> tuple[list[float], list[float]]:
    """Time reference and config alternately (ABAB…, order swapped every pair) so drift cancels."""
    for _ in range(warmup):
        fn_ref()
        fn_cfg()
    t_ref, t_cfg = [], []
    for i in range(reps):
        if i % 2 == 0:
            t_ref.append(_timed(fn_ref, sync))
            t_cfg.append(_timed(fn_cfg, sync))
        else:
            t_cfg.append(_timed(fn_cfg, sync))
            t_ref.append(_timed(fn_ref, sync))
    return t_ref, t_cfg


def interleaved_times(fn_ref: Callable[[], object], fns: Sequence[Callable[[], object]], reps: int, warmup: int,
                      sync: Callable[[], None] = lambda: None, min_reps: int | None = None,
                      settled: Callable[[list[float], list[float]], bool] | None = None, seed: int = 0,
                      timer: Callable[[Callable[[], object], Callable[[], None]], float] = _timed,
                      ) -> list[tuple[list[float], list[float]]]:
    """Time several configs against one shared reference: each round runs the reference and every config still
    active once, in a fresh random order, so drift cancels as in ``paired_times`` at about half the runs (one
    reference run per round instead of one per config run), and every config's gain is paired with reference runs
    made in the same rounds (a machine that slows down slows its reference too).

    Adaptive repetitions: a config leaves after ``min_reps`` rounds once ``settled(t_ref, t_cfg)`` says its gain is
    known well enough; none runs more than ``reps`` rounds. Returns (t_ref, t_cfg) per config, paired by round.
    ``timer(fn, sync)`` -> seconds is injectable so the schedule can be tested without a clock.
    """
    import random

    n = len(fns)
    for _ in range(warmup):
        for f in (fn_ref, *fns):
            timer(f, sync)
    t_ref: list[list[float]] = [[] for _ in range(n)]
    t_cfg: list[list[float]] = [[] for _ in range(n)]
    active = list(range(n))
    floor = reps if min_reps is None or settled is None else max(1, min(min_reps, reps))
    rng = random.Random(seed)
    for r in range(reps):
        if not active:
            break
        order = [-1, *active]
        rng.shuffle(order)
        times = {i: timer(fn_ref if i < 0 else fns[i], sync) for i in order}
        for i in active:
            t_ref[i].append(times[-1])
            t_cfg[i].append(times[i])
        if r + 1 >= floor and settled is not None:
            active = [i for i in active if not settled(t_ref[i], t_cfg[i])]
    return list(zip(t_ref, t_cfg, strict=True))


def gain_stats(t_ref: list[float], t_cfg: list[float]) -> dict[str, float]:
    """gain = median T(ref) − median T(cfg) with a bootstrap 95% half-width."""
    return {"gain_s": statistics.median(t_ref) - statistics.median(t_cfg), "ci_s": bootstrap_ci(t_ref, t_cfg),
            "t_ref_s": statistics.median(t_ref), "t_cfg_s": statistics.median(t_cfg), "reps": len(t_ref)}


def _prefill_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(ids, use_cache=False)
    return run


def time_prefill(model: nn.Module, ids: torch.Tensor, backend: Backend, assignment: dict[str, str] | None = None,
                 reps: int = 10, warmup: int = 2) -> dict[str, float | list[float]]:
    """End-to-end prefill latency (TTFT) of ``model`` on ``ids`` with ``assignment`` applied: median, CI, samples."""
    ids = ids.to(backend.device())
    prime(backend, model, assignment or {})
    with backend.apply(model, assignment or {}) as m:
        fn = _prefill_fn(m, ids)
        for _ in range(warmup):
            fn()
        times = [_timed(fn, backend.synchronize) for _ in range(reps)]
    return {"median_s": statistics.median(times), "ci_s": bootstrap_ci(times), "times_s": times, "reps": reps}


def compare_prefill(model: nn.Module, ids: torch.Tensor, backend: Backend, assignment: dict[str, str],
                    reps: int = 10, warmup: int = 2) -> dict[str, float]:
    """Measured end-to-end gain of ``assignment`` vs all-reference, reference and config interleaved."""
    ids = ids.to(backend.device())

    def run(assign: dict[str, str]) -> Callable[[], object]:
        # both sides enter ``apply`` (~1 ms on SmolLM2, mostly the module walk), as in the sub-graph timing: a
        # config that alone paid it measured ~1 ms less gain than the groups predict
        def fn() -> object:
            with backend.apply(model, assign) as m:
                return _prefill_fn(m, ids)()
        return fn

    prime(backend, model, assignment)
    t_ref, t_cfg = paired_times(run({}), run(assignment), reps, warmup, backend.synchronize)
    return gain_stats(t_ref, t_cfg)
