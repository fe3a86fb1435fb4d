"""Clusters as users meet them: a node lost in the middle of a run. The multi-node scenarios run in
their own process on their own `ray.cluster_utils.Cluster` (tests/multinode.py), so a run that hangs
fails here by timeout instead of hanging the suite, and the session's Ray is never touched. The
cases that need no second node (a replacement the cluster can never place) run on the session's
cluster, with replacements that ask for a resource no node has."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import assert_same_run

from meerkat_ray.config import load_config
from meerkat_ray.runlog import read_metrics, read_path
from meerkat_ray.executors import FAULT_COUNTERS
from meerkat_ray.runner import run_experiment

HERE = Path(__file__).resolve().parent
RUN = ["model.name=tiny-llama", "data.task=tweets2", "data.max_length=32", "data.num_test=32",
       "mask.calib_num_seqs=2", "mask.calib_seq_len=32", "mask.cache=false", "mask.density=0.01",
       "data.num_train=96", "data.num_clients=4", "data.partition=mixed", "data.batch_size=4", "zo.lr=1e-2",
       "fed.rounds=4", "fed.local_steps=2", "fed.eval_every=2", "vp.calib_steps=2", "vp.rho=1e-6", "vp.sigma=1e6",
       "vp.min_quiet_fraction=0"]


@pytest.fixture(scope="module")
def calm(tmp_path_factory) -> Path:
    """The fault-free reference: the same federation without Ray."""
    root = tmp_path_factory.mktemp("calm")
    run_experiment(load_config(None, [*RUN, "executor=local", "model.num_threads=1", "name=calm",
                                      f"output_dir={root}"]), progress=False)
    return root / "calm"


def scenario(name: str, out: Path, *overrides: str, timeout_s: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(HERE / "multinode.py"), name, str(out), *overrides],
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.ray
@pytest.mark.slow
def test_a_lost_node_shrinks_the_pool_restores_the_server_and_the_pool_regrows(calm, tmp_path):
    """The server's node dies mid-round with one of the two client actors: the round finishes on the
    actor left (its replacement cannot be placed, so it holds no work), the server is rebuilt on the
    other node from the last checkpoint, and when a node joins the replacement becomes the second
    actor again. The run ends exactly as a fault-free one without Ray."""
    proc = scenario("lost-node", tmp_path, *RUN, "executor=ray", "ray.num_actors=2", "ray.gpus_per_client=1",
                    "ray.cpus_per_client=1", "ray.actor_start_timeout_s=60")
    multi = tmp_path / "multi"
    assert_same_run(calm, multi, ignore=FAULT_COUNTERS)

    events = json.loads((tmp_path / "events.json").read_text())
    assert events["killed"]["round"] == 2 and events["killed"]["client_actors_there"] == 1
    assert events["server_node_after"] != events["killed"]["node"]
    assert events["pool"] == {"1": 2, "2": 1, "3": 2, "4": 2}  # shrunk in round 2, grown back in round 3
    assert events["starting_after_loss"] == 1 and events["replacements_up"] == 1
    counts = {m["round"]: {k: m[k] for k in FAULT_COUNTERS} for m in read_metrics(multi)[1:]}
    assert counts[1] == dict.fromkeys(FAULT_COUNTERS, 0)
    assert counts[2]["pool_shrinks"] == 1 and counts[2]["actor_restarts"] == 1 and counts[2]["server_restarts"] == 1
    assert counts[2]["pool_regrowths"] == 0  # (retries: the plans in flight there, 0 if they had just finished)
    assert counts[3]["pool_regrowths"] == 1 and counts[3]["pool_shrinks"] == 0
    assert f"the server actor was lost with node {events['killed']['node'][:12]}" in proc.stderr


# ----------------------------------------------------------------------------- on the session's cluster

UNPLACEABLE = {"resources": {"no-such-node": 1}}  # what a replacement asks for when no node can take it
RAY = [*RUN, "executor=ray", "ray.num_actors=2", "ray.cpus_per_client=0.5"]


def lose_in_round(monkeypatch, victims: dict) -> None:
    """`victims[r](executor)` is killed in round r: right after the round's first plan went to it
    (so that plan is in flight: it is re-run elsewhere), or for the server after the first result."""
    import ray

    from meerkat_ray.distributed.executor import RayExecutor

    real_run, real_dispatch = RayExecutor.run_clients, RayExecutor._maybe_kill
    done, current = [], {}

    def run_clients(self, plans, on_result=None):
        current["round"] = plans[0].round if plans else None

        def after(result):
            if on_result:
                on_result(result)
            kill_once(self, result.round)
        return real_run(self, plans, after)

    def kill_once(self, round_, dispatched=None):
        if round_ in victims and round_ not in done:
            victim = victims[round_](self)
            if dispatched is None or victim is dispatched:
                done.append(round_)
                ray.kill(victim, no_restart=True)

    def maybe_kill(self, actor):
        real_dispatch(self, actor)
        kill_once(self, current.get("round"), dispatched=actor)

    monkeypatch.setattr(RayExecutor, "run_clients", run_clients)
    monkeypatch.setattr(RayExecutor, "_maybe_kill", maybe_kill)


@pytest.mark.ray
def test_unplaceable_replacements_a_client_is_left_out_the_server_stops_the_run_with_resume(
        ray_cluster, calm, tmp_path, monkeypatch):
    """Replacements ask for a resource no node has. One of two client actors dies in round 2: the
    run does not wait for its replacement and finishes the round on the actor left. The server
    actor dies in round 3: the run stops within ray.actor_start_timeout_s with an error naming the
    node, the round and `run --resume`. The resumed run ends bit for bit as the fault-free one, the
    shrunk round 2 included (kept from before the stop). The run is stored at a file:// URI: the
    `run --resume` the error prints names the URI, and pasted as it is, it completes the run."""
    from meerkat_ray.cli import main
    from meerkat_ray.errors import MeerkatError
    from meerkat_ray.runner import run_stored
    from meerkat_ray.distributed.actors import ClientActor, ServerActor
    from meerkat_ray.distributed.executor import RayExecutor

    real_new, real_new_server = RayExecutor._new_actor, RayExecutor.new_server_actor

    def new_actor(self, slot):
        if len(self.slot_of) < self.cfg.ray.num_actors and not self.counts["actor_restarts"]:  # at set-up
            return real_new(self, slot)
        actor = ClientActor.options(num_cpus=0.5, **UNPLACEABLE).remote(self.cfg, self.data_ref, f"client-actor-{slot}")
        self.slot_of[id(actor)] = slot
        return actor

    def new_server_actor(self):
        if self.server is None:
            return real_new_server(self)
        return ServerActor.options(num_cpus=0.25, **UNPLACEABLE).remote()

    monkeypatch.setattr(RayExecutor, "_new_actor", new_actor)
    monkeypatch.setattr(RayExecutor, "new_server_actor", new_server_actor)
    lose_in_round(monkeypatch, {2: lambda ex: ex.actors[0], 3: lambda ex: ex.server.actor})
    monkeypatch.setenv("MEERKAT_RAY_SCRATCH", str(tmp_path / "scratch"))
    uri = f"file://{tmp_path / 'store'}"
    cfg = load_config(None, [*RAY, "ray.actor_start_timeout_s=2", "name=lost", f"output_dir={uri}"])
    with pytest.raises(MeerkatError) as err:
        run_stored(cfg, progress=False)
    message = str(err.value)
    node = ray_cluster.get_runtime_context().get_node_id()
    for part in ("round 3", f"node {node[:12]}", "ray.actor_start_timeout_s", "checkpoint of round 2",
                 f"meerkat-ray run --resume {uri}/lost`"):
        assert part in message, (part, message)
    stored = tmp_path / "store" / "lost"
    rounds = read_metrics(stored)[1:]
    assert [m["round"] for m in rounds] == [1, 2]
    assert rounds[1]["pool_shrinks"] == 1 and rounds[1]["actor_restarts"] == 1 and rounds[1]["retries"] >= 1
    assert rounds[1]["pool_regrowths"] == 0

    monkeypatch.undo()
    command = message.split("`")[1].split()  # the command as printed, pasted
    assert command[:3] == ["meerkat-ray", "run", "--resume"]
    assert main([*command[1:], "--quiet"]) == 0
    assert_same_run(calm, stored, ignore=FAULT_COUNTERS)
    assert ray_cluster.is_initialized()


# ----------------------------------------------------------------------------- Ray Jobs, S3, no shared path

class HoldingS3:
    """moto's threaded S3 server behind a WSGI wrapper that can run `on_first_checkpoint` (once, in
    the server's thread) when the first Tune checkpoint is stored, before it answers that upload:
    the trial that sent it waits for the answer, so whatever the hook does to the trials happens
    while every one of them is still unfinished."""

    CHECKPOINT = re.compile(r".*/checkpoint_\d+/checkpoint\.safetensors")

    def __init__(self):
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        self.on_first_checkpoint, self.fired, self._lock = None, threading.Event(), threading.Lock()
        moto_app = DomainDispatcherApplication(create_backend_app)
        holding = self

        class Server(ThreadedMotoServer):
            def _server_entry(self) -> None:
                from moto.moto_server.threaded_moto_server import MotoRequestHandler
                from werkzeug.serving import make_server

                self._server = make_server(self._ip_address, self._port, holding.app(moto_app), True,
                                           request_handler=MotoRequestHandler)
                self._server_ready_event.set()
                self._server.serve_forever()

        self.server = Server(ip_address="127.0.0.1", port=0, verbose=False)

    def app(self, inner):
        def wsgi(environ, start_response):
            body = list(inner(environ, start_response))
            query = environ.get("QUERY_STRING", "")
            stored = (environ["REQUEST_METHOD"] == "PUT" and "partNumber" not in query) or \
                (environ["REQUEST_METHOD"] == "POST" and "uploadId" in query)  # a whole object, or a multipart one completed
            if stored and self.CHECKPOINT.fullmatch(environ.get("PATH_INFO", "")):
                with self._lock:
                    if not self.fired.is_set() and self.on_first_checkpoint is not None:
                        self.on_first_checkpoint()
                        self.fired.set()
            return body
        return wsgi


@pytest.fixture
def s3(monkeypatch):
    """A local S3-compatible server (moto, `HoldingS3`) on 127.0.0.1 and a bucket; yields the server
    and the sweep URI prefix."""
    import pyarrow.fs as pafs

    holding = HoldingS3()
    holding.server.start()
    _, port = holding.server.get_host_and_port()
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    fs, _ = pafs.FileSystem.from_uri(f"s3://sweeps?{query}&allow_bucket_creation=true")
    fs.create_dir("sweeps")
    yield holding, f"s3://sweeps/jobs?{query}"
    holding.server.stop()


class RayCLICluster:
    """A cluster started with `ray start` (`head`, then `worker` nodes) and a private temp folder.
    Every port is 0, so each process binds one the system picks (the head's GCS and dashboard
    ports are read back from what `ray start` prints): no port is chosen here and released for Ray
    to take, so no other process can take it in between (the head's Ray Client server, unused
    here, keeps Ray's fixed default: it takes no 0). Stopped by killing exactly the processes
    whose command line names that temp folder, and their children (never `ray stop`, which stops
    every Ray on the machine)."""

    PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port")

    def __init__(self, env: dict, gcs_port: int = 0, temp: str = ""):
        import tempfile

        self.temp = temp or tempfile.mkdtemp(prefix="mrj", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.env, self.gcs_port = env, gcs_port
        self.ray_bin = str(Path(sys.executable).parent / "ray")
        self.gcs, self.address = (f"127.0.0.1:{gcs_port}" if gcs_port else ""), ""

    def head(self, *args: str, env: dict | None = None) -> RayCLICluster:
        import re

        out = self._start(env or self.env, "--head", f"--port={self.gcs_port}", "--num-cpus=0", "--include-dashboard=true",
                          "--dashboard-host=127.0.0.1", "--dashboard-port=0", *args)
        gcs = re.search(r"--address='[^':]+:(\d+)'", out)
        dashboard = re.search(r"RAY_API_SERVER_ADDRESS='(http://[^']+)'", out)
        if not (gcs and dashboard):
            self.stop()
            raise AssertionError(f"no GCS or dashboard address in the output of ray start:\n{out[-3000:]}")
        self.gcs, self.address = f"127.0.0.1:{gcs.group(1)}", dashboard.group(1)
        return self

    def worker(self, env: dict, *args: str) -> RayCLICluster:
        self._start(env, f"--address={self.gcs}", "--num-cpus=2", *args)
        return self

    def _start(self, env: dict, *args: str) -> str:
        proc = subprocess.run([self.ray_bin, "start", *args, *(f"--{name}=0" for name in self.PORTS),
                               "--node-ip-address=127.0.0.1", "--num-gpus=0", "--disable-usage-stats",
                               f"--temp-dir={self.temp}"], env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode:
            self.stop()
            raise AssertionError(proc.stdout[-2000:] + proc.stderr[-2000:])
        return proc.stdout + proc.stderr

    def job(self, *args, timeout_s: int = 300) -> subprocess.CompletedProcess:
        """`ray job ARGS` against this cluster; retried while the head's job agent is still starting."""
        import time

        deadline = time.monotonic() + 90
        while True:
            proc = subprocess.run([self.ray_bin, "job", *args[:1], "--address", self.address, *args[1:]],
                                  env=self.env, capture_output=True, text=True, timeout=timeout_s)
            if "No available agent" not in proc.stderr + proc.stdout or time.monotonic() > deadline:
                return proc
            time.sleep(1)

    def job_status(self, submission_id: str) -> str:
        """What `ray job status` reports, asked in this process (a CLI process costs ~2 s of CPU)."""
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient(self.address).get_job_status(submission_id).value)

    def live_actors(self, submission_id: str) -> list[dict]:
        """Actors of a submitted job that are not dead yet (the state API of the head's dashboard)."""
        from ray.job_submission import JobSubmissionClient
        from ray.util.state import list_actors

        job_id = JobSubmissionClient(self.address).get_job_info(submission_id).job_id
        return [a for a in list_actors(address=self.address, filters=[("job_id", "=", job_id)], limit=1000,
                                       raise_on_missing_output=False)
                if a.state != "DEAD"]

    def processes(self) -> list:
        """This cluster's processes: those whose command line names its temp folder, and their children."""
        import psutil

        named = [p for p in psutil.process_iter(["cmdline"]) if self.temp in " ".join(p.info["cmdline"] or [])]
        return list({p.pid: p for q in named for p in [q, *self._children(q)]}.values())

    def freeze(self, title: str) -> list:
        """SIGSTOP this cluster's workers whose process title starts with `title` (a Ray worker sets
        it to `ray::<Class>.<method>`); returns them, for `thaw`."""
        import psutil

        frozen = []
        for p in self.processes():
            with __import__("contextlib").suppress(psutil.Error):
                if " ".join(p.cmdline()).startswith(title):
                    p.suspend()
                    frozen.append(p)
        return frozen

    @staticmethod
    def thaw(processes: list) -> None:
        import psutil

        for p in processes:
            with __import__("contextlib").suppress(psutil.Error):
                p.resume()

    def stop(self) -> None:
        import time

        import psutil

        mine = self.processes()
        # the GCS goes last, as Ray's own Node.kill_all_processes does: a raylet told to stop
        # unregisters from the GCS, and with the GCS gone it waits ~10 s for an answer
        gcs = [p for p in mine if self._is_gcs(p)]
        for group in ([p for p in mine if p not in gcs], gcs):
            for p in group:
                with __import__("contextlib").suppress(psutil.Error):
                    p.terminate()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(self._status(p) != psutil.STATUS_ZOMBIE for p in group):
                time.sleep(0.1)
            for p in [p for p in group if self._status(p) != psutil.STATUS_ZOMBIE]:  # a zombie has exited
                with __import__("contextlib").suppress(psutil.Error):
                    p.kill()
        __import__("shutil").rmtree(self.temp, ignore_errors=True)

    @staticmethod
    def _is_gcs(process) -> bool:
        import psutil

        try:
            return Path(process.cmdline()[0]).name == "gcs_server"
        except (psutil.Error, IndexError):
            return False

    @staticmethod
    def _status(process) -> str:
        import psutil

        try:
            return process.status()
        except psutil.Error:
            return psutil.STATUS_ZOMBIE

    @staticmethod
    def _children(process) -> list:
        import psutil

        try:
            return process.children(recursive=True)
        except psutil.Error:
            return []


