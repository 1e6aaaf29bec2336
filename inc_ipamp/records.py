"""Typed, JSON-serialisable records passed between pipeline stages (one file per stage).

Every stage reads the previous stage's record and writes its own, so any stage can be rerun alone.
A configuration of a group is a tuple of format names aligned with ``Group.ops``.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .errors import ArtifactError
from .formats import get_format
from .io import load_json, save_json
from .lossmodel import LOSS_MODEL_VERSION, NOISE_MODELS, LossModel


def check_finite(obj: Any, where: str) -> None:
    """Raise ArtifactError naming the first NaN/inf number anywhere in ``obj`` (nested dicts/lists).

    Why: one NaN in a shift sum made HiGHS spin for good, one in Σx² silently switched an op's SQNR guard off.
    """
    import math

    stack: list[tuple[str, Any]] = [(where, obj)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise ArtifactError(f"{path} is {v}: the file holds a non-finite number; rerun the stage that wrote it")
        if isinstance(v, dict):
            stack.extend((f"{path}.{k}", x) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{path}[{i}]", x) for i, x in enumerate(v))


def _record(path: str | Path, kind: str) -> dict[str, Any]:
    """Load a stage file and check it is the right record: a JSON object whose ``record`` is ``kind``."""
    d = load_json(path, kind)
    if not isinstance(d, dict) or d.pop("record", None) != kind:
        raise ArtifactError(f"{path} is not a {kind} record; rerun the stage that writes it")
    return d


_R = TypeVar("_R", bound="StageRecord")


class StageRecord:
    """One stage's file: saved with ``"record": RECORD`` beside the dataclass fields, and refused on load when the
    file holds another kind of record. Subclasses are dataclasses with a ``from_json`` that validates."""

    RECORD: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls: type[_R], d: dict[str, Any]) -> _R:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        return save_json({"record": self.RECORD, **self.to_json()}, path)

    @classmethod
    def load(cls: type[_R], path: str | Path) -> _R:
        return cls.from_json(_record(path, cls.RECORD))


@dataclass
class OperandStats:
    """Sums over calibration samples for one operand of one op (divide by n_samples for means).

    xg2: Σ(x⊙g)²; g2: Σg²; amax: max|x|; emp[f]: Σg²(Q_f(x)−x)²; int_uniform[f]: Σ g² s²/12 with the
    format's real (per-tensor/per-channel) scales; err2[f], x2: Σ(Q_f(x)−x)² and Σx² for SQNR.
    With GQA the repeated K/V heads are folded back first (the copies share one rounding error: g = Σ_copies g).
    coh[f]: Σ_n d_n², d_n = Σ_i g_i (Q_f(x)−x)_i the first-order loss change of sequence n summed coherently before
    squaring. It keeps the correlation between rounding errors that the diagonal Σg²e² drops: per-tensor INT8
    zeroing most of an outlier-dominated activation is a systematic shift, not noise; a weight's error is the same at
    every position. lin[f]: Σ_n d_n, whose mean is the first-order part of the mean shift (so coh/N − (lin/N)² is the
    variance). curv[f]: from the sampled-label backward, Σ_n T'_n (ĝ_n·e)² over the sequences that had it
    (``Sensitivity.n_curvature``); ½·curv/n_curvature estimates the second-order mean shift ½eᵀHe.
    dia[f]: Σ_n Σ_i (g_i (Q_f(x)−x)_i)², the terms of each d_n squared before adding: a diagonal proxy of coh with far
    less sampling noise (thousands of terms per sequence instead of one), read only as a ratio to coh within an op
    type (``LossModel.noise_variance``). For the weight operand its terms are the output's (g_y ⊙ E x, when the
    weight's changes come from the output errors) or the weight gradient's (g_W ⊙ E): one or the other for every
    layer of a record.
    seq[f]: the d_n themselves, one per calibration sequence in calibration order (Σ seq = lin): summed over an op
    type they give the type's first-order mean a standard error that counts the calibration sequences shared by all
    its layers (``LossModel.first_order_mean``).
    cseq[f], dseq[f]: the curvature and diagonal sums' terms per curvature batch and per batch (Σ cseq = curv,
    Σ dseq = dia; one per sequence at the default batch of 1): what ``LossModel.bootstrap`` redraws to see how much
    the IP's choice flatters its own prediction (records calibrated before them lack them: that check is skipped).
    Operand "y" is the op's output, for formats whose kernel rounds it (``Format.output_rounded``, bf16).
    """

    xg2: float = 0.0
    g2: float = 0.0
    amax: float = 0.0
    x2: float = 0.0
    numel: int = 0
    emp: dict[str, float] = field(default_factory=dict)
    int_uniform: dict[str, float] = field(default_factory=dict)
    err2: dict[str, float] = field(default_factory=dict)
    coh: dict[str, float] = field(default_factory=dict)
    curv: dict[str, float] = field(default_factory=dict)
    lin: dict[str, float] = field(default_factory=dict)
    dia: dict[str, float] = field(default_factory=dict)
    seq: dict[str, list[float]] = field(default_factory=dict)
    cseq: dict[str, list[float]] = field(default_factory=dict)
    dseq: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class OpSensitivity:
    name: str
    kind: str  # "linear" | "bgemm"
    calls: int = 0
    macs: int = 0  # per calibration sequence
    weight_numel: int = 0
    #: the weight is shared with another module (``ops.tied_linears``): quantising it frees no memory
    tied: bool = False
    shapes: dict[str, list[int]] = field(default_factory=dict)
    operands: dict[str, OperandStats] = field(default_factory=dict)


@dataclass
class Sensitivity(StageRecord, LossModel):
    """Output of ``calibrate``: per-op, per-operand sums and the reference loss (the predictions on them:
    ``lossmodel.LossModel``)."""

    RECORD = "sensitivity"
    model: str
    n_samples: int
    seq_len: int
    mean_loss: float
    formats: list[str]
    ops: dict[str, OpSensitivity]  # execution order
    unreached: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    data_source: str = ""
    #: sequences that had the sampled-label (curvature) backward: a share of them is enough (``calibrate``)
    n_curvature: int = 0
    #: what the sums mean; files of another version are refused (their terms would be misread, not just stale)
    version: int = LOSS_MODEL_VERSION
    #: noise models whose sums were collected (``sensitivity.noise_models``); a prediction with another is refused
    noise_models: list[str] = field(default_factory=lambda: sorted(set(NOISE_MODELS) - {"auto"}))

    # -- io ---------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Sensitivity:
        if d.get("version", 1) != LOSS_MODEL_VERSION:
            raise ArtifactError(f"this sensitivity record has loss-model version {d.get('version', 1)}, this inc-ipamp "
                                f"reads version {LOSS_MODEL_VERSION} (its sums mean something else); rerun calibrate")
        check_finite({k: v for k, v in d.items() if k != "wall_s"}, "sensitivity")
        try:
            ops = {}
            for name, o in d["ops"].items():
                operands = {k: OperandStats(**v) for k, v in o["operands"].items()}
                ops[name] = OpSensitivity(**{**o, "operands": operands})
            return cls(**{**d, "ops": ops})
        except (KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(f"not a sensitivity record ({e})") from None


@dataclass
class Group:
    """A sequential single-entry/single-exit sub-graph's quantizable ops, in execution order."""

    name: str
    ops: list[str]
    layer: int | None = None
    signature: str = ""  # equal signatures => equal shapes and structure => reusable timings

    def configs(self, formats: list[str]) -> list[tuple[str, ...]]:
        """All per-op format combinations; ``formats[0]`` is the reference, so config 0 is all-reference."""
        return list(itertools.product(formats, repeat=len(self.ops)))


