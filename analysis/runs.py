"""Reading run folders and finding them: a run folder, a sweep folder, or any folder of run folders.

Only the files of the run-folder contract are read (config.yaml, metrics.jsonl, path.parquet,
clients.json, summary.json; a sweep's sweep.yaml), with yaml / json / pandas: never the training
code, never torch. A run that is still going (no summary.json yet) is read as far as it got.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

MAX_DEPTH = 4  # how deep a folder of run folders is searched (sweeps/<sweep>/runs/<trial> is 3)


class AnalysisError(Exception):
    """Not a run, sweep or runs folder, or an unreadable file; the message names the path."""


@dataclass(eq=False)
class Run:
    dir: Path
    config: dict                      # config.yaml, nested as written
    metrics: pd.DataFrame             # metrics.jsonl, one row per round (round 0 = zero-shot)
    path: pd.DataFrame | None         # path.parquet (None when absent)
    summary: dict | None              # summary.json (None while the run is going)
    clients: list[dict] | None        # clients.json (None when absent)

    @property
    def name(self) -> str:
        return self.dir.name

    def get(self, dotted: str, default=None):
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def rounds_done(self) -> int:
        return int(self.metrics["round"].max()) if len(self.metrics) else 0

    @property
    def evaluated(self) -> pd.DataFrame:
        """Rounds with an accuracy, with the cumulative uplink / downlink bytes at that round."""
        m = self.metrics
        return m[m["accuracy"].notna()] if "accuracy" in m else m.iloc[0:0]

    def last(self, column: str):
        if column not in self.metrics:
            return None
        values = self.metrics[column].dropna()
        return None if values.empty else values.iloc[-1]

    @property
    def final_accuracy(self):
        if self.summary and self.summary.get("final_accuracy") is not None:
            return self.summary["final_accuracy"]
        return self.last("accuracy")

    @property
    def extreme_clients(self) -> list[int] | None:
        """The truly extreme clients, where the partition knows them."""
        if self.clients is not None:
            return sorted(int(c["client"]) for c in self.clients if c.get("extreme"))
        if self.summary and self.summary.get("extreme_clients") is not None:
            return sorted(int(k) for k in self.summary["extreme_clients"])
        return None

    @property
    def num_clients(self) -> int:
        if self.clients is not None:
            return len(self.clients)
        return int(self.get("data.num_clients", 0) or 0)

    @property
    def flagged_clients(self) -> list[int]:
        if self.summary and self.summary.get("flagged_clients") is not None:
            return sorted(int(k) for k in self.summary["flagged_clients"])
        flagged = self.metrics["flagged_clients"].dropna() if "flagged_clients" in self.metrics else []
        return sorted(int(k) for k in flagged.iloc[-1]) if len(flagged) else []

    @property
    def decided_round(self) -> int | None:
        """The round after which the early-stopping policy decided (None: not (yet) decided)."""
        if self.summary and "vp_decided_round" in self.summary:
            return self.summary["vp_decided_round"]
        if "vp_decided" in self.metrics:
            decided = self.metrics[self.metrics["vp_decided"].fillna(False).astype(bool)]
            if len(decided):
                return int(decided["round"].iloc[0])
        return None

    @property
    def num_test(self) -> int | None:
        """Test examples every evaluation scores (summary.json; the config's data.num_test while going)."""
        if self.summary and self.summary.get("num_test") is not None:
            return int(self.summary["num_test"])
        value = self.get("data.num_test")
        return int(value) if value else None

    @property
    def calibration_rounds(self) -> list[int]:
        """The rounds that recorded VPCS calibration steps (metrics.jsonl's `calibration`)."""
        if "calibration" not in self.metrics:
            return []
        flags = self.metrics["calibration"].astype(object).where(self.metrics["calibration"].notna(), False)
        return [int(r) for r, c in zip(self.metrics["round"], flags) if bool(c) and r > 0]

    def client_losses(self) -> pd.DataFrame | None:
        """round, client, train_loss: each client's mean loss over its own local steps of the round
        (metrics.jsonl's `client_train_loss`; None for runs written before it was recorded)."""
        if "client_train_loss" not in self.metrics:
            return None
        rows = [(int(r), int(k), v) for r, losses in zip(self.metrics["round"], self.metrics["client_train_loss"])
                if isinstance(losses, dict) for k, v in losses.items()]
        frame = pd.DataFrame(rows, columns=["round", "client", "train_loss"])
        frame["train_loss"] = pd.to_numeric(frame["train_loss"], errors="coerce")
        return frame

    @property
    def has_grad_ip(self) -> bool:
        return self.path is not None and len(self.path) > 0 and bool(self.path["grad_ip"].notna().any())


@dataclass
class Collection:
    """What `analyze` was pointed at: one run, a Tune sweep, or a folder of run folders."""

    root: Path
    kind: str                                   # run | sweep | runs
    runs: list[Run]
    grid: dict[str, list] = field(default_factory=dict)  # a sweep's grid axes (dotted key -> values)
    space: dict[str, dict] = field(default_factory=dict)  # a searched sweep's space (dotted key -> {dist: args})
    search: dict = field(default_factory=dict)            # its search settings (search, metric, mode, ...)


def is_run_dir(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and (folder / "metrics.jsonl").is_file()


def is_sweep_dir(folder: Path) -> bool:
    return (folder / "sweep.yaml").is_file() and (folder / "runs").is_dir()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as exc:
        raise AnalysisError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError:
        raise AnalysisError(f"{path}: malformed YAML") from None
    if not isinstance(data, dict):
        raise AnalysisError(f"{path}: expected a mapping")
    return data


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise AnalysisError(f"{path}: malformed JSON (line {exc.lineno})") from None


def read_metrics(path: Path) -> pd.DataFrame:
    rows = []
    for i, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise AnalysisError(f"{path}: line {i} is not JSON") from None
        if not isinstance(row, dict) or "round" not in row:
            raise AnalysisError(f"{path}: line {i} has no 'round'")
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame({"round": pd.Series(dtype="int64")})
    for column in ("accuracy", "train_loss", "test_loss", "uplink_bytes", "downlink_bytes", "wall_s"):
        if column not in frame:
            frame[column] = np.nan
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame = frame.sort_values("round", ignore_index=True)
    frame["cum_uplink_bytes"] = frame["uplink_bytes"].fillna(0).cumsum()
    frame["cum_downlink_bytes"] = frame["downlink_bytes"].fillna(0).cumsum()
    return frame


def read_path(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise AnalysisError(f"{path}: not a readable parquet file ({type(exc).__name__})") from None
    missing = {"round", "client", "step", "grad_ip"} - set(frame.columns)
    if missing:
        raise AnalysisError(f"{path}: missing columns {sorted(missing)}")
    if "perturbation" in frame:  # zo.num_perturbations > 1: one row per step, its GradIP the sum over directions
        keys = ["round", "client", "step"]
        first = frame[frame["perturbation"] == 0].set_index(keys)
        first["grad_ip"] = frame.groupby(keys)["grad_ip"].sum(min_count=1)
        frame = first.reset_index().drop(columns="perturbation")
    return frame


def load_run(folder: str | Path) -> Run:
    folder = Path(folder)
    if not is_run_dir(folder):
        raise AnalysisError(f"{folder}: not a run folder (it needs config.yaml and metrics.jsonl)")
    clients = _read_json(folder / "clients.json")
    return Run(dir=folder, config=_read_yaml(folder / "config.yaml"), metrics=read_metrics(folder / "metrics.jsonl"),
               path=read_path(folder / "path.parquet"), summary=_read_json(folder / "summary.json"),
               clients=clients if isinstance(clients, list) else None)


def find_run_dirs(folder: Path, depth: int = MAX_DEPTH) -> list[Path]:
    """Run folders at or below `folder` (not inside one another), sorted by path."""
    if is_run_dir(folder):
        return [folder]
    if depth == 0:
        return []
    found = []
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    for child in children:
        found += find_run_dirs(child, depth - 1)
    return found


def load(folder: str | Path) -> Collection:
    """A run folder, a sweep folder (sweep.yaml + runs/) or a folder holding run folders."""
    root = Path(folder)
    if not root.exists():
        raise AnalysisError(f"{root}: no such folder")
    if not root.is_dir():
        raise AnalysisError(f"{root}: not a folder")
    if is_run_dir(root):
        return Collection(root, "run", [load_run(root)])
    if is_sweep_dir(root):
        spec = _read_yaml(root / "sweep.yaml")
        grid = spec.get("grid") or {}
        runs = [load_run(d) for d in find_run_dirs(root / "runs", depth=1)]
        if not runs:
            raise AnalysisError(f"{root}: a sweep folder without any trial run folder in runs/ yet")
        space = spec.get("space") if isinstance(spec.get("space"), dict) else {}
        search = spec.get("search") if isinstance(spec.get("search"), dict) else {}
        return Collection(root, "sweep", runs, {k: list(v) for k, v in grid.items() if isinstance(v, list)},
                          {k: v for k, v in space.items() if isinstance(v, dict)}, search)
    dirs = find_run_dirs(root)
    if not dirs:
        raise AnalysisError(f"{root}: not a run folder (config.yaml + metrics.jsonl), a sweep folder "
                            f"(sweep.yaml + runs/) or a folder holding run folders")
    return Collection(root, "runs", [load_run(d) for d in dirs])
