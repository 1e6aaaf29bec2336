"""The loss model: predicted loss MSE and mean loss shift of a format assignment from a calibration's sums.

``records.Sensitivity`` holds the sums (data); this module is what they mean (docs/METHOD.md, "Predicted loss
MSE"): per op and operand a noise term (coherent, empirical or uniform), a mean shift (½ curvature; the first-order
mean too with ``FIRST_ORDER_SHIFT``), variances adding over ops and shifts adding before squaring, and the input SQNR
of the guard.
"""

from __future__ import annotations

import copy
import math
import random
import statistics
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .errors import ArtifactError, IpampError
from .formats import get_format, uniform_float_variance_factor
from .ops import op_type

if TYPE_CHECKING:
    from .records import OperandStats, OpSensitivity

NOISE_MODELS = ("auto", "uniform", "empirical", "coherent")
#: the loss model's defaults, one home for the CLI, the Python API (solve, frontier, baselines) and INC's strategies
DEFAULT_NOISE = "auto"
#: below this input SQNR (dB) an op is kept out of plans. With the kernel's numerics and the mean counted once the
#: model held down to 7.4 dB, the lowest op of SmolLM2 (INT8: measured/predicted 1.1-1.9 on assignments whose worst
#: op is at 7.4 dB, held-out and Lee news, benchmarks/results/sensitivity.md); below ~5 dB the rounding error's power
#: is a third of the signal's and a Taylor model is not expected to hold. 25 dB (the former default, set when the
#: INT8 numerics were the symmetric 8-bit ones) now excluded every Linear of SmolLM2 but ~40.
DEFAULT_MIN_SQNR_DB = 5.0
#: bootstrap draws of the calibration for the selection check of a plan chosen at a β budget
#: (``solver.selection_optimism``; 0: off). Each draw is one more IP solve (0.3-3 s on SmolLM2).
SELECTION_DRAWS = 10
#: whether the mean first-order change E_n[g·e] is part of an op's mean shift (signed). On by default. Off, the
#: first-order change counts by its second moment E[d²] in the noise and the shift is the curvature part alone (≥ 0).
#: The case for off: the mean is over a few calibration sequences, its sign across ops is mostly noise (SmolLM2 INT8,
#: 8×256 tokens: 52% of the 271 ops negative, median |mean/SE| 0.8), and the IP picks the ops whose sample mean
#: happens to be negative to cancel the curvature part (a β 0.0029 plan: Σ first order −0.0124 against Σ ½curvature
#: +0.0129, predicted shift +0.0005, measured held out +0.0098); off, peers_first_order_off.md's 15 IP-ET plans
#: measured 0.57-1.65× their predicted loss MSE. The case for on, which decided the default: on the default run
#: (16×256 calibration tokens) its plan measured 1.530× at loss MSE 0.00112 (default_run.md at e96a9bd), off 1.346×
#: at 0.00105 (default_run_first_order_off.md): the first-order mean carries real signal on average (held-out shift
#: of random assignments 0.97-1.11× predicted with it, 0.82-0.90× without: sensitivity.md, sensitivity_int8.md).
#: Between the two, the default since loss model v5: one estimate per op type, kept as far as the calibration can
#: tell it from zero (``FIRST_ORDER_ESTIMATE``).
FIRST_ORDER_SHIFT = True
#: how that first-order mean is estimated. "tested" (the default since loss model v5): one estimate per op type (the
#: same op and operand in every decoder layer), its mean over the layers shrunk by its standard error from the
#: per-sequence type totals (``first_order_mean``). "shrunk" (v4): each op's own mean shrunk toward its type's by
#: empirical Bayes, the SEs per op. "own": each op's sample mean. Why "tested": the IP buys the ops whose estimate is
#: lowest, so an estimate's noise becomes the plan's bias. With "shrunk" (SmolLM2 INT8, 8×256 calibration tokens) the
#: five IP-ET plans of peers.md at 73738a3 had a first-order sum of −0.004 .. −0.082 in calibration and +0.001 ..
#: −0.045 on three held-out sets of 8 sequences calibrated alike; their measured shifts were 2-10× the predicted. The
#: type means themselves did not hold out (gate_proj's activations −0.00025 in calibration, +0.00012 / −0.00003 /
#: −0.00004 held out) except v_proj's activations (−0.0019 / −0.0023 / −0.0017 / −0.0025): the layers share the
#: calibration sequences, so their noise does not average out over the layers, and only a per-sequence type total
#: sees that.
FIRST_ORDER_ESTIMATE = "tested"
FIRST_ORDER_ESTIMATES = ("tested", "shrunk", "own")
#: whether the coherent model's per-op variance is the op's own sample variance of d_n (False) or a ratio estimate
#: (True, the default): its op type's pooled coherent/diagonal ratio times its own diagonal sum ``dia``
#: (``noise_variance``). The coherent sum is one squared number per sequence (8 sequences: ±50% sampling noise per
#: op); the diagonal sum adds thousands of squared terms per sequence, and the type's ratio keeps what the coherent sum
#: knows about correlated errors (SmolLM2 INT8: 0.6-1.4 for most types, 9.9 for matmul_av's probabilities).
POOL_NOISE = True
#: an op type needs this many layers for its spread across them to be estimated; fewer (lm_head): own sample mean
MIN_TYPE_MEMBERS = 3
#: version of the sums in a sensitivity record: 2 = weight first-order (coh, lin) sums, GQA copies folded, curvature
#: weighted by each sequence's T' and over ``n_curvature`` sequences, INT8 activations with the kernel's numerics;
#: 3 = an output operand "y" for the formats whose kernels round their output (bf16); 4 = diagonal sums ``dia``;
#: 5 = the per-sequence first-order changes ``seq``
LOSS_MODEL_VERSION = 5


