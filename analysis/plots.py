"""What a figure function returns: the matplotlib figure, its one-sentence caption, and the data it
drew (every curve as a Series, plus marks such as round boundaries), so that the report and its
tests can read what a figure shows without looking at pixels. Also the few drawing helpers the
figure modules share (colours, the legend below the plots, compact lists of numbers)."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class Series:
    """One drawn curve (or set of points): the panel it is on, its legend label, its points."""
    panel: str
    label: str
    x: list[float]
    y: list[float]
    meta: dict = field(default_factory=dict)   # e.g. client, round, the clients a mean is over, marker


@dataclass
class Plot:
    fig: plt.Figure
    caption: str                                 # one sentence: what is plotted, over which clients / rounds / examples
    series: list[Series] = field(default_factory=list)
    marks: dict = field(default_factory=dict)    # e.g. round boundaries, the decision, the axis scales

    def on(self, panel: str) -> list[Series]:
        return [s for s in self.series if s.panel == panel]

    def plot(self, ax, panel: str, label: str, x, y, fmt: str = "-", meta: dict | None = None, legend: bool = True,
             **style) -> None:
        """Draw one curve on `ax` and record it (NaN points are kept: matplotlib leaves them out)."""
        x, y = [float(v) for v in x], [float(v) for v in y]
        lines = ax.plot(x, y, fmt, label=label if legend else None, **style)
        marker = lines[0].get_marker() if lines else None
        self.series.append(Series(panel, label, x, y, {**(meta or {}), "marker": None if marker in (None, "None", "")
                                                       else str(marker)}))


def colours(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def legend_below(fig: plt.Figure, ax) -> None:
    """One legend below the plots (labels can be long: method + the keys that vary); the figure
    grows with the number of lines."""
    handles, labels = ax.get_legend_handles_labels()
    ncol = 1 if len(labels) <= 4 else (2 if len(labels) <= 12 else 3)
    labels = [textwrap.fill(label, 150 // ncol) for label in labels]
    lines = sum(max(label.count("\n") + 1 for label in labels[i:i + ncol]) for i in range(0, len(labels), ncol))
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height + 0.2 * lines + 0.3)
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)


def ranges(values) -> str:
    """[1, 2, 3, 5] -> "1-3, 5" (rounds, client ids)."""
    values = sorted(set(int(v) for v in values))
    parts, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}" if j > i + 1
                     else f"{values[i]}, {values[j]}")
        i = j + 1
    return ", ".join(parts)


def counted(word: str, values) -> str:
    """("client", [3, 4]) -> "clients 3, 4"; ("round", [2]) -> "round 2"."""
    values = list(values)
    return f"{word}{'s' if len(values) != 1 else ''} {ranges(values)}" if values else f"no {word}s"
