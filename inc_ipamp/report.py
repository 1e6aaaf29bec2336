"""Human-readable output: the Pareto plot (PNG) and a Markdown report explaining each group's choice.

The report answers "why this format here?" per group: how much of the plan's predicted loss MSE the group
carries, how its chosen gain compares with the best the group could give, and the format of every op.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .records import Gains, Partition, Plan, Sensitivity

Points = list[Plan] | list[dict[str, Any]] | list[tuple[float, float]]


def _points(src: str | Path | Points) -> tuple[list[float], list[float], str]:
    """(gains, losses, metric) from a frontier file, a list of Plans, plan dicts or (gain, loss) pairs."""
    if isinstance(src, (str, Path)):
        from .solver import load_frontier

        src = load_frontier(src)
    gains, losses, metric = [], [], ""
    for p in src:
        if isinstance(p, Plan):
            gains.append(p.predicted_gain)
            losses.append(p.predicted_loss_mse)
            metric = p.metric
        elif isinstance(p, dict):
            gains.append(float(p.get("predicted_gain", p.get("gain"))))
            losses.append(float(p.get("predicted_loss_mse", p.get("loss_mse"))))
            metric = p.get("metric", metric)
        else:
            gains.append(float(p[0]))
            losses.append(float(p[1]))
    return gains, losses, metric


_UNITS = {"ET": ("ms saved per prefill (ET: empirical time gain)", 1e3),
          "TT": ("ms saved (TT: theoretical time gain)", 1e3), "M": ("MiB of weights saved (M)", 1 / 2**20)}


def plot_frontier(
    frontier_json_or_points: str | Path | Points,
    path: str | Path,
    measured_points: list[dict[str, Any]] | list[tuple[float, float]] | None = None,
    baselines: dict[str, Plan] | None = None,
    title: str | None = None,
) -> Path:
    """Predicted loss MSE vs gain along the frontier; measured points (``gain``, ``loss_mse``) overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g, loss, metric = _points(frontier_json_or_points)
    label, scale = _UNITS.get(metric, (metric or "gain", 1.0))
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    # A gain in (g_i, g_{i+1}] costs at least loss_{i+1}: the "pre" step is the achievable boundary.
    ax.step([x * scale for x in g], loss, where="pre", color="C0", alpha=0.4)
    ax.plot([x * scale for x in g], loss, "o", color="C0", label=f"IP-{metric} frontier (predicted)")
    if measured_points:
        mg, ml, _ = _points(measured_points)
        ax.plot([x * scale for x in mg], ml, "s", mfc="none", color="C3", label="measured")
    for i, (name, p) in enumerate((baselines or {}).items()):
        ax.plot([p.predicted_gain * scale], [p.predicted_loss_mse], "^", color=f"C{(i + 4) % 10}", label=name)
    if any(v > 0 for v in loss) and min((v for v in loss if v > 0), default=1) > 0:
        ax.set_yscale("symlog", linthresh=min(v for v in loss if v > 0))
    ax.set_xlabel(label)
    ax.set_ylabel("loss MSE (predicted)")
    ax.set_title(title or "Loss MSE vs gain (Pareto frontier)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def group_explanations(
    plan: Plan, sensitivity: Sensitivity, partition: Partition, gains: Gains, noise: str | None = None
) -> list[dict[str, Any]]:
    """Per group: chosen config, its noise loss MSE and share of the plan's noise total, its mean loss shift
    (shifts add over groups and are squared once for the plan), chosen vs best gain."""
    from .solver import build_instance

    noise = noise or plan.solver.get("noise", "empirical")
    inst = build_instance(sensitivity, partition, gains, plan.metric, noise)
    total = sum(
        g.loss[g.configs.index(tuple(plan.assignment[op] for op in g.ops))] for g in inst.groups
    )
    rows = []
    for g in inst.groups:
        cfg = tuple(plan.assignment.get(op, inst.reference_format) for op in g.ops)
        c = g.configs.index(cfg)
        gains_m = g.gain[plan.metric]
        best_c = max(range(len(gains_m)), key=gains_m.__getitem__)
        lossy = [ci for ci in range(len(g.configs)) if ci != g.ref_index]
        cheapest = min(lossy, key=lambda ci: g.loss[ci]) if lossy else None
        n_low = sum(f != inst.reference_format for f in cfg)
        if n_low == 0:
            if max(gains_m) <= 0:
                why = "no config of this group is faster than the reference"
            else:
                why = (f"kept at reference: its least lossy low-precision config costs "
                       f"{g.loss[cheapest]:.3g} loss MSE for {gains_m[cheapest]:.3g} gain")
        elif c == best_c:
            why = "takes its best-gain config: the budget allows it"
        else:
            why = f"partly quantized: the best-gain config would add {g.loss[best_c] - g.loss[c]:.3g} loss MSE"
        rows.append({
            "group": g.name,
            "ops": dict(zip(g.ops, cfg, strict=True)),
            "loss_mse": g.loss[c],
            "loss_share_pct": 100.0 * g.loss[c] / total if total > 0 else 0.0,
            "shift": g.shift_of(c),
            "gain": gains_m[c],
            "best_gain": gains_m[best_c],
            "gain_of_best_pct": 100.0 * gains_m[c] / gains_m[best_c] if gains_m[best_c] > 0 else math.nan,
            "why": why,
        })
    return rows


