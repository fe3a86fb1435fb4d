"""The figures of a report, one function each, drawn with matplotlib's Agg backend (no display).

Every figure function takes data already read from run folders and returns a `Plot` (the figure,
its caption and the series it drew), or None when the runs hold nothing to draw (no evaluated
round, no decided early-stopping policy). The GradIP figure is `gradip_plot.grad_ip`.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .plots import Plot, colours, counted, legend_below, plt, ranges
from .runs import Run

__all__ = ["accuracy_vs_uplink", "confusion", "curves", "heatmap", "plt"]
MAX_CONFUSION_PANELS = 16
CALIBRATION_COLOUR = "tab:gray"


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


def _label(label: str, runs: list[Run]) -> str:
    return f"{label} [{len(runs)} seeds]" if len(runs) > 1 else label


def _band(ax, x, stat: pd.DataFrame, colour, runs: list[Run]) -> None:
    if len(runs) > 1:
        ax.fill_between(x, stat["min"], stat["max"], color=colour, alpha=0.15, linewidth=0)


def examples_text(runs: list[Run]) -> str:
    """"300 held-out examples" (or the range over the runs)."""
    sizes = sorted({n for n in (r.num_test for r in runs) if n})
    if not sizes:
        return "the held-out test examples"
    return f"{sizes[0]:,} held-out examples" if len(sizes) == 1 else f"{sizes[0]:,}-{sizes[-1]:,} held-out examples"


def evaluated_rounds(runs: list[Run]) -> str:
    """"round 0 (zero-shot) and after rounds 1-4", or the rounds each run evaluated."""
    sets = {tuple(int(r) for r in run.evaluated["round"]) for run in runs}
    if len(sets) != 1:
        return "each run's evaluated rounds (round 0 = zero-shot)"
    later = [r for r in next(iter(sets)) if r > 0]
    return "round 0 (zero-shot)" + (f" and after {counted('round', later)}" if later else "")


# ----------------------------------------------------------------------------- train loss lines

def loss_lines(runs: list[Run], split: bool) -> list[dict]:
    """The train-loss lines of one group of runs: {label, clients, stat (round, mean, min, max)}.

    Each client's loss in a round is the mean over its own local steps (metrics.jsonl's
    client_train_loss), so a client counts once whatever its number of steps. `split`: one line for
    the clients never flagged and one for the flagged ones (whose steps drop to 1 after the
    decision); otherwise one line over all clients. Runs written before per-client losses were
    recorded give the round's mean over all steps of all clients."""
    per_line: dict[str, list[pd.DataFrame]] = {}
    members: dict[str, list[list[int]]] = {}
    for run in runs:
        losses = run.client_losses()
        if losses is None or losses.empty:
            frame = run.metrics[run.metrics["round"] > 0][["round", "train_loss"]].dropna()
            per_line.setdefault("all steps of all clients", []).append(frame)
            continue
        clients = sorted(losses["client"].unique())
        flagged = set(run.flagged_clients) if run.decided_round is not None else set()
        sets = {"never flagged": [k for k in clients if k not in flagged], "flagged": sorted(flagged)} \
            if split and flagged else {"all": clients}
        for name, ks in sets.items():
            if ks:
                rows = losses[losses["client"].isin(ks)]
                per_line.setdefault(name, []).append(rows.groupby("round", as_index=False)["train_loss"].mean())
                members.setdefault(name, []).append([int(k) for k in ks])
    lines = []
    for name, frames in per_line.items():
        data = pd.concat([f.assign(run=i) for i, f in enumerate(frames)])
        stat = data.groupby("round").agg(mean=("train_loss", "mean"), min=("train_loss", "min"),
                                         max=("train_loss", "max")).reset_index()
        clients = members.get(name)
        lines.append({"name": name, "clients": clients[0] if clients and len(frames) == 1 else None,
                      "stat": stat, "label": _loss_label(name, clients, runs)})
    return lines


