"""Experiment tracking, read back from the trackers' own stores: a run logged to a real `mlflow
server` started here on 127.0.0.1 (params = the resolved config, every round's metrics with the
round as step, summary.json and the figures as artifacts), a W&B offline run read from its .wandb
file (LevelDB-style records of W&B's protobufs, parsed here), and failures: a server that is down or
a bad URI is an `error:` at start before any model loads; a tracker failing mid-run is one warning
and the run folder is complete."""

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port

from meerkat_ray.cli import main

TINY = ["model.name=tiny-llama", "model.num_threads=1", "data.task=tweets2", "data.num_train=96", "data.num_test=16",
        "data.num_clients=3", "data.batch_size=4", "data.max_length=32", "mask.calib_num_seqs=2",
        "mask.calib_seq_len=32", "fed.rounds=3", "fed.local_steps=2", "fed.eval_every=2", "vp.calib_steps=2",
        "executor=local"]
SERVER_START_S = 120  # a loaded 2-core machine needs ~20 s


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, proxied artifacts) on 127.0.0.1, stopped at
    the end of the module; `timeout` ends it even if the test process dies."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow = shutil.which("mlflow") or str(Path(os.sys.executable).parent / "mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        ["timeout", "900", mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "art")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this fixture started: timeout, mlflow, its workers
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        out |= flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tracked_run(mlflow_server, tmp_path_factory):
    """One tiny run logged to the MLflow server and to W&B offline at once (one run, two readers)."""
    folder = tmp_path_factory.mktemp("tracked")
    mode = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"
    try:
        assert main(["run", *TINY, "name=tracked", f"output_dir={folder}", f"tracking.mlflow_uri={mlflow_server}",
                     "tracking.mlflow_experiment=runs", "tracking.wandb_project=meerkat", "--quiet"]) == 0
    finally:
        if mode is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = mode
    return folder / "tracked"


