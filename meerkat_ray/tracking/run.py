"""Tracking of one federation (`run`, or one Tune trial): the Tracker that mirrors its run folder
to MLflow and W&B, and `run_tracked`, which wraps a run with it.

Params = the resolved config (dotted keys); every round's numbers from metrics.jsonl with the round
as step (round 0 = zero-shot); at the end the run folder's summary.json, config.yaml, clients.json,
metrics.jsonl and the `analyze` figures and report as artifacts.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

from ..config import Config, to_dict
from ..errors import MeerkatError
from ..runlog import read_metrics
from .common import absolute_uri, draw_figures, flat, numbers, read_ids, warn, write_ids
from .mlflow_run import MlflowRun, mlflow_client
from .wandb_run import WandbRun, check_wandb, new_run_id

ARTIFACTS = ("summary.json", "config.yaml", "clients.json", "metrics.jsonl")


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
            tracker.wandb_id = ids.get("wandb_run_id") or new_run_id()
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
        from ..storage import local_copy
        from ..uris import run_location

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
        """The run stopped with an exception: mark the tracked runs KILLED for an interrupt or a
        scheduler's stop (Tune ends a stopped trial with SystemExit(0) out of `tune.report`),
        FAILED otherwise."""
        stopped = isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and exc.code in (0, None))
        status = "KILLED" if stopped else "FAILED"
        if self.mlflow:
            self._guard("MLflow", lambda: self.mlflow.end(status))
        if self.wandb:
            self._guard("W&B", lambda: self.wandb.end(1))


def run_tracked(cfg: Config, run, resume=None, **kwargs) -> dict:
    """`run(cfg, resume=..., on_round=..., **kwargs)` (the orchestration's `runner.run_stored` or
    `run_experiment`, handed down by the caller) with tracking: started first (a tracking error
    stops nothing that ran), fed by the round callback, closed with the summary (or the failure)."""
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
