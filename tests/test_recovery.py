"""Recovery keeps its promise: the same bits after a lost or frozen actor at any point of the round
cycle, bounded rebuilds, an attempt that never shares (or clobbers) its replacement's folders,
uploads that are whole or absent, resumes that are all checked alike, and a stored run that bad
input never deletes. Ray tests run on the session's cluster (`ray_cluster`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, assert_same_run

from meerkat_ray.config import load_config
from meerkat_ray.errors import MeerkatError
from meerkat_ray.runlog import read_metrics
from meerkat_ray.runner import run_experiment

RUN = [*TINY_RUN, "data.num_train=96", "data.num_clients=4", "data.partition=mixed", "fed.local_steps=2",
       "vp.calib_steps=2", "vp.rho=1e-6", "vp.sigma=1e6", "vp.min_quiet_fraction=0", "executor=local"]
CYCLE = [*RUN, "fed.rounds=6", "fed.eval_every=1"]  # one point of the round cycle per round
RAY = ["executor=ray", "ray.num_actors=2", "ray.cpus_per_client=0.5"]


def local_twin(tmp_path: Path, overrides: list[str], name: str = "calm") -> Path:
    run_experiment(load_config(None, [*overrides, "executor=local", f"name={name}", f"output_dir={tmp_path}"]),
                   progress=False)  # (overrides may name the Ray backend: local wins here)
    return tmp_path / name


def capture_executor(monkeypatch) -> list:
    from meerkat_ray.distributed.executor import RayExecutor

    made, real = [], RayExecutor.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        made.append(self)
    monkeypatch.setattr(RayExecutor, "__init__", init)
    return made


# ----------------------------------------------------------------------------- a lost server actor

POINTS = ["after planning", "during client work", "after finishing", "after the sync", "during evaluation",
          "during the writes"]


@pytest.mark.ray
@pytest.mark.slow
def test_losing_the_server_actor_at_each_point_of_the_round_cycle_ends_as_the_calm_run(
        ray_cluster, tmp_path, monkeypatch):
    """Round r loses the server actor at POINTS[r - 1]; each loss is noticed at the next call on
    the server and the actor rebuilt from the last checkpoint's state, the driver's values of that
    round and the rounds since. The run ends bit for bit as the same federation without Ray."""
    import ray

    from meerkat_ray.distributed.executor import RayExecutor
    from meerkat_ray.distributed.server_proxy import ServerProxy
    from meerkat_ray.runlog import RunWriter

    calm = local_twin(tmp_path, CYCLE)
    fired: list[tuple[int, str]] = []
    state = {"round": 0}

    def lose(proxy, point: str) -> None:
        r = state["round"]
        if r >= 1 and POINTS[r - 1] == point and (r, point) not in fired:
            fired.append((r, point))
            ray.kill(proxy.actor, no_restart=True)

    def wrap(cls, name, before=None, after=None):
        real = getattr(cls, name)

        def method(self, *args, **kwargs):
            if before:
                before(self, *args)
            out = real(self, *args, **kwargs)
            if after:
                after(self, *args)
            return out
        monkeypatch.setattr(cls, name, method)

    def planned(proxy, round_):
        state["round"] = round_
        lose(proxy, "after planning")

    def run_clients(self, plans, on_result=None):
        def after(result):
            if on_result:
                on_result(result)
            lose(self.server, "during client work")
        return real_run(self, plans, after)
    real_run = RayExecutor.run_clients
    monkeypatch.setattr(RayExecutor, "run_clients", run_clients)
    wrap(ServerProxy, "plan_round", after=planned)
    wrap(ServerProxy, "finish_planned", after=lambda proxy, *a: lose(proxy, "after finishing"))
    wrap(RayExecutor, "sync", after=lambda ex, *a: lose(ex.server, "after the sync"))
    wrap(RayExecutor, "evaluate", before=lambda ex: lose(ex.server, "during evaluation"))
    executors = capture_executor(monkeypatch)
    wrap(RunWriter, "add_round", before=lambda writer, *a: lose(executors[0].server, "during the writes"))

    cfg = load_config(None, [*CYCLE, *RAY, "name=lossy", f"output_dir={tmp_path}"])
    run_experiment(cfg, progress=False)
    assert fired == [(r, p) for r, p in enumerate(POINTS, start=1)]
    assert executors[0].server.restarts == len(POINTS)
    assert_same_run(calm, cfg.run_dir, ignore=("server_restarts",))


@pytest.mark.ray
def test_server_replacements_that_keep_dying_are_bounded_and_none_is_left_alive(ray_cluster, tmp_path,
                                                                               monkeypatch):
    """Every replacement of the server actor dies before it is up: the run stops after
    ray.max_actor_restarts attempts (each counted), with the error naming the key and
    `run --resume`, instead of rebuilding forever. A replacement that fails for another reason (its
    set-up raises) is killed, not leaked."""
    import ray

    from meerkat_ray.distributed.executor import RayExecutor
    from meerkat_ray.distributed.server_proxy import ServerProxy

    made, real_new = [], RayExecutor.new_server_actor

    def new_server_actor(self):
        actor = real_new(self)
        if self.server is not None:  # a replacement: gone before it is up
            made.append(actor)
            ray.kill(actor, no_restart=True)
        return actor
    monkeypatch.setattr(RayExecutor, "new_server_actor", new_server_actor)
    real_finish = ServerProxy.finish_planned

    def finish_planned(self, round_, results):
        out = real_finish(self, round_, results)
        if round_ == 1:
            ray.kill(self.actor, no_restart=True)
        return out
    monkeypatch.setattr(ServerProxy, "finish_planned", finish_planned)
    cfg = load_config(None, [*RUN, *RAY, "fed.rounds=2", "ray.max_actor_restarts=3", "name=dying",
                             f"output_dir={tmp_path}"])
    with pytest.raises(MeerkatError, match=r"ray\.max_actor_restarts.*after 3 restarts.*run --resume"):
        run_experiment(cfg, progress=False)
    assert len(made) == 3

    # a replacement whose set-up raises (here: it is handed no config) is killed when it fails
    monkeypatch.setattr(RayExecutor, "new_server_actor", lambda self: made.append(real_new(self)) or made[-1])

    def broken_setup(self, round_, results):
        out = real_finish(self, round_, results)
        if round_ == 1:
            self.setup_args = (None, *self.setup_args[1:])
            ray.kill(self.actor, no_restart=True)
        return out
    monkeypatch.setattr(ServerProxy, "finish_planned", broken_setup)
    cfg = load_config(None, [*RUN, *RAY, "fed.rounds=2", "name=broken", f"output_dir={tmp_path}"])
    with pytest.raises(ray.exceptions.RayTaskError):
        run_experiment(cfg, progress=False)
    # ray.kill is asynchronous: a call that reaches the replacement before the kill does is still
    # answered, so ask until it is gone (a leaked replacement answers until the deadline)
    replacement, deadline = made[-1], time.monotonic() + 60
    while True:
        try:
            ray.get(replacement.__ray_ready__.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            break
        assert time.monotonic() < deadline, "the replacement whose set-up failed is still alive 60 s later"
        time.sleep(0.2)


# ----------------------------------------------------------------------------- a frozen client actor

@pytest.mark.ray
@pytest.mark.slow
def test_a_client_actor_frozen_mid_round_is_killed_and_the_run_ends_as_the_calm_one(ray_cluster, tmp_path,
                                                                                  monkeypatch):
    """SIGSTOP on a client actor right after it is handed a plan in round 2: it never answers, so
    once its plan is past the deadline derived from round 1's step times (here the floor, 5 s) it
    is killed and replaced and its plans run on the other actor. The run ends with the bits of a
    calm one; the round counts the timeout; the stopped process is gone."""
    import psutil

    from meerkat_ray.distributed.executor import RayExecutor

    overrides = [*RUN, "fed.rounds=3"]
    calm = local_twin(tmp_path, overrides)
    frozen: dict = {}
    real_run, real_dispatch = RayExecutor.run_clients, RayExecutor._maybe_kill

    def run_clients(self, plans, on_result=None):
        if plans and plans[0].round == 2 and "pids" not in frozen:
            frozen["pids"] = {id(a): info["pid"] for a, info in zip(self.actors, self.actor_info())}
        return real_run(self, plans, on_result)

    def maybe_kill(self, actor):
        real_dispatch(self, actor)
        if "pids" in frozen and "pid" not in frozen:
            frozen["pid"] = frozen["pids"][id(actor)]
            os.kill(frozen["pid"], signal.SIGSTOP)
    monkeypatch.setattr(RayExecutor, "run_clients", run_clients)
    monkeypatch.setattr(RayExecutor, "_maybe_kill", maybe_kill)
    cfg = load_config(None, [*overrides, *RAY, "ray.plan_timeout_floor_s=5", "name=frozen", f"output_dir={tmp_path}"])
    try:
        run_experiment(cfg, progress=False)
        gone = gone_within(frozen["pid"], 60)  # killed by Ray, stopped as it is
    finally:
        if "pid" in frozen and psutil.pid_exists(frozen["pid"]):
            os.kill(frozen["pid"], signal.SIGKILL)
    assert gone
    rounds = read_metrics(cfg.run_dir)
    assert rounds[2]["actor_timeouts"] >= 1 and rounds[2]["actor_restarts"] >= 1
    assert rounds[1]["actor_timeouts"] == 0
    assert_same_run(calm, cfg.run_dir, ignore=("retries", "actor_restarts", "pool_shrinks", "pool_regrowths",
                                               "actor_timeouts"))


def gone_within(pid: int, timeout_s: float) -> bool:
    import time

    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


# ----------------------------------------------------------------------------- stored runs: no Ray

def test_each_process_writes_a_stored_run_in_a_scratch_folder_of_its_own(tmp_path, monkeypatch):
    """Two attempts at one stored run (a trial being stopped, its retry) never share a folder: the
    one being stopped cannot remove or overwrite the files of the one replacing it."""
    monkeypatch.setenv("MEERKAT_RAY_SCRATCH", str(tmp_path))
    cfg = load_config(None, [*RUN, "output_dir=file:///store/runs", "name=trial"])
    code = ("from meerkat_ray.config import load_config; import sys; "
            "print(load_config(None, sys.argv[1:]).run_dir)")
    other = subprocess.run([sys.executable, "-c", code, "output_dir=file:///store/runs", "name=trial"],
                           capture_output=True, text=True, check=True, env={**os.environ}).stdout.strip()
    assert cfg.run_dir.name == Path(other).name == "trial"
    assert cfg.run_dir != Path(other) and tmp_path in cfg.run_dir.parents and tmp_path in Path(other).parents
    assert cfg.run_dir == load_config(None, [*RUN, "output_dir=file:///store/runs", "name=trial"]).run_dir

    # a killed attempt cannot remove its folder: the next one on the node does, and only the dead's
    from meerkat_ray.uris import remove_dead_attempts

    (Path(other) / "config.yaml").parent.mkdir(parents=True)  # the subprocess has exited
    cfg.run_dir.mkdir(parents=True)
    remove_dead_attempts("file:///store/runs")
    assert not Path(other).parent.exists() and cfg.run_dir.is_dir()


def test_an_upload_to_a_file_uri_is_whole_or_absent(tmp_path, monkeypatch):
    """A copy killed halfway leaves the stored file as it was (no torn file at the URI), and no
    temp file behind."""
    import pyarrow.fs as pafs

    from meerkat_ray.storage import resolve

    store = resolve(f"file://{tmp_path / 'store'}", "test")
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(b"a" * 1000)
    new.write_bytes(b"b" * 100_000)
    store.upload_file(old, "run/metrics.jsonl")
    real_copy = pafs.copy_files

    def torn_copy(source, destination, **kwargs):
        with open(destination, "wb") as f:  # what a kill in the middle of the copy leaves
            f.write(b"b" * 512)
        raise OSError("killed while copying")
    monkeypatch.setattr(pafs, "copy_files", torn_copy)
    with pytest.raises(OSError):
        store.upload_file(new, "run/metrics.jsonl")
    monkeypatch.setattr(pafs, "copy_files", real_copy)
    assert (tmp_path / "store" / "run" / "metrics.jsonl").read_bytes() == b"a" * 1000
    assert [p.name for p in (tmp_path / "store" / "run").iterdir()] == ["metrics.jsonl"]


@pytest.mark.slow
def test_a_round_whose_upload_cannot_happen_is_an_error_before_it_is_reported(tmp_path, monkeypatch):
    """The local run folder is gone when round 1 is to be uploaded: the run stops with an error
    naming it, and round 1 never reaches `on_round` (where a Tune trial reports and checkpoints)."""
    from meerkat_ray import checkpoint
    from meerkat_ray.runner import run_stored

    monkeypatch.setenv("MEERKAT_RAY_SCRATCH", str(tmp_path / "scratch"))
    real_save = checkpoint.RunCheckpoint.save

    def save(self, folder):
        real_save(self, folder)
        if self.round == 1:
            shutil.rmtree(folder)
    monkeypatch.setattr(checkpoint.RunCheckpoint, "save", save)
    seen = []
    cfg = load_config(None, [*RUN, "fed.rounds=2", f"output_dir=file://{tmp_path / 'store'}", "name=gone"])
    with pytest.raises(MeerkatError, match="gone from this node's scratch"):
        run_stored(cfg, progress=False, on_round=lambda r, *a: seen.append(r))
    assert seen == []


@pytest.mark.slow
def test_a_stored_run_cut_short_in_its_first_upload_is_started_again_not_refused(tmp_path, monkeypatch):
    """What a stopped Ray job left (measured on 6758c49: a trial killed while its first upload
    pass had sent metrics, sparse_init, mask and path but not yet config.yaml): the trial, started
    afresh by the resumed sweep (no Tune checkpoint), must replace that folder, while a folder
    that is no run folder at all is still refused."""
    from meerkat_ray.runner import run_stored
    from meerkat_ray.storage import Store, resolve

    monkeypatch.setenv("MEERKAT_RAY_SCRATCH", str(tmp_path / "scratch"))
    uri = f"file://{tmp_path / 'store'}"
    cfg = load_config(None, [*RUN, "fed.rounds=1", f"output_dir={uri}", "name=cut"])
    real_upload, sent = Store.upload_file, []

    def killed_midway(self, local, rel):
        if len(sent) == 2:
            raise KeyboardInterrupt  # the attempt is stopped here
        sent.append(rel)
        real_upload(self, local, rel)
    monkeypatch.setattr(Store, "upload_file", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        run_stored(cfg, progress=False)
    monkeypatch.setattr(Store, "upload_file", real_upload)
    store = resolve(uri, "test").child("cut")
    assert store.files() and not store.is_file("sparse_final.safetensors")
    run_stored(cfg, overwrite=True, progress=False)  # what a trial restarted from scratch does
    assert store.is_file("sparse_final.safetensors") and store.is_file("config.yaml")

    foreign = tmp_path / "store" / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cfg.name = "foreign"
    with pytest.raises(MeerkatError, match="not a run folder"):
        run_stored(cfg, overwrite=True, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"


def calibration_too_long() -> list[str]:
    """Valid keys that only the data can refuse: no client's ~24 examples fill 30 one-pass steps of 4."""
    return ["vp.calib_steps=30", "vp.min_window=30"]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["uri", "local"])