@dataclass
class Partition(StageRecord):
    RECORD = "partition"
    model: str
    method: str  # "torch.export" | "dataflow"
    groups: list[Group]
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Partition:
        try:
            part = cls(**{**d, "groups": [Group(**g) for g in d["groups"]]})
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"not a partition record ({e})") from None
        if not all(isinstance(g.ops, list) and g.ops and all(isinstance(o, str) for o in g.ops) for g in part.groups):
            raise ArtifactError("not a partition record (a group without a list of op names)")
        return part


@dataclass
class GroupGains:
    """Gains of every config of one group. ``gains[metric][i]`` belongs to ``configs[i]``;
    ET in seconds saved per prefill, TT in theoretical seconds, M in bytes. ``ci`` = half-width of
    the ET confidence interval (same units)."""

    group: str
    configs: list[list[str]]
    gains: dict[str, list[float]]
    ci: dict[str, list[float]] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)  # metric -> "measured:cpu", "replayed:<file>", …
    #: metric -> per config "" (trustworthy) or why its measurement failed the quality checks; the solver
    #: never picks a flagged config (gains/measure.py "quality checks")
    flags: dict[str, list[str]] = field(default_factory=dict)

    def usable(self, metric: str, i: int) -> bool:
        return not (self.flags.get(metric) or [""] * (i + 1))[i]


