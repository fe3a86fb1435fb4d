"""`meerkat-ray tune`: a grid of federations run by Ray Tune.

Each trial is one federation (`runner.run_experiment`) inside its own placement group, laid out by
`cluster.trial_bundles`: the trial's driver, its server actor and its client actors (with
executor=local, one bundle in which the trial runs its clients itself). Trials come from the
grid (Tune's grid_search), from Tune's seeded random sampling of `space:` (tune.search=random, mixed
with the grid) or from Optuna's TPE through Tune's OptunaSearch (tune.search=optuna); Tune keeps
the searcher's state in the experiment folder, so `--resume` continues the same search. After every round the
trial reports its metrics and checkpoints its state (`checkpoint.RunCheckpoint`: counters, VPCS
state and the n masked values); `--resume` restores an interrupted sweep and continues every
unfinished trial after its last checkpointed round.

Sweep folder (<tune.output_dir>/<tune.name>/):
    sweep.yaml                      the resolved base, grid and Tune settings
    runs/<trial>/                   each trial's run folder (config.yaml, metrics.jsonl, path.parquet, ...)
    tune/                           Ray Tune's experiment: per trial progress.csv, result.json,
                                    TensorBoard event files and checkpoints (`tensorboard --logdir tune`)
    results.parquet, results.csv    one row per trial: grid and sampled values, final / best accuracy, bytes,
                                    flagged clients
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import tempfile
from pathlib import Path

import pandas as pd
import torch
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from .. import runner, staging, storage, uris
from ..checkpoint import RunCheckpoint, open_resume
from ..config import Config, set_dotted
from ..errors import MeerkatError
from ..experiment import check_model, prepare_data
from ..runlog import remove_owned_folder, write_text
from ..sweep_file import Sweep, point_config, point_tag
from ..tracking import SweepTracking, Tracker
from .cluster import connect, disconnect, federation_demand, trial_bundles

EXPERIMENT = "tune"  # Ray Tune's experiment folder inside the sweep folder
# Trials checkpoint every round by design; Tune's warning about frequent experiment snapshots is noise here.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


# ----------------------------------------------------------------------------- one trial

def trial_name(trial_id: str, point: dict) -> str:
    tag = re.sub(r"[^\w.=+,-]", "-", point_tag(point))  # model ids carry a "/"
    return f"{trial_id}_{tag}" if tag else trial_id


def trial_config(base: dict, point: dict, runs_dir: str, trial_id: str) -> Config:
    data = dict(base)
    set_dotted(data, "name", trial_name(trial_id, point))
    set_dotted(data, "output_dir", runs_dir)
    return point_config(data, point)


def run_trial(params: dict, base: dict, runs_dir: str) -> None:
    """The Tune trainable: one federation that reports and checkpoints after every round."""
    cfg = trial_config(base, params, runs_dir, tune.get_context().get_trial_id())
    if cfg.executor == "local":  # the clients run in this process: one thread per CPU of its bundle
        torch.set_num_threads(cfg.model.num_threads or max(1, int(cfg.ray.cpus_per_client)))
    resume = None
    checkpoint = tune.get_checkpoint()  # set when Tune retries a failed trial or resumes a sweep
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            kept = RunCheckpoint.load(folder)
        runner.fetch_run_dir(cfg)  # a run folder stored at a URI comes back to this node first
        try:  # the checks of `run --resume`: never a checkpoint newer than the run folder's logs
            _, resume = open_resume(cfg.run_dir, kept, expect=cfg)
        except MeerkatError as exc:
            raise MeerkatError(f"Tune's checkpoint of round {kept.round} does not fit the run folder "
                               f"{uris.run_location(cfg)}: {exc}") from None
    run_experiment_with_reports(cfg, resume)


def run_experiment_with_reports(cfg: Config, resume: RunCheckpoint | None) -> None:
    """Reports and checkpoints after every round; the last round's once the run folder is complete
    (a scheduler stops a trial as soon as it reports its last round)."""
    final = []
    tracker = Tracker.start(cfg, strict=False, resumed=resume is not None)  # the sweep checked it: warnings only

    def report(metrics: dict, checkpoint: RunCheckpoint) -> None:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint.save(folder)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    def on_round(round_: int, metrics: dict, last: dict, checkpoint: RunCheckpoint) -> None:
        tracker.on_round(round_, metrics, last, checkpoint)
        flagged = metrics["flagged_clients"]  # everything reported comes from the round's metrics
        values = {
            "round": round_,
            "accuracy": last["accuracy"],            # the latest evaluation
            "best_accuracy": last["best_accuracy"],
            "zero_shot_accuracy": last["zero_shot_accuracy"],
            "test_loss": last["test_loss"],
            "train_loss": float("nan") if metrics.get("train_loss") is None else metrics["train_loss"],
            "uplink_bytes": last["uplink_bytes"],      # cumulative, as summary.json
            "downlink_bytes": last["downlink_bytes"],
            "num_flagged": len(flagged),
            "flagged_clients": ",".join(str(k) for k in flagged),  # a string: TensorBoard skips it
            "run_dir": uris.run_location(cfg),
        }
        if round_ < cfg.fed.rounds:
            report(values, checkpoint)
        else:
            final.append((values, checkpoint))

    try:
        summary = runner.run_stored(cfg, overwrite=True, progress=False, on_round=on_round, resume=resume)
    except BaseException as exc:
        tracker.fail(exc)
        raise
    tracker.finish(summary)  # before the last report: a scheduler may end the trial right at it
    for values, checkpoint in final:
        report(values, checkpoint)


def trial_resources(base: dict, params: dict) -> tune.PlacementGroupFactory:
    return tune.PlacementGroupFactory(trial_bundles(point_config(base, params)))


def trial_dirname(trial) -> str:
    return trial_name(trial.trial_id, trial.config)


# ----------------------------------------------------------------------------- the sweep

def preflight(sweep: Sweep) -> None:
    """Model names and data of every grid point and space corner, checked before Ray starts (no
    model is loaded)."""
    checked = set()
    for cfg in [*sweep.configs, *sweep.corners]:
        for key, check in ((cfg.model.name, check_model), ((cfg.seed, repr(cfg.data)), prepare_data)):
            if key not in checked:
                checked.add(key)
                check(cfg)


def open_sweep_folder(sweep: Sweep, resume: bool, overwrite: bool) -> Path:
    folder = sweep.folder
    staging.stage_sweep(sweep, folder, resume, overwrite)  # a sweep at a URI: checked there, staged here
    if resume:
        path, fs = staging.tune_storage(sweep, folder)
        if not tune.Tuner.can_restore(f"{path}/{EXPERIMENT}", storage_filesystem=fs):
            raise MeerkatError(f"{folder}: no interrupted sweep to resume there")
        stored = yaml.safe_load((folder / "sweep.yaml").read_text())
        spec = sweep.spec()
        differ = [key for key in spec if stored.get(key, spec[key] if key == "search" else {}) != spec[key]]
        if differ:
            raise MeerkatError(f"{folder / 'sweep.yaml'}: {' and '.join(differ)} differ from the sweep being resumed")
        return folder
    if folder.exists():
        if not overwrite:
            raise MeerkatError(f"{folder}: sweep folder already exists (--resume continues it, --overwrite replaces it)")
        remove_owned_folder(folder, "sweep.yaml", "sweep")
    folder.mkdir(parents=True)
    spec = {**sweep.spec(), "tune": dataclasses.asdict(sweep.tune), "source": sweep.source}
    write_text(folder / "sweep.yaml", yaml.safe_dump(spec, sort_keys=False))
    staging.publish(sweep, folder, "sweep.yaml")
    return folder


def make_tuner(sweep: Sweep, folder: Path, resume: bool, progress: bool, trial_fn=run_trial,
               callbacks=()) -> tune.Tuner:
    """`trial_fn(params, base, runs_dir)` is the trainable (`run_trial`; tests wrap it to inject faults);
    `callbacks` are Tune callbacks of a new sweep (tests interrupt a sweep with one)."""
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, base=sweep.base, runs_dir=staging.runs_location(sweep, folder)),
        resources=functools.partial(trial_resources, sweep.base))
    if resume:
        path, fs = staging.tune_storage(sweep, folder)
        return tune.Tuner.restore(f"{path}/{EXPERIMENT}", trainable=trainable, storage_filesystem=fs, resume_unfinished=True,
                                  resume_errored=True)
    t = sweep.tune
    scheduler = None
    if t.scheduler == "asha":
        max_t = t.asha.max_t or max(cfg.fed.rounds for cfg in [*sweep.configs, *sweep.corners])
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=t.asha.grace_period,
                                  reduction_factor=t.asha.reduction_factor)
    search_alg, max_concurrent = searcher(sweep)
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, num_samples=t.num_samples, search_alg=search_alg,
                                    max_concurrent_trials=max_concurrent, scheduler=scheduler,
                                    trial_dirname_creator=trial_dirname, reuse_actors=t.reuse_actors),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=staging.tune_storage(sweep, folder)[0],
                                  storage_filesystem=staging.tune_storage(sweep, folder)[1], verbose=1 if progress else 0,
                                  callbacks=list(callbacks) or None,
                                  # every round's checkpoint kept: Tune prunes old ones as soon as a new one is
                                  # registered, but the experiment state at storage is synced later, so a sweep
                                  # stopped in between resumes from a checkpoint it had deleted (seen: the trial
                                  # then failed on every retry, "does not exist on storage anymore")
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                                  # a failed trial restarts from its latest checkpoint (run_trial resumes it)
                                  failure_config=tune.FailureConfig(max_failures=t.max_failures)),
    )


DOMAINS = {  # space: distribution -> Ray Tune's sampler
    "uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint,
    "quniform": tune.quniform, "qloguniform": tune.qloguniform, "choice": tune.choice,
}


def param_space(sweep: Sweep) -> dict:
    space = {key: tune.grid_search(values) for key, values in sweep.grid.items()}
    for key, spec in sweep.space.items():
        (name, args), = spec.items()
        space[key] = DOMAINS[name](args) if name == "choice" else DOMAINS[name](*args)
    return space


def searcher(sweep: Sweep):
    """(search_alg, max_concurrent_trials for TuneConfig): Tune's own seeded variant generator for
    grid and random search, Optuna's TPE (seeded sampler) behind Tune's OptunaSearch and, when
    tune.max_concurrent_trials is set, Tune's ConcurrencyLimiter."""
    t = sweep.tune
    if t.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=t.seed, n_startup_trials=t.optuna.n_startup_trials)
        return OptunaSearch(sampler=sampler), t.max_concurrent_trials or None
    return BasicVariantGenerator(max_concurrent=t.max_concurrent_trials, random_state=t.seed), None


