"""The figures and table of a searched sweep (a sweep.yaml with a `space:`): final accuracy and test
loss against each searched key (log axis for log-sampled keys), the best-so-far curve over trials
in the order the search proposed them, and the best trials.

Proposal order: the sweep's results.parquet (`trial_index`, Tune's trial counter) where it exists,
else the trial folders' names (a sweep still going has no results table yet).
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .figures import plt
from .runs import AnalysisError, Collection

LOG_SAMPLED = ("loguniform", "qloguniform")
TARGETS = (("final_accuracy", "final accuracy", max), ("final_test_loss", "final test loss", min))
METRIC_COLUMNS = {"accuracy": "final_accuracy", "best_accuracy": "best_accuracy", "test_loss": "final_test_loss"}
BEST_SHOWN = 5


def distribution(spec) -> str:
    """`{loguniform: [1e-5, 1e-2]}` -> "loguniform"."""
    return next(iter(spec)) if isinstance(spec, dict) and len(spec) == 1 else "?"


def proposal_order(collection: Collection, table: pd.DataFrame) -> pd.Series:
    """Each row's position in the order the search proposed the trials."""
    path = collection.root / "results.parquet"
    index = {}
    if path.is_file():
        try:
            results = pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
            raise AnalysisError(f"{path}: not a readable results table ({type(exc).__name__})") from None
        if {"trial_index", "run_dir"} <= set(results.columns):  # (older tables: folder names decide)
            index = {Path(str(d)).name: int(i) for i, d in zip(results["trial_index"], results["run_dir"]) if d}
    names = table["run"].tolist()
    known = [index.get(name, math.inf) for name in names]
    ranks = sorted(range(len(names)), key=lambda i: (known[i], names[i]))
    order = [0] * len(names)
    for position, i in enumerate(ranks):
        order[i] = position
    return pd.Series(order, index=table.index)


def against_keys(table: pd.DataFrame, space: dict) -> plt.Figure | None:
    """One column per searched key, rows: final accuracy, final test loss; a dot per trial."""
    keys = [k for k in space if k in table]
    targets = [(c, label) for c, label, _ in TARGETS if c in table and table[c].notna().any()]
    if not keys or not targets:
        return None
    fig, axes = plt.subplots(len(targets), len(keys), figsize=(3.6 * len(keys) + 0.6, 2.8 * len(targets) + 0.4),
                             squeeze=False, layout="constrained")
    for col, key in enumerate(keys):
        x = pd.to_numeric(table[key], errors="coerce")
        categorical = distribution(space[key]) == "choice" and x.isna().any()
        xs = table[key].astype(str) if categorical else x
        for row, (column, label) in enumerate(targets):
            ax = axes[row][col]
            ax.scatter(xs, table[column], s=22, alpha=0.8, color="tab:blue")
            if distribution(space[key]) in LOG_SAMPLED:
                ax.set_xscale("log")
            ax.set_xlabel(f"{key} ({distribution(space[key])})")
            if col == 0:
                ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    return fig


def best_so_far(table: pd.DataFrame, order: pd.Series) -> plt.Figure | None:
    """Per target: every trial's value in proposal order and the best value so far."""
    targets = [(c, label, better) for c, label, better in TARGETS if c in table and table[c].notna().any()]
    if not targets:
        return None
    fig, axes = plt.subplots(1, len(targets), figsize=(5.2 * len(targets), 3.2), squeeze=False, layout="constrained")
    ranked = table.assign(_order=order).sort_values("_order")
    for ax, (column, label, better) in zip(axes[0], targets):
        values = pd.to_numeric(ranked[column], errors="coerce")
        best, curve = None, []
        for value in values:
            if not math.isnan(value):
                best = value if best is None else better(best, value)
            curve.append(math.nan if best is None else best)
        trials = range(1, len(values) + 1)
        ax.scatter(trials, values, s=20, color="tab:blue", alpha=0.7, label="trial")
        ax.step(trials, curve, where="post", color="tab:red", label="best so far")
        ax.set_xlabel("trial (in the order proposed)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    return fig


def best_trials(table: pd.DataFrame, space: dict, metric: str, mode: str, order: pd.Series) -> pd.DataFrame:
    """The BEST_SHOWN best trials by the sweep's metric (final accuracy when it has no column)."""
    column = METRIC_COLUMNS.get(metric, "final_accuracy")
    if column not in table:
        return table.iloc[0:0]
    shown = ["run", *[k for k in space if k in table], "final_accuracy", "best_accuracy", "final_test_loss",
             "status", "rounds"]
    ranked = table.assign(trial=order + 1).dropna(subset=[column])
    ranked = ranked.sort_values(column, ascending=mode == "min", kind="stable")
    return ranked[["trial", *[c for c in shown if c in ranked]]].head(BEST_SHOWN)