def test_overwrite_keeps_the_stored_run_when_the_new_run_is_refused(tmp_path, monkeypatch, capsys, where):
    """`run --overwrite` whose data is refused leaves the run folder it would replace untouched,
    at a URI as on a local disk: a folder is deleted only when the new run is about to write."""
    from meerkat_ray.cli import main

    monkeypatch.setenv("MEERKAT_RAY_SCRATCH", str(tmp_path / "scratch"))
    output = f"file://{tmp_path / 'store'}" if where == "uri" else str(tmp_path / "store")
    args = ["run", *RUN, "fed.rounds=1", f"output_dir={output}", "name=kept", "--quiet"]
    assert main(args) == 0
    folder = tmp_path / "store" / "kept"
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*args, *calibration_too_long(), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: vp.min_window"), err
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_tune_checkpoint_newer_than_the_stored_run_folder_is_refused_with_a_reason(tmp_path, monkeypatch):
    """A retried trial whose Tune checkpoint (round 2) is newer than the run folder at the URI
    (its logs end at round 1) stops with an error saying so, instead of resuming into a run folder
    that lacks the rounds it builds on; the same trial with a fitting folder resumes."""
    from ray import tune as ray_tune

    from meerkat_ray.checkpoint import RunCheckpoint
    from meerkat_ray.config import to_dict
    from meerkat_ray.distributed import tune as sweep_tune

    monkeypatch.setenv("MEERKAT_RAY_SCRATCH", str(tmp_path / "scratch"))
    overrides = [*RUN, "fed.rounds=3"]
    kept: dict = {}

    def on_round(round_, metrics, last, ckpt):
        if round_ == 1:
            shutil.copytree(cfg.run_dir, tmp_path / "at-round-1")
        if round_ == 2:
            (tmp_path / "tune-ckpt").mkdir()
            ckpt.save(tmp_path / "tune-ckpt")
            kept["round"] = ckpt.round
    cfg = load_config(None, [*overrides, "name=t0", f"output_dir={tmp_path / 'straight'}"])
    run_experiment(cfg, progress=False, on_round=on_round)
    assert kept == {"round": 2} and RunCheckpoint.load(tmp_path / "tune-ckpt").round == 2

    runs = tmp_path / "runs"
    shutil.copytree(tmp_path / "at-round-1", runs / "t0")  # the stored folder lags the checkpoint
    monkeypatch.setattr(ray_tune, "get_checkpoint", lambda: ray_tune.Checkpoint.from_directory(tmp_path / "tune-ckpt"))
    monkeypatch.setattr(ray_tune, "get_context", lambda: type("C", (), {"get_trial_id": lambda self: "t0"})())
    monkeypatch.setattr(ray_tune, "report", lambda *a, **k: None)
    base = {k: v for k, v in to_dict(cfg).items() if k not in ("name", "output_dir")}
    with pytest.raises(MeerkatError, match=r"Tune's checkpoint of round 2 does not fit the run folder "
                                           r"file://.*/runs/t0: .*metrics.jsonl: lacks rounds"):
        sweep_tune.run_trial({}, base, f"file://{runs}")

    shutil.rmtree(runs / "t0")
    shutil.copytree(tmp_path / "straight" / "t0", runs / "t0")
    sweep_tune.run_trial({}, base, f"file://{runs}")  # a folder that holds round 2: resumed to the end
    assert torch.equal(*_thetas(runs / "t0", tmp_path / "straight" / "t0"))


