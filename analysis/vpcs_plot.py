"""The VPCS decision of one run, client by client: each judged client's calibration trajectory
with the decision rule's (`vp.rule`) statistic and threshold drawn on it.

- paper: |GradIP| (log scale); the early and late phase statistics S as segments over their
  phases; the quiet line sigma x the population reference (dotted).
- stepwise / trend: the relative level r_k^t = log|GradIP_k^t| - median over the clients of
  log|GradIP_j^t| at the same step (the shared direction's factor cancels); the early and late
  medians as segments. stepwise: the late level at which the client's z reaches -outlier_z
  (dotted); trend: the population's level 0 (dotted) and the Mann-Kendall Z against its cut-off
  in the panel's title.

The trajectory of each client is its window: its first min(calib_steps, n_k // batch) steps.
Read from the run folder alone (path.parquet, clients.json, summary.json, config.yaml).
"""
from __future__ import annotations

import math

import numpy as np

from .gradip_plot import EXTREME_COLOUR, IID_COLOUR, UNKNOWN_COLOUR, phase_lengths
from .plots import Plot, plt
from .runs import Run

MAX_PANELS = 12


def windows(run: Run) -> dict[int, np.ndarray]:
    """client -> |GradIP| of its calibration window (rounds that calibrated, in order)."""
    calib = int(run.get("vp.calib_steps", 0) or 0)
    rows = run.path[run.path["round"].isin(run.calibration_rounds)].sort_values(["client", "round", "step"])
    sizes = {int(c["client"]): int(c["size"]) for c in run.clients or [] if "size" in c}
    batch = int(run.get("data.batch_size", 1) or 1)
    out = {}
    for k, g in rows.groupby("client"):
        w = min(calib, sizes[int(k)] // batch) if int(k) in sizes else calib
        out[int(k)] = np.abs(g["grad_ip"].to_numpy(float)[:w])
    return out


def relative(traj: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    logs = {k: np.log(np.maximum(v, 1e-300)) for k, v in traj.items()}
    longest = max(len(v) for v in logs.values())
    med = np.array([np.median([v[t] for v in logs.values() if len(v) > t]) for t in range(longest)])
    return {k: v - med[: len(v)] for k, v in logs.items()}


def _verdict(rule: str, s: dict, run: Run) -> tuple[str, float | None]:
    """The panel's title text and the threshold line (None: no line) of the rule's statistic."""
    if rule == "stepwise":
        z_cut = float(run.get("vp.outlier_z", 3.5))
        centre = s["decay"] - s["z"] * s["spread"]
        start = s["level"] - s["decay"]
        return f"z {s['z']:.2f} (flag < −{z_cut:g})", start + centre - z_cut * s["spread"]
    if rule == "trend":
        return f"MK Z {s['trend_z']:.2f} (flag < {s['z_crit']:.2f}, level < 0)", 0.0
    return (f"ρ_later {s['rho_later']:.2f} (> {run.get('vp.rho')}), quiet {s['quiet_fraction']:.2f} "
            f"(> {run.get('vp.min_quiet_fraction')})"), None


def decision(run: Run, title: str) -> Plot | None:
    stats = (run.summary or {}).get("vpcs") or {}
    if not stats or run.path is None or "grad_ip" not in run.path:
        return None
    rule = run.get("vp.rule", "paper")
    traj = {k: v for k, v in windows(run).items() if str(k) in stats}
    if not traj:
        return None
    series = relative(traj) if rule in ("stepwise", "trend") else traj
    reference = None
    if rule == "paper":
        phase = "late" if run.get("vp.reference", "early") == "late" else "early"
        reference = float(run.get("vp.sigma")) * float(np.median([stats[str(k)][phase] for k in traj]))
    extreme, flagged = run.extreme_clients, set(run.flagged_clients)
    clients = sorted(traj)[:MAX_PANELS]
    cols = min(4, len(clients))
    rows_n = math.ceil(len(clients) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.4 * rows_n + 0.6), sharey=True,
                             squeeze=False, constrained_layout=True)
    plot = Plot(fig, "")
    ef, lf = float(run.get("vp.early_fraction", 0.2)), float(run.get("vp.late_fraction", 0.5))
    for ax, k in zip(axes.flat, clients):
        y, s = series[k], stats[str(k)]
        x = np.arange(1, len(y) + 1)
        colour = UNKNOWN_COLOUR if extreme is None else (EXTREME_COLOUR if k in extreme else IID_COLOUR)
        plot.plot(ax, "trajectory", f"client {k}", x, y, "-", meta={"client": k}, legend=False, color=colour,
                  linewidth=0.7, alpha=0.8)
        n_early, n_late = phase_lengths(len(y), ef, lf)
        if rule == "paper":
            early, late = s["early"], s["late"]
        else:
            early, late = float(np.median(y[:n_early])), float(np.median(y[len(y) - n_late:]))
        ax.plot([1, n_early], [early, early], color="tab:green", linewidth=2)
        ax.plot([len(y) - n_late + 1, len(y)], [late, late], color="tab:orange", linewidth=2)
        text, line = _verdict(rule, s, run)
        line = reference if rule == "paper" else line
        if line is not None:
            ax.axhline(line, color="black", linestyle=":", linewidth=1)
        plot.marks.setdefault("thresholds", {})[k] = line
        mark = " — FLAGGED" if k in flagged else ""
        ax.set_title(f"client {k}{' (extreme)' if extreme and k in extreme else ''}{mark}\n{text}", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(clients):]:
        ax.axis("off")
    if rule == "paper":
        axes[0][0].set_yscale("log")
    what = "|GradIP|" if rule == "paper" else "relative level r (log)"
    for ax in axes[:, 0]:
        ax.set_ylabel(what)
    fig.suptitle(title, fontsize=10)
    plot.marks["rule"] = rule
    plot.caption = (f"vp.rule={rule}: each judged client's calibration window ({what}), the early (green) and late "
                    "(orange) phase statistics, and the threshold of its decision (dotted); red: truly extreme.")
    return plot
