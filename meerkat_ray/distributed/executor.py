"""`executor=ray`: the executor that spreads virtual clients over client actors.

`RayExecutor` has the interface of every executor (`executors.py`), so the one round loop
(`runner.federate`) drives it; it runs in the driver and is the only place that waits on Ray
futures. Per round:
    plans (from the ServerActor, through `ServerProxy`) -> a queue over the client actors (a free
    actor takes the next client; `ray.wait` returns whichever finishes first) -> results keyed by
    client id -> the ServerActor -> its SyncMessage, applied by the driver to its own copy of the
    global values and broadcast once to every client actor.
Bit-identity with executor=local: a client's result depends only on (global values, plan, data,
model), never on which actor ran it, and the server aggregates by client id, never by arrival.

Placement: outside Ray Tune, actors are scheduled by their resources. Inside a Tune trial the
trial's placement group has the bundles of `cluster.trial_bundles` ([driver, server, client actor
0..A-1]) and every actor is pinned to its own bundle.
"""
from __future__ import annotations

import sys
import time
from collections import deque

import numpy as np
import ray
import torch
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..config import Config
from ..errors import MeerkatError
from ..executors import FAULT_COUNTERS
from ..messages import measured_s
from ..terms import apply_sync_
from ..experiment import DataSetup, check_model
from ..seeds import derive_seed
from ..scoring import accuracy_and_loss
from .actors import ClientActor, ServerActor
from .cluster import (CONTROL_CPUS, LOST, NO_TASK_EVENTS, connect, disconnect, federation_demand, node_label,
                      resume_hint, trial_bundles)
from .deadlines import Deadlines
from .server_proxy import ServerProxy

IN_FLIGHT = 2         # plans queued per client actor (the second hides the driver round trip)


def build(cfg: Config, data: DataSetup, progress: bool) -> RayExecutor:
    """Join or start the cluster, then the actors: the model is loaded by the client actors only,
    the mask made by actor 0."""
    check_model(cfg)
    connect(cfg.ray, *federation_demand(cfg), progress=progress)
    try:
        return RayExecutor(cfg, data)
    except BaseException:
        disconnect()
        raise