def _fmt_gain(x: float, metric: str) -> str:
    label, scale = _UNITS.get(metric, ("", 1.0))
    unit = label.split(" ")[0]
    return f"{x * scale:.4g} {unit}"


def write_report(
    path: str | Path,
    plan: Plan,
    sensitivity: Sensitivity,
    partition: Partition,
    gains: Gains,
    frontier: list[Plan] | None = None,
    measured: dict[str, Any] | None = None,
    baselines: dict[str, Plan] | None = None,
) -> Path:
    """Markdown report: the plan's totals, per-group reasons, the frontier and baselines at the same budget."""
    m = plan.metric
    rows = group_explanations(plan, sensitivity, partition, gains)
    s = plan.solver
    lines = [
        f"# Mixed-precision plan for `{plan.model}`",
        "",
        f"- Objective: maximise **{m}** gain ({_UNITS.get(m, (m, 1))[0]}), reference format `{plan.reference_format}`",
        f"- Budget: β = {plan.beta}, loss MSE ≤ {plan.budget_loss_mse}" if plan.beta is not None
        else f"- Budget: least loss MSE for a gain ≥ {s.get('target_gain')}",
        f"- Predicted loss MSE: {plan.predicted_loss_mse:.4g} (mean reference loss {sensitivity.mean_loss:.4g}; "
        f"β-equivalent {s.get('beta_equivalent') or 0:.4g})"
        + (f" = noise {s.get('predicted_noise_mse', 0):.4g} + shift² ({s['predicted_shift']:.4g})²"
           if s.get("predicted_shift") is not None else " (first-order noise only: calibrated without curvature)"),
        f"- Predicted gain: {_fmt_gain(plan.predicted_gain, m)}"
        + (f" of a {gains.reference_time_s * 1e3:.4g} ms reference prefill" if m == "ET" and gains.reference_time_s
           else ""),
        f"- Low-precision ops: {len(plan.low_precision_ops())} of {len(plan.assignment)}",
        f"- Solver: status {s.get('status')}, termination {s.get('termination')}, gap {s.get('gap')}, "
        f"{(s.get('wall_s') or 0):.3g} s",
    ]
    if s.get("note"):
        lines.append(f"- Note: {s['note']}")
    if measured:
        lines += ["", "## Measured", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in measured.items()]
    lines += [
        "", "## Per group", "",
        "noise = the group's noise loss MSE (these add); share = its part of the plan's noise total; shift = its "
        "predicted mean loss change (these add, then the total is squared); best gain = the best any config of the "
        "group gives.", "",
        "| group | formats per op | noise | share | shift | gain | best gain | why |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ops = ", ".join(f"{op.rsplit('.', 1)[-1]}={f}" for op, f in r["ops"].items())
        lines.append(
            f"| `{r['group']}` | {ops} | {r['loss_mse']:.3g} | {r['loss_share_pct']:.1f} % | {r['shift']:.3g} | "
            f"{_fmt_gain(r['gain'], m)} | {_fmt_gain(r['best_gain'], m)} | {r['why']} |"
        )
    if frontier:
        lines += ["", "## Pareto frontier (predicted)", "", "| β | loss MSE | gain | low-precision ops |",
                  "|---|---|---|---|"]
        for p in frontier:
            lines.append(f"| {p.beta if p.beta is not None else '-'} | {p.predicted_loss_mse:.4g} | "
                         f"{_fmt_gain(p.predicted_gain, p.metric)} | {len(p.low_precision_ops())} |")
    if baselines:
        lines += ["", "## Baselines at the same budget", "",
                  "Greedy per-op orders, scored on the same group gain tables as the IP.", "",
                  "| method | loss MSE | gain | low-precision ops |", "|---|---|---|---|",
                  f"| IP-{m} | {plan.predicted_loss_mse:.4g} | {_fmt_gain(plan.predicted_gain, m)} | "
                  f"{len(plan.low_precision_ops())} |"]
        for name, p in baselines.items():
            lines.append(f"| {name} | {p.predicted_loss_mse:.4g} | {_fmt_gain(p.predicted_gain, m)} | "
                         f"{len(p.low_precision_ops())} |")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
