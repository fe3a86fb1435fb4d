"""Sweeps: every file in tune_configs/ validates (base + every grid point, no model loaded); a bad
sweep file is refused with one `error:` line before Ray starts; a checkpointed federation resumes
bit for bit; and the smoke sweep through the CLI, on the session's Ray cluster, writes a 4-row
results table, a run folder per trial and TensorBoard logs, and resumes when finished."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import FLAG_ALL, assert_same_run, timeless

from meerkat_ray.checkpoint import RunCheckpoint
from meerkat_ray.cli import main
from meerkat_ray.config import load_config
from meerkat_ray.runlog import load_theta, read_metrics, read_path
from meerkat_ray.runner import run_experiment
from meerkat_ray.sweep_file import load_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "tune_configs").glob("*.yaml"))


def test_the_sweep_files_are_there():
    assert {p.stem for p in SWEEPS} >= {"smoke", "demo_grid", "paper_grid", "vp_thresholds"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_file_validates_and_says_how_to_run_it(path):
    sweep = load_sweep(path)
    assert len(sweep.configs) == math.prod(len(v) for v in sweep.grid.values())
    for point, cfg in zip(sweep.points, sweep.configs):
        assert all(getattr_dotted(cfg, k) == v for k, v in point.items())
    head = path.read_text().split("\nbase:")[0]  # the opening comment: what it is for, the command
    assert head.startswith("# ") and "meerkat-ray tune " in head and f"tune_configs/{path.name}" in head


def getattr_dotted(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_paper_grid_covers_the_paper():
    sweep = load_sweep(ROOT / "tune_configs" / "paper_grid.yaml")
    assert set(sweep.grid["model.name"]) == {"meta-llama/Llama-3.2-1B", "Qwen/Qwen2-1.5B", "google/gemma-2-2b"}
    assert set(sweep.grid["data.task"]) == {"sst2", "ag_news", "yelp_polarity", "boolq", "rte", "wsc", "wic"}
    assert sweep.grid["mask.density"] == [1e-3, 1e-4, 1e-5]
    assert sweep.grid["fed.local_steps"] == [1, 10, 30, 50, 100]
    assert 0 < sweep.configs[0].ray.gpus_per_client < 1


BAD = [  # sweep file text, extra CLI items, what the error line must name
    ("grid: {mask.densty: [0.1]}\n", [], "grid.mask.densty"),
    ("grid: {mask.density: 0.1}\n", [], "grid.mask.density"),
    ("grid: {mask.density: [0.1, 2.0]}\n", [], "mask.density"),
    ("grid: {name: [a, b]}\n", [], "grid.name"),
    ("base: {fed: {roundz: 3}}\n", [], "base.fed.roundz"),
    ("tune: {metric: f1}\n", [], "tune.metric"),
    ("grid: {seed: [0]}\n", ["tune.reuse_actors=sometimes"], "tune.reuse_actors"),
    ("gird: {}\n", [], "gird"),
    ("grid: {fed.local_steps: [1, 2]}\n", ["grid.fed.local_steps=[1, 0]"], "fed.local_steps"),
    ("base: {model: {name: no-such/model-anywhere}}\n", [], "model.name"),
    # run folders of trials go under tune.output_dir: a base output_dir would silently do nothing
    ("grid: {seed: [0]}\n", ["output_dir=elsewhere"], "tune.output_dir=elsewhere"),
    ("base: {output_dir: elsewhere}\n", [], "tune.output_dir=elsewhere"),
]


@pytest.mark.parametrize("text,items,key", BAD, ids=[b[2] for b in BAD])
def test_a_bad_sweep_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys, text, items, key):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for an invalid sweep")

    monkeypatch.setattr(ray, "init", no_ray)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["tune", str(path), *items, f"tune.output_dir={tmp_path}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and key in err[0], err
    assert not (tmp_path / "bad").exists()


def test_overrides_reach_base_grid_and_tune(tmp_path):
    sweep = load_sweep(ROOT / "tune_configs" / "smoke.yaml",
                       ["fed.rounds=3", "base.seed=5", "grid.fed.local_steps=[1]", "tune.mode=min",
                        f"tune.output_dir={tmp_path}"])
    assert {c.fed.rounds for c in sweep.configs} == {3} and {c.seed for c in sweep.configs} == {5}
    assert sweep.grid["fed.local_steps"] == [1] and len(sweep.configs) == 2
    assert sweep.tune.mode == "min" and sweep.folder == tmp_path / "smoke"


RESUME = ["model.name=tiny-llama", "model.num_threads=1", "data.task=tweets2", "data.num_train=96",
          "data.num_test=16", "data.num_clients=3", "data.batch_size=4", "data.max_length=32",
          "mask.calib_num_seqs=2", "mask.calib_seq_len=32", "mask.cache=false", "fed.rounds=3",
          "fed.local_steps=2", "vp.calib_steps=2", *FLAG_ALL,
          "executor=local"]


@pytest.mark.slow
def test_a_checkpointed_run_resumes_bit_for_bit(tmp_path):
    """Run b checkpoints after every round and is interrupted after round 2; it resumes from the
    round-1 checkpoint (so round 2 is cut from its files and computed again) and must end exactly
    as the uninterrupted run a: same sparse_final, path.parquet and metrics, VPCS state included."""
    run_experiment(load_config(None, [*RESUME, "name=a", f"output_dir={tmp_path}"]), progress=False)

    class Interrupted(Exception):
        pass

    def checkpoint(round_, metrics, last, saved):
        saved.save(_mkdir(tmp_path / f"ckpt{round_}"))
        if round_ == 2:
            raise Interrupted

    cfg_b = load_config(None, [*RESUME, "name=b", f"output_dir={tmp_path}"])
    with pytest.raises(Interrupted):
        run_experiment(cfg_b, progress=False, on_round=checkpoint)
    assert [m["round"] for m in read_metrics(tmp_path / "b")] == [0, 1, 2]
    resume = RunCheckpoint.load(tmp_path / "ckpt1")
    assert resume.server["vp"]["decided_round"] == 1 and resume.server["vp"]["flagged"]
    summary = run_experiment(cfg_b, progress=False, resume=resume)

    a, b = tmp_path / "a", tmp_path / "b"
    assert torch.equal(load_theta(a / "sparse_final.safetensors"), load_theta(b / "sparse_final.safetensors"))
    assert read_path(a).equals(read_path(b))
    assert timeless(a) == timeless(b)
    summary_a = json.loads((a / "summary.json").read_text())
    for key in ("final_accuracy", "uplink_bytes", "downlink_bytes", "local_steps", "flagged_clients"):
        assert summary[key] == summary_a[key]


@pytest.mark.slow
def test_a_trial_reports_every_round_and_the_last_one_after_its_run_folder_is_complete(tmp_path, monkeypatch):
    """A scheduler stops a trial at its last report: by then summary.json and sparse_final exist."""
    from meerkat_ray.distributed import tune as sweep_tune

    cfg = load_config(None, [*RESUME, "name=trial", f"output_dir={tmp_path}"])
    reports = []

    def fake_report(metrics, checkpoint):
        saved = RunCheckpoint.load(checkpoint.path)
        reports.append((metrics["round"], saved.round, (cfg.run_dir / "summary.json").is_file()))

    monkeypatch.setattr(sweep_tune.tune, "report", fake_report)
    sweep_tune.run_experiment_with_reports(cfg, resume=None)
    assert reports == [(1, 1, False), (2, 2, False), (3, 3, True)]


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.ray
def test_smoke_sweep_writes_a_four_row_results_table(ray_cluster, tmp_path):
    args = ["tune", str(ROOT / "tune_configs" / "smoke.yaml"), f"tune.output_dir={tmp_path}",
            "base.mask.cache=false", "tune.max_concurrent_trials=1", "--quiet"]  # one at a time: one trial process
    assert main(args) == 0
    folder = tmp_path / "smoke"
    table = pd.read_parquet(folder / "results.parquet")
    assert len(table) == 4 and len(pd.read_csv(folder / "results.csv")) == 4
    assert set(zip(table["mask.density"], table["fed.local_steps"])) == {(1e-3, 2), (1e-3, 4), (1e-2, 2), (1e-2, 4)}
    assert (table["status"] == "done").all() and (table["rounds_done"] == 2).all()
    for column in ("final_accuracy", "best_accuracy", "uplink_bytes", "downlink_bytes", "flagged_clients"):
        assert column in table.columns
    for row in table.itertuples():
        run = Path(row.run_dir)
        assert run.parent == folder / "runs"
        for name in ("config.yaml", "metrics.jsonl", "path.parquet", "summary.json", "sparse_final.safetensors"):
            assert (run / name).is_file(), run / name
        metrics = read_metrics(run)
        assert [m["round"] for m in metrics] == [0, 1, 2]
        summary = json.loads((run / "summary.json").read_text())
        assert list(summary["flagged_clients"]) == list(row.flagged_clients)
        # the table's numbers are the trial's own: its last evaluation (a count of the 32 test
        # examples) and its byte totals, not defaults or another trial's
        assert row.final_accuracy == metrics[-1]["accuracy"] == summary["final_accuracy"]
        assert float(row.final_accuracy * 32).is_integer() and row.zero_shot_accuracy == metrics[0]["accuracy"]
        assert row.uplink_bytes == summary["uplink_bytes"] == sum(m["uplink_bytes"] for m in metrics) > 0
        assert row.downlink_bytes == summary["downlink_bytes"]
    trial_dirs = [d for d in (folder / "tune").iterdir() if d.is_dir()]
    assert len(trial_dirs) == 4
    for trial in trial_dirs:  # TensorBoard event files and a checkpoint per trial
        assert list(trial.glob("events.out.tfevents.*")) and list(trial.glob("checkpoint_*"))
    assert ray_cluster.is_initialized()  # the session's cluster was used and left running

    assert main(args) == 2  # the folder exists: neither resumed nor replaced silently
    assert main([*args, "--resume"]) == 0  # a finished sweep resumes to the same table
    assert pd.read_parquet(folder / "results.parquet").drop(columns="run_dir").equals(table.drop(columns="run_dir"))


def trial_runs(folder: Path) -> dict[tuple, Path]:
    """Trial run folders of a sweep by their grid point (density, local steps)."""
    from meerkat_ray.config import from_dict

    out = {}
    for run in (folder / "runs").iterdir():
        cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text()))
        out[(cfg.mask.density, cfg.fed.local_steps)] = run
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_whose_driver_is_killed_mid_trial_resumes_to_the_uninterrupted_results(ray_cluster, tmp_path):
    """`meerkat-ray tune` (a subprocess on the session's cluster, one trial at a time) is SIGKILLed
    once its first trial has finished round 1 of 3; `tune --resume` finishes the sweep, and every
    trial's run folder ends bit for bit as the same federation run uninterrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from meerkat_ray.sweep_file import load_sweep, point_config

    items = [str(ROOT / "tune_configs" / "smoke.yaml"), "grid.fed.local_steps=[2]", "grid.mask.density=[0.001, 0.01]",
             "fed.rounds=3", "mask.cache=false", "model.num_threads=1", "tune.max_concurrent_trials=1",
             f"tune.output_dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "meerkat_ray", "tune", *items, "--quiet"], env=env,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "driver.log", "w"))
    folder = tmp_path / "smoke"

    def mid_trial() -> bool:  # a trial has written round 1 (of 3) and Tune's experiment state exists
        states = list((folder / "tune").glob("experiment_state*.json")) if (folder / "tune").is_dir() else []
        for metrics in (folder / "runs").glob("*/metrics.jsonl") if (folder / "runs").is_dir() else []:
            rounds = [json.loads(line)["round"] for line in metrics.read_text().splitlines() if line.strip()]
            if states and 1 in rounds and 3 not in rounds:
                return True
        return False

    deadline = time.monotonic() + 300
    while driver.poll() is None and not mid_trial() and time.monotonic() < deadline:
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    killed_at = time.time()
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-3000:]
    assert not (folder / "results.parquet").exists()  # it really stopped before the end
    finished = [r for r in (folder / "runs").iterdir() if (r / "summary.json").is_file()]
    assert len(finished) < 2

    assert main(["tune", *items, "--resume", "--quiet"]) == 0
    table = pd.read_parquet(folder / "results.parquet")
    assert len(table) == 2 and (table["status"] == "done").all() and (table["rounds_done"] == 3).all()
    sweep = load_sweep(items[0], items[1:])
    trials = trial_runs(folder)
    assert len(trials) == 2
    # tune.reuse_actors (the default): one trial at a time, the next trial starts in the process the
    # last one finished in. Tune records each result's pid and time (whole seconds): every result
    # after the kill came from one process (without reuse: one per trial)
    rows = [json.loads(line) for trial in (folder / "tune").iterdir() if (trial / "result.json").is_file()
            for line in (trial / "result.json").read_text().splitlines()]
    assert len({row["pid"] for row in rows if row["timestamp"] > killed_at}) == 1, rows
    for point in sweep.points:
        cfg = point_config(sweep.base, point)
        cfg.name, cfg.output_dir = f"straight-{point['mask.density']}", str(tmp_path / "straight")
        run_experiment(cfg, progress=False)
        assert_same_run(cfg.run_dir, trials[(point["mask.density"], point["fed.local_steps"])])
    assert ray_cluster.is_initialized()