@pytest.mark.slow
def test_a_run_is_logged_to_a_real_mlflow_server(mlflow_server, tracked_run, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tracked_run
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("runs")
    (run,) = client.search_runs([experiment.experiment_id])
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"] == run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"

    config = flatten(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert run.data.params == {k: str(v) for k, v in config.items() if not k.startswith("tracking.")}

    rows = metrics_rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for key in ("accuracy", "test_loss", "train_loss", "uplink_bytes", "downlink_bytes", "wall_s"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        expected = [(r["round"], pytest.approx(float(r[key]))) for r in rows if r.get(key) is not None]
        assert logged == expected, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")] == [0, 2, 3]  # evaluated rounds

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "config.yaml", "metrics.jsonl", "analysis"} <= artifacts
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "analysis")}
    assert {"analysis/curves.png", "analysis/report.html"} <= figures
    local = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == json.loads((run_dir / "summary.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.metrics["summary.final_accuracy"] == pytest.approx(summary["final_accuracy"])


def test_a_server_that_is_down_is_an_error_before_anything_starts(tmp_path, capsys, monkeypatch):
    from meerkat_ray import local_executor

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(local_executor, "prepare_model", no_model)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    assert main(["run", *TINY, "name=down", f"output_dir={tmp_path}", f"tracking.mlflow_uri={url}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: tracking.mlflow_uri: no MLflow server answers at " + url), err
    assert not (tmp_path / "down").exists() and time.monotonic() - started < 30

    assert main(["run", *TINY, "name=bad", f"output_dir={tmp_path}", "tracking.mlflow_uri=htp://x", "--quiet"]) == 2
    assert "tracking.mlflow_uri: not an MLflow tracking URI" in capsys.readouterr().err
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    assert main(["run", *TINY, "name=bad", f"output_dir={tmp_path}", "tracking.wandb_project=p", "--quiet"]) == 2
    assert "WANDB_MODE must be one of" in capsys.readouterr().err


def test_a_tracker_that_fails_mid_run_is_one_warning_and_the_run_completes(tmp_path, capsys, monkeypatch):
    """The store stops answering after round 1's metrics: the run goes on untracked to the end."""
    from mlflow.tracking import MlflowClient

    real = MlflowClient.log_batch
    calls = {"metrics": 0}

    def failing(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        if metrics:
            calls["metrics"] += 1
            if calls["metrics"] > 2:  # rounds 0 and 1 got through
                raise ConnectionError("the tracking server went away")
        return real(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", failing)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert main(["run", *TINY, "name=flaky", f"output_dir={tmp_path}", f"tracking.mlflow_uri={uri}", "--quiet"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "MLflow tracking stopped" in warnings[0] and "the run folder" in warnings[0]
    run_dir = tmp_path / "flaky"
    for name in ("summary.json", "sparse_final.safetensors", "metrics.jsonl", "path.parquet"):
        assert (run_dir / name).is_file()
    assert [r["round"] for r in metrics_rows(run_dir)] == [0, 1, 2, 3]
    monkeypatch.setattr(MlflowClient, "log_batch", real)
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]
    history = MlflowClient(uri).get_metric_history(run_id, "train_loss")
    assert [m.step for m in history] == [1]  # logged until the failure, nothing after


# ----------------------------------------------------------------------------- W&B offline files

def wandb_records(path: Path):
    """The records of a .wandb file: a 7-byte header (':W&B', magic 0xBEE1, version 0), then
    32 KiB blocks of chunks, each `<crc32:u32><length:u16><type:u8>` + data, type 1 = a whole
    record, 2/3/4 = first / middle / last piece; a block's tail shorter than a chunk header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    pos, block, pieces = 7, 32768, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:  # zero fill to the end of the block
            pos += room - 7
            continue
        pieces += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


@pytest.mark.slow
def test_a_wandb_offline_run_holds_the_config_and_every_round(tracked_run):
    run_dir = tracked_run
    wandb_id = json.loads((run_dir / "tracking.json").read_text())["wandb_run_id"]
    (file,) = (run_dir / "wandb").glob(f"offline-run-*-{wandb_id}/run-{wandb_id}.wandb")
    records = list(wandb_records(file))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds and kinds.count("exit") == 1

    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "meerkat" and run.display_name == "tracked"
    logged_config = {item.key: json.loads(item.value_json) for item in run.config.update}
    config = flatten(yaml.safe_load((run_dir / "config.yaml").read_text()))
    for key in ("zo.lr", "fed.rounds", "model.name", "data.num_clients"):
        value = logged_config[key]
        assert (value["value"] if isinstance(value, dict) else value) == config[key]

    history = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.append(items)
    rows = metrics_rows(run_dir)
    steps = [h["_step"] for h in history if "train_loss" in h or "accuracy" in h]
    assert steps == [r["round"] for r in rows]
    by_step = {h["_step"]: h for h in history}
    for row in rows:
        for key in ("accuracy", "train_loss", "uplink_bytes"):
            if row.get(key) is not None:
                assert math.isclose(by_step[row["round"]][key], row[key]), (row["round"], key)
    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary |= {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.summary.update}
    assert summary["final_accuracy"] == pytest.approx(json.loads((run_dir / "summary.json").read_text())["final_accuracy"])


@pytest.mark.ray
@pytest.mark.slow
def test_a_random_search_nests_its_trials_under_the_sweeps_mlflow_run(ray_cluster, mlflow_server, tmp_path,
                                                                      monkeypatch):
    """The tiny random search end to end, tracked: one parent run for the sweep, one child per
    trial (params with the sampled values, per-round metrics), the parent's best-so-far curve;
    W&B offline runs in the trials' folders, grouped by the sweep's name."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")  # the trials inherit it from the driver's cluster
    root = Path(__file__).resolve().parents[1]
    assert main(["tune", str(root / "tune_configs" / "smoke_search.yaml"), f"tune.output_dir={tmp_path}",
                 f"base.tracking.mlflow_uri={mlflow_server}", "base.tracking.mlflow_experiment=sweeps",
                 "base.tracking.wandb_project=sweeps", "base.mask.cache=false", "--quiet"]) == 0
    folder = tmp_path / "smoke_search"
    table = pd.read_parquet(folder / "results.parquet")
    assert len(table) == 2 and (table["status"] == "done").all()

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    parent_id = json.loads((folder / "tracking.json").read_text())["mlflow_run_id"]
    (parent,) = [r for r in runs if r.info.run_id == parent_id]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert parent.info.status == "FINISHED" and parent.data.params["tune.search"] == "random"
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    by_dir = {json.loads((Path(d) / "tracking.json").read_text())["mlflow_run_id"]: row
              for d, row in zip(table["run_dir"], table.itertuples())}
    for child in children:
        row = by_dir[child.info.run_id]
        assert float(child.data.params["zo.lr"]) == pytest.approx(row[table.columns.get_loc("zo.lr") + 1])
        assert int(child.data.params["fed.local_steps"]) == row[table.columns.get_loc("fed.local_steps") + 1]
        assert [m.step for m in client.get_metric_history(child.info.run_id, "accuracy")] == [0, 1, 2]
    finals = list(table.sort_values("trial_index")["final_accuracy"])
    best = [m.value for m in sorted(client.get_metric_history(parent_id, "best_so_far.final_accuracy"),
                                    key=lambda m: m.step)]
    assert best == pytest.approx([finals[0], max(finals)])
    assert {"results.csv", "sweep.yaml", "analysis"} <= {a.path for a in client.list_artifacts(parent_id)}
    for run_dir in table["run_dir"]:
        (file,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
        run = next(r.run for r in wandb_records(file) if r.WhichOneof("record_type") == "run")
        assert run.run_group == "smoke_search" and run.display_name == Path(run_dir).name


@pytest.mark.slow
def test_run_resume_continues_the_same_mlflow_run(tmp_path):
    """A run interrupted after round 2 is marked in MLflow; `run --resume` continues the same
    MLflow run (tracking.json) to FINISHED, every round logged once with its round as step."""
    from mlflow.tracking import MlflowClient

    from meerkat_ray.config import load_config
    from meerkat_ray.runner import run_experiment
    from meerkat_ray.tracking import run_tracked

    class Interrupted(Exception):
        pass

    def stop_after_round_2(round_, metrics, last, checkpoint):
        if round_ == 2:
            raise Interrupted

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = load_config(None, [*TINY, "name=cut", f"output_dir={tmp_path}", f"tracking.mlflow_uri={uri}"])
    with pytest.raises(Interrupted):
        run_tracked(cfg, run_experiment, progress=False, on_round=stop_after_round_2)
    run_dir = tmp_path / "cut"
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FAILED"
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"] == run_id
    (run,) = client.search_runs([client.get_experiment_by_name("meerkat-ray").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]  # each round once, the interrupted one included
    rows = {r["round"]: r for r in metrics_rows(run_dir)}
    assert {m.step: m.value for m in history} == {s: pytest.approx(rows[s]["train_loss"]) for s in (1, 2, 3)}
    assert sorted(m.step for m in client.get_metric_history(run_id, "accuracy")) == [0, 2, 3]


@pytest.mark.slow
def test_a_trial_a_scheduler_stops_is_killed_not_failed_in_mlflow(tmp_path):
    """ASHA's stop reaches a trial as SystemExit(0) raised out of `tune.report` (Ray Tune's function
    trainables): its MLflow run is KILLED, like the sweep's `status: stopped`, never FAILED."""
    from mlflow.tracking import MlflowClient

    from meerkat_ray.config import load_config
    from meerkat_ray.runner import run_experiment
    from meerkat_ray.tracking import run_tracked

    def stopped_by_the_scheduler(round_, metrics, last, checkpoint):
        if round_ == 1:
            raise SystemExit(0)

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = load_config(None, [*TINY, "name=stopped", f"output_dir={tmp_path}", f"tracking.mlflow_uri={uri}"])
    with pytest.raises(SystemExit):
        run_tracked(cfg, run_experiment, progress=False, on_round=stopped_by_the_scheduler)
    run_id = json.loads((tmp_path / "stopped" / "tracking.json").read_text())["mlflow_run_id"]
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"


def test_a_sweep_with_a_dead_tracking_server_stops_before_ray_and_its_folder(tmp_path, capsys, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", no_ray)
    root = Path(__file__).resolve().parents[1]
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["tune", str(root / "tune_configs" / "smoke_search.yaml"), f"tune.output_dir={tmp_path}",
                 f"base.tracking.mlflow_uri={url}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: tracking.mlflow_uri: no MLflow server answers"), err
    assert not (tmp_path / "smoke_search").exists()


def test_a_resumed_sweep_continues_its_parent_run(tmp_path):
    """The sweep's parent run: KILLED when the sweep was interrupted, the same run again (RUNNING,
    then FINISHED) when it is resumed; trial runs their process left RUNNING are closed."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from meerkat_ray.sweep_file import load_sweep
    from meerkat_ray.tracking import SweepTracking, write_ids

    root = Path(__file__).resolve().parents[1]
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    sweep = load_sweep(root / "tune_configs" / "smoke_search.yaml",
                       [f"tune.output_dir={tmp_path}", f"base.tracking.mlflow_uri={uri}"])
    first = SweepTracking.start(sweep, resume=False)
    sweep.folder.mkdir(parents=True)
    first.attach(sweep.folder)
    base = first.trial_base()
    assert base["tracking"]["mlflow_parent_run"] == first.parent.run_id
    client = MlflowClient(uri)
    trial = client.create_run(client.get_run(first.parent.run_id).info.experiment_id,
                              tags={"mlflow.parentRunId": first.parent.run_id})
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    write_ids(trial_dir, {"mlflow_run_id": trial.info.run_id})
    table = pd.DataFrame({"trial_index": [1], "status": ["stopped"], "run_dir": [str(trial_dir)],
                          "final_accuracy": [0.5], "final_test_loss": [0.7]})
    (sweep.folder / "results.csv").write_text("x\n")
    first.finish(table, sweep.folder, complete=False)
    assert client.get_run(first.parent.run_id).info.status == "KILLED"
    assert client.get_run(trial.info.run_id).info.status == "KILLED"  # closed by the driver

    again = SweepTracking.start(sweep, resume=True)
    assert again.parent.run_id == first.parent.run_id
    assert client.get_run(first.parent.run_id).info.status == "RUNNING"
    again.finish(table.assign(status="done"), sweep.folder, complete=True)
    assert client.get_run(first.parent.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_run_stored_at_a_uri_logs_its_artifacts_from_there(tmp_path):
    """output_dir a storage URI: the local copy of the run folder is gone when the run ends, the
    artifacts come from the stored folder."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    store = f"file://{tmp_path / 'store'}"
    assert main(["run", *TINY, "name=stored", f"output_dir={store}", f"tracking.mlflow_uri={uri}", "--quiet"]) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("meerkat-ray").experiment_id])
    assert run.info.status == "FINISHED"
    assert {"summary.json", "config.yaml", "analysis"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    local = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == json.loads((tmp_path / "store" / "stored" / "summary.json").read_text())