def _loss_label(name: str, clients: list[list[int]] | None, runs: list[Run]) -> str:
    if clients is None:
        return "mean over all steps of all clients (run without per-client losses)"
    if len(clients) > 1:
        return {"never flagged": "clients never flagged (in each seed)",
                "flagged": "flagged clients (in each seed)"}.get(name, "all clients")
    ids = counted("client", clients[0])
    decided = runs[0].decided_round
    if name == "never flagged":
        return f"{ids} (never flagged)"
    if name == "flagged":
        return f"{ids} (flagged after round {decided}: 1 local step a round from then on)"
    return ids


def _loss_caption(lines: list[dict], single: bool) -> str:
    if not single:
        return ("one line per method: the mean over all of a run's clients of each client's mean loss over "
                "its own local steps (every client counts once, whatever its number of steps)")
    return "each client's mean loss over its own local steps, averaged over " + \
        " and, as a second line, over ".join(line["label"] for line in lines)


# ----------------------------------------------------------------------------- accuracy and loss

def _shade_calibration(axes, run: Run) -> list[int]:
    """Shade the rounds that recorded VPCS calibration steps; the last axes' span carries the legend label."""
    rounds = run.calibration_rounds
    for ax in axes:
        for i, r in enumerate(rounds):
            ax.axvspan(r - 0.5, r + 0.5, color=CALIBRATION_COLOUR, alpha=0.12, linewidth=0,
                       label=f"VPCS calibration ({counted('round', rounds)})" if ax is axes[-1] and i == 0 else None)
    return rounds


