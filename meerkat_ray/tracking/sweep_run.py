"""Tracking of a sweep (`tune`): its MLflow parent run (the sweep's settings, the metric of every
trial in proposal order with the best so far, results.csv and the sweep's figures), under which
the trials' own runs are nested (MLflow: the parent run id; W&B: the group)."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

from ..errors import MeerkatError
from .common import absolute_uri, draw_figures, read_ids, warn, write_ids
from .mlflow_run import MlflowRun, mlflow_client
from .wandb_run import check_wandb

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
