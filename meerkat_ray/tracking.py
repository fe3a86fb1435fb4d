"""Experiment tracking: MLflow and Weights & Biases runs that mirror a run folder.

    tracking: {mlflow_uri: "sqlite:///mlruns.db"}          # or http://127.0.0.1:5000, or a folder
    tracking: {wandb_project: meerkat}                     # WANDB_MODE=offline (the default) or online

One tracked run per federation (`run`, or one Tune trial): params = the resolved config (dotted
keys), every round's numbers from metrics.jsonl with the round as step (round 0 = zero-shot), and
at the end the run folder's summary.json, config.yaml, clients.json, metrics.jsonl and the
`analyze` figures and report as artifacts. A sweep (`tune`) has a parent run of its own (its
settings, the metric of every trial in proposal order with the best so far, results.csv and the
sweep's figures), and its trials are nested under it (MLflow: the parent run id; W&B: the group).

Failures: a tracking URI that no server answers, a store that cannot be opened, W&B online without
an API key are errors when the run starts (one `error:` line, before any model loads). Once a run
is going, a tracking failure is one warning on stderr and tracking of that run stops; the run, its
folder and its checkpoints go on untouched. Inside a Tune trial even the start is a warning only:
the sweep checked the URI before Ray started. tracking.json in the run folder keeps the tracked
runs' ids, so `run --resume` and a resumed sweep continue the same runs.

The MLflow client retries a failing request a few times (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default
here 2, each at most MLFLOW_HTTP_REQUEST_TIMEOUT s, default here 20) instead of its own minutes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .config import Config, to_dict
from .errors import MeerkatError
from .runlog import read_metrics, write_json

TRACKING_FILE = "tracking.json"   # in the run (or sweep) folder: the tracked runs' ids
ARTIFACTS = ("summary.json", "config.yaml", "clients.json", "metrics.jsonl")
WANDB_MODES = ("offline", "online", "disabled")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


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


# ----------------------------------------------------------------------------- MLflow

def mlflow_client(uri: str):
    """A client of the store at `uri`, checked to answer (MeerkatError naming the key otherwise)."""
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its INFO lines about creating tables
    if uri.startswith(("http://", "https://")):  # one bounded probe instead of the client's retries
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as answer:
                answer.read()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise MeerkatError(f"tracking.mlflow_uri: no MLflow server answers at {uri} ({reason})") from None
    if uri.startswith("sqlite:///"):  # SQLite creates the file, not its folder
        Path(uri.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - the stores raise many types (SQLAlchemy, REST, OS)
        raise MeerkatError(f"tracking.mlflow_uri: cannot open the MLflow store at {uri} "
                           f"({type(exc).__name__}: {str(exc)[:200]})") from None
    return client


def experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created when missing (several trials may race to create it).
    With a sqlite store the artifacts go beside the database file (mlartifacts/NAME), not into
    whatever folder the creating process runs in."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    uri = client.tracking_uri
    location = None
    if uri.startswith("sqlite:///") and not uri.endswith(":memory:"):
        location = str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / re.sub(r"[^\w.-]", "-", name))
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - created meanwhile by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class MlflowRun:
    """One MLflow run, written through MlflowClient (no global state: safe in Tune trials)."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, client, experiment: str, name: str, params: dict, parent: str = "", run_id: str = "",
             tags: dict | None = None) -> "MlflowRun":
        """Continue run `run_id` where given (and still there), else create one with `params`."""
        from mlflow.entities import Param, RunStatus

        if run_id:
            try:
                client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                return cls(client, run_id)
            except Exception:  # noqa: BLE001 - deleted meanwhile: start a new one
                pass
        run_tags = {"mlflow.runName": name, **(tags or {})}
        if parent:
            run_tags["mlflow.parentRunId"] = parent
        run = client.create_run(experiment_id(client, experiment), run_name=name, tags=run_tags)
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run.info.run_id, params=items[i:i + 100])
        return cls(client, run.info.run_id)

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def artifacts(self, files: list[Path], folder: Path | None = None, under: str = "") -> None:
        for path in files:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        if folder is not None and folder.is_dir() and any(folder.iterdir()):
            self.client.log_artifacts(self.run_id, str(folder), artifact_path=under or None)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


# ----------------------------------------------------------------------------- W&B

def wandb_mode() -> str:
    return os.environ.get("WANDB_MODE", "offline")


