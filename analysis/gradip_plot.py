"""The GradIP figure of one run: every client's GradIP over its replayed local steps, round by round.

Each round is its own segment of the x axis, as wide as the most local steps any client ran in it
(the calibration round first, then the T-step rounds), with a grey line at each boundary: a round
starts every client again from a new global model, so no line runs across a boundary. A client
that ran a single step in a round (early-stopped by VPCS) is a dot in that round's segment.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .plots import Plot, counted, plt, ranges
from .runs import Run

EXTREME_COLOUR, IID_COLOUR, UNKNOWN_COLOUR = "tab:red", "tab:blue", "tab:gray"
MAX_CLIENTS_DRAWN = 40
MAX_ROUND_LABELS = 12
CALIBRATION_WHAT = {"first_round": "round 1, aggregated", "probe": "round 1, update discarded",
                    "rounds": "spread over rounds"}


def phase_lengths(steps: int, early_fraction: float, late_fraction: float) -> tuple[int, int]:
    """The early / late phases of the VPCS calibration window (the same rule as the server's)."""
    early = max(1, round(early_fraction * steps))
    late = max(1, min(steps - early, round(late_fraction * steps)))
    return early, late


def round_layout(path: pd.DataFrame) -> tuple[dict[int, int], dict[int, int]]:
    """round -> (x offset of its first step - 1, width = the most local steps a client ran in it)."""
    widths = (path.groupby("round")["step"].max() + 1).sort_index()
    offsets = widths.cumsum() - widths
    return {int(r): int(o) for r, o in offsets.items()}, {int(r): int(w) for r, w in widths.items()}


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


def _colour(client: int, extreme: list[int] | None) -> str:
    return UNKNOWN_COLOUR if extreme is None else (EXTREME_COLOUR if client in extreme else IID_COLOUR)


def _draw_segments(plot: Plot, top, bottom, rows: pd.DataFrame, offsets: dict[int, int], window: int,
                   extreme) -> dict[int, tuple[float, float]]:
    """One segment per (client, round), a dot where it is a single step; returns (client, round) ->
    (x, running mean of |GradIP|) of that segment's last step (where the decision's X goes)."""
    last = {}
    for (k, r), seg in rows.groupby(["client", "round"], sort=True):
        k, r = int(k), int(r)
        x = offsets[r] + seg["step"].to_numpy() + 1
        values = seg["grad_ip"].to_numpy(dtype=float)
        rolled = rolling_abs(values, window)
        style = dict(color=_colour(k, extreme), alpha=0.7, markersize=3.5)
        fmt = "o" if len(values) == 1 else "-"
        meta = {"client": k, "round": r}
        plot.plot(top, "grad_ip", f"client {k}", x, values, fmt, meta=meta, legend=False, linewidth=0.7, **style)
        plot.plot(bottom, "abs_grad_ip", f"client {k}", x, rolled, fmt, meta=meta, legend=False, linewidth=1.2,
                  **style)
        last[(k, r)] = (float(x[-1]), float(rolled[-1]))
    return last


def _mark_rounds(plot: Plot, axes, offsets: dict[int, int], widths: dict[int, int], decided: int | None) -> None:
    """A grey line at every round boundary (the decision's is dashed black), round numbers on top."""
    rounds = sorted(offsets)
    boundaries = {r: offsets[r] + 0.5 for r in rounds[1:]}
    for r, x in boundaries.items():
        for ax in axes:
            if decided is not None and r == decided + 1:
                ax.axvline(x, color="black", linestyle="--", linewidth=1)
            else:
                ax.axvline(x, color="tab:gray", linewidth=0.8, alpha=0.7)
    if decided is not None and decided == rounds[-1]:  # decided after the last round: no boundary there
        for ax in axes:
            ax.axvline(offsets[decided] + widths[decided] + 0.5, color="black", linestyle="--", linewidth=1)
    every = max(1, math.ceil(len(rounds) / MAX_ROUND_LABELS))
    for r in rounds[::every]:
        axes[0].text(offsets[r] + 0.5 + widths[r] / 2, 0.98, f"round {r}", transform=axes[0].get_xaxis_transform(),
                     ha="center", va="top", fontsize=7, color="dimgray")
    plot.marks.update(rounds=rounds, round_spans={r: (offsets[r] + 0.5, offsets[r] + widths[r] + 0.5) for r in rounds},
                      boundaries=list(boundaries.values()),
                      decision=offsets[decided] + widths[decided] + 0.5 if decided in offsets else None)


def _shade_calibration(plot: Plot, axes, run: Run, rows: pd.DataFrame, offsets: dict[int, int]) -> list:
    """The calibration window with its early / late phases (in the x positions of the client that
    ran the most calibration steps); the legend entries it adds."""
    calib = run.get("vp.calib_steps")
    rounds = run.calibration_rounds
    if not (run.get("vp.enabled") and calib and rounds):
        return []
    calib_rows = rows[rows["round"].isin(rounds)]
    longest = calib_rows.groupby("client").size().idxmax()
    own = calib_rows[calib_rows["client"] == longest].sort_values(["round", "step"])
    xs = (own["round"].map(offsets) + own["step"] + 1).to_numpy()[: int(calib)]
    early, late = phase_lengths(len(xs), float(run.get("vp.early_fraction", 0.2)), float(run.get("vp.late_fraction", 0.5)))
    for ax in axes:
        ax.axvspan(0.5, xs[-1] + 0.5, color="tab:gray", alpha=0.06)
        ax.axvspan(xs[0] - 0.5, xs[early - 1] + 0.5, color="tab:green", alpha=0.08)
        ax.axvspan(xs[len(xs) - late] - 0.5, xs[-1] + 0.5, color="tab:orange", alpha=0.08)
    plot.marks["calibration"] = (0.5, float(xs[-1] + 0.5))
    what = CALIBRATION_WHAT.get(run.get("vp.calibration", "rounds"), run.get("vp.calibration"))
    return [Patch(color="tab:gray", alpha=0.2, label=f"VPCS calibration ({calib} steps, {what})"),
            Patch(color="tab:green", alpha=0.25, label="VPCS early phase"),
            Patch(color="tab:orange", alpha=0.25, label="VPCS late phase")]


def _steps_text(run: Run, rows: pd.DataFrame, flagged: set[int]) -> str:
    """"round 1: 30 local steps per client; rounds 2-4: 8 (the flagged clients 3, 4: 1)"."""
    counts = rows.groupby(["round", "client"]).size().rename("steps").reset_index()
    calibration, decided = set(run.calibration_rounds), run.decided_round
    later = counts[~counts["round"].isin(calibration)]
    parts = []
    if calibration:
        c = counts[counts["round"].isin(calibration)]["steps"]
        parts.append(f"{counted('round', calibration)}, the VPCS calibration: {int(c.max())} local steps per client")
    if len(later):
        full = later[~later["client"].isin(flagged) | (later["round"] <= (decided or 0))]["steps"]
        text = f"{counted('round', later['round'].unique())}: {int(full.max()) if len(full) else 0} per client"
        stopped = later[later["client"].isin(flagged) & (later["round"] > (decided or 0))]["steps"]
        if len(stopped):
            text += f", {ranges(stopped.unique())} for the flagged {counted('client', flagged)}"
            text += " (drawn as dots)" if stopped.max() == 1 else ""
        parts.append(text)
    return "; ".join(parts)


def grad_ip(run: Run, title: str) -> Plot | None:
    """GradIP per client, round by round; extreme clients red, others blue; the calibration window's
    early / late phases shaded; the decision dashed, with an X on each flagged client."""
    if not run.has_grad_ip:
        return None
    rows = run.path.dropna(subset=["grad_ip"]).sort_values(["client", "round", "step"])
    extreme, flagged, decided = run.extreme_clients, set(run.flagged_clients), run.decided_round
    clients = sorted({int(k) for k in rows["client"]})
    shown = sorted(clients, key=lambda k: (extreme is not None and k not in extreme, k))[:MAX_CLIENTS_DRAWN]
    rows = rows[rows["client"].isin(shown)]
    offsets, widths = round_layout(rows)
    window = max(1, min(10, max(widths.values()) // 10))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True, constrained_layout=True)
    plot = Plot(fig, "")
    last = _draw_segments(plot, top, bottom, rows, offsets, window, extreme)
    typical = float(np.nanmedian(np.abs(rows["grad_ip"].to_numpy(dtype=float))))
    top.set_yscale("symlog", linthresh=10.0 ** round(math.log10(typical)) if typical > 0 else 1.0)
    bottom.set_yscale("log")
    handles = [Line2D([], [], color=EXTREME_COLOUR, label="truly extreme client"),
               Line2D([], [], color=IID_COLOUR, label="other client")] if extreme is not None else \
              [Line2D([], [], color=UNKNOWN_COLOUR, label="client (extreme ones unknown)")]
    handles.append(Line2D([], [], color="tab:gray", linewidth=0.8, label="round boundary"))
    handles += _shade_calibration(plot, (top, bottom), run, rows, offsets)
    threshold = quiet_threshold(run) if run.get("vp.enabled") else None
    if threshold:
        bottom.axhline(threshold, color="black", linestyle=":", linewidth=1)
        handles.append(Line2D([], [], color="black", linestyle=":", label="quiet below σ × population reference"))
    _mark_rounds(plot, (top, bottom), offsets, widths, decided)
    if decided is not None:
        handles.append(Line2D([], [], color="black", linestyle="--", label=f"decision (end of round {decided})"))
        for k in sorted(flagged & set(shown)):
            if (k, decided) in last:
                bottom.plot(*last[(k, decided)], marker="X", markersize=11, color="black", linestyle="none")
        if flagged:
            handles.append(Line2D([], [], marker="X", color="black", linestyle="none", markersize=9,
                                  label=f"flagged: {', '.join(map(str, sorted(flagged)))}"))
        if any(len(s.x) == 1 for s in plot.on("grad_ip")):
            handles.append(Line2D([], [], marker="o", color="tab:gray", linestyle="none", markersize=4,
                                  label="a client's single step in a round"))
    top.set(ylabel="GradIP (symlog)", title=title)
    bottom.set(xlabel="local step within each round (rounds side by side)",
               ylabel=f"|GradIP|, running mean of {window} within a round")
    for ax in (top, bottom):
        ax.grid(alpha=0.3, axis="y")
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncol=3, frameon=False)
    if len(shown) < len(clients):
        bottom.text(0.01, 0.02, f"{len(shown)} of {len(clients)} clients drawn", transform=bottom.transAxes, fontsize=8)
    who = counted("client", shown) + (f" of {len(clients)}" if len(shown) < len(clients) else "")
    plot.caption = (f"GradIP = scalar × ⟨g_pre, z⟩ of every replayed local step of {who} over "
                    f"{counted('round', offsets)}, each round its own segment between grey lines "
                    f"({_steps_text(run, rows, flagged)}); top: the raw values (symmetric log scale), bottom: "
                    + (f"the running mean of |GradIP| over {window} steps within a round" if window > 1 else "|GradIP|")
                    + " (log scale).")
    return plot