def until(condition, timeout_s: float) -> bool:
    """Wait for a state (not for a time): True as soon as `condition()` holds, False after timeout_s."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return bool(condition())


JOB_SWEEP = ["grid.mask.density=[0.01]", "grid.fed.local_steps=[2]", "grid.seed=[0,1]", "fed.rounds=4",
             "mask.cache=false", "model.num_threads=1"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_job_sweep_on_s3_stops_resumes_and_needs_no_shared_path(s3, tmp_path):
    """As cluster/README.md tells users to work: `ray start --head` (no CPUs for work) and a worker
    node; `ray job submit -- meerkat-ray tune ... tune.output_dir=s3://...`; `ray job stop` midway;
    the same submission with --resume completes it; `ray job logs` and the submission's own output
    show it. The trials write their run folders in the worker's scratch folder (a path the driver
    is never told) and upload them to S3 every round; the results table and analyze then work from
    the URI alone, the resumed trial equals a straight run, and the worker's scratch folder is left
    empty."""
    import io
    import os
    import time

    import pandas as pd
    import pyarrow.fs as pafs

    from meerkat_ray.cli import main
    from meerkat_ray.storage import resolve, uri_join
    from meerkat_ray.sweep_file import load_sweep, point_config

    holding, s3_uri = s3
    venv_bin = str(Path(sys.executable).parent)
    # RAY_AUTH_MODE explicit: otherwise `ray start --head` turns token auth on when ~/.ray/auth_token
    # exists (any local ray.init writes one) while a joining worker does not; a 127.0.0.1-only cluster
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "MEERKAT_RAY_SCRATCH": str(tmp_path / "head"),
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cluster = RayCLICluster(env).head().worker({**env, "MEERKAT_RAY_SCRATCH": str(tmp_path / "worker")})
    sweep_file = str(HERE.parent / "tune_configs" / "smoke.yaml")
    command = ["--", "meerkat-ray", "tune", sweep_file, *JOB_SWEEP, f"tune.output_dir={s3_uri}"]
    store = resolve(s3_uri, "s3").child("smoke")
    # the trials are frozen the moment the first Tune checkpoint is stored (before its upload is
    # answered), so `ray job stop` always meets an unfinished sweep however fast the machine is
    frozen = []
    holding.on_first_checkpoint = lambda: frozen.extend(cluster.freeze("ray::ImplicitFunc"))
    try:
        assert cluster.job("submit", "--submission-id", "first", "--no-wait", *command).returncode == 0
        assert holding.fired.wait(240), store.files()
        assert frozen, [" ".join(p.cmdline()) for p in cluster.processes()]
        assert cluster.job("stop", "first").returncode == 0
        assert cluster.job_status("first") == "STOPPED"
        assert not store.is_file("results.parquet")  # it really was interrupted
        cluster.thaw(frozen)
        first_logs = cluster.job("logs", "first").stdout
        # the first job's trials outlive `ray job stop` for a while: the resumed sweep starts
        # once none of them is left (each attempt has its own scratch folder and claims the
        # stored run folder, so even one still running could not touch the new attempt's files)
        stopped = time.monotonic()
        assert until(lambda: not cluster.live_actors("first"), 120), cluster.live_actors("first")
        print(f"the first job's actors were all dead {time.monotonic() - stopped:.1f} s after `ray job stop`")

        second = cluster.job("submit", "--submission-id", "second", *command, "--resume", timeout_s=400)
        errors = {f: store.read_bytes(f).decode()[-1500:] for f in store.files() if f.endswith("error.txt")}
        assert second.returncode == 0, (second.stdout[-3000:], second.stderr[-3000:], errors)
        assert cluster.job_status("second") == "SUCCEEDED"
        logs = second.stdout  # a submission without --no-wait follows the job's logs to its end
    finally:
        cluster.thaw(frozen)
        cluster.stop()
    assert "smoke" in first_logs and "2 trials ->" in logs and uri_join(s3_uri, "smoke") in logs

    # the results table, from S3
    local = tmp_path / "results.parquet"
    pafs.copy_files(f"{store.path}/results.parquet", str(local), source_filesystem=store.fs)
    table = pd.read_parquet(local)
    assert len(table) == 2 and (table["status"] == "done").all() and (table["rounds_done"] == 4).all()
    assert all(str(r).startswith(uri_join(s3_uri, "smoke", "runs").partition("?")[0]) for r in table["run_dir"])
    # nothing was left on the worker; the driver's node holds only its staging copy of sweep.yaml + results
    assert not [p for p in (tmp_path / "worker").rglob("*") if p.is_file()]
    assert {p.name for p in (tmp_path / "head").rglob("*") if p.is_file()} <= {"sweep.yaml", "results.parquet",
                                                                               "results.csv"}

    # a trial stopped midway and resumed ends exactly as the same federation run straight through
    sweep = load_sweep(sweep_file, [*JOB_SWEEP, f"tune.output_dir={tmp_path}"])
    cfg = point_config(sweep.base, next(p for p in sweep.points if p["seed"] == 0))
    cfg.name, cfg.output_dir = "straight", str(tmp_path)
    run_experiment(cfg, progress=False)
    stored = resolve(table.loc[table["seed"] == 0, "run_dir"].iloc[0], "run_dir")
    assert stored.read_bytes("sparse_final.safetensors") == (cfg.run_dir / "sparse_final.safetensors").read_bytes()
    assert pd.read_parquet(io.BytesIO(stored.read_bytes("path.parquet"))).equals(read_path(cfg.run_dir))

    # the report from the URI (export and run --resume from a URI: the file:// test below, same code)
    assert main(["analyze", uri_join(s3_uri, "smoke")]) == 0
    assert store.is_file("analysis/report.html")


# ----------------------------------------------------------------------------- autoscaling

def cluster_env(tmp_path: Path) -> dict:
    import os

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "MEERKAT_RAY_SCRATCH": str(tmp_path / "scratch")}
    env.pop("RAY_ADDRESS", None)
    return env


def fake_autoscaling_config(gcs: str, idle_timeout_minutes: float) -> dict:
    """Ray's fake_multinode provider (worker nodes are raylets the autoscaler starts on this
    machine); the wheel ships no example YAML for it, so here is the whole config."""
    return {
        "cluster_name": "fake-meerkat", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "gcs_address": gcs, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},  # nothing to ssh into
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0, "GPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def gpu_workers(cluster: RayCLICluster) -> int:
    """Alive nodes with a GPU (only the autoscaler's gpu_worker nodes have one), from the head's
    state API in this process: a `ray status` process per poll cost ~2 s of CPU beside the sweep."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=cluster.address, filters=[("state", "=", "ALIVE")], limit=100,
                       raise_on_missing_output=False)
    return sum(1 for n in nodes if n.resources_total.get("GPU", 0) > 0)


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_waits_for_autoscaled_gpu_workers_which_leave_when_idle(calm, tmp_path):
    """The head has no CPU or GPU for work; GPU workers exist only once the (fake) autoscaler
    launches them for the trial's placement group. The sweep waits instead of failing, completes,
    and the idle worker is removed after idle_timeout_minutes.

    While that cluster still runs, a run with ray.address="" (the default, no RAY_ADDRESS) gets its
    own embedded cluster: Ray's own lookup would join the `ray start` one (it finds it through the
    address file `ray start` leaves in Ray's temp folder) and refuse the CPU count the embedded
    cluster declares. Ray's temp folder is a private one here (RAY_TMPDIR), so no other Ray on this
    machine is seen or touched."""
    import shutil
    import socket
    import tempfile
    import time

    import pandas as pd
    import yaml

    private = tempfile.mkdtemp(prefix="mre", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**cluster_env(tmp_path), "RAY_TMPDIR": private, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    head_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    config = tmp_path / "autoscaling.yaml"
    with socket.socket() as sock:  # the fake provider must know the GCS address before the head starts
        sock.bind(("127.0.0.1", 0))
        gcs_port = sock.getsockname()[1]
    cluster = RayCLICluster(env, gcs_port=gcs_port, temp=f"{private}/ray")
    config.write_text(yaml.safe_dump(fake_autoscaling_config(cluster.gcs, idle_timeout_minutes=0.1)))
    cluster.head(f"--autoscaling-config={config}", env=head_env)
    try:
        assert gpu_workers(cluster) == 0
        sweep = subprocess.Popen(
            [str(Path(sys.executable).parent / "meerkat-ray"), "tune", str(HERE.parent / "tune_configs" / "smoke.yaml"),
             "grid.mask.density=[0.01]", "grid.fed.local_steps=[2]", "mask.cache=false", "model.num_threads=1",
             "ray.gpus_per_client=1", f"ray.address={cluster.gcs}", f"tune.output_dir={tmp_path}", "--quiet"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        launched, deadline = 0, time.monotonic() + 300
        while sweep.poll() is None and time.monotonic() < deadline:  # the workers seen while the sweep runs
            launched = max(launched, gpu_workers(cluster))  # (an idle one may be gone again by its end)
            time.sleep(0.5)
        if sweep.poll() is None:
            sweep.kill()
        out, err = sweep.communicate(timeout=30)
        assert sweep.returncode == 0, out[-3000:] + err[:5000]
        assert (Path(private) / "ray" / "ray_current_cluster").is_file()  # what a plain ray.init() finds
        beside = subprocess.run([sys.executable, "-m", "meerkat_ray", "run", *RUN, "executor=ray", "ray.num_actors=1",
                                 "ray.cpus_per_client=1", "model.num_threads=1", "name=beside",
                                 f"output_dir={tmp_path}"], env=env, capture_output=True, text=True, timeout=300)
        deadline = time.monotonic() + 90
        while gpu_workers(cluster) and time.monotonic() < deadline:
            time.sleep(1)
        left = gpu_workers(cluster)
    finally:
        cluster.stop()
        shutil.rmtree(private, ignore_errors=True)
    table = pd.read_parquet(tmp_path / "smoke" / "results.parquet")
    assert len(table) == 1 and table["status"].tolist() == ["done"]
    assert launched == 1 and left == 0
    assert beside.returncode == 0, beside.stderr[-3000:]
    assert "Ray: embedded cluster with" in beside.stdout
    assert_same_run(calm, tmp_path / "beside", ignore=FAULT_COUNTERS)


# ----------------------------------------------------------------------------- a sweep loses a node

NODE_SWEEP = ["grid.mask.density=[0.01]", "grid.fed.local_steps=[2]", "grid.seed=[0,1]", "fed.rounds=4",
              "mask.cache=false", "model.num_threads=1", "ray.cpus_per_client=2", "tune.max_failures=2"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_survives_a_lost_node_with_the_results_of_a_fault_free_one(tmp_path):
    """Two trials, one per worker node, run folders at a file:// URI and each node with its own
    scratch folder. The node of the first trial to report round 2 is removed under it; Tune
    retries that trial from its round-2 checkpoint on the node left, downloading its run folder.
    The results table holds what a fault-free sweep gives: each trial's row and run folder equal
    a straight run of its grid point, bit for bit."""
    import io

    import pandas as pd

    from meerkat_ray.storage import resolve
    from meerkat_ray.sweep_file import load_sweep, point_config

    sweep_file = str(HERE.parent / "tune_configs" / "smoke.yaml")
    uri = f"file://{tmp_path / 'store'}"
    scenario("lost-node-sweep", tmp_path, sweep_file, *NODE_SWEEP, f"tune.output_dir={uri}", timeout_s=400)
    events = json.loads((tmp_path / "events.json").read_text())
    assert events["node"] and events["trial"] and events["errors"] == []
    table = pd.read_parquet(tmp_path / "results.parquet")
    assert len(table) == 2 and (table["status"] == "done").all() and (table["rounds_done"] == 4).all()
    lost = table[table["trial_id"].str.startswith(events["trial"])]
    assert len(lost) == 1  # the trial whose node was removed finished too

    sweep = load_sweep(sweep_file, [*NODE_SWEEP, f"tune.output_dir={tmp_path}"])
    for point in sweep.points:
        cfg = point_config(sweep.base, point)
        cfg.name, cfg.output_dir = f"straight-{point['seed']}", str(tmp_path)
        summary = run_experiment(cfg, progress=False)
        row = table[table["seed"] == point["seed"]].iloc[0]
        for column, key in (("final_accuracy", "final_accuracy"), ("best_accuracy", "best_accuracy"),
                            ("final_test_loss", "final_test_loss"), ("uplink_bytes", "uplink_bytes"),
                            ("downlink_bytes", "downlink_bytes")):
            assert row[column] == summary[key], (column, row[column], summary[key])
        assert list(row["flagged_clients"]) == list(summary["flagged_clients"])
        stored = resolve(row["run_dir"], "run_dir")
        assert stored.read_bytes("sparse_final.safetensors") == (cfg.run_dir / "sparse_final.safetensors").read_bytes()
        assert pd.read_parquet(io.BytesIO(stored.read_bytes("path.parquet"))).equals(read_path(cfg.run_dir))
        rounds = [json.loads(line)["round"] for line in stored.read_bytes("metrics.jsonl").splitlines()]
        assert rounds == [0, 1, 2, 3, 4]
    # the node left cleaned up after both trials; the lost node kept what it had (gone with it on a cloud)
    left = ({"scratch-0", "scratch-1"} - {events["lost_scratch"]}).pop()
    assert not [p for p in (tmp_path / left).rglob("*") if p.is_file()]
    assert [p for p in (tmp_path / events["lost_scratch"]).rglob("*") if p.name == "config.yaml"]


# ----------------------------------------------------------------------------- storage URIs, without Ray

@pytest.mark.parametrize("argv,key", [(["run", "output_dir=nope://x"], "output_dir"),
                                      (["tune", str(HERE.parent / "tune_configs" / "smoke.yaml"),
                                        "tune.output_dir=nope://x"], "tune.output_dir")])
def test_a_storage_uri_pyarrow_cannot_open_is_refused_before_ray_starts(monkeypatch, capsys, argv, key):
    import ray

    from meerkat_ray.cli import main

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init reached with a bad storage URI"))
    assert main([*argv, *([] if argv[0] == "tune" else RUN), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key}: cannot open 'nope://x'"), err


@pytest.mark.slow
def test_a_run_at_a_file_uri_is_uploaded_resumed_analyzed_and_exported_from_it(calm, tmp_path, monkeypatch):
    """output_dir=file://...: the run folder exists only at the URI afterwards (the scratch copy is
    gone), equals the same run written to a plain folder, and run --resume, analyze and export
    take the URI."""
    from meerkat_ray.cli import main

    monkeypatch.setenv("MEERKAT_RAY_SCRATCH", str(tmp_path / "scratch"))
    store = tmp_path / "store"
    assert main(["run", *RUN, "executor=local", "model.num_threads=1", "name=calm",
                 f"output_dir=file://{store}", "--quiet"]) == 0
    assert_same_run(calm, store / "calm", ignore=FAULT_COUNTERS)
    assert not [p for p in (tmp_path / "scratch").rglob("*") if p.is_file()]
    assert main(["run", "--resume", f"file://{store}/calm", "--quiet"]) == 0  # finished: rewrites the same
    assert_same_run(calm, store / "calm", ignore=FAULT_COUNTERS)
    assert main(["analyze", f"file://{store}/calm"]) == 0 and (store / "calm" / "analysis" / "report.html").is_file()
    assert main(["export", f"file://{store}/calm", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