def check_wandb() -> None:
    mode = wandb_mode()
    if mode not in WANDB_MODES:
        raise MeerkatError(f"tracking.wandb_project: WANDB_MODE must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
    import wandb

    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
        raise MeerkatError("tracking.wandb_project: WANDB_MODE=online needs a W&B API key (`wandb login` or "
                           "WANDB_API_KEY); WANDB_MODE=offline writes the run to RUN_DIR/wandb/ for a later `wandb sync`")


class WandbRun:
    """One W&B run whose files live in the run folder (RUN_DIR/wandb/)."""

    def __init__(self, run):
        self.run = run

    @classmethod
    def open(cls, project: str, folder: Path, name: str, group: str, params: dict, run_id: str) -> "WandbRun":
        import wandb

        settings = wandb.Settings(console="off", silent=True, save_code=False, disable_git=True,
                                  x_disable_stats=True)
        run = wandb.init(project=project, dir=str(folder), name=name, group=group or None, config=params,
                         id=run_id, resume="allow", mode=wandb_mode(), settings=settings, reinit="create_new")
        return cls(run)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def artifacts(self, summary: dict, figures: list[Path], step: int) -> None:
        import wandb

        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        if figures:
            self.run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures}, step=step)

    def end(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


# ----------------------------------------------------------------------------- one federation

class Tracker:
    """Tracking of one federation. `start` before the run (errors there are errors when `strict`),
    `on_round` from `federate`'s callback, then `finish(summary)` or `fail(exc)`. Never raises
    after `start`: a failure is one warning and that backend stops."""

    def __init__(self, cfg: Config, strict: bool):
        self.cfg, self.strict = cfg, strict
        self.t = cfg.tracking
        self.run_dir = cfg.run_dir
        self.params = {k: v for k, v in flat(to_dict(cfg)).items() if not k.startswith("tracking.")}
        self.mlflow: MlflowRun | None = None
        self.wandb: WandbRun | None = None
        self.use_wandb = bool(self.t.wandb_project)  # until W&B fails
        self.wandb_id = ""
        self.logged_round = -1

    @property
    def active(self) -> bool:
        return bool(self.mlflow or self.use_wandb)

    @classmethod
    def start(cls, cfg: Config, strict: bool = True, resumed: bool = False) -> "Tracker":
        tracker = cls(cfg, strict)
        ids = read_ids(cfg.run_dir) if resumed else {}
        tracker.logged_round = int(ids.get("logged_round", -1))  # a resumed run's recomputed rounds are the same
        if cfg.tracking.mlflow_uri:
            tracker._start("MLflow", lambda: tracker._open_mlflow(ids.get("mlflow_run_id", "")))
        if cfg.tracking.wandb_project:
            tracker.use_wandb = tracker._start("W&B", check_wandb)
            tracker.wandb_id = ids.get("wandb_run_id") or _wandb_id()
        return tracker

    def _start(self, what: str, fn) -> bool:
        """fn() succeeded; a failure is an error when strict, else a warning (and False)."""
        try:
            fn()
            return True
        except Exception as exc:  # noqa: BLE001
            if self.strict:
                if isinstance(exc, MeerkatError):
                    raise
                raise MeerkatError(f"tracking: {what} could not start ({type(exc).__name__}: {exc})") from None
            warn(f"{self.cfg.name}: {what} tracking is off for this run: {exc}")
            return False

    def _open_mlflow(self, run_id: str) -> None:
        client = mlflow_client(absolute_uri(self.t.mlflow_uri))
        self.mlflow = MlflowRun.open(client, self.t.mlflow_experiment, self.cfg.name, self.params,
                                     parent=self.t.mlflow_parent_run, run_id=run_id,
                                     tags={"meerkat.run_dir": str(self.run_dir.absolute())})

    def _guard(self, what: str, fn) -> None:
        """Run fn; on failure warn once and stop that backend (the run goes on)."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - tracking must never end a federation
            warn(f"{self.cfg.name}: {what} tracking stopped ({type(exc).__name__}: {str(exc)[:300]}); "
                 f"the run folder {self.run_dir} has everything")
            if what == "MLflow":
                self.mlflow = None
            else:
                self.wandb, self.use_wandb = None, False

    def on_round(self, round_: int, metrics: dict, last: dict, checkpoint=None) -> None:
        """`federate`'s per-round callback: log the rows of metrics.jsonl not logged yet (round 0,
        the zero-shot evaluation, comes with round 1; a resumed run skips the rounds tracking.json
        says were logged: recomputed after the checkpoint, they hold the same numbers)."""
        if not self.active:
            return
        ids = {}
        if self.mlflow:
            ids["mlflow_run_id"] = self.mlflow.run_id
        if self.use_wandb:
            ids["wandb_run_id"] = self.wandb_id
            if self.wandb is None:
                self._guard("W&B", self._open_wandb)
        write_ids(self.run_dir, ids)  # the ids first: a run killed from here on is continued, not duplicated
        rows = [r for r in read_metrics(self.run_dir) if r["round"] > self.logged_round]
        for row in rows:
            values = numbers(row)
            if row["round"] == round_:
                values["best_accuracy"] = float(last["best_accuracy"])
            if self.mlflow:
                self._guard("MLflow", lambda: self.mlflow.log(values, row["round"]))
            if self.wandb:
                self._guard("W&B", lambda: self.wandb.log(values, row["round"]))
        self.logged_round = max([self.logged_round, *(r["round"] for r in rows)])
        write_ids(self.run_dir, {"logged_round": self.logged_round})

    def _open_wandb(self) -> None:
        self.wandb = WandbRun.open(self.t.wandb_project, self.run_dir, self.cfg.name, self.t.wandb_group,
                                   self.params, self.wandb_id)

    def finish(self, summary: dict) -> None:
        """Artifacts: the run folder's small files and the `analyze` figures and report (from the
        storage URI where output_dir is one: the local copy is gone by now)."""
        if not (self.mlflow or self.wandb):
            return
        from .storage import local_copy, run_location

        try:
            with local_copy(run_location(self.cfg), skip=("tb", "wandb")) as folder:
                self._finish(summary, Path(folder))
        except Exception as exc:  # noqa: BLE001 - the download of a stored run folder failed
            warn(f"{self.cfg.name}: no artifacts tracked, the run folder at {run_location(self.cfg)} could not be "
                 f"read ({type(exc).__name__}: {str(exc)[:300]})")

    def _finish(self, summary: dict, run_dir: Path) -> None:
        step = int(summary.get("rounds", 0))
        totals = {f"summary.{k}": float(v) for k, v in summary.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        with tempfile.TemporaryDirectory(prefix="meerkat-figures-") as tmp:
            figures = draw_figures(run_dir, Path(tmp))

            def close_mlflow():
                self.mlflow.log(totals, step)
                self.mlflow.artifacts([run_dir / f for f in ARTIFACTS], Path(tmp), "analysis")
                self.mlflow.end("FINISHED")

            def close_wandb():
                self.wandb.artifacts(summary, figures, step)
                self.wandb.end(0)

            if self.mlflow:
                self._guard("MLflow", close_mlflow)
            if self.wandb:
                self._guard("W&B", close_wandb)

    def fail(self, exc: BaseException) -> None:
        """The run stopped with an exception: mark the tracked runs (KILLED for an interrupt)."""
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        if self.mlflow:
            self._guard("MLflow", lambda: self.mlflow.end(status))
        if self.wandb:
            self._guard("W&B", lambda: self.wandb.end(1))


def _wandb_id() -> str:
    import uuid

    return uuid.uuid4().hex[:12]


def draw_figures(folder: Path, out: Path) -> list[Path]:
    """The `analyze` report of a run or sweep folder into `out`; a failure is a warning (no figures)."""
    try:
        from analysis import analyze

        report = analyze(folder, out)
        return list(report.figures)
    except Exception as exc:  # noqa: BLE001 - figures are a nicety of tracking, never a failure
        warn(f"{folder}: no figures for tracking ({type(exc).__name__}: {exc})")
        return []


def run_tracked(cfg: Config, run=None, resume=None, **kwargs) -> dict:
    """`run(cfg, resume=..., on_round=..., **kwargs)` (default `runner.run_experiment`) with
    tracking: started first (a tracking error stops nothing that ran), fed by the round callback,
    closed with the summary (or the failure)."""
    if run is None:
        from .runner import run_experiment as run

    tracker = Tracker.start(cfg, strict=True, resumed=resume is not None)
    if not tracker.active:
        return run(cfg, resume=resume, **kwargs)
    inner = kwargs.pop("on_round", None)

    def on_round(*args):
        tracker.on_round(*args)
        if inner:
            inner(*args)

    try:
        summary = run(cfg, resume=resume, on_round=on_round, **kwargs)
    except BaseException as exc:
        tracker.fail(exc)
        raise
    tracker.finish(summary)
    return summary


# ----------------------------------------------------------------------------- a sweep

RUN_STATUS = {"done": "FINISHED", "stopped": "KILLED", "error": "FAILED"}  # results.csv status -> MLflow
CURVES = (("final_accuracy", max), ("final_test_loss", min))  # parent-run metrics per trial, best so far


class SweepTracking:
    """The parent run of a sweep: `start` before the sweep folder is touched (errors are errors),
    `attach` once it exists, `finish` with the results table. Trials log their own runs, nested
    under it through the tracking.* keys of `trial_base`."""

    def __init__(self, sweep, parent: MlflowRun | None):
        self.sweep, self.parent = sweep, parent

    @classmethod
    def start(cls, sweep, resume: bool) -> "SweepTracking":
        t = sweep.configs[0].tracking
        if t.wandb_project:
            check_wandb()
        if not t.mlflow_uri:
            return cls(sweep, None)
        client = mlflow_client(absolute_uri(t.mlflow_uri))
        run_id = read_ids(sweep.folder).get("mlflow_run_id", "") if resume else ""
        s = sweep.tune
        params = {"tune.search": s.search, "tune.seed": s.seed, "tune.num_samples": s.num_samples,
                  "tune.metric": s.metric, "tune.mode": s.mode, "tune.scheduler": s.scheduler,
                  "tune.max_concurrent_trials": s.max_concurrent_trials,
                  **{f"grid.{k}": v for k, v in sweep.grid.items()},
                  **{f"space.{k}": v for k, v in sweep.space.items()}}
        try:
            parent = MlflowRun.open(client, t.mlflow_experiment, s.name, params, run_id=run_id,
                                    tags={"meerkat.sweep_dir": str(sweep.folder)})
        except Exception as exc:  # noqa: BLE001
            raise MeerkatError(f"tracking.mlflow_uri: cannot create the sweep's MLflow run ({exc})") from None
        return cls(sweep, parent)

    def attach(self, folder: Path) -> None:
        if self.parent:
            write_ids(folder, {"mlflow_run_id": self.parent.run_id})

    def trial_base(self) -> dict:
        """The base config every trial is built from: the tracking URI absolute (trials run in
        their own working directory), the parent run and the W&B group set."""
        import copy

        base = copy.deepcopy(self.sweep.base)
        tracking = base.setdefault("tracking", {})
        if tracking.get("mlflow_uri"):
            tracking["mlflow_uri"] = absolute_uri(tracking["mlflow_uri"])
        if self.parent:
            tracking["mlflow_parent_run"] = self.parent.run_id
        if tracking.get("wandb_project"):
            tracking.setdefault("wandb_group", self.sweep.tune.name)
        return base

    def finish(self, table, folder: Path, complete: bool) -> None:
        """Close the trials' runs that their process could not (a scheduler's stop ends a trial
        without a word), log the curves over trials and the sweep's files to the parent run."""
        if not self.parent:
            return
        try:
            self._finish(table, folder, complete)
        except Exception as exc:  # noqa: BLE001 - the sweep and its folder are complete already
            warn(f"{folder}: MLflow tracking of the sweep stopped ({type(exc).__name__}: {str(exc)[:300]})")

    def _finish(self, table, folder: Path, complete: bool) -> None:
        client = self.parent.client
        for row in table.itertuples():
            run_id = read_ids(Path(row.run_dir)).get("mlflow_run_id") if row.run_dir else None
            if run_id and client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status=RUN_STATUS.get(row.status, "KILLED"))
        ordered = table.sort_values("trial_index", kind="stable")
        for column, better in CURVES:
            best = None
            for step, value in enumerate(ordered[column]):
                if value is None or not math.isfinite(float(value)):
                    continue
                best = value if best is None else better(best, value)
                self.parent.log({f"trial.{column}": float(value), f"best_so_far.{column}": float(best)}, step)
        with tempfile.TemporaryDirectory(prefix="meerkat-figures-") as tmp:
            draw_figures(folder, Path(tmp))
            self.parent.artifacts([folder / "results.csv", folder / "sweep.yaml"], Path(tmp), "analysis")
        self.parent.end("FINISHED" if complete else "KILLED")
