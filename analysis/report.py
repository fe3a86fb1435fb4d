"""`meerkat-ray analyze DIR`: the figures and one self-contained HTML report for a run folder, a
sweep folder, or a folder of run folders (the default output is DIR/analysis/)."""
from __future__ import annotations

import html
import itertools
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import figures, gradip_plot, search, vpcs_plot
from .html import Figure, embed, page, table
from .methods import SHORT_NAMES, group_runs, method_label, varying_keys
from .plots import Plot
from .runs import AnalysisError, Collection, load
from .tables import flagging_rows, results_table

REPORT = "report.html"
MAX_GRADIP_RUNS = 24
MAX_HEATMAPS = 6
PREFERRED_PAIRS = [("mask.density", "fed.local_steps"), ("vp.sigma", "vp.rho")]  # (x, y)


@dataclass
class Report:
    html: Path
    figures: list[Path] = field(default_factory=list)
    plots: dict[str, Plot] = field(default_factory=dict)  # PNG file name -> what it shows (caption, series, marks)


def analyze(folder: str | Path, out: str | Path | None = None) -> Report:
    """Read the run folders under `folder`, write the PNG figures and report.html into `out`."""
    collection = load(folder)
    out = Path(out) if out is not None else collection.root / "analysis"
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if (out / REPORT).is_file():  # a report of ours: its old figures go, so none is stale
        for old in out.glob("*.png"):
            old.unlink()
    builder = _Builder(collection, out)
    sections = builder.build()
    title = f"meerkat-ray analysis of {collection.root.name or collection.root}"
    _write_text(out / REPORT, page(title, sections))
    return Report(out / REPORT, [out / f.file for f in builder.figures], builder.plots)


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _axis_name(key: str) -> str:
    return f"{SHORT_NAMES[key]} ({key})" if key in SHORT_NAMES else key


def _safe(name: str) -> str:
    return re.sub(r"[^\w.=+-]", "-", name)[:80]


