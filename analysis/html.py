"""One self-contained HTML page: figures embedded as base64 PNG (each also linked to its file),
tables with click-to-sort headers (a few lines of inline JavaScript). Opens offline."""
from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
td.t, th.t { text-align: left; }
table.sortable th { cursor: pointer; background: #f4f4f4; }
table.sortable th:hover { background: #e8e8e8; }
.scroll { overflow-x: auto; }
code { background: #f4f4f4; padding: 0 3px; }
"""

SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.dataset.dir !== "asc";
      table.querySelectorAll("th").forEach(function (h) { h.dataset.dir = ""; });
      th.dataset.dir = asc ? "asc" : "desc";
      var body = table.tBodies[0];
      var key = function (row) {
        var cell = row.cells[col], v = cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent.trim();
        return v === "" ? null : (isNaN(Number(v)) ? v : Number(v));
      };
      Array.from(body.rows).sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) { return x === y ? 0 : (x === null ? 1 : -1); }
        var d = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
        return asc ? d : -d;
      }).forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


@dataclass
class Figure:
    file: str          # PNG file name, beside the report
    title: str
    caption: str


def embed(folder: Path, fig: Figure) -> str:
    data = base64.b64encode((folder / fig.file).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(fig.title)}">'
            f'<figcaption><b>{html.escape(fig.title)}.</b> {html.escape(fig.caption)} '
            f'(<a href="{html.escape(fig.file)}">{html.escape(fig.file)}</a>)</figcaption></figure>')


def _cell(value) -> tuple[str, str]:
    """(displayed text, raw sort value) of one table cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "", ""
    if isinstance(value, bool):
        return str(value).lower(), str(value).lower()
    if isinstance(value, int):
        return f"{value:,}", str(value)
    if isinstance(value, float):
        text = f"{value:.4f}" if abs(value) < 1e4 else f"{value:,.0f}"
        return (f"{value:.3g}" if 0 < abs(value) < 1e-3 else text), repr(value)
    return str(value), str(value)


def table(frame: pd.DataFrame, sortable: bool = True) -> str:
    def is_text(column) -> bool:
        return frame[column].map(lambda v: isinstance(v, str) and v != "").any()

    text_columns = {c for c in frame.columns if is_text(c)}
    head = "".join(f'<th class="{"t" if c in text_columns else ""}">{html.escape(str(c))}</th>' for c in frame.columns)
    rows = []
    for record in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, record):
            shown, raw = _cell(value.item() if hasattr(value, "item") else value)
            cls = ' class="t"' if column in text_columns else ""
            cells.append(f'<td{cls} data-v="{html.escape(raw)}">{html.escape(shown)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cls = ' class="sortable"' if sortable else ""
    return (f'<div class="scroll"><table{cls}><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def page(title: str, sections: list[tuple[str, str]]) -> str:
    """`sections`: (heading, HTML body) in order."""
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{content}\n" for h, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}"
            f"<script>{SORT_JS}</script></body></html>\n")