def results_table(sweep: Sweep, results) -> pd.DataFrame:
    """One row per trial: its grid and sampled values, how far it got, accuracy, bytes and flagged clients."""
    rows = []
    for result in results:
        m = result.metrics or {}
        point = {key: result.config.get(key) for key in [*sweep.grid, *sweep.space]}
        rounds = point_config(sweep.base, point).fed.rounds
        done = int(m.get("round", 0))
        up, down = m.get("uplink_bytes"), m.get("downlink_bytes")
        rows.append({
            "trial_id": m.get("trial_id") or Path(result.path).name,
            "trial_index": proposal_index(m),
            **point,
            "status": "error" if result.error else ("done" if done >= rounds else "stopped"),
            "rounds_done": done,
            "final_accuracy": m.get("accuracy"),
            "best_accuracy": m.get("best_accuracy"),
            "zero_shot_accuracy": m.get("zero_shot_accuracy"),
            "final_test_loss": m.get("test_loss"),
            "uplink_bytes": up,
            "downlink_bytes": down,
            "total_bytes": None if up is None else up + down,
            "num_flagged": m.get("num_flagged"),
            "flagged_clients": [int(k) for k in str(m.get("flagged_clients") or "").split(",") if k],
            **flagging(m.get("run_dir")),
            "run_dir": m.get("run_dir"),
            "error": last_line(result.error),
            "trial_path": result.path,  # Tune's folder of the trial (error.txt, checkpoints), at the sweep's storage
        })
    return pd.DataFrame(rows).sort_values(["trial_index", "trial_id"], ignore_index=True)


