"""The driver's handle on the server actor, restored when the actor (or its node) is lost."""
from __future__ import annotations

import sys

import ray

from ..config import Config
from ..errors import MeerkatError
from .cluster import LOST, node_label, resume_hint


class ServerProxy:
    """The driver's handle on the ServerActor; the round loop calls it like a local `Server`.

    A lost server actor (its node died) is rebuilt where the cluster has room: a fresh actor is set
    up as at the start, loads the last state the driver holds (the latest `state_dict`, which is the
    last round's checkpoint, with the driver's global values of that round, or the `load_state` of a
    resumed run), replays the rounds planned and finished since (and plans the round in progress
    again), and the failed call runs again. All of it is deterministic, so the run goes on
    exactly as without the loss. The values kept are a copy: the driver applies the next round's
    sync to its own in place, and a replacement built from those would be a round ahead.

    Every attempt at a replacement counts against `ray.max_actor_restarts`, whether it is lost
    again, fails or never starts (each one is killed, none leaks); a replacement that cannot be
    scheduled within `ray.actor_start_timeout_s` stops the run with an error naming the node, the
    round and `run --resume`. A server actor that stops answering (no reply to a call within the
    executor's deadline, see `deadlines.Deadlines`) is killed and replaced like a lost one.
    """

    def __init__(self, executor, cfg: Config, setup_args: tuple):
        self.executor, self.cfg, self.setup_args = executor, cfg, setup_args
        self.actor = executor.server_actor
        self.node: str | None = None
        self.saved = None                 # (state, theta) a replacement loads: theta is the driver's
        self.since: list[tuple] = []      # (round, results) finished after `saved`, replayed in order
        self.planned: int | None = None   # a round planned and not finished yet
        self.round = 0
        self.restarts = 0
        self.node = self._call("setup", *setup_args)

    def _call(self, method: str, *args):
        while True:
            try:
                if self.actor is None:
                    self._rebuild()
                return self.executor.deadlines.get(self.actor, getattr(self.actor, method).remote(*args),
                                                   f"server.{method}", what="the server actor")
            except LOST:
                self.actor = None

    def _rebuild(self) -> None:
        ray_cfg, lost = self.cfg.ray, node_label(self.node)
        if self.restarts >= ray_cfg.max_actor_restarts:
            raise MeerkatError(f"ray.max_actor_restarts: the server actor was lost with {lost} in round {self.round} "
                               f"after {self.restarts} restarts; {resume_hint(self.cfg, self.round)}")
        print(f"warning: the server actor was lost with {lost} in round {self.round}; restoring it from the last "
              "checkpoint", file=sys.stderr, flush=True)
        self.restarts += 1  # an attempt counts whether or not it comes up
        self.executor.counts["server_restarts"] += 1
        actor = self.executor.new_server_actor()
        try:
            setup = actor.setup.remote(*self.setup_args)
            ready, _ = ray.wait([setup], timeout=ray_cfg.actor_start_timeout_s)
            if not ready:
                raise MeerkatError(f"round {self.round}: the server actor was lost with {lost} and no replacement could "
                                   f"be scheduled within {ray_cfg.actor_start_timeout_s:g} s "
                                   f"(ray.actor_start_timeout_s); {resume_hint(self.cfg, self.round)}")
            self.node = ray.get(setup)
            calls = ([actor.load_state.remote(*self.saved)] if self.saved else [])
            for round_, results in self.since:
                calls += [actor.plan_round.remote(round_), actor.finish_planned.remote(round_, results)]
            if self.planned is not None:
                calls.append(actor.plan_round.remote(self.planned))
            for ref in calls:
                self.executor.deadlines.get(actor, ref, "server.replay", what="the server actor's replacement")
        except BaseException:
            ray.kill(actor)  # lost, failed or never started: never left behind
            raise
        self.actor = actor

    def plan_round(self, round_: int):
        self.round = round_
        plans = self._call("plan_round", round_)
        self.planned = round_
        return plans

    def finish_planned(self, round_: int, results):
        outcome = self._call("finish_planned", round_, results)
        self.since.append((round_, results))
        self.planned = None
        return outcome

    def state_dict(self) -> dict:
        """The server's JSON-able state; with the global values the driver holds after the same round
        (`executor.theta`) it is what a replacement restores."""
        state = self._call("state_dict")
        self.saved, self.since = (state, self.executor.theta.clone()), []
        return state

    def load_state(self, state: dict, theta) -> None:
        self._call("load_state", state, theta)
        self.saved, self.since = (state, theta.clone()), []

    def theta_digest(self) -> str:
        return self._call("theta_digest")