@dataclass
class Gains(StageRecord):
    RECORD = "gains"
    model: str
    device: str
    formats: list[str]  # formats[0] = reference
    batch: int
    seq_len: int
    reference_time_s: float | None
    groups: dict[str, GroupGains]
    #: sub-graph calls timed to measure ET (a run over a span of n layers counts n; a cached config counts 0)
    subgraph_calls: int = 0
    notes: list[str] = field(default_factory=list)
    #: how far the measurement can be trusted: machine state (threads, load) at start and end, flagged configs,
    #: Σ best group gains vs the reference prefill (``consistent``: the former is below the latter)
    quality: dict[str, Any] = field(default_factory=dict)
    #: content hashes of the files this record was made from (pipeline.digest), to refuse stale mixes
    inputs: dict[str, str] = field(default_factory=dict)
    #: "prefill" (a batch × seq_len prompt) or "decode" (one new token per sequence after seq_len cached tokens;
    #: ``reference_time_s`` is then the decode step, TPOT): gains/decode.py
    phase: str = "prefill"

    def has(self, metric: str) -> bool:
        """Whether every group carries ``metric`` (a decode-objective run computes the prefill's TT/RT/M, no ET)."""
        return bool(self.groups) and all(metric in g.gains for g in self.groups.values())

    def best_low_precision(self, metric: str = "ET") -> tuple[float, str, list[str]] | None:
        """(gain, group, config) of the usable configuration with any op off the reference format that gains most,
        or None where there is none: a gain ≤ 0 says no low-precision configuration pays on this device at all."""
        best = None
        for name, gg in self.groups.items():
            for i, (cfg, g) in enumerate(zip(gg.configs, gg.gains.get(metric, []), strict=False)):
                if any(f != self.formats[0] for f in cfg) and gg.usable(metric, i) and (best is None or g > best[0]):
                    best = (g, name, cfg)
        return best

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Gains:
        check_finite({k: v for k, v in d.items() if k != "quality"}, "gains")
        if "timed_runs" in d:  # the field's name before 2026-11 (it always counted sub-graph calls)
            d = {**{k: v for k, v in d.items() if k != "timed_runs"}, "subgraph_calls": d["timed_runs"]}
        try:
            g = cls(**{**d, "groups": {k: GroupGains(**v) for k, v in d["groups"].items()}})
        except (KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(f"not a gains record ({e})") from None
        for gg in g.groups.values():
            for m, vals in gg.gains.items():
                if len(vals) != len(gg.configs):
                    raise ArtifactError(f"gains record: group {gg.group} has {len(vals)} {m} values for "
                                        f"{len(gg.configs)} configs")
        return g


@dataclass
class Plan(StageRecord):
    """A chosen configuration: one format per op (ops absent = reference) and what predicted it."""

    RECORD = "plan"
    model: str
    assignment: dict[str, str]
    reference_format: str
    metric: str
    beta: float | None
    predicted_loss_mse: float
    predicted_gain: float
    budget_loss_mse: float | None = None
    solver: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    #: content hashes of the files this plan was solved from (pipeline.digest), to refuse stale mixes
    inputs: dict[str, str] = field(default_factory=dict)

    def low_precision_ops(self) -> list[str]:
        return [op for op, f in self.assignment.items() if f != self.reference_format]

    def quantized_ops(self) -> dict[str, str]:
        """op -> format of the ops an engine's quantization config must list: neither the reference nor fp32 (the
        reference kind: an fp32 op in a bf16 plan runs above the reference, nothing to quantize)."""
        return {op: f for op, f in self.assignment.items() if f != self.reference_format
                and get_format(f).kind != "ref"}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        check_finite({k: v for k, v in d.items() if k not in ("measured", "solver")}, "plan")
        try:
            return cls(**d)
        except TypeError as e:
            raise ArtifactError(f"not a plan record ({e})") from None