def last_line(error) -> str | None:
    """The last non-empty line of a failed trial's error (its exception's own message), or None."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] if error is not None else []
    return lines[-1] if lines else None


def proposal_index(metrics: dict) -> int:
    """The order in which the search proposed the trial: Tune's trial counter, the number its
    experiment tag starts with (-1 when the trial never reported)."""
    head = str(metrics.get("experiment_tag", "")).split("_", 1)[0]
    return int(head) if head.isdigit() else -1


def flagging(run_dir: str | None) -> dict:
    """Flagging precision / recall from a finished trial's summary.json (where this machine sees it)."""
    text = storage.read_run_file(run_dir, "summary.json") if run_dir else None
    quality = json.loads(text).get("flagging") if text else None
    quality = quality or {}
    return {"flag_precision": quality.get("precision"), "flag_recall": quality.get("recall")}


def error_file(sweep: Sweep, trial_path: str) -> str:
    """Where a failed trial's error.txt is kept: in Tune's trial folder at the sweep's storage (the
    URI for a sweep stored at one)."""
    store = staging.sweep_store(sweep)
    name = str(trial_path).rstrip("/").rsplit("/", 1)[-1]
    if store is None:
        return str(sweep.folder / EXPERIMENT / name / "error.txt")
    return uris.uri_join(store.uri, EXPERIMENT, name, "error.txt")