def auto_noise(fmt: str) -> str:
    """The noise model that validated best for a format, out of sample (benchmarks/results/sensitivity.md,
    SmolLM2-135M, held-out Wikipedia and Lee news, real CPU kernels): the coherent first-order sum with the mean
    shift, for every format. (Before the INT8 formats had the kernel's affine activations and the mean was counted
    once, per-tensor INT8 needed the analytic s²/12; with them, s²/12 over-predicts ~3-4x and coherent is within
    1.0-1.5x.) Kept as a function: a format that validates better elsewhere gets its row here."""
    get_format(fmt)
    return "coherent"


def shrink(means: list[float], se2: list[float]) -> list[float]:
    """Empirical-Bayes (James-Stein type) estimates of the true means behind noisy sample means ``means`` with
    squared standard errors ``se2``: each moves toward the pooled mean μ by SE²/(τ² + SE²), τ² the spread of the true
    means estimated by moments (the means' variance less their mean SE², at least 0). With τ² = 0 all are μ; with
    SEs small against the spread, each keeps its own."""
    mu = statistics.fmean(means)
    tau2 = max(statistics.variance(means) - statistics.fmean(se2), 0.0) if len(means) > 1 else 0.0
    return [mu + (tau2 / (tau2 + e) if tau2 + e > 0 else 1.0) * (m - mu) for m, e in zip(means, se2, strict=True)]


def tested_mean(seqs: list[list[float]], tests: int = 1) -> float:
    """One first-order mean for the ops of a type from their per-sequence changes ``seqs`` (one list per op, the
    same sequences in the same order): m = E_n[D_n]/L, D_n = Σ_ops d_n the type's total of sequence n, times
    max(0, 1 − λ²·SE²/m²), SE² = Var_n(D_n)/(N·L²). The SE is the one that counts: the ops share the calibration
    sequences, so their errors need not cancel over the layers. The factor is a non-negative garrote at
    λ² = max(1, 2 ln ``tests``), the universal threshold for that many means estimated at once (with λ² = 1 it is the
    linear shrink μ²/(μ² + SE²), μ² estimated by m² − SE²): a mean within λ SEs of zero counts as zero, one of many
    SEs nearly whole. Why the threshold grows with the tests: of 37 type means (SmolLM2, 8 sequences) several lie
    2 SEs from zero by chance, and the IP buys whichever of them came out negative."""
    n, k = len(seqs[0]), len(seqs)
    if n < 2 or any(len(s) != n for s in seqs):
        raise ArtifactError("per-sequence sums of unequal length (or fewer than 2 sequences): rerun calibrate")
    totals = [sum(col) for col in zip(*seqs, strict=True)]
    m = statistics.fmean(totals) / k
    se2 = statistics.variance(totals) / (n * k * k)
    if not (math.isfinite(m) and math.isfinite(se2)) or m == 0.0:
        return 0.0
    lam2 = max(1.0, 2.0 * math.log(max(tests, 1)))
    return m * max(0.0, 1.0 - lam2 * se2 / (m * m))


