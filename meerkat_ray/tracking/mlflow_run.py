"""MLflow: a checked client of the store at a tracking URI, the experiment, and one run written
through MlflowClient (params, metrics by step, artifacts, end status).

The MLflow client retries a failing request a few times (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default
here 2, each at most MLFLOW_HTTP_REQUEST_TIMEOUT s, default here 20) instead of its own minutes.
"""
from __future__ import annotations

import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import MeerkatError

os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


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