def write_results(table: pd.DataFrame, folder: Path) -> None:
    table.to_parquet(folder / "results.parquet", index=False)
    csv = table.assign(flagged_clients=[" ".join(map(str, v)) for v in table["flagged_clients"]])
    csv.to_csv(folder / "results.csv", index=False)


def run_sweep(sweep: Sweep, resume: bool = False, overwrite: bool = False, progress: bool = True) -> pd.DataFrame:
    """Run (or resume) a validated sweep; returns the results table also written to the sweep folder."""
    preflight(sweep)
    tracking = SweepTracking.start(sweep, resume)  # MLflow's parent run; a tracking error stops the sweep here
    folder = open_sweep_folder(sweep, resume, overwrite)
    tracking.attach(folder)
    demand = [federation_demand(cfg) for cfg in [*sweep.configs, *sweep.corners]]
    connect(sweep.configs[0].ray, max(c for c, _ in demand), max(g for _, g in demand), progress=progress)
    try:
        tracked = dataclasses.replace(sweep, base=tracking.trial_base())  # trials nested under the parent run
        results = make_tuner(tracked, folder, resume, progress).fit()
    finally:
        disconnect()
    table = results_table(sweep, results)
    write_results(table, folder)
    done = table["status"].isin(["done"] if sweep.tune.scheduler != "asha" else ["done", "stopped"])
    tracking.finish(table, folder, complete=bool(done.all()) and len(table) >= sweep.expected_trials)
    staging.publish(sweep, folder, "results.parquet", "results.csv")
    if progress:
        shown = [c for c in table.columns if c not in ("run_dir", "trial_id", "trial_path", "error")]
        where = staging.sweep_store(sweep).uri if staging.sweep_store(sweep) else folder
        print(f"\n{len(table)} trials -> {where}/results.csv")
        print(table[shown].to_string(index=False))
    return table