def curves(groups: dict[str, list[Run]]) -> Plot | None:
    """Accuracy at every evaluated round (round 0 = zero-shot) and train loss vs round: one line per
    group, and for a single setting the never-flagged and the flagged clients apart."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.4), constrained_layout=True)
    plot = Plot(fig, "")
    single = len(groups) == 1
    all_runs, drawn_lines = [r for runs in groups.values() for r in runs], []
    for colour, (label, runs) in zip(colours(len(groups)), groups.items()):
        acc = group_stat(runs, "accuracy", evaluated_only=True)
        if not acc.empty:
            plot.plot(acc_ax, "accuracy", _label(label, runs), acc["round"], acc["mean"], "o-", color=colour,
                      markersize=4, meta={"rounds": [int(r) for r in acc["round"]]})
            _band(acc_ax, acc["round"], acc, colour, runs)
        lines = loss_lines(runs, split=single)
        styles = ["-", "--", ":"]
        for style, line in zip(styles, lines):
            stat = line["stat"]
            if stat.empty:
                continue
            name = line["label"] if single else _label(label, runs)
            plot.plot(loss_ax, "train_loss", name, stat["round"], stat["mean"], "." + style,
                      color=colour if not single else ("tab:blue", "tab:red", "tab:gray")[len(drawn_lines) % 3],
                      markersize=5, meta={"clients": line["clients"], "line": line["name"]})
            _band(loss_ax, stat["round"], stat, colour, runs)
            drawn_lines.append(line)
    if not plot.series:
        plt.close(fig)
        return None
    calibration = _shade_calibration((acc_ax, loss_ax), all_runs[0]) if len(all_runs) == 1 else []
    plot.marks["calibration_rounds"] = calibration
    acc_ax.set(xlabel="round", ylabel="test accuracy", title="accuracy vs round (round 0 = zero-shot)")
    loss_ax.set(xlabel="round", ylabel="train loss (client's mean over its steps)", title="train loss vs round")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    legend_below(fig, max((acc_ax, loss_ax), key=lambda ax: len(ax.get_legend_handles_labels()[1])))
    plot.caption = (f"Left: test accuracy of the global model on {examples_text(all_runs)} at "
                    f"{evaluated_rounds(all_runs)}; right: the train loss of rounds "
                    f"{ranges(sorted({int(r) for s in plot.on('train_loss') for r in s.x}))}, "
                    f"{_loss_caption(drawn_lines, single)}"
                    + (f"; shaded: the VPCS calibration ({counted('round', calibration)})" if calibration else "")
                    + ".")
    return plot


def accuracy_vs_uplink(groups: dict[str, list[Run]]) -> Plot | None:
    """Accuracy at every evaluation vs cumulative uplink bytes, one line per group: the
    communication / accuracy trade-off. The x axis is symmetric-log, linear below the smallest
    nonzero byte count's decade, so the zero-shot point (0 bytes) keeps its place at 0."""
    stats = {label: (runs, group_stat(runs, "accuracy", evaluated_only=True)) for label, runs in groups.items()}
    stats = {label: v for label, v in stats.items() if not v[1].empty}
    if not stats:
        return None
    positive = [b for _, stat in stats.values() for b in stat["bytes"] if b > 0]
    # linear up to the decade below the first nonzero count: a narrow stretch that holds only 0
    linthresh = float(10 ** (math.floor(math.log10(min(positive))) - 1)) if positive else 1.0
    fig, ax = plt.subplots(figsize=(8, 4.6), constrained_layout=True)
    plot = Plot(fig, "")
    for colour, (label, (runs, stat)) in zip(colours(len(stats)), stats.items()):
        plot.plot(ax, "uplink", _label(label, runs), stat["bytes"], stat["mean"], "o", color=colour, markersize=4,
                  meta={"rounds": [int(r) for r in stat["round"]]})
        sent = (stat["bytes"] > 0).to_numpy()
        ax.plot(stat["bytes"][sent], stat["mean"][sent], "-", color=colour)
        if not sent.all() and sent.any():  # zero-shot to the first evaluation: across the change of scale
            first = int(np.argmax(sent))
            ax.plot(stat["bytes"].iloc[first - 1: first + 1], stat["mean"].iloc[first - 1: first + 1], ":", color=colour)
        _band(ax, stat["bytes"], stat, colour, runs)
        if len(stats) == 1:
            for r, b, a in zip(stat["round"], stat["bytes"], stat["mean"]):
                ax.annotate("zero-shot" if r == 0 else f"r{int(r)}", (b, a), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
    ax.set_xscale("symlog", linthresh=linthresh, linscale=0.5)
    ax.set_xlim(left=-0.5 * linthresh)
    ax.axvspan(-0.5 * linthresh, linthresh, color="tab:gray", alpha=0.12, linewidth=0,
               label=f"x axis linear from 0 to {linthresh:,.0f} B (the zero-shot point), logarithmic above")
    plot.marks.update(xscale="symlog", linthresh=linthresh)
    ax.set(xlabel="cumulative uplink bytes (all clients)", ylabel="test accuracy", title="accuracy vs communication")
    ax.grid(alpha=0.3, which="both")
    legend_below(fig, ax)
    all_runs = [r for runs, _ in stats.values() for r in runs]
    plot.caption = (f"Test accuracy of the global model on {examples_text(all_runs)} at every evaluation, "
                    f"{evaluated_rounds(all_runs)}, against the bytes all clients had uploaded up to that "
                    f"round (scalars and losses){', one line per method' if len(stats) > 1 else ''}; the x axis is "
                    f"linear from 0 to {linthresh:,.0f} B, so that the zero-shot point stands at 0, and logarithmic above.")
    return plot


def confusion(rows: list[dict]) -> Plot | None:
    """Flagged vs truly extreme clients: one 2 x 2 table per row (label, runs, tp, fp, fn, tn, precision,
    recall), the counts summed over the seeds of a line."""
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
    runs = sum(int(row.get("runs", 1)) for row in rows)
    single = rows[0] if len(rows) == 1 and runs == 1 else None
    who = (f" (flagged: {_ids(single.get('flagged'))}; truly extreme: {_ids(single.get('extreme'))})"
           if single else "")
    what = "of this run" if single else f"for {len(rows)} line(s) ({runs} runs)"
    caption = (f"The early-stopping decision {what} against the partition's truly extreme clients{who}: clients flagged or not (columns) vs truly extreme or not (rows)"
               + ("." if single else ", counts summed over the seeds of a line."))
    return Plot(fig, caption, marks={"tables": [{k: row[k] for k in ("label", "tp", "fp", "fn", "tn")} for row in rows]})


def _ids(text) -> str:
    """"3 4" (a results-table cell) -> "clients 3, 4"."""
    return counted("client", [int(v) for v in str(text or "").split()])


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
