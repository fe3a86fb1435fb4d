"""How long a call on an actor may take before the actor counts as frozen.

A client actor that hangs instead of dying (a stuck CUDA call or collective, a node that stops
answering, a process stopped by a signal) would otherwise hold the run forever. Every call the
driver waits on has a deadline derived from the run's own measured times:

    allowance(kind, units) = max(ray.plan_timeout_floor_s, FACTOR * rate(kind) * units)

with rate(kind) the slowest seconds per unit seen so far for that kind of call (a client plan:
per local step, from the client's own compute time; a sync, an evaluation shard, a server call:
per call, wall time). Before a kind has been measured once it gets ray.actor_setup_timeout_s (the
first call may include warm-up). `ray.plan_timeout_s` > 0 replaces the derived allowance of a
client plan by that fixed value. When a deadline passes, the actor is killed and treated exactly
like a lost one: its work runs elsewhere, a replacement takes its slot, the run ends with the same
bits as a calm one.
"""
from __future__ import annotations

import sys
import time

import ray

from ..config import RayConfig
from .cluster import ActorFrozen

FACTOR = 10.0  # a call may take this many times the slowest one of its kind measured so far


class Deadlines:
    def __init__(self, rc: RayConfig, counts: dict):
        self.fixed_plan_s, self.floor_s, self.first_s = rc.plan_timeout_s, rc.plan_timeout_floor_s, rc.actor_setup_timeout_s
        self.counts = counts         # the executor's fault counters: `actor_timeouts` is counted here
        self.rate: dict[str, float] = {}

    def allowance(self, kind: str, units: int = 1) -> float:
        if kind == "plan" and self.fixed_plan_s > 0:
            return self.fixed_plan_s
        rate = self.rate.get(kind)
        if rate is None:
            return max(self.floor_s, self.first_s)
        return max(self.floor_s, FACTOR * rate * max(units, 1))

    def observe(self, kind: str, seconds: float, units: int = 1) -> None:
        self.rate[kind] = max(self.rate.get(kind, 0.0), seconds / max(units, 1))

    def kill_frozen(self, actor, what: str, waited_s: float) -> str:
        """Kill an actor that missed its deadline; returns what happened, for the error handled as
        its loss."""
        print(f"warning: {what} did not answer within {waited_s:.1f} s (ray.plan_timeout_s, "
              "ray.plan_timeout_floor_s); killing it and running its work elsewhere", file=sys.stderr, flush=True)
        ray.kill(actor, no_restart=True)
        self.counts["actor_timeouts"] += 1
        return f"{what} did not answer within {waited_s:.1f} s"

    def get(self, actor, ref, kind: str, what: str, since: float | None = None):
        """`ray.get(ref)` within the allowance of `kind` counted from `since` (default: now); an
        actor that misses it is killed (ActorFrozen, one of cluster.LOST)."""
        start = time.monotonic() if since is None else since
        limit = self.allowance(kind)
        ready, _ = ray.wait([ref], timeout=max(0.0, start + limit - time.monotonic()))
        if not ready:
            raise ActorFrozen(self.kill_frozen(actor, what, time.monotonic() - start))
        value = ray.get(ref)
        self.observe(kind, time.monotonic() - start)
        return value