class _Builder:
    def __init__(self, collection: Collection, out: Path):
        self.c, self.out = collection, out
        self.groups = group_runs(collection.runs)
        self.table = results_table(collection)
        if collection.kind == "runs":  # where in the folder (a sweep's trials all sit in runs/)
            self.table["run"] = [str(r.dir.relative_to(collection.root)) for r in collection.runs]
        self.figures: list[Figure] = []
        self.plots: dict[str, Plot] = {}

    def save(self, drawn, file: str, title: str, caption: str = "") -> str:
        """Write the figure's PNG and return its HTML (empty when there was nothing to draw).
        `drawn`: a Plot (its own caption first, then `caption`) or a bare matplotlib Figure."""
        if drawn is None:
            return ""
        fig = drawn.fig if isinstance(drawn, Plot) else drawn
        if isinstance(drawn, Plot):
            self.plots[file] = drawn
            caption = f"{drawn.caption} {caption}".strip()
        fig.savefig(self.out / file, dpi=110)
        figures.plt.close(fig)
        self.figures.append(Figure(file, title, caption))
        return embed(self.out, self.figures[-1])

    def build(self) -> list[tuple[str, str]]:
        sections = [("Overview", self.overview()), ("Accuracy and loss", self.curves())]
        for heading, body in (("GradIP trajectories and the VPCS decision", self.grad_ip()),
                              ("Flagged vs truly extreme clients", self.flagging()),
                              ("Grid", self.heatmaps()),
                              ("Search", self.search())):
            if body:
                sections.append((heading, body))
        shown = [c for c in self.table.columns if c != "run_dir"]
        sections.append(("All runs", "<p>Click a column header to sort.</p>" + table(self.table[shown])))
        self.table.to_csv(self.out / "runs.csv", index=False)
        return sections

    def overview(self) -> str:
        c = self.c
        kind = {"run": "run folder", "sweep": "sweep folder", "runs": "folder of run folders"}[c.kind]
        lines = [f"<p>{html.escape(kind)} <code>{html.escape(str(c.root))}</code>: {len(c.runs)} run(s), "
                 f"{sum(r.finished for r in c.runs)} finished. Written by <code>meerkat-ray analyze</code> from "
                 f"the run folders' files only; <code>runs.csv</code> beside this page holds the table below.</p>"]
        if c.kind == "run":
            run = c.runs[0]
            facts = [("method", method_label(run.config)), ("model", run.get("model.name")),
                     ("task", run.get("data.task")),
                     ("clients / partition", f"{run.get('data.num_clients')} / {run.get('data.partition')}"),
                     ("mask", f"{run.get('mask.kind')}, u={run.get('mask.density')}"),
                     ("rounds R × local steps T", f"{run.get('fed.rounds')} × {run.get('fed.local_steps')}"),
                     ("learning rate / eps", f"{run.get('zo.lr')} / {run.get('zo.eps')}"),
                     ("seed", run.get("seed"))]
            row = self.table.iloc[0]
            facts += [(k.replace("_", " "), row[k]) for k in ("status", "rounds", "zero_shot_accuracy",
                                                             "final_accuracy", "best_accuracy", "uplink_bytes",
                                                             "downlink_bytes", "local_steps")]
            lines.append(table(pd.DataFrame(facts, columns=["", "value"]).astype({"value": object}), sortable=False))
        else:
            counts = pd.DataFrame([(label, len(runs)) for label, runs in self.groups.items()],
                                  columns=["line (method and the keys that vary)", "runs"])
            lines.append(table(counts, sortable=False))
        return "".join(lines)

    def curves(self) -> str:
        many = any(len(v) > 1 for v in self.groups.values())
        band = "Lines are means over the runs that differ only in seed; bands span their min and max." if many else ""
        return (self.save(figures.curves(self.groups), "curves.png", "Accuracy and train loss vs round", band)
                + self.save(figures.accuracy_vs_uplink(self.groups), "accuracy_vs_uplink.png",
                            "Accuracy vs cumulative uplink bytes", band))

    def grad_ip(self) -> str:
        runs = [(i, r) for i, r in enumerate(self.c.runs) if r.has_grad_ip]
        parts = []
        for i, run in runs[:MAX_GRADIP_RUNS]:
            file = "gradip.png" if self.c.kind == "run" else f"gradip_{i:02d}_{_safe(run.name)}.png"
            label = self.table.loc[i, "label"]
            title = f"GradIP per client: {run.name}" + ("" if self.c.kind == "run" else f" — {label}")
            parts.append(self.save(gradip_plot.grad_ip(run, title), file, title,
                                   "Red: truly extreme (single-label) clients; blue: the others. Shaded: the VPCS "
                                   "calibration window (grey) with its early (green) and late (orange) phases; "
                                   "dashed: the decision; X: flagged clients, early-stopped to 1 local step per "
                                   "round from then on."))
            decision_file = "vpcs.png" if self.c.kind == "run" else f"vpcs_{i:02d}_{_safe(run.name)}.png"
            parts.append(self.save(vpcs_plot.decision(run, f"VPCS decision: {run.name}"), decision_file,
                                   f"VPCS decision per client ({run.get('vp.rule', 'paper')} rule): {run.name}"))
            parts.append(self.vpcs_table(run))
        if len(runs) > MAX_GRADIP_RUNS:
            parts.append(f"<p>{len(runs) - MAX_GRADIP_RUNS} more runs with GradIP are not drawn.</p>")
        return "".join(parts)

    @staticmethod
    def vpcs_table(run) -> str:
        """Each client's VPCS statistics at the decision, flagged or not, truly extreme or not."""
        stats = (run.summary or {}).get("vpcs") or {}
        if not stats:
            return ""
        extreme, flagged = run.extreme_clients, set(run.flagged_clients)
        rule = run.get("vp.rule", "paper")
        rows = []
        for k, s in sorted(stats.items(), key=lambda kv: int(kv[0])):
            row = {"client": int(k), "flagged": int(k) in flagged,
                   "truly extreme": (int(k) in extreme) if extreme is not None else None}
            if rule == "paper":
                row.update({"rho_later": s.get("rho_later"), "quiet fraction": s.get("quiet_fraction"),
                            "early |GradIP|": s.get("early", s.get("early_mean")),
                            "late |GradIP|": s.get("late", s.get("late_mean"))})
            else:
                row.update(s)
            rows.append(row)
        decided = run.decided_round
        if rule == "paper":
            stat = (run.summary or {}).get("vp_statistic") or "mean"
            how = (f"on {stat}s of |GradIP| (σ = {run.get('vp.sigma')}, ρ = {run.get('vp.rho')}, "
                   f"quiet fraction > {run.get('vp.min_quiet_fraction')})")
        elif rule == "stepwise":
            how = f"by the stepwise rule (robust z of the relative decay below −{run.get('vp.outlier_z')})"
        else:
            how = f"by the trend rule (Mann-Kendall at level {run.get('vp.trend_alpha')}, Bonferroni)"
        return f"<p>VPCS decided after round {decided} {how}.</p>" + table(pd.DataFrame(rows))

    def flagging(self) -> str:
        rows = flagging_rows(self.groups)
        if not rows:
            return ""
        fig = self.save(figures.confusion(rows), "vpcs_confusion.png", "Flagged vs truly extreme clients",
                        "Early stopping is VPCS, or random stopping for vp.policy=random.")
        frame = pd.DataFrame(rows)[["label", "runs", "flagged", "extreme", "tp", "fp", "fn", "tn", "precision",
                                    "recall"]]
        return fig + table(frame)

    def heatmap_pairs(self) -> list[tuple[str, str]]:
        keys = self.c.grid or varying_keys(self.c.runs)
        axes = [k for k in keys if k in self.table and self.table[k].astype(str).nunique() > 1 and k != "seed"]
        if len(axes) == 1:
            return [(axes[0], "method")]
        pairs = [p for p in PREFERRED_PAIRS if p[0] in axes and p[1] in axes]
        pairs += [p for p in itertools.combinations(axes, 2) if p not in pairs and p[::-1] not in pairs]
        return [p for p in pairs if self.crossed(*p)][:MAX_HEATMAPS]

    def crossed(self, x: str, y: str) -> bool:
        """Whether the runs vary x and y independently (more filled cells than values on either axis),
        not together (two runs that differ in several keys would give a meaningless diagonal)."""
        cells = self.table[[x, y]].astype(str)
        return len(cells.drop_duplicates()) > max(cells[x].nunique(), cells[y].nunique())

    def search(self) -> str:
        """A searched sweep: the metric against each searched key, best so far, the best trials."""
        space = self.c.space
        if not space:
            return ""
        order = search.proposal_order(self.c, self.table)
        metric, mode = self.c.search.get("metric", "accuracy"), self.c.search.get("mode", "max")
        keys = ", ".join(f"<code>{html.escape(k)}</code> ({search.distribution(v)})" for k, v in space.items())
        return (f"<p>{html.escape(str(self.c.search.get('search', 'random')))} search over {keys}; "
                f"{len(self.table)} trials, metric {html.escape(metric)} ({html.escape(mode)}).</p>"
                + self.save(search.against_keys(self.table, space), "search_keys.png",
                            "Final accuracy and test loss against each searched key",
                            "One dot per trial; log axes for log-sampled keys (loguniform, qloguniform).")
                + self.save(search.best_so_far(self.table, order), "search_best_so_far.png",
                            "Best so far over trials", "Each trial's final value in the order the search "
                            "proposed the trials (dots) and the best value up to it (line).")
                + f"<h3>Best trials (by {html.escape(metric)}, {html.escape(mode)})</h3>"
                + table(search.best_trials(self.table, space, metric, mode, order), sortable=False))

    def heatmaps(self) -> str:
        if self.c.kind == "run":
            return ""
        parts = []
        for x, y in self.heatmap_pairs():
            values = ["final_accuracy"]
            if "vp.sigma" in (x, y) or "vp.rho" in (x, y):
                values += [v for v in ("final_test_loss", "flag_precision", "flag_recall") if self.table[v].notna().any()]
            for value in values:
                fig = figures.heatmap(self.table, x, y, value, _axis_name(x), _axis_name(y))
                parts.append(self.save(fig, f"heatmap_{_safe(value)}_{_safe(x)}_{_safe(y)}.png",
                                       f"{value.replace('_', ' ')} over {y} × {x}",
                                       "Mean over the runs in each cell (seeds and any other axes averaged; n = "
                                       "runs per cell)."))
        return "".join(parts)
