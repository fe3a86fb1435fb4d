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

The modules: `common` (the ids file, warnings, values, figures), `mlflow_run` and `wandb_run` (one
backend each), `run` (one federation: Tracker, run_tracked) and `sweep_run` (a sweep's parent run).
"""
from .common import TRACKING_FILE, absolute_uri, draw_figures, flat, numbers, read_ids, warn, write_ids
from .mlflow_run import MlflowRun, experiment_id, mlflow_client
from .run import ARTIFACTS, Tracker, run_tracked
from .sweep_run import CURVES, RUN_STATUS, SweepTracking
from .wandb_run import WANDB_MODES, WandbRun, check_wandb, wandb_mode

__all__ = ["ARTIFACTS", "CURVES", "RUN_STATUS", "TRACKING_FILE", "WANDB_MODES", "MlflowRun", "SweepTracking",
           "Tracker", "WandbRun", "absolute_uri", "check_wandb", "draw_figures", "experiment_id", "flat",
           "mlflow_client", "numbers", "read_ids", "run_tracked", "wandb_mode", "warn", "write_ids"]
