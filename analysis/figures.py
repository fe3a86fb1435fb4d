"""The figures of a report, one function each, drawn with matplotlib's Agg backend (no display).

Every function takes data already read from run folders and returns a Figure, or None when the
runs hold nothing to draw (no evaluated round, no GradIP, no decided early-stopping policy).
"""
from __future__ import annotations

import math
import textwrap

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .runs import Run  # noqa: E402

EXTREME_COLOUR, IID_COLOUR = "tab:red", "tab:blue"
MAX_CLIENTS_DRAWN = 40
MAX_CONFUSION_PANELS = 16


def colours(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def group_stat(runs: list[Run], column: str, evaluated_only: bool) -> pd.DataFrame:
    """Per round: mean, min and max of `column` over the runs, and the mean cumulative uplink bytes."""
    frames = []
    for i, run in enumerate(runs):
        m = run.evaluated if evaluated_only else run.metrics
        frames.append(m[["round", column, "cum_uplink_bytes"]].assign(run=i))
    data = pd.concat(frames).dropna(subset=[column])
    if data.empty:
        return pd.DataFrame(columns=["round", "mean", "min", "max", "bytes"])
    stat = data.groupby("round").agg(mean=(column, "mean"), min=(column, "min"), max=(column, "max"),
                                     bytes=("cum_uplink_bytes", "mean"))
    return stat.reset_index()


def _legend(fig: plt.Figure, ax) -> None:
    """One legend below the plots (labels can be long: method + the keys that vary); the figure
    grows with the number of lines."""
    handles, labels = ax.get_legend_handles_labels()
    ncol = 1 if len(labels) <= 4 else (2 if len(labels) <= 12 else 3)
    labels = [textwrap.fill(label, 150 // ncol) for label in labels]
    lines = sum(max(label.count("\n") + 1 for label in labels[i:i + ncol]) for i in range(0, len(labels), ncol))
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height + 0.2 * lines + 0.3)
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)


def _label(label: str, runs: list[Run]) -> str:
    return f"{label} [{len(runs)} seeds]" if len(runs) > 1 else label


def curves(groups: dict[str, list[Run]]) -> plt.Figure | None:
    """Accuracy (evaluated rounds) and train loss vs round, one line per group (mean, min-max band)."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.4), constrained_layout=True)
    drawn = 0
    for colour, (label, runs) in zip(colours(len(groups)), groups.items()):
        acc = group_stat(runs, "accuracy", evaluated_only=True)
        loss = group_stat(runs, "train_loss", evaluated_only=False)
        if acc.empty and loss.empty:
            continue
        drawn += 1
        for ax, stat, style in ((acc_ax, acc, "o-"), (loss_ax, loss, ".-")):
            if stat.empty:
                continue
            ax.plot(stat["round"], stat["mean"], style, color=colour, label=_label(label, runs), markersize=4)
            if len(runs) > 1:
                ax.fill_between(stat["round"], stat["min"], stat["max"], color=colour, alpha=0.15, linewidth=0)
    if not drawn:
        plt.close(fig)
        return None
    acc_ax.set(xlabel="round", ylabel="test accuracy", title="accuracy vs round (round 0 = zero-shot)")
    loss_ax.set(xlabel="round", ylabel="train loss (mean over the round's steps)", title="train loss vs round")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    _legend(fig, max((acc_ax, loss_ax), key=lambda ax: len(ax.get_legend_handles_labels()[1])))
    return fig


def accuracy_vs_uplink(groups: dict[str, list[Run]]) -> plt.Figure | None:
    """Accuracy vs cumulative uplink bytes (log scale), one line per group: the communication /
    accuracy trade-off. Round 0 (zero-shot, 0 bytes) cannot sit on a log axis and is left out."""
    fig, ax = plt.subplots(figsize=(8, 4.6), constrained_layout=True)
    drawn = 0
    for colour, (label, runs) in zip(colours(len(groups)), groups.items()):
        stat = group_stat(runs, "accuracy", evaluated_only=True)
        stat = stat[stat["bytes"] > 0]
        if stat.empty:
            continue
        drawn += 1
        ax.plot(stat["bytes"], stat["mean"], "o-", color=colour, label=_label(label, runs), markersize=4)
        if len(runs) > 1:
            ax.fill_between(stat["bytes"], stat["min"], stat["max"], color=colour, alpha=0.15, linewidth=0)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set(xlabel="cumulative uplink bytes (all clients)", ylabel="test accuracy",
           title="accuracy vs communication")
    ax.grid(alpha=0.3, which="both")
    _legend(fig, ax)
    return fig


# ----------------------------------------------------------------------------- GradIP and VPCS

def phase_lengths(steps: int, early_fraction: float, late_fraction: float) -> tuple[int, int]:
    """The early / late phases of the VPCS calibration window (the same rule as the server's)."""
    early = max(1, round(early_fraction * steps))
    late = max(1, min(steps - early, round(late_fraction * steps)))
    return early, late


def client_trajectories(path: pd.DataFrame) -> dict[int, np.ndarray]:
    """client -> its GradIP over its own local steps (rounds in order, steps in order)."""
    rows = path.dropna(subset=["grad_ip"]).sort_values(["client", "round", "step"])
    return {int(k): g["grad_ip"].to_numpy(dtype=float) for k, g in rows.groupby("client")}


def decision_steps(path: pd.DataFrame, decided_round: int) -> dict[int, int]:
    """client -> how many local steps it had run when the policy decided (end of `decided_round`)."""
    done = path[path["round"] <= decided_round]
    return {int(k): int(v) for k, v in done.groupby("client").size().items()}


def rolling_abs(values: np.ndarray, window: int) -> np.ndarray:
    return pd.Series(np.abs(values)).rolling(window, min_periods=1).mean().to_numpy()


def quiet_threshold(run: Run) -> float | None:
    """sigma x the population reference: the median over clients of their late-phase |GradIP|
    statistic (vp.reference=late), or of their early-phase one (early; runs older than the key)."""
    stats = (run.summary or {}).get("vpcs") or {}
    phase = run.get("vp.reference", "early")
    values = [s.get(phase, s.get(f"{phase}_mean")) for s in stats.values() if isinstance(s, dict)]  # *_mean: older runs
    values = [v for v in values if v is not None]
    sigma = run.get("vp.sigma")
    if not values or sigma is None:
        return None
    return float(sigma) * float(np.median(values))


def grad_ip(run: Run, title: str) -> plt.Figure | None:
    """GradIP per client over its local steps; extreme clients red, others blue; the calibration
    window's early / late phases shaded; the decision marked, with an X on each flagged client."""
    if not run.has_grad_ip:
        return None
    traj = client_trajectories(run.path)
    extreme = run.extreme_clients
    flagged = set(run.flagged_clients)
    shown = sorted(traj, key=lambda k: (extreme is not None and k not in extreme, k))[:MAX_CLIENTS_DRAWN]
    longest = max(len(v) for v in traj.values())
    window = max(1, min(10, longest // 10))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True, constrained_layout=True)
    for k in sorted(shown):
        values = traj[k]
        steps = np.arange(1, len(values) + 1)
        is_extreme = extreme is not None and k in extreme
        colour = EXTREME_COLOUR if is_extreme else (IID_COLOUR if extreme is not None else "tab:gray")
        top.plot(steps, values, color=colour, linewidth=0.7, alpha=0.6)
        bottom.plot(steps, rolling_abs(values, window), color=colour, linewidth=1.2, alpha=0.8)
    typical = float(np.nanmedian(np.abs(np.concatenate(list(traj.values())))))
    top.set_yscale("symlog", linthresh=10.0 ** round(math.log10(typical)) if typical > 0 else 1.0)
    bottom.set_yscale("log")
    calib = run.get("vp.calib_steps")
    enabled = bool(run.get("vp.enabled"))
    handles = [Line2D([], [], color=EXTREME_COLOUR, label="truly extreme client"),
               Line2D([], [], color=IID_COLOUR, label="other client")] if extreme is not None else \
              [Line2D([], [], color="tab:gray", label="client (extreme ones unknown)")]
    if enabled and calib:
        early, late = phase_lengths(int(calib), float(run.get("vp.early_fraction", 0.2)),
                                    float(run.get("vp.late_fraction", 0.5)))
        calibration = run.get("vp.calibration", "rounds")  # runs before vp.calibration existed spread it over rounds
        for ax in (top, bottom):
            ax.axvspan(0.5, calib + 0.5, color="tab:gray", alpha=0.06)
            ax.axvspan(0.5, early + 0.5, color="tab:green", alpha=0.08)
            ax.axvspan(calib - late + 0.5, calib + 0.5, color="tab:orange", alpha=0.08)
        what = {"first_round": "round 1, aggregated", "probe": "round 1, update discarded",
                "rounds": "spread over rounds"}.get(calibration, calibration)
        handles += [Patch(color="tab:gray", alpha=0.2, label=f"VPCS calibration ({calib} steps, {what})"),
                    Patch(color="tab:green", alpha=0.25, label="VPCS early phase"),
                    Patch(color="tab:orange", alpha=0.25, label="VPCS late phase")]
        threshold = quiet_threshold(run)
        if threshold:
            bottom.axhline(threshold, color="black", linestyle=":", linewidth=1)
            handles.append(Line2D([], [], color="black", linestyle=":", label="quiet below σ × population reference"))
    decided = run.decided_round
    if decided is not None:
        at = decision_steps(run.path, decided)
        for ax in (top, bottom):
            ax.axvline(max(at.values(), default=0) + 0.5, color="black", linestyle="--", linewidth=1)
        handles.append(Line2D([], [], color="black", linestyle="--", label=f"decision (end of round {decided})"))
        for k in sorted(flagged & set(shown)):
            step = at.get(k)
            if step:
                value = rolling_abs(traj[k], window)[step - 1]
                bottom.plot([step], [value], marker="X", markersize=11, color="black", linestyle="none")
        if flagged:
            handles.append(Line2D([], [], marker="X", color="black", linestyle="none", markersize=9,
                                  label=f"flagged: {', '.join(map(str, sorted(flagged)))}"))
    top.set(ylabel="GradIP (symlog)", title=title)
    bottom.set(xlabel="local step of the client", ylabel=f"|GradIP|, running mean of {window}")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend(handles=handles, fontsize=8, loc="upper right", frameon=False)
    if len(shown) < len(traj):
        bottom.text(0.01, 0.02, f"{len(shown)} of {len(traj)} clients drawn", transform=bottom.transAxes, fontsize=8)
    return fig


def confusion(rows: list[dict]) -> plt.Figure | None:
    """Flagged vs truly extreme clients: one 2 x 2 table per row (label, tp, fp, fn, tn, precision, recall)."""
    rows = rows[:MAX_CONFUSION_PANELS]
    if not rows:
        return None
    cols = min(4, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 3.3 * nrows), constrained_layout=True, squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        table = np.array([[row["tp"], row["fn"]], [row["fp"], row["tn"]]])
        ax.imshow(table, cmap="Blues", vmin=0, vmax=max(1, table.max()))
        for (i, j), v in np.ndenumerate(table):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=14,
                    color="white" if v > table.max() / 2 else "black")
        ax.set_xticks([0, 1], ["flagged", "not flagged"])
        ax.set_yticks([0, 1], ["extreme", "not extreme"])
        p, r = row["precision"], row["recall"]
        ax.set_title(f"{row['label']}\nprecision {_fmt(p)}, recall {_fmt(r)}", fontsize=8)
    return fig


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


# ----------------------------------------------------------------------------- sweeps

def _sorted_values(values) -> list:
    unique = list(dict.fromkeys(values))
    try:
        return sorted(unique)
    except TypeError:
        return sorted(unique, key=str)


def heatmap(table: pd.DataFrame, x_key: str, y_key: str, value: str, x_name: str, y_name: str) -> plt.Figure | None:
    """Mean of `value` over the runs in each (x, y) cell (seeds and other axes averaged), annotated."""
    data = table[[x_key, y_key, value]].dropna(subset=[value])
    if data.empty:
        return None
    xs, ys = _sorted_values(data[x_key]), _sorted_values(data[y_key])
    mean = np.full((len(ys), len(xs)), np.nan)
    count = np.zeros((len(ys), len(xs)), dtype=int)
    for (xv, yv), cell in data.groupby([x_key, y_key])[value]:
        i, j = ys.index(yv), xs.index(xv)
        mean[i, j], count[i, j] = cell.mean(), len(cell)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(xs), 1.4 + 0.8 * len(ys)), constrained_layout=True)
    image = ax.imshow(np.ma.masked_invalid(mean), cmap="viridis", aspect="auto", origin="lower")
    fig.colorbar(image, ax=ax, label=value.replace("_", " "))
    finite = mean[np.isfinite(mean)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for (i, j), v in np.ndenumerate(mean):
        if np.isfinite(v):
            text = f"{v:.3f}" + (f"\nn={count[i, j]}" if count.max() > 1 else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if v < middle else "black")
    ax.set_xticks(range(len(xs)), [_tick(v) for v in xs])
    ax.set_yticks(range(len(ys)), [_tick(v) for v in ys])
    ax.set(xlabel=x_name, ylabel=y_name, title=f"{value.replace('_', ' ')} over {y_name} × {x_name}")
    return fig


def _tick(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
