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
          "TT": ("ms saved (TT: theoretical time gain)", 1e3),
          "RT": ("ms saved (RT: roofline time gain on a named device)", 1e3),
          "M": ("MiB of weights saved (M)", 1 / 2**20)}


def plot_frontier(
    frontier_json_or_points: str | Path | Points,
    path: str | Path,
    measured_points: list[dict[str, Any]] | list[tuple[float, float]] | None = None,
    baselines: dict[str, Plan] | None = None,
    title: str | None = None,
    chosen: Plan | None = None,
    evaluation: dict[str, Any] | None = None,
    reference_time_s: float | None = None,
) -> Path:
    """Predicted loss MSE vs gain along the frontier, the chosen plan marked; with ``evaluation`` (evaluation.json)
    every evaluated plan (ours and the baselines) is drawn at its predicted and at its measured position.

    Measured ET gains are drawn as the fraction of the prefill they saved times ``reference_time_s`` (the reference
    prefill when the gains were measured): a machine that ran at another speed during evaluation would otherwise
    shift every measured point away from the predictions it is compared with."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g, loss, metric = _points(frontier_json_or_points)
    label, scale = _UNITS.get(metric, (metric or "gain", 1.0))
    fig, ax = plt.subplots(figsize=(6.8, 4.6), dpi=110)
    # A gain in (g_i, g_{i+1}] costs at least loss_{i+1}: the "pre" step is the achievable boundary.
    ax.step([x * scale for x in g], loss, where="pre", color="C0", alpha=0.4)
    ax.plot([x * scale for x in g], loss, "o", color="C0", ms=4, label=f"IP-{metric} frontier (predicted)")
    if chosen is not None:
        ax.plot([chosen.predicted_gain * scale], [chosen.predicted_loss_mse], "*", color="C1", ms=14,
                label="chosen plan (predicted)")
    if measured_points:
        mg, ml, _ = _points(measured_points)
        ax.plot([x * scale for x in mg], ml, "s", mfc="none", color="C3", label="measured")
    for i, (name, p) in enumerate((baselines or {}).items()):
        ax.plot([p.predicted_gain * scale], [p.predicted_loss_mse], "^", color=f"C{(i + 4) % 10}", label=name)
    for i, (name, row) in enumerate(((evaluation or {}).get("plans") or {}).items()):
        color = "C1" if name == "ip" else f"C{(i + 4) % 10}"
        if name != "ip":
            ax.plot([row["predicted_gain"] * scale], [row["predicted_loss_mse"]], "^", color=color,
                    label=f"{name} (predicted)")
        if "measured_gain_s" in row and metric == "ET":
            x = row["measured_gain_s"]
            if reference_time_s and row.get("reference_prefill_s"):
                x = x / row["reference_prefill_s"] * reference_time_s
            ax.plot([x * scale], [row["measured_loss_mse"]], "s", mfc="none", color=color, ms=8,
                    label=f"{'chosen plan' if name == 'ip' else name} (measured)")
    if any(v > 0 for v in loss):
        ax.set_yscale("symlog", linthresh=min(v for v in loss if v > 0))
    ax.set_xlabel(label)
    ax.set_ylabel("loss MSE")
    ax.set_title(title or "Loss MSE vs gain: frontier, chosen plan, baselines")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
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
    (shifts add over groups and are squared once for the plan), chosen vs best gain, and why.

    "Why" tells the three reasons apart: the SQNR guard excluded every low-precision config of an op (not a
    trade-off: such configs never enter the IP), the measurement of a config failed its quality checks, or the
    IP judged the loss not worth the gain.
    """
    from .solver import build_instance

    noise = noise or plan.solver.get("noise", "empirical")
    guard = plan.solver.get("min_sqnr_db")
    m = plan.metric
    # every config (no guard: it is explained below), the plan's own loss model
    inst = build_instance(sensitivity, partition, gains, m, noise, None, plan.solver.get("predicted_shift") is not None)
    ref = inst.reference_format
    total = sum(g.noise[g.configs.index(tuple(plan.assignment.get(op, ref) for op in g.ops))] for g in inst.groups)
    rows = []
    for g in inst.groups:
        gg = gains.groups[g.name]
        cfg = tuple(plan.assignment.get(op, ref) for op in g.ops)
        c = g.configs.index(cfg)
        gains_m = g.gain[m]
        guarded = {}
        if guard is not None:
            for op in g.ops:
                for f in sorted({f for cf in g.configs for f in cf} - {ref}):
                    if op in sensitivity.ops and sensitivity.sqnr_db(op, f) < guard:
                        guarded[op] = (f, sensitivity.sqnr_db(op, f))
        allowed = [ci for ci, cf in enumerate(g.configs)
                   if not any(f != ref and op in guarded for op, f in zip(g.ops, cf, strict=True))
                   and gg.usable(m, gg.configs.index(list(cf)))]
        best_c = max(allowed or [g.ref_index], key=gains_m.__getitem__)
        flags = gg.flags.get(m) or []
        emulated = sum(1 for f in flags if f.startswith("no real kernel"))
        flagged = sum(1 for f in flags if f) - emulated
        n_low = sum(f != ref for f in cfg)
        notes = []
        if guarded:
            notes.append("below the " + f"{guard:g} dB SQNR guard (excluded, not traded off): " + ", ".join(
                f"{op.rsplit('.', 1)[-1]} {f} {db:.1f} dB" for op, (f, db) in guarded.items()))
        if flagged:
            notes.append(f"{flagged} config(s) kept out: their timing failed the quality checks")
        if emulated:
            notes.append(f"{emulated} config(s) kept out: this device has no real kernel for them (emulated only)")
        lossy = [ci for ci in allowed if ci != g.ref_index]
        if n_low == 0:
            if not lossy:
                why = "no low-precision config is allowed"
            elif max(gains_m[ci] for ci in lossy) <= 0:
                why = "no allowed config is faster than the reference"
            else:
                cheapest = min(lossy, key=lambda ci: g.noise[ci])
                why = (f"kept at reference: the budget does not cover its least lossy config "
                       f"({g.noise[cheapest]:.3g} loss MSE for {_fmt_gain(gains_m[cheapest], m)})")
        elif c == best_c:
            why = "takes its best allowed config: the budget covers it"
        else:
            why = (f"partly quantized: its best allowed config would add {g.noise[best_c] - g.noise[c]:.3g} loss MSE "
                   f"for {_fmt_gain(gains_m[best_c] - gains_m[c], m)} more")
        if notes:
            why += "; " + "; ".join(notes)
        rows.append({
            "group": g.name,
            "ops": dict(zip(g.ops, cfg, strict=True)),
            "noise_mse": g.noise[c],
            "noise_share_pct": 100.0 * g.noise[c] / total if total > 0 else 0.0,
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


def _measured_section(measured: dict[str, Any], m: str) -> list[str]:
    """evaluation.json as tables: reference, then every plan (ours first) with predicted and measured columns."""
    ref = measured.get("reference", {})
    lines = ["", "## Measured (evaluation.json)", "", f"- Reference perplexity (held-out text): "
             f"{ref.get('perplexity', float('nan')):.4g}"]
    for task, a in (ref.get("accuracy") or {}).items():
        lines.append(f"- Reference accuracy {task}: {a.get('acc', float('nan')):.3f} (n={a.get('n')})")
    ms = measured.get("machine_end") or {}
    if ms:
        lines.append(f"- Machine during evaluation: {ms.get('threads')} torch thread(s), {ms.get('cpus')} core(s), "
                     f"1-min load average {ms.get('load_avg_1min')}")
    plans = measured.get("plans") or {}
    timed = any("measured_speedup" in r for r in plans.values())
    head = "| plan | low-precision ops | loss MSE predicted | loss MSE measured | perplexity |"
    sep = "|---|---|---|---|---|"
    if timed:
        head += " gain predicted | gain measured (±CI) | speedup measured |"
        sep += "---|---|---|"
    lines += ["", f"Loss MSE and perplexity on held-out text ({measured.get('loss_data', 'evaluation split')}; "
              f"{measured.get('loss_numerics') or 'fake-quantised'}, out of sample: not the calibration sequences); "
              "gains end to "
              "end with the device's real kernels, reference and plan interleaved. The baselines are greedy per-op "
              "orders at the same loss budget (Random, Prefix = network order, SQNR = highest SQNR first).", "",
              head, sep]
    for name, r in plans.items():
        label = "IP-" + m if name == "ip" else name + (" (same plan as IP)" if r.get("same_plan_as_ip") else "")
        row = (f"| {label} | {r.get('n_low_precision_ops')} | "
               f"{r.get('predicted_loss_mse', float('nan')):.3g} | {r.get('measured_loss_mse', float('nan')):.3g} | "
               f"{r.get('perplexity', float('nan')):.4g} |")
        if timed:
            ci = r.get("predicted_gain_ci")
            row += (f" {_fmt_gain(r.get('predicted_gain', 0.0), m)}" + (f" ±{ci * 1e3:.2g}" if ci else "") + " | "
                    + (f"{r['measured_gain_s'] * 1e3:.3g} ms ±{r['measured_gain_ci_s'] * 1e3:.2g} | "
                       f"{r['measured_speedup']:.3f}x |" if "measured_gain_s" in r else "- | - |"))
        lines.append(row)
    if sum(1 for r in plans.values() if r.get("same_plan_as_ip")) and timed:
        lines += ["", "Rows marked *same plan as IP* are exactly the IP's plan (the budget admits every allowed op), "
                  "measured once; a tighter --beta tells the methods apart."]
    for key, label in (("speed_check", "Speed"), ("loss_check", "Loss")):
        check = (plans.get("ip") or {}).get(key)
        if check:
            lines += ["", f"**{label} check: {'OK' if check['ok'] else 'FAILED'}.** " + check["message"]]
    if any("measured_decode_speedup" in r for r in plans.values()):
        lines += ["", "Decode step (one new token after the cached context, real KV cache; `--objective decode/mix`):",
                  "", "| plan | prefill gain predicted | decode-step gain predicted | decode-step gain measured (±CI) "
                  "| decode speedup measured |", "|---|---|---|---|---|"]
        for name, r in plans.items():
            if "measured_decode_speedup" in r:
                pre = r.get("predicted_prefill_gain")
                lines.append(f"| {'IP-' + m if name == 'ip' else name} | "
                             + (f"{pre * 1e3:.3g} ms" if pre is not None else "not timed") + " | "
                             f"{r['predicted_decode_gain'] * 1e3:.3g} ms | {r['measured_decode_gain_s'] * 1e3:.3g} ms "
                             f"±{r['measured_decode_gain_ci_s'] * 1e3:.2g} | {r['measured_decode_speedup']:.3f}x |")
        dcheck = (plans.get("ip") or {}).get("decode_speed_check")
        if dcheck:
            lines += ["", ("**Decode speed check: OK.** " if dcheck["ok"] else "**Decode speed check: FAILED.** ")
                      + dcheck["message"]]
    return lines


_PER = {"prefill": "per prefill", "decode": "per decode step", "mix": "per weighted request"}
#: what the reference time of each objective's gains record is
OBJECTIVE_TIME = {"prefill": "reference prefill", "decode": "reference decode step (TPOT)",
                  "mix": "weighted reference (w_TTFT x TTFT + w_TPOT x TPOT)"}


def _objective_frontiers(fronts: dict[str, list[Plan]], m: str) -> list[str]:
    """One table per objective: the frontier the same sensitivity and gains give when that phase's time is the goal."""
    from .solver import speedup_of

    lines = ["", "## Frontier per objective (predicted)", "",
             "The same loss budgets, each objective maximising its own time: prefill (TTFT), decode (TPOT, one decode "
             "step) and mix (w_TTFT·TTFT + w_TPOT·TPOT). Speedups are against that objective's reference time."]
    for obj, pts in fronts.items():
        lines += ["", f"### {obj}", "", "| β | loss MSE | gain | speedup | low-precision ops |",
                  "|---|---|---|---|---|"]
        for p in pts:
            ref = p.solver.get("reference_time_s")
            sp = f"{speedup_of(p.predicted_gain, ref):.3f}x" if ref and p.metric in ("ET", "RT") else "-"
            beta = f"{p.beta:.4g}" if p.beta is not None else "-"
            lines.append(f"| {beta} | {p.predicted_loss_mse:.4g} | {_fmt_gain(p.predicted_gain, p.metric)} | {sp} | "
                         f"{len(p.low_precision_ops())} |")
    return lines


def nothing_pays(gains: Gains, metric: str) -> str | None:
    """One sentence when no low-precision configuration measured a gain at all (so the plan is the reference and no
    budget changes that), naming the least slow one; None otherwise. Measured on an H100 with a 135M model, every
    FP8 Linear was slower: a user must hear that the device, not the budget, decided."""
    best = gains.best_low_precision(metric) if metric == "ET" else None
    if best is None or best[0] > 0:
        return None
    g, group, cfg = best
    where = " (".join(p.strip() for p in gains.device.split(";")[:2]) + (")" if ";" in gains.device else "")
    return (f"No low-precision configuration measured faster than {gains.formats[0]} on {where}: the least slow, "
            f"{group} as {'/'.join(cfg)}, costs {-g * 1e3:.3g} ms more {_PER.get(gains.phase, 'per prefill')}; the "
            "plan keeps "
            f"every op in {gains.formats[0]} whatever the budget (small shapes are bound by launching kernels: "
            f"larger --batch/--gain-seq-len measure whether your shapes pay)")


def write_report(
    path: str | Path,
    plan: Plan,
    sensitivity: Sensitivity,
    partition: Partition,
    gains: Gains,
    frontier: list[Plan] | None = None,
    measured: dict[str, Any] | None = None,
    baselines: dict[str, Plan] | None = None,
    objective_frontiers: dict[str, list[Plan]] | None = None,
) -> Path:
    """Markdown report: the plan's totals, the measurement's trustworthiness, measured results with the baselines,
    per-group reasons and the frontier (and one per objective, ``objective_frontiers``). ``gains``: the record the
    plan was solved on (for --objective decode/mix, ``solver.objective_gains``'s)."""
    from .sensitivity import dominance_note
    from .solver import selection_note, speedup_of

    m = plan.metric
    rows = group_explanations(plan, sensitivity, partition, gains)
    s = plan.solver
    ref_t = gains.reference_time_s
    guard = s.get("min_sqnr_db")
    n_guarded = sum(1 for op in plan.assignment if op in sensitivity.ops and guard is not None
                    and any(sensitivity.sqnr_db(op, f) < guard for f in gains.formats[1:]))
    objective = s.get("objective", "prefill")
    gain_line = f"- Predicted gain: {_fmt_gain(plan.predicted_gain, m)}"
    if m == "ET" and ref_t:
        gain_line += (f" of a {ref_t * 1e3:.4g} ms {OBJECTIVE_TIME.get(objective, 'reference')} (predicted speedup "
                      f"{speedup_of(plan.predicted_gain, ref_t):.3f}x)")
    lines = [
        f"# Mixed-precision plan for `{plan.model}`",
        "",
        f"- Objective: maximise **{m}** gain ({_UNITS.get(m, (m, 1))[0].replace('per prefill', _PER[objective])})"
        + ({"decode": " of the **decode** step (TPOT)", "mix": " of the **mix** (w_TTFT·TTFT + w_TPOT·TPOT)"}
           .get(objective, "")) + f", reference format `{plan.reference_format}`",
        f"- Budget: β = {plan.beta}, loss MSE ≤ {plan.budget_loss_mse:.4g}" if plan.beta is not None
        and plan.budget_loss_mse is not None
        else f"- Budget: least loss MSE for a gain ≥ {_fmt_gain(s.get('target_gain') or 0.0, m)}",
        f"- Predicted loss MSE: {plan.predicted_loss_mse:.4g} (mean reference loss {sensitivity.mean_loss:.4g}; "
        f"β-equivalent {s.get('beta_equivalent') or 0:.4g})"
        + (f" = noise {s.get('predicted_noise_mse', 0):.4g} + shift² ({s['predicted_shift']:.4g})²"
           if s.get("predicted_shift") is not None else " (first-order noise only: calibrated without curvature)"),
        *([f"- {note[0].upper()}{note[1:]}"] if (note := selection_note(plan)) else []),
        *([f"- **{dom[0].upper()}{dom[1:]}**"] if (dom := dominance_note(sensitivity)) else []),
        gain_line,
        f"- Low-precision ops: {len(plan.low_precision_ops())} of {len(plan.assignment)}"
        + (f"; the SQNR guard ({guard:g} dB) keeps {n_guarded} ops out of at least one format"
           if guard is not None else ""),
        f"- Solver: status {s.get('status')}, termination {s.get('termination')}, gap {s.get('gap')}, "
        f"{(s.get('wall_s') or 0):.3g} s",
    ]
    if s.get("budget_binds") is not None:
        lines.append(f"- The budget {'binds' if s['budget_binds'] else 'does not bind'}: the fastest plan the guard "
                     f"and the quality checks allow is predicted at loss MSE {s['fastest_allowed_loss_mse']:.4g}"
                     + (", over the budget, so the solver traded gain for loss (see the frontier below)"
                        if s["budget_binds"] else ""))
    if s.get("note"):
        lines.append(f"- Note: {s['note']}")
    if not plan.low_precision_ops() and (msg := nothing_pays(gains, m)):
        lines.append(f"- **{msg}**")
    q = gains.quality or {}
    # a mix record carries each phase's own quality record
    phases = [(p, q[p]) for p in ("prefill", "decode") if isinstance(q.get(p), dict)] if gains.phase == "mix" else \
        [(gains.phase, q)] if q else []
    if phases:
        lines += ["", "## How far the time measurements can be trusted", ""]
    for phase, pq in phases:
        st = pq.get("machine_end", {})
        tag = f" ({phase})" if len(phases) > 1 else ""
        loaded = " — **the machine was loaded by other work**" if pq.get("loaded") else ""
        lines += [f"- Measured{tag} on `{gains.device}`; load average "
                  f"{pq.get('machine_start', {}).get('load_avg_1min')} at start, {st.get('load_avg_1min')} at end, on "
                  f"{st.get('cpus')} core(s){loaded}",
                  f"- Configs that failed the quality checks{tag} (kept out of every plan): "
                  f"{pq.get('flagged_configs', 0)}"]
        lines += [f"  - {f}" for f in pq.get("flagged", [])[:10]]
        ref_q = pq.get("reference_prefill_s", pq.get("reference_decode_s", 0))
        lines.append(f"- Σ best group gains{tag} {pq.get('sum_best_gain_s', 0) * 1e3:.4g} ms vs the "
                     f"{OBJECTIVE_TIME.get(phase, 'reference')} {ref_q * 1e3:.4g} ms: "
                     + ("consistent" if pq.get("consistent", True) else "**inconsistent (not trustworthy)**"))
    if measured:
        lines += _measured_section(measured, m)
    lines += [
        "", "## Per group", "",
        "noise = the group's noise loss MSE (these add); share = its part of the plan's noise total; shift = its "
        "predicted mean loss change (these add, then the total is squared); best gain = the best config the guard "
        "and the quality checks allow.", "",
        "| group | formats per op | noise | share | shift | gain | best gain | why |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ops = ", ".join(f"{op.rsplit('.', 1)[-1]}={f}" for op, f in r["ops"].items())
        lines.append(
            f"| `{r['group']}` | {ops} | {r['noise_mse']:.3g} | {r['noise_share_pct']:.1f} % | {r['shift']:.3g} | "
            f"{_fmt_gain(r['gain'], m)} | {_fmt_gain(r['best_gain'], m)} | {r['why']} |"
        )
    if frontier:
        lines += ["", "## Pareto frontier (predicted), with this plan in its place", "",
                  "| β | loss MSE | gain | low-precision ops |", "|---|---|---|---|"]
        # the plan goes before the first frontier point that is not below it (ties: the plan first)
        here = (plan.predicted_loss_mse, plan.predicted_gain)
        points = sorted(frontier, key=lambda p: (p.predicted_loss_mse, p.predicted_gain))
        pos = next((i for i, p in enumerate(points) if (p.predicted_loss_mse, p.predicted_gain) >= here), len(points))
        for i, p in enumerate([*points[:pos], plan, *points[pos:]]):
            bold = "**" if i == pos else ""
            beta = f"this plan (β {plan.beta})" if i == pos else f"{p.beta:.4g}" if p.beta is not None else "-"
            lines.append(f"| {bold}{beta}{bold} | {bold}{p.predicted_loss_mse:.4g}{bold} | "
                         f"{bold}{_fmt_gain(p.predicted_gain, m if i == pos else p.metric)}{bold} | "
                         f"{bold}{len(p.low_precision_ops())}{bold} |")
    if objective_frontiers:
        lines += _objective_frontiers(objective_frontiers, m)
    if baselines:
        lines += ["", "## Baselines at the same budget (predicted)", "",
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