class RayExecutor:
    """A pool of client actors fed as a queue, plus the server actor.

    Set-up: every actor loads its model copy; actor 0 computes the mask and theta_0 (`mask`,
    `theta0` here, for the run folder and the server); every actor then builds its worker.

    Faults: a client actor that dies (with its node, or killed by `ray.chaos_kill_prob`) loses the
    plans it held; they go back to the queue and run on the actors left (`retries`; the pool
    shrinks, `pool_shrinks`). Its slot gets a fresh actor (`actor_restarts`; at most
    `ray.max_actor_restarts` for real deaths) that holds no work until the cluster has placed and
    started it - at once where there is room, when the autoscaler has added a node, or never; once
    up it restores the global values of the last finished round (the driver's copy) and joins the pool
    (`pool_regrowths`). Only when no client actor is left does the run wait for one, at most
    `ray.actor_start_timeout_s`. A client actor that stops answering is handled the same way: every
    call the driver waits on has a deadline (`deadlines.Deadlines`: a plan's from the measured time
    per step, `ray.plan_timeout_s` / `ray.plan_timeout_floor_s`), and an actor that misses it is
    killed and counted as lost (`actor_timeouts`). A client's result depends only on the global
    values, its plan and its data, so the run ends bit-identical to a fault-free one. A lost server
    actor is restored by `ServerProxy`. The driver's own copy of the global values (`theta`, after `round`) is what
    replacements, client or server, restore.
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
        self.deadlines = Deadlines(cfg.ray, self.counts)
        self.pg = self._own_placement_group(cfg)
        # the server actor's process starts alongside the client actors'; it is set up in make_server
        self.server_actor = self.new_server_actor()
        self.data_ref = ray.put(data)  # one copy in the object store for every actor (and replacements)
        self.actors = [self._new_actor(i) for i in range(cfg.ray.num_actors)]
        try:
            self._await_start()
            self.mask, self.theta0 = ray.get(self.actors[0].compute_mask.remote())
            self.theta = self.theta0.clone()
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

    # -- the pool

    def run_clients(self, plans, on_result=None):
        """Every plan runs on some actor; a lost actor's plans go back to the queue, and so do those
        of an actor that misses its current plan's deadline (it is killed)."""
        queue = deque(plans)
        pending: dict = {}  # ObjectRef -> (actor, plan)
        held: dict[int, deque] = {}  # id(actor) -> its plans in flight, in the order it runs them
        busy_since: dict[int, float] = {}  # id(actor) -> when it started the first of them
        results = {}
        round_ = plans[0].round if plans else self.round + 1
        while queue or pending:
            # one plan per idle actor first, then the second in flight: K <= IN_FLIGHT x actors
            # clients must not pile up on the first actors while the others wait
            for depth in range(1, IN_FLIGHT + 1):
                for actor in list(self.actors):
                    mine = held.setdefault(id(actor), deque())
                    if queue and len(mine) < depth and id(actor) not in self.victims:
                        plan = queue.popleft()
                        pending[actor.run.remote(plan)] = (actor, plan)
                        if not mine:
                            busy_since[id(actor)] = time.monotonic()
                        mine.append(plan)
                        self._maybe_kill(actor)
            if not pending:  # no client actor is left: wait (bounded) for a replacement
                self._wait_for_actors(round_)
                continue
            owners = {id(a): a for a, _ in pending.values()}
            due = {k: busy_since[k] + self.deadlines.allowance("plan", held[k][0].steps) for k in owners}
            done, _ = ray.wait(list(pending) + list(self.starting), num_returns=1,
                               timeout=max(0.0, min(due.values()) - time.monotonic()))
            if not done:  # an actor sits on its plan past the deadline: frozen, handled as lost
                for k in [k for k, t in due.items() if t <= time.monotonic()]:
                    self.deadlines.kill_frozen(owners[k], self._name(owners[k]), time.monotonic() - busy_since[k])
                    self._lost(owners[k], pending, queue)  # its plans go back to the queue
                    held.pop(k, None)
                continue
            if done[0] in self.starting:  # a replacement is up: it takes plans from the next pass on
                self._admit(done[0])
                continue
            actor, plan = pending.pop(done[0])
            held[id(actor)].popleft()
            busy_since[id(actor)] = time.monotonic()
            try:
                result = ray.get(done[0])
            except LOST:
                self.counts["retries"] += 1
                queue.appendleft(plan)
                self._lost(actor, pending, queue)
                held.pop(id(actor), None)
                continue
            self.deadlines.observe("plan", measured_s(result), plan.steps)
            results[plan.client] = result  # filed under the plan it answers: what it claims is the server's to check
            if on_result:
                on_result(result)
            if id(actor) in self.victims and not held[id(actor)]:
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
        actor.restore.remote(ray.put(self.theta), self.round)
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
        counts = dict(self.counts)
        self.counts.update(dict.fromkeys(FAULT_COUNTERS, 0))  # in place: the deadlines count into it too
        return counts

    def _on_every_actor(self, method: str, *args) -> None:
        """Call `method` on every ready actor and wait; a dead one leaves the pool. Replacements that
        are up by then join afterwards and restore the state the call leads to (`self.round` is
        already the round it brings the actors to)."""
        since = time.monotonic()
        calls = [(a, getattr(a, method).remote(*args)) for a in self.actors]
        for actor, ref in calls:
            try:
                self.deadlines.get(actor, ref, method, self._name(actor), since)
            except LOST:
                self._lost(actor)
        self._admit_started()
        if not self.actors:
            self._wait_for_actors(self.round)

    def sync(self, msg, theta: torch.Tensor) -> torch.Tensor:
        """The driver applies `msg` to its own global values `theta` (what replacements restore) and
        every client actor applies it to theirs; returns the driver's values after the round."""
        self.round, self.theta = msg.round, apply_sync_(theta, msg)  # the server has finished this round
        self._on_every_actor("sync", ray.put(msg))  # one copy in the object store, read by every actor
        return self.theta

    def restore(self, theta: torch.Tensor, round_: int) -> None:
        self.round, self.theta = round_, theta.clone()
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
            since = time.monotonic()
            calls = [(a, a.evaluate_shard.remote(i, len(actors))) for i, a in enumerate(actors)]
            shards = []
            for actor, ref in calls:
                try:
                    shards.append(self.deadlines.get(actor, ref, "evaluate", self._name(actor), since))
                except LOST:
                    self._lost(actor)
            if len(shards) == len(actors):
                ordered = [None] * sum(map(len, shards))
                for i, scores in enumerate(shards):
                    ordered[i::len(actors)] = scores
                return accuracy_and_loss(ordered)

    def theta_digests(self) -> list[str]:
        """Every client actor's digest of its global values (32 bytes each, not n values)."""
        while True:
            actors = self._ready_actors()
            since = time.monotonic()
            digests = []
            for actor, ref in [(a, a.theta_digest.remote()) for a in actors]:
                try:
                    digests.append(self.deadlines.get(actor, ref, "theta_digest", self._name(actor), since))
                except LOST:
                    self._lost(actor)
            if len(digests) == len(actors):
                return digests

    def _name(self, actor) -> str:
        return f"client-actor-{self.slot_of.get(id(actor))}"

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
