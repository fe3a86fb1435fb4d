"""What both backends and both kinds of tracked run share: the ids file, the warning line, the
conversion of a config and of a metrics row to tracked values, absolute store URIs, and the
`analyze` figures logged as artifacts.

tracking.json in a run (or sweep) folder keeps the tracked runs' ids, so `run --resume` and a
resumed sweep continue the same runs.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

from ..runlog import write_json

TRACKING_FILE = "tracking.json"   # in the run (or sweep) folder: the tracked runs' ids


def warn(message: str) -> None:
    print(f"warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def flat(data: dict, prefix: str = "") -> dict:
    """{"zo": {"lr": 1e-3}} -> {"zo.lr": 1e-3}."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def numbers(row: dict) -> dict[str, float]:
    """The numeric values of a metrics row (bools and lists left out; their counts kept)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, bool) or key == "round":
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
        elif isinstance(value, list) and key.endswith("_clients"):
            out[f"num_{key.removesuffix('_clients')}"] = float(len(value))  # flagged_clients -> num_flagged
    return out


def absolute_uri(uri: str) -> str:
    """A file or sqlite URI with a relative path made absolute: Tune trials run in their own
    working directory, and `run --resume` may start elsewhere."""
    match = re.fullmatch(r"(sqlite:///)(.+)", uri)
    if match and not match.group(2).startswith("/") and match.group(2) != ":memory:":
        return match.group(1) + str(Path(match.group(2)).absolute())
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return "file:" + str(Path(uri[5:]).absolute())
    if ":" not in uri:
        return str(Path(uri).absolute())
    return uri


def read_ids(folder: Path) -> dict:
    path = folder / TRACKING_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def write_ids(folder: Path, ids: dict) -> None:
    if folder.is_dir():
        write_json(folder / TRACKING_FILE, {**read_ids(folder), **ids})


def draw_figures(folder: Path, out: Path) -> list[Path]:
    """The `analyze` report of a run or sweep folder into `out`; a failure is a warning (no figures)."""
    try:
        from analysis import analyze

        report = analyze(folder, out)
        return list(report.figures)
    except Exception as exc:  # noqa: BLE001 - figures are a nicety of tracking, never a failure
        warn(f"{folder}: no figures for tracking ({type(exc).__name__}: {exc})")
        return []
