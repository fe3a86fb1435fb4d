"""Federation on Ray: the executor that spreads virtual clients over client actors.

`RayExecutor` has the interface of `runner.LocalExecutor`, so the one round loop
(`runner.federate`) drives both; it runs in the driver and is the only place that waits on Ray
futures. Per round:
    plans (from the ServerActor) -> a queue over the client actors (a free actor takes the next
    client; `ray.wait` returns whichever finishes first) -> results keyed by client id -> the
    ServerActor -> its SyncMessage broadcast once to every client actor.
Bit-identity with ray.backend=local: a client's result depends only on (global values, plan, data,
model), never on which actor ran it, and the server aggregates by client id, never by arrival.

Placement: outside Ray Tune, actors are scheduled by their resources. Inside a Tune trial the
trial's placement group has the bundles of `trial_bundles` ([driver, server, client actor 0..A-1])
and every actor is pinned to its own bundle.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
from collections import deque

import numpy as np
import ray
import torch
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .actors import ClientActor, ServerActor
from .config import Config, RayConfig
from .errors import MeerkatError
from .path import derive_seed
from .runner import FAULT_COUNTERS
from .zo import accuracy_and_loss

CONTROL_CPUS = 0.25   # the trial driver and the server actor: waiting on futures, replay and GradIP are light
IN_FLIGHT = 2         # plans queued per client actor (the second hides the driver round trip)
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
    if cfg.ray.backend == "local":
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
    context = ray.init(num_cpus=cpus, num_gpus=rc.num_gpus or None, dashboard_host=rc.dashboard_host, **common)
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

LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)  # an actor (or its node) is gone


def node_label(node_id: str | None) -> str:
    """`node 3f2a9c1b0d4e (10.0.0.7)`: how warnings and error lines name a node."""
    if not node_id:
        return "an unknown node"
    ip = next((n.get("NodeManagerAddress") for n in ray.nodes() if n.get("NodeID") == node_id), None)
    return f"node {node_id[:12]}" + (f" ({ip})" if ip else "")


def resume_hint(cfg: Config, round_: int) -> str:
    return (f"the run folder holds the checkpoint of round {max(round_ - 1, 0)}: `meerkat-ray run --resume "
            f"{cfg.run_dir}` continues it (a Tune trial retries from it by itself, up to tune.max_failures)")


# ----------------------------------------------------------------------------- the server

class ServerProxy:
    """The driver's handle on the ServerActor; the round loop calls it like a local `Server`.

    A lost server actor (its node died) is rebuilt where the cluster has room: a fresh actor is set
    up as at the start, loads the last state the driver holds (the latest `state_dict`, which is the
    last round's checkpoint, or the `load_state` of a resumed run), replays the `finish_round` calls
    made since, and the failed call runs again. All of it is deterministic, so the run goes on
    exactly as without the loss. A replacement that cannot be scheduled within
    `ray.actor_start_timeout_s` stops the run with an error naming the node, the round and
    `run --resume`.
    """

    def __init__(self, executor: RayExecutor, cfg: Config, setup_args: tuple):
        self.executor, self.cfg, self.setup_args = executor, cfg, setup_args
        self.actor = executor.server_actor
        self.node: str | None = None
        self.saved = None                 # (state, theta) a replacement loads
        self.since: list[tuple] = []      # finish_round arguments after `saved`, replayed in order
        self.round = 0
        self.restarts = 0
        self.node = self._call("setup", *setup_args)

    def _call(self, method: str, *args):
        while True:
            try:
                if self.actor is None:
                    self._rebuild()
                return ray.get(getattr(self.actor, method).remote(*args))
            except LOST:
                self.actor = None

    def _rebuild(self) -> None:
        ray_cfg, lost = self.cfg.ray, node_label(self.node)
        if self.restarts >= ray_cfg.max_actor_restarts:
            raise MeerkatError(f"ray.max_actor_restarts: the server actor was lost with {lost} in round {self.round} "
                               f"after {self.restarts} restarts; {resume_hint(self.cfg, self.round)}")
        print(f"warning: the server actor was lost with {lost} in round {self.round}; restoring it from the last "
              "checkpoint", file=sys.stderr, flush=True)
        actor = self.executor.new_server_actor()
        setup = actor.setup.remote(*self.setup_args)
        ready, _ = ray.wait([setup], timeout=ray_cfg.actor_start_timeout_s)
        if not ready:
            ray.kill(actor)
            raise MeerkatError(f"round {self.round}: the server actor was lost with {lost} and no replacement could be "
                               f"scheduled within {ray_cfg.actor_start_timeout_s:g} s (ray.actor_start_timeout_s); "
                               f"{resume_hint(self.cfg, self.round)}")
        self.node = ray.get(setup)
        calls = ([actor.load_state.remote(*self.saved)] if self.saved else [])
        calls += [actor.finish_round.remote(*args) for args in self.since]
        ray.get(calls)
        self.actor = actor
        self.restarts += 1
        self.executor.counts["server_restarts"] += 1

    def plan_round(self, round_: int):
        self.round = round_
        return self._call("plan_round", round_)

    def finish_round(self, round_: int, plans, results):
        outcome = self._call("finish_round", round_, plans, results)
        self.since.append((round_, plans, results))
        return outcome

    def state_dict(self):
        state = self._call("state_dict")
        self.saved, self.since = state, []
        return state

    def load_state(self, state: dict, theta: torch.Tensor) -> None:
        self._call("load_state", state, theta)
        self.saved, self.since = (state, theta), []

    def theta(self) -> torch.Tensor:
        return self._call("theta")

    def snapshot(self):
        return self._call("snapshot")


# ----------------------------------------------------------------------------- the executor

class RayExecutor:
    """A pool of client actors fed as a queue, plus the server actor.

    Set-up: every actor loads its model copy; actor 0 computes the mask and theta_0 (`mask`,
    `theta0` here, for the run folder and the server); every actor then builds its worker.

    Faults: a client actor that dies (with its node, or killed by `ray.chaos_kill_prob`) loses the
    plans it held; they go back to the queue and run on the actors left (`retries`; the pool
    shrinks, `pool_shrinks`). Its slot gets a fresh actor (`actor_restarts`; at most
    `ray.max_actor_restarts` for real deaths) that holds no work until the cluster has placed and
    started it - at once where there is room, when the autoscaler has added a node, or never; once
    up it restores the global values of the last finished round from the server and joins the pool
    (`pool_regrowths`). Only when no client actor is left does the run wait for one, at most
    `ray.actor_start_timeout_s`. A client's result depends only on the global values, its plan and
    its data, so the run ends bit-identical to a fault-free one. A lost server actor is restored by
    `ServerProxy`.
    """

    def __init__(self, cfg: Config, data):
        self.cfg = cfg
        self.actors: list = []               # ready: started, holding the global values after self.round
        self.starting: dict = {}             # ObjectRef of start() -> a replacement not up yet (holds no work)
        self.slot_of: dict[int, int] = {}    # id(actor handle) -> its slot (name, placement bundle)
        self.node_of: dict[int, str] = {}    # id(actor handle) -> node id, once started
        self.lost_nodes: list[str] = []      # nodes of client actors lost, in order
        self.round = 0                       # the actors hold the global values after this round
        self.server: ServerProxy | None = None
        self.restarts_left = cfg.ray.max_actor_restarts
        self.victims: set[int] = set()       # id() of actors killed by the chaos option
        self.chaos = np.random.default_rng(derive_seed(cfg.seed, "chaos")) if cfg.ray.chaos_kill_prob > 0 else None
        self.counts = dict.fromkeys(FAULT_COUNTERS, 0)
        self.pg = self._own_placement_group(cfg)
        # the server actor's process starts alongside the client actors'; it is set up in make_server
        self.server_actor = self.new_server_actor()
        self.data_ref = ray.put(data)  # one copy in the object store for every actor (and replacements)
        self.actors = [self._new_actor(i) for i in range(cfg.ray.num_actors)]
        try:
            self._await_start()
            self.mask, self.theta0 = ray.get(self.actors[0].compute_mask.remote())
            self.mask_ref, self.theta0_ref = ray.put(self.mask), ray.put(self.theta0)
            nodes = ray.get([a.start.remote(self.mask_ref, self.theta0_ref) for a in self.actors])  # set-up errors surface here
        except BaseException:
            self.close()
            raise
        self.node_of.update((id(a), node) for a, node in zip(self.actors, nodes))

    def _await_start(self) -> None:
        """Every actor of the run is placed and has loaded the model within ray.actor_setup_timeout_s;
        a cluster that cannot fit them (or an autoscaler that adds no node) is an error, never a
        silent wait."""
        timeout = self.cfg.ray.actor_setup_timeout_s
        refs = [a.__ray_ready__.remote() for a in (self.server_actor, *self.actors)]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            rc = self.cfg.ray
            need = {"CPU": CONTROL_CPUS + rc.num_actors * rc.cpus_per_client, "GPU": rc.num_actors * rc.gpus_per_client}
            have = {k: ray.cluster_resources().get(k, 0) for k in ("CPU", "GPU")}
            raise MeerkatError(f"{len(pending)} of the run's {len(refs)} actors did not start within {timeout:g} s "
                               f"(ray.actor_setup_timeout_s): the run needs {need['CPU']:g} CPUs and "
                               f"{need['GPU']:g} GPUs, the cluster has {have['CPU']:g} CPUs and {have['GPU']:g} "
                               "GPUs in all, some of them perhaps taken (ray.num_actors, ray.cpus_per_client, "
                               "ray.gpus_per_client)")

    def _new_actor(self, slot: int):
        options = {} if self.cfg.ray.task_events else {"runtime_env": {"env_vars": NO_TASK_EVENTS}}
        actor = ClientActor.options(num_cpus=self.cfg.ray.cpus_per_client, num_gpus=self.cfg.ray.gpus_per_client,
                                    **options, **self._placement(2 + slot)).remote(self.cfg, self.data_ref,
                                                                                   f"client-actor-{slot}")
        self.slot_of[id(actor)] = slot
        return actor

    def new_server_actor(self):
        return ServerActor.options(num_cpus=CONTROL_CPUS, **self._placement(1)).remote()

    @staticmethod
    def _own_placement_group(cfg: Config):
        """The Tune trial's placement group when this federation runs inside one laid out by `trial_bundles`."""
        pg = get_current_placement_group()
        if pg is not None and len(pg.bundle_specs) == len(trial_bundles(cfg)):
            return pg
        return None

    def _placement(self, bundle: int) -> dict:
        if self.pg is None:
            return {}
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle)}

    def make_server(self, cfg: Config, theta: torch.Tensor, g_pre, client_sizes: list[int]) -> ServerProxy:
        self.server = ServerProxy(self, cfg, (cfg, theta, g_pre, client_sizes))
        return self.server

    def local_server(self, server: ServerProxy):
        return server.snapshot()

    # -- the pool

    def run_clients(self, plans, on_result=None):
        """Every plan runs on some actor; a lost actor's plans go back to the queue."""
        queue = deque(plans)
        pending: dict = {}  # ObjectRef -> (actor, plan)
        load: dict[int, int] = {}
        results = {}
        round_ = plans[0].round if plans else self.round + 1
        while queue or pending:
            # one plan per idle actor first, then the second in flight: K <= IN_FLIGHT x actors
            # clients must not pile up on the first actors while the others wait
            for depth in range(1, IN_FLIGHT + 1):
                for actor in list(self.actors):
                    if queue and load.setdefault(id(actor), 0) < depth and id(actor) not in self.victims:
                        plan = queue.popleft()
                        pending[actor.run.remote(plan)] = (actor, plan)
                        load[id(actor)] += 1
                        self._maybe_kill(actor)
            if not pending:  # no client actor is left: wait (bounded) for a replacement
                self._wait_for_actors(round_)
                continue
            done, _ = ray.wait(list(pending) + list(self.starting), num_returns=1)
            if done[0] in self.starting:  # a replacement is up: it takes plans from the next pass on
                self._admit(done[0])
                continue
            actor, plan = pending.pop(done[0])
            load[id(actor)] -= 1
            try:
                result = ray.get(done[0])
            except LOST:
                self.counts["retries"] += 1
                queue.appendleft(plan)
                self._lost(actor, pending, queue)
                continue
            results[result.client] = result
            if on_result:
                on_result(result)
            if id(actor) in self.victims and load[id(actor)] == 0:
                self._lost(actor)  # killed after its last plan had already finished
        return [results[p.client] for p in plans]  # keyed by client: arrival order never matters

    def _maybe_kill(self, actor) -> None:
        """ray.chaos_kill_prob: kill the actor that was just given a plan (seeded from the run seed)."""
        if self.chaos is not None and self.chaos.random() < self.cfg.ray.chaos_kill_prob:
            self.victims.add(id(actor))
            ray.kill(actor, no_restart=True)

    def _lost(self, actor, pending: dict | None = None, queue: deque | None = None) -> None:
        """A dead actor leaves the pool; its other plans go back to the queue; its slot gets a replacement."""
        for ref, (owner, plan) in list((pending or {}).items()):
            if owner is actor:
                del pending[ref]
                queue.appendleft(plan)
                self.counts["retries"] += 1
        if actor in self.actors:
            self.actors.remove(actor)
            self.counts["pool_shrinks"] += 1
            self.lost_nodes.append(self.node_of.get(id(actor)))
        self._replace(actor)

    def _replace(self, dead) -> None:
        slot = self.slot_of.pop(id(dead), None)
        if slot is None:  # already replaced
            return
        chaos = id(dead) in self.victims
        self.victims.discard(id(dead))
        where = node_label(self.node_of.pop(id(dead), None))
        if not chaos and self.restarts_left <= 0:
            print(f"warning: client-actor-{slot} was lost ({where}) and ray.max_actor_restarts are used up; "
                  f"{len(self.actors)} client actors carry on", file=sys.stderr, flush=True)
            return
        if not chaos:
            self.restarts_left -= 1
            print(f"warning: client-actor-{slot} was lost ({where}); its replacement joins once the cluster can place "
                  f"it, {len(self.actors)} client actors carry on", file=sys.stderr, flush=True)
        actor = self._new_actor(slot)
        self.starting[actor.start.remote(self.mask_ref, self.theta0_ref)] = actor
        self.counts["actor_restarts"] += 1

    def _admit(self, ref) -> None:
        """A replacement has started: it restores the current global values and joins the pool. Calls
        on one actor run in order, so the plans it gets next wait for the restore. Only called where
        the server's values are those after `self.round` (never between finish_round and sync)."""
        actor = self.starting.pop(ref)
        try:
            node = ray.get(ref)
        except LOST:  # lost before it was up: its slot tries again
            self._replace(actor)
            return
        self.node_of[id(actor)] = node
        if self.server is not None:
            actor.restore.remote(ray.put(self.server.theta()), self.round)
        self.actors.append(actor)
        self.actors.sort(key=lambda a: self.slot_of[id(a)])
        self.counts["pool_regrowths"] += 1

    def _admit_started(self) -> None:
        """Replacements that are up by now join the pool (no waiting)."""
        if self.starting:
            ready, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)
            for ref in ready:
                self._admit(ref)

    def _wait_for_actors(self, round_: int) -> None:
        """No client actor is left: wait up to ray.actor_start_timeout_s for a replacement, else stop."""
        timeout = self.cfg.ray.actor_start_timeout_s
        deadline = time.monotonic() + timeout
        while not self.actors and self.starting and time.monotonic() < deadline:
            ready, _ = ray.wait(list(self.starting), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            for ref in ready:
                self._admit(ref)
        if not self.actors:
            nodes = ", ".join(dict.fromkeys(node_label(n) for n in self.lost_nodes)) or "no node known"
            raise MeerkatError(f"round {round_}: every client actor was lost ({nodes}) and none could be restarted "
                               f"within {timeout:g} s (ray.actor_start_timeout_s, ray.max_actor_restarts); "
                               f"{resume_hint(self.cfg, round_)}")

    def fault_counts(self) -> dict:
        """Clients re-run, actors replaced, pool shrinks and regrowths, server restores since the last
        call (per round in metrics.jsonl)."""
        counts, self.counts = self.counts, dict.fromkeys(FAULT_COUNTERS, 0)
        return counts

    def _on_every_actor(self, method: str, *args) -> None:
        """Call `method` on every ready actor and wait; a dead one leaves the pool. Replacements that
        are up by then join afterwards and restore the state the call leads to (`self.round` is
        already the round it brings the actors to)."""
        calls = [(a, getattr(a, method).remote(*args)) for a in self.actors]
        for actor, ref in calls:
            try:
                ray.get(ref)
            except LOST:
                self._lost(actor)
        self._admit_started()
        if not self.actors:
            self._wait_for_actors(self.round)

    def sync(self, msg) -> None:
        self.round = msg.round  # the server has finished this round
        self._on_every_actor("sync", ray.put(msg))  # one copy in the object store, read by every actor

    def restore(self, theta: torch.Tensor, round_: int) -> None:
        self.round = round_
        self._on_every_actor("restore", ray.put(theta), round_)

    def _ready_actors(self) -> list:
        self._admit_started()
        if not self.actors:
            self._wait_for_actors(self.round)
        return list(self.actors)

    def evaluate(self) -> tuple[float, float]:
        """Every actor scores a share of the test batches; recombined in test-set order, so the
        numbers equal a single worker's to the bit."""
        while True:
            actors = self._ready_actors()
            calls = [(a, a.evaluate_shard.remote(i, len(actors))) for i, a in enumerate(actors)]
            shards = []
            for actor, ref in calls:
                try:
                    shards.append(ray.get(ref))
                except LOST:
                    self._lost(actor)
            if len(shards) == len(actors):
                ordered = [None] * sum(map(len, shards))
                for i, scores in enumerate(shards):
                    ordered[i::len(actors)] = scores
                return accuracy_and_loss(ordered)

    def global_theta(self) -> torch.Tensor:
        """The actors' global values (they must all agree)."""
        while True:
            actors = self._ready_actors()
            thetas = []
            for actor, ref in [(a, a.global_theta.remote()) for a in actors]:
                try:
                    thetas.append(ray.get(ref))
                except LOST:
                    self._lost(actor)
            if len(thetas) == len(actors):
                break
        if any(not torch.equal(thetas[0], t) for t in thetas[1:]):
            raise RuntimeError("client actors disagree on the global values")
        return thetas[0]

    def actor_info(self) -> list[dict]:
        return ray.get([a.info.remote() for a in self.actors])

    def close(self) -> None:
        """Stop the actors, and the embedded cluster if this process started one."""
        server = self.server.actor if self.server is not None else self.server_actor
        for actor in self.actors + list(self.starting.values()) + ([server] if server is not None else []):
            ray.kill(actor)
        self.actors, self.starting, self.server_actor = [], {}, None
        if self.server is not None:
            self.server.actor = None
        disconnect()
