"""The Ray cluster a run or sweep uses: join one or start an embedded one, and what a federation
holds on it.

`connect` joins `ray.address` (or $RAY_ADDRESS under `ray job submit`) or starts an embedded cluster
that this process then owns (`disconnect` stops only that). `trial_bundles` lays out one
federation's placement group: [driver, server actor, client actor 0..A-1] (executor=ray) or one
bundle in which the trial runs its clients itself (executor=local).
"""
from __future__ import annotations

import logging
import math
import os
import socket

import ray

from ..config import Config, RayConfig
from ..errors import MeerkatError

CONTROL_CPUS = 0.25   # the trial driver and the server actor: waiting on futures, replay and GradIP are light
# ray.task_events=false: Ray's core worker then records no per-task events in the actor. Its buffer
# holds ~30 KB per task of a round (K = 1,000 clients of one actor: +30 MB of RSS, tests/test_memory.py)
NO_TASK_EVENTS = {"RAY_task_events_report_interval_ms": "0"}
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM", "MEERKAT_RAY_CACHE", "HF_HOME")

_owned_cluster = False  # True while this process runs an embedded cluster that it started


# ----------------------------------------------------------------------------- the cluster

def runtime_env() -> dict:
    """What every actor of this job inherits: the offline switches and cache folders of the driver.

    Under `ray job submit` the job's own runtime_env already reaches every actor (and Ray refuses
    the same variable set twice), so nothing is added there.
    """
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return {}
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    return {"env_vars": env} if env else {}


def client_bundle(rc: RayConfig) -> dict:
    bundle = {"CPU": rc.cpus_per_client}
    if rc.gpus_per_client:
        bundle["GPU"] = rc.gpus_per_client
    return bundle


def trial_bundles(cfg: Config) -> list[dict]:
    """Placement-group bundles that cover one federation.

    ray backend: [driver, server, client actor 0 .. num_actors-1];
    local backend: one bundle in which the driver also runs every client.
    """
    if cfg.executor == "local":
        return [client_bundle(cfg.ray)]
    return [{"CPU": CONTROL_CPUS}, {"CPU": CONTROL_CPUS}] + [client_bundle(cfg.ray)] * cfg.ray.num_actors


def connect(rc: RayConfig, num_cpus: float = 0.0, num_gpus: float = 0.0, progress: bool = False) -> None:
    """Join `ray.address` (or $RAY_ADDRESS under `ray job submit`), else start an embedded cluster.

    An already initialised Ray (tests, a Tune trial) is used as it is. The embedded cluster
    declares at least `num_cpus` logical CPUs so that every actor fits, and `ray.num_gpus` logical
    GPUs (0 = detect): on a CPU machine that exercises fractional-GPU scheduling.
    """
    global _owned_cluster
    if ray.is_initialized():
        return
    common = dict(runtime_env=runtime_env(), logging_level=logging.WARNING)
    address = rc.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        _check_reachable(address)
        try:
            context = ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise MeerkatError(f"ray.address: cannot join a Ray cluster at {address!r} ({exc})") from None
        if progress:
            print(f"Ray: joined the cluster at {address} (dashboard {context.dashboard_url or 'off'})", flush=True)
        return
    cpus = max(os.cpu_count() or 1, math.ceil(num_cpus))
    # address="local": a new cluster of its own, even where a `ray start` cluster runs on this machine
    # (without it Ray joins that one, from the address file `ray start` leaves, and refuses num_cpus)
    context = ray.init(address="local", num_cpus=cpus, num_gpus=rc.num_gpus or None,
                       dashboard_host=rc.dashboard_host, **common)
    _owned_cluster = True
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if num_gpus > gpus + 1e-9:
        disconnect()
        raise MeerkatError(f"ray.gpus_per_client: the federation needs {num_gpus:g} GPUs, the embedded cluster "
                           f"has {gpus:g} (declare logical ones with ray.num_gpus)")
    if progress:
        dashboard = f"http://{context.dashboard_url}" if context.dashboard_url else "off"
        print(f"Ray: embedded cluster with {cpus} CPUs, {gpus:g} GPUs (dashboard {dashboard})", flush=True)


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes (ray.init retries an unreachable GCS for a long time)."""
    if address == "auto":
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError):
        raise MeerkatError(f"ray.address: no Ray cluster answers at {address!r} (expected auto or host:port)") from None


def disconnect() -> None:
    """Stop the embedded cluster if `connect` started it (a joined cluster keeps running)."""
    global _owned_cluster
    if _owned_cluster:
        ray.shutdown()
        _owned_cluster = False


def federation_demand(cfg: Config) -> tuple[float, float]:
    """(CPUs, GPUs) that one federation of this config holds on the cluster."""
    bundles = trial_bundles(cfg)
    return sum(b.get("CPU", 0.0) for b in bundles), sum(b.get("GPU", 0.0) for b in bundles)


# ----------------------------------------------------------------------------- lost nodes

class ActorFrozen(Exception):
    """An actor missed the deadline of a call (`deadlines.Deadlines`) and was killed: handled as lost."""


LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ActorFrozen)  # an actor (or its node) is gone


def node_label(node_id: str | None) -> str:
    """`node 3f2a9c1b0d4e (10.0.0.7)`: how warnings and error lines name a node."""
    if not node_id:
        return "an unknown node"
    ip = next((n.get("NodeManagerAddress") for n in ray.nodes() if n.get("NodeID") == node_id), None)
    return f"node {node_id[:12]}" + (f" ({ip})" if ip else "")


def resume_hint(cfg: Config, round_: int) -> str:
    """The command that continues the run, naming where its folder is kept (a URI, not this node's
    scratch copy, for a run stored at one)."""
    from ..uris import run_location

    return (f"the run folder holds the checkpoint of round {max(round_ - 1, 0)}: `meerkat-ray run --resume "
            f"{run_location(cfg)}` continues it (a Tune trial retries from it by itself, up to tune.max_failures)")


