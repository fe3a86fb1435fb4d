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
from .zo import accuracy_and_loss

CONTROL_CPUS = 0.25   # the trial driver and the server actor: waiting on futures, replay and GradIP are light
IN_FLIGHT = 2         # plans queued per client actor (the second hides the driver round trip)
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


# ----------------------------------------------------------------------------- the server

class ServerProxy:
    """The driver's handle on the ServerActor; the round loop calls it like a local `Server`."""

    def __init__(self, actor):
        self.actor = actor

    def plan_round(self, round_: int):
        return ray.get(self.actor.plan_round.remote(round_))

    def finish_round(self, round_: int, plans, results):
        return ray.get(self.actor.finish_round.remote(round_, plans, results))

    def state_dict(self):
        return ray.get(self.actor.state_dict.remote())

    def load_state(self, state: dict, theta: torch.Tensor) -> None:
        ray.get(self.actor.load_state.remote(state, theta))

    def snapshot(self):
        return ray.get(self.actor.snapshot.remote())


# ----------------------------------------------------------------------------- the executor

class RayExecutor:
    """A pool of client actors fed as a queue, plus the server actor.

    Set-up: every actor loads its model copy; actor 0 computes the mask and theta_0 (`mask`,
    `theta0` here, for the run folder and the server); every actor then builds its worker.

    Faults: a client actor that dies (or that `ray.chaos_kill_prob` kills on purpose) loses the
    plans it held; they go back to the queue and run on another actor (`retries`). Its slot gets a
    fresh actor that restores the global values of the last finished round from the server actor
    (`actor_restarts`; at most `ray.max_actor_restarts` for real deaths, after which the pool just
    shrinks). A client's result depends only on the global values, its plan and its data, so the
    run ends bit-identical to a fault-free one.
    """

    def __init__(self, cfg: Config, data):
        self.cfg = cfg
        self.actors: list = []
        self.slot_of: dict[int, int] = {}   # id(actor handle) -> its slot (name, placement bundle)
        self.round = 0                       # the actors hold the global values after this round
        self.server_ready = False
        self.restarts_left = cfg.ray.max_actor_restarts
        self.victims: set[int] = set()       # id() of actors killed by the chaos option
        self.chaos = np.random.default_rng(derive_seed(cfg.seed, "chaos")) if cfg.ray.chaos_kill_prob > 0 else None
        self.retries = self.actor_restarts = 0
        self.pg = self._own_placement_group(cfg)
        # the server actor's process starts alongside the client actors'; it is set up in make_server
        self.server_actor = ServerActor.options(num_cpus=CONTROL_CPUS, **self._placement(1)).remote()
        self.data_ref = ray.put(data)  # one copy in the object store for every actor (and replacements)
        self.actors = [self._new_actor(i) for i in range(cfg.ray.num_actors)]
        try:
            self.mask, self.theta0 = ray.get(self.actors[0].compute_mask.remote())
            self.mask_ref, self.theta0_ref = ray.put(self.mask), ray.put(self.theta0)
            ray.get([a.start.remote(self.mask_ref, self.theta0_ref) for a in self.actors])  # set-up errors surface here
        except BaseException:
            self.close()
            raise

    def _new_actor(self, slot: int):
        actor = ClientActor.options(num_cpus=self.cfg.ray.cpus_per_client, num_gpus=self.cfg.ray.gpus_per_client,
                                    **self._placement(2 + slot)).remote(self.cfg, self.data_ref, f"client-actor-{slot}")
        self.slot_of[id(actor)] = slot
        return actor

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
        ray.get(self.server_actor.setup.remote(cfg, theta, g_pre, client_sizes))
        self.server_ready = True
        return ServerProxy(self.server_actor)

    def local_server(self, server: ServerProxy):
        return server.snapshot()

    def run_clients(self, plans, on_result=None):
        """Every plan runs on some actor; a lost actor's plans go back to the queue."""
        queue = deque(plans)
        pending: dict = {}  # ObjectRef -> (actor, plan)
        load = {id(a): 0 for a in self.actors}
        results = {}
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
            done, _ = ray.wait(list(pending), num_returns=1)
            actor, plan = pending.pop(done[0])
            load[id(actor)] -= 1
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayActorError:
                self.retries += 1
                queue.appendleft(plan)
                self._lost(actor, pending, queue)
                continue
            results[result.client] = result
            if on_result:
                on_result(result)
            if id(actor) in self.victims and load[id(actor)] == 0:
                self._replace(actor)  # killed after its last plan had already finished
        return [results[p.client] for p in plans]  # keyed by client: arrival order never matters

    def _maybe_kill(self, actor) -> None:
        """ray.chaos_kill_prob: kill the actor that was just given a plan (seeded from the run seed)."""
        if self.chaos is not None and self.chaos.random() < self.cfg.ray.chaos_kill_prob:
            self.victims.add(id(actor))
            ray.kill(actor, no_restart=True)

    def _lost(self, actor, pending: dict, queue: deque) -> None:
        """A dead actor: its other plans go back to the queue, a fresh actor takes its slot."""
        for ref, (owner, plan) in list(pending.items()):
            if owner is actor:
                del pending[ref]
                queue.appendleft(plan)
                self.retries += 1
        self._replace(actor)

    def _replace(self, dead) -> None:
        if dead not in self.actors:
            return
        index = self.actors.index(dead)
        slot = self.slot_of.pop(id(dead))
        chaos = id(dead) in self.victims
        self.victims.discard(id(dead))
        if not chaos and self.restarts_left <= 0:
            del self.actors[index]
            print(f"warning: a client actor died; {len(self.actors)} left", file=sys.stderr, flush=True)
            if not self.actors:
                raise RuntimeError("every client actor died")
            return
        if not chaos:
            self.restarts_left -= 1
            print(f"warning: client-actor-{slot} died; starting a replacement", file=sys.stderr, flush=True)
        actor = self._new_actor(slot)
        # Calls on one actor run in order: the plans sent next wait for these. The server holds the
        # global values of the last finished round; before it is set up the survivors (or theta_0) do.
        actor.start.remote(self.mask_ref, self.theta0_ref)
        if self.server_ready or self.round > 0:
            actor.restore.remote(self._current_theta(exclude=dead), self.round)
        self.actors[index] = actor
        self.actor_restarts += 1

    def _current_theta(self, exclude):
        if self.server_ready:
            return self.server_actor.theta.remote()
        alive = [a for a in self.actors if a is not exclude and id(a) not in self.victims]
        if not alive:
            raise RuntimeError("every client actor died and no server holds the global values")
        return alive[0].global_theta.remote()

    def fault_counts(self) -> dict:
        """Clients re-run and actors replaced since the last call (per round in metrics.jsonl)."""
        counts = {"retries": self.retries, "actor_restarts": self.actor_restarts}
        self.retries = self.actor_restarts = 0
        return counts

    def _on_every_actor(self, method: str, *args) -> None:
        """Call `method` on every actor and wait. A dead actor is replaced by one that restores the
        state the call leads to (`self.round` is already the round it brings the actors to)."""
        calls = [(a, getattr(a, method).remote(*args)) for a in self.actors]
        for actor, ref in calls:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                self._replace(actor)

    def sync(self, msg) -> None:
        self.round = msg.round  # the server has finished this round
        self._on_every_actor("sync", ray.put(msg))  # one copy in the object store, read by every actor

    def restore(self, theta: torch.Tensor, round_: int) -> None:
        self.round = round_
        self._on_every_actor("restore", ray.put(theta), round_)

    def evaluate(self) -> tuple[float, float]:
        """Every actor scores a share of the test batches; recombined in test-set order, so the
        numbers equal a single worker's to the bit."""
        while True:
            actors = list(self.actors)
            calls = [(a, a.evaluate_shard.remote(i, len(actors))) for i, a in enumerate(actors)]
            shards = []
            for actor, ref in calls:
                try:
                    shards.append(ray.get(ref))
                except ray.exceptions.RayActorError:
                    self._replace(actor)
            if len(shards) == len(actors):
                ordered = [None] * sum(map(len, shards))
                for i, scores in enumerate(shards):
                    ordered[i::len(actors)] = scores
                return accuracy_and_loss(ordered)

    def global_theta(self) -> torch.Tensor:
        """The actors' global values (they must all agree)."""
        while True:
            actors = list(self.actors)
            try:
                thetas = ray.get([a.global_theta.remote() for a in actors])
                break
            except ray.exceptions.RayActorError:
                for actor in actors:  # find the dead one(s)
                    try:
                        ray.get(actor.info.remote())
                    except ray.exceptions.RayActorError:
                        self._replace(actor)
        if any(not torch.equal(thetas[0], t) for t in thetas[1:]):
            raise RuntimeError("client actors disagree on the global values")
        return thetas[0]

    def actor_info(self) -> list[dict]:
        return ray.get([a.info.remote() for a in self.actors])

    def close(self) -> None:
        """Stop the actors, and the embedded cluster if this process started one."""
        for actor in self.actors + ([self.server_actor] if self.server_actor else []):
            ray.kill(actor)
        self.actors, self.server_actor = [], None
        disconnect()