#: per-record caches of the estimators pooled over op types (``noise_variance``, ``first_order_mean``)
_CACHES = ("_noise_cache", "_first_order_cache", "_tested_cache")


class LossModel:
    """Predictions over a sensitivity record's sums (the base of ``records.Sensitivity``, which holds them).

    The estimators pooled over an op's type are computed once per record and cached on it, so a record's sums are
    fixed once it has predicted; copies and pickles start without the caches (``__getstate__``), so a copy whose sums
    are then changed predicts from its own."""

    ops: dict[str, OpSensitivity]
    n_samples: int
    n_curvature: int
    formats: list[str]
    noise_models: list[str]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in _CACHES}

    def operand_term(self, op: str, operand: str, fmt: str, noise: str = "auto", centred: bool = True) -> float:
        """Predicted loss-MSE contribution of quantising one operand of one op to ``fmt``.

        ``centred``: the coherent model's E[d²] is Var(d) + (E d)²; where the mean E d is part of ``shift``
        (``FIRST_ORDER_SHIFT``), which ``predict`` adds before squaring, only the variance belongs here (else the
        mean counts twice). The other models estimate noise alone."""
        f = get_format(fmt)
        if f.kind == "ref":
            return 0.0
        if operand == "y" and not f.output_rounded:  # the output operand: kernels that round their output only
            return 0.0
        st = self.ops[op].operands[operand]
        n = max(self.n_samples, 1)
        if noise == "auto":
            noise = auto_noise(fmt)
        if noise in NOISE_MODELS and noise not in self.noise_models:
            raise ArtifactError(f"this sensitivity record holds the sums of the {', '.join(self.noise_models)} noise "
                                f"model(s), not {noise}: rerun calibrate with --noise {noise}")
        if noise == "coherent" and fmt in st.coh:
            # with the mean in the shift, only the variance belongs here
            return self.noise_variance(op, operand, fmt, centred and FIRST_ORDER_SHIFT)
        if noise in ("empirical", "coherent"):
            if fmt not in st.emp:
                raise ArtifactError(f"format {fmt} was not calibrated (calibrated: {', '.join(self.formats)})")
            return st.emp[fmt] / n
        if noise != "uniform":
            raise IpampError(f"noise model must be one of {NOISE_MODELS}, got {noise!r}")
        if f.kind == "float":
            return uniform_float_variance_factor(f) * st.xg2 / n
        if fmt not in st.int_uniform:
            raise ArtifactError(f"format {fmt} was not calibrated (calibrated: {', '.join(self.formats)})")
        return st.int_uniform[fmt] / n

    def term(self, op: str, fmt: str, noise: str = "auto", centred: bool = True) -> float:
        """Predicted loss-MSE contribution of running op ``op`` (both operands) in ``fmt`` (see ``operand_term``)."""
        return sum(self.operand_term(op, o, fmt, noise, centred) for o in self.ops[op].operands)

    def predict(self, assignment: dict[str, str], noise: str = "auto", shift: bool = True) -> float:
        """Predicted loss MSE of a per-op format assignment (missing ops = reference): E[Δ²] = Var(Δ) + (E Δ)², the
        ops' variances add, their mean shifts add before squaring. ``shift=False``: second moments only."""
        use = shift and self.has_shift
        mse = sum(self.term(op, f, noise, centred=use) for op, f in assignment.items())
        if use:
            mse += sum(self.shift(op, f) for op, f in assignment.items()) ** 2
        return mse

    def operand_stats(self) -> Iterator[OperandStats]:
        """Every op's every operand's sums, in record order: what the record-wide checks and redraws walk."""
        return (st for o in self.ops.values() for st in o.operands.values())

    @property
    def has_curvature(self) -> bool:
        """The second-order part of the shift was calibrated (the sampled-label backward ran)."""
        return self.n_curvature > 0 and any(st.curv for st in self.operand_stats())

    @property
    def has_shift(self) -> bool:
        if not FIRST_ORDER_SHIFT:
            return self.has_curvature
        return any(st.lin for st in self.operand_stats())

    def operand_shift(self, op: str, operand: str, fmt: str) -> float:
        """Predicted mean loss shift of one operand of one op in ``fmt``: the second-order ½·E[eᵀHe] if calibrated,
        H the Gauss-Newton Hessian of the per-sequence mean loss estimated from sampled-label gradients
        (E[ĝĝᵀ] = H/T'), plus the mean first-order change E_n[g·e] where ``FIRST_ORDER_SHIFT`` is on (signed)."""
        if get_format(fmt).kind == "ref":
            return 0.0
        st = self.ops[op].operands[operand]
        lin = self.first_order_mean(op, operand, fmt) if FIRST_ORDER_SHIFT else 0.0
        if self.n_curvature <= 0:
            return lin
        return lin + 0.5 * st.curv.get(fmt, 0.0) / self.n_curvature

    def noise_variance(self, op: str, operand: str, fmt: str, centred: bool = True) -> float:
        """The coherent model's term for one operand of one op: Var(d_n) (``centred``) or E[d_n²], d_n the
        first-order loss change of a sequence. With ``POOL_NOISE``, the ratio estimate r_type · dia/N, r_type =
        Σ_type (own term) / Σ_type dia/N over the op's type (``op_type``; at least ``MIN_TYPE_MEMBERS`` ops with
        diagonal sums); else, or for an op without a type, its own sample moment."""
        n = max(self.n_samples, 1)
        st = self.ops[op].operands[operand]
        own = self._own_noise(st, fmt, n, centred)
        if not POOL_NOISE or fmt not in st.dia:
            return own
        pooled = self._per_type(_CACHES[0], (operand, fmt, n, centred),
                                lambda: self._pooled_noise(operand, fmt, n, centred))
        return pooled.get(op, own)

    def _per_type(self, cache: str, key: tuple, build: Callable[[], dict[str, float]]) -> dict[str, float]:
        """``build()``'s estimates for every op, made once per record and ``key`` and kept in ``cache``
        (``_CACHES``)."""
        store = self.__dict__.setdefault(cache, {})
        if key not in store:
            store[key] = build()
        return store[key]

    @staticmethod
    def _own_noise(st, fmt: str, n: int, centred: bool) -> float:
        second = st.coh[fmt] / n
        return max(second - (st.lin.get(fmt, 0.0) / n) ** 2, 0.0) if centred else second

    def _pooled_noise(self, operand: str, fmt: str, n: int, centred: bool) -> dict[str, float]:
        out: dict[str, float] = {}
        for names in self._types(operand, fmt, "dia").values():
            sts = [self.ops[x].operands[operand] for x in names]
            own = sum(self._own_noise(st, fmt, n, centred) for st in sts)
            diag = sum(st.dia[fmt] for st in sts)
            if diag > 0 and math.isfinite(own / diag):
                out.update((x, own / diag * st.dia[fmt]) for x, st in zip(names, sts, strict=True))
        return out

    def _types(self, operand: str, fmt: str, field: str, min_members: int = MIN_TYPE_MEMBERS) -> dict[str, list[str]]:
        """Ops whose ``operand`` has ``fmt`` in its coh and ``field`` sums, by ``op_type``; types of at least
        ``min_members`` ops."""
        by_type: dict[str, list[str]] = {}
        for name, o in self.ops.items():
            st = o.operands.get(operand)
            if st is not None and fmt in st.coh and fmt in getattr(st, field):
                by_type.setdefault(op_type(name), []).append(name)
        return {t: v for t, v in by_type.items() if len(v) >= min_members}

    def first_order_mean(self, op: str, operand: str, fmt: str) -> float:
        """The mean first-order loss change E_n[g·e] of one operand of one op in ``fmt``, as ``FIRST_ORDER_ESTIMATE``
        says. "tested": its type's estimate (``tested_mean``, as many tests as the record has op types and operands
        in ``fmt``) over the per-sequence sums ``seq``, spread over the type's ops by their curvature terms (equally
        without curvature); "shrunk": the empirical-Bayes estimate over its type (``shrink``; SE² = (E[d²] − E[d]²)/
        (N − 1) per op; types of at least ``MIN_TYPE_MEMBERS`` ops); "own" (or fewer than 2 sequences): its sample
        mean."""
        n = max(self.n_samples, 1)
        raw = self.ops[op].operands[operand].lin.get(fmt, 0.0) / n
        if FIRST_ORDER_ESTIMATE not in FIRST_ORDER_ESTIMATES:
            raise IpampError(f"FIRST_ORDER_ESTIMATE must be one of {FIRST_ORDER_ESTIMATES}, "
                             f"got {FIRST_ORDER_ESTIMATE!r}")
        if FIRST_ORDER_ESTIMATE == "own" or n < 2:
            return raw
        if FIRST_ORDER_ESTIMATE == "tested":
            st = self.ops[op].operands[operand]
            if fmt not in st.seq:
                if fmt in st.lin:
                    raise ArtifactError(f"{op}.{operand} has no per-sequence sums for {fmt}: rerun calibrate")
                return raw  # an operand this format does not round (the output "y" of a non-bf16 format): 0
            return self._per_type(_CACHES[2], (operand, fmt), lambda: self._tested_means(operand, fmt))[op]
        return self._per_type(_CACHES[1], (operand, fmt, n), lambda: self._shrunk_means(operand, fmt, n)).get(op, raw)

    def _tested_means(self, operand: str, fmt: str) -> dict[str, float]:
        # every type of every operand is one of the means tested at once (``tested_mean``'s threshold)
        types = {o: self._types(o, fmt, "seq", min_members=1)
                 for o in dict.fromkeys(o for op in self.ops.values() for o in op.operands)}
        tests = sum(len(t) for t in types.values())
        out: dict[str, float] = {}
        for names in types[operand].values():
            est = tested_mean([self.ops[x].operands[operand].seq[fmt] for x in names], tests=tests)
            # spread over the type's ops by their curvature term: the IP buys the ops of a type whose errors are
            # small, and their first-order change is small with them (v_proj's activations, SmolLM2 INT8: held-out
            # per-layer means correlate -0.69 with the calibration's curvature terms)
            scale = [self.ops[x].operands[operand].curv.get(fmt, 0.0) for x in names]
            total = sum(scale)
            if not (total > 0 and math.isfinite(total)):
                scale, total = [1.0] * len(names), float(len(names))
            out.update((x, est * len(names) * c / total) for x, c in zip(names, scale, strict=True))
        return out

    def _shrunk_means(self, operand: str, fmt: str, n: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for names in self._types(operand, fmt, "lin").values():
            sts = [self.ops[x].operands[operand] for x in names]
            means = [st.lin[fmt] / n for st in sts]
            se2 = [max(st.coh[fmt] / n - m * m, 0.0) / (n - 1) for st, m in zip(sts, means, strict=True)]
            if all(map(math.isfinite, means + se2)):
                out.update(zip(names, shrink(means, se2), strict=True))
        return out

    def bootstrap(self, rng: random.Random) -> tuple[LossModel, LossModel] | None:
        """One bootstrap draw of the calibration: (in-bag, out-of-bag) copies of the record whose sums are those of
        the sequences drawn with replacement (as many as there are) and of the sequences the draw left out. Per
        sequence: ``seq`` (so ``lin`` and ``coh``), ``dseq`` (so ``dia``) and the curvature batches' ``cseq`` (so
        ``curv``), drawn with the sequences where each batch is one sequence (the default), else apart. Sums kept per
        record only (``emp``, SQNR, the mean loss) stay: the coherent terms do not read them, the guard and the
        budget's scale are the calibration's. Why: the IP buys the ops whose estimates came out low, so its own
        prediction of the plan it chose is biased low; re-choosing on draws measures by how much
        (``solver.selection_optimism``). None where the record cannot be redrawn (fewer than 4 sequences, no
        per-sequence curvature or diagonal terms: a record calibrated before they were kept, with a batch of more
        than one sequence, or ranks merged unevenly) or the draw left fewer than 2 sequences out."""
        shape = self._redraw_shape()
        if shape is None:
            return None
        n, nc = shape
        draw = [rng.randrange(n) for _ in range(n)]
        cdraw = draw if nc == n else [rng.randrange(nc) for _ in range(nc)]
        drawn, cdrawn = set(draw), set(cdraw)
        left, cleft = [i for i in range(n) if i not in drawn], [i for i in range(nc) if i not in cdrawn]
        if len(left) < 2 or (nc and not cleft):
            return None
        return self._subsample(draw, cdraw, nc), self._subsample(left, cleft, nc)

    @property
    def can_redraw(self) -> bool:
        """Whether ``bootstrap`` can redraw this record's sequences at all (its per-sequence sums are complete)."""
        return self._redraw_shape() is not None

    def _redraw_shape(self) -> tuple[int, int] | None:
        """(sequences, curvature batches) of a record whose per-sequence sums can be redrawn, else None: every
        ``seq`` list as long (at least 4), the ``cseq`` lists as long as each other, and every ``dseq`` one per
        sequence (a batch of one), since it is drawn with them."""
        sts = list(self.operand_stats())
        n_seq = {len(v) for st in sts for v in st.seq.values()}
        n_cb = {len(v) for st in sts for v in st.cseq.values()}
        if (len(n_seq) != 1 or min(n_seq) < 4 or (self.has_curvature and len(n_cb) != 1)
                or any(len(st.dseq.get(f, ())) != min(n_seq) for st in sts for f in st.dia)):
            return None
        return min(n_seq), (min(n_cb) if n_cb else 0)

    def _subsample(self, draw: list[int], cdraw: list[int], nc: int) -> LossModel:
        out = copy.deepcopy(self)  # the per-type caches are not copied (``__getstate__``)
        out.n_samples = len(draw)
        out.n_curvature = round(self.n_curvature * len(cdraw) / nc) if nc else 0  # sequences, not batches
        for st in out.operand_stats():
            for f, v in st.seq.items():
                st.seq[f] = [v[i] for i in draw]
                st.lin[f] = math.fsum(st.seq[f])
                st.coh[f] = math.fsum(x * x for x in st.seq[f])
            for f, v in st.cseq.items():
                st.cseq[f] = [v[i] for i in cdraw]
                st.curv[f] = math.fsum(st.cseq[f])
            for f, v in st.dseq.items():
                st.dseq[f] = [v[i] for i in draw]
                st.dia[f] = math.fsum(st.dseq[f])
        return out

    def shift(self, op: str, fmt: str) -> float:
        """Predicted mean loss shift of op ``op`` in ``fmt``: its operands' shifts added (``operand_shift``)."""
        return sum(self.operand_shift(op, o, fmt) for o in self.ops[op].operands)

    def sqnr_db(self, op: str, fmt: str) -> float:
        """Input SQNR of an op in ``fmt`` (worst operand), for the PGQ baseline."""
        import math

        vals = []
        for k, st in self.ops[op].operands.items():
            if k == "y":  # an output, not an input
                continue
            e = st.err2.get(fmt, 0.0)
            vals.append(float("inf") if e <= 0 else 10 * math.log10(st.x2 / e))
        return min(vals)

    @property
    def op_names(self) -> list[str]:
        return list(self.ops)