def _thetas(a: Path, b: Path):
    from meerkat_ray.runlog import load_theta

    return load_theta(a / "sparse_final.safetensors"), load_theta(b / "sparse_final.safetensors")


# ----------------------------------------------------------------------------- printed recovery commands

@pytest.mark.ray
@pytest.mark.slow
def test_a_failed_trial_is_named_with_its_error_and_its_error_file_is_where_it_says(ray_cluster, tmp_path, capsys):
    """A trial that fails at run time (its model folder has a config.json but no weights) makes
    `tune` exit 1 and print, per failed trial, the last line of its error and where its error.txt
    is kept at the sweep's URI; that file is there; the printed --resume command is the sweep's own."""
    from meerkat_ray.cli import main
    from meerkat_ray.storage import resolve

    model = tmp_path / "no-weights"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    sweep_file = str(Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml")
    uri = f"file://{tmp_path / 'store'}"
    args = ["tune", sweep_file, "grid.mask.density=[0.01]", "grid.fed.local_steps=[2]", f"model.name={model}",
            "tune.max_failures=0", f"tune.output_dir={uri}", "--quiet"]
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: 1 of 1 trials failed; `meerkat-ray tune ") and "--resume` retries" in err[0]
    line = err[1]
    assert line.startswith("  trial ") and f"(all of it: {uri}/smoke/tune/" in line and line.endswith("error.txt)")
    where = line.rsplit("(all of it: ", 1)[1][:-1]
    text = resolve(where.rsplit("/", 1)[0], "test").read_bytes("error.txt").decode()
    reason = line.split(": ", 1)[1].rsplit(" (all of it: ", 1)[0]
    assert reason and reason in text
