"""The server: plans rounds, checks and replays what clients send, computes GradIP, runs VPCS and
aggregates. Pure torch/numpy: the Ray server actor is a thin wrapper around it. Who is planned and
who is early-stopped is up to the selection policies (`strategies/policies.py`), how results become
terms up to the aggregation rule (`strategies/aggregation.py`), what a result holds and how it
becomes the next global values up to the client algorithm (`algorithms/`, `fed.algorithm`).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .algorithms import make_algorithm
from .algorithms.base import short
from .config import Config
from .messages import ClientPlan, ClientResult, SyncMessage
from .runlog import theta_digest
from .strategies.aggregation import ClientPath
from .strategies.strategy import ServerStrategy

if TYPE_CHECKING:  # imported where a round's frame is built: a client actor's process (which loads this module) never needs it
    import pandas as pd


@dataclass
class RoundOutcome:
    metrics: dict            # server-side part of the round's metrics.jsonl record
    path_rows: pd.DataFrame  # this round's virtual-path log
    sync: SyncMessage        # what every client applies to reach the new global values


class Server:
    def __init__(self, cfg: Config, theta: torch.Tensor, g_pre: torch.Tensor | None, client_sizes: list[int]):
        self.cfg = cfg
        self.theta = theta.clone()          # global fp32 masked values, mask order
        self.g_pre = g_pre.double() if g_pre is not None else None
        self.sizes = np.asarray(client_sizes, dtype=np.int64)
        self.cursors = np.zeros(len(client_sizes), dtype=np.int64)
        self.strategy = ServerStrategy(cfg, len(client_sizes), list(client_sizes))
        self.algorithm = make_algorithm(cfg.fed.algorithm, cfg.zo.num_perturbations, cfg.zo.estimator,
                                        cfg.privacy.enabled)
        self.uplink_bytes = 0
        self.downlink_bytes = 0
        self.local_steps = 0
        self.private_steps = np.zeros(len(client_sizes), dtype=np.int64)  # DP-ZO: steps each client released
        self.planned: tuple[int, list[ClientPlan]] | None = None  # the last round planned, until it is finished

    def state_dict(self) -> dict:
        """What a resumed run needs besides the config and the global values (which the driver holds
        itself): JSON-able counters, data cursors and VPCS state; also what the summary reads."""
        state = {"cursors": self.cursors.tolist(), "uplink_bytes": self.uplink_bytes,
                 "downlink_bytes": self.downlink_bytes, "local_steps": self.local_steps,
                 "vp": self.strategy.state_dict()}
        if self.cfg.privacy.enabled:
            state["private_steps"] = self.private_steps.tolist()
        return state

    def theta_digest(self) -> str:
        return theta_digest(self.theta)

    def load_state(self, state: dict, theta: torch.Tensor) -> None:
        self.theta = theta.clone()
        self.cursors = np.asarray(state["cursors"], dtype=np.int64)
        self.uplink_bytes, self.downlink_bytes = state["uplink_bytes"], state["downlink_bytes"]
        self.local_steps = state["local_steps"]
        if "private_steps" in state:
            self.private_steps = np.asarray(state["private_steps"], dtype=np.int64)
        self.strategy.load_state(state["vp"])

    @property
    def num_clients(self) -> int:
        return len(self.sizes)

    @property
    def vp(self):
        """The VPCS state (flagged clients, statistics) the strategy keeps."""
        return self.strategy.vp

    def steps_for(self, client: int, round_: int) -> int:
        return self.strategy.steps_for(client, round_)

    def is_probe(self, round_: int) -> bool:
        return self.strategy.is_probe(round_)

    def plan_round(self, round_: int) -> list[ClientPlan]:
        """Plans for round `round_` (rounds count from 1; 0 is the zero-shot evaluation)."""
        lr = self.algorithm.lr(self.cfg)
        clients = self.strategy.participants(round_)
        plans = []
        for k in clients:
            steps = self.steps_for(k, round_)
            plans.append(ClientPlan(round=round_, client=k, seeds=self.algorithm.plan_seeds(self.cfg, round_, k, steps),
                                    steps=steps, lr=lr,
                                    cursor=int(self.cursors[k])))
        self.planned = (round_, plans)
        return plans

    def finish_planned(self, round_: int, results: list[ClientResult | None]) -> RoundOutcome:
        """`finish_round` on the plans this server made for `round_` (what the round loop calls: the
        plans never travel back, and results are checked against what was actually asked)."""
        if self.planned is None or self.planned[0] != round_:
            raise RuntimeError(f"round {round_} finished without being planned by this server")
        plans, self.planned = self.planned[1], None
        return self.finish_round(round_, plans, results)

    def in_calibration(self, round_: int) -> bool:
        return self.strategy.in_calibration(round_)

    @staticmethod
    def check_result(plan: ClientPlan, result: ClientResult | None, clip: float = 0.0, algorithm=None,
                     n: int = 0, vp: bool = False) -> str:
        """Why a result is rejected ('' = accepted), in one line: a ClientResult answering this plan's
        round and client (ints), holding what the algorithm says (sparse_zo by default: with `clip`
        > 0, zo.clip, a |scalar| > clip is refused too; `vp`: Meerkat-vp runs)."""
        if result is None:
            return "no result"
        if not isinstance(result, ClientResult):
            return f"sent a {type(result).__name__}, not a ClientResult"
        ids = (result.round, result.client)
        if not all(map(is_id, ids)) or ids != (plan.round, plan.client):
            return f"answered round {short(result.round)} client {short(result.client)}"
        return (algorithm or make_algorithm("sparse_zo")).check_upload(plan, result, n, clip, vp)

    def finish_round(self, round_: int, plans: list[ClientPlan], results: list[ClientResult | None]) -> RoundOutcome:
        """Check results, replay the accepted virtual paths, GradIP, VPCS, aggregate, account bytes.

        `results[i]` answers `plans[i]` (what an executor returns); whatever it holds, nothing reads
        it before the check has accepted it or named why not."""
        if len(results) != len(plans):
            raise RuntimeError(f"round {round_}: {len(results)} results for {len(plans)} plans")
        answers = {p.client: r for p, r in zip(plans, results)}
        accepted, rejected = self._check_results(plans, answers)
        by_client = {p.client: answers[p.client] for p in accepted}
        paths = self._paths(round_, accepted, by_client)
        self.theta, sync, grad_ips_of = self.algorithm.aggregate(self.theta, round_, paths, by_client, self.strategy,
                                                                 self.g_pre, self.is_probe(round_))
        P = self.algorithm.perturbations
        rows = []
        for path in paths:
            grad_ips = grad_ips_of[path.client]
            rows += [(round_, path.client, i // P, s, g, path.lr, path.weight, gi, i % P)
                     for i, (s, g, gi) in enumerate(zip(path.seeds, path.scalars, grad_ips))]
        if P > 1:  # a step's GradIP: the sum over its directions of (g / P) <g_pre, z>
            grad_ips_of = {k: [math.fsum(v[i: i + P]) for i in range(0, len(v), P)] for k, v in grad_ips_of.items()}
        for plan in plans:  # data consumed is consumed, accepted or not
            self.cursors[plan.client] += plan.steps * self.cfg.data.batch_size
            self.private_steps[plan.client] += plan.steps  # a planned step counts as released (conservative)
        decided_now = self.strategy.end_round(round_, [p.client for p in plans],
                                              {p.client: list(by_client[p.client].losses) for p in accepted},
                                              grad_ips_of)
        metrics = self._account(round_, plans, accepted, rejected, answers, sync, decided_now)
        import pandas as pd

        columns = ["round", "client", "step", "seed", "scalar", "lr", "weight", "grad_ip", "perturbation"]
        frame = pd.DataFrame(rows, columns=columns)
        frame = frame.astype({"round": "int64", "client": "int64", "step": "int64", "seed": "int64",
                              "perturbation": "int64"})
        if P == 1:  # one direction per step: the contract's columns only
            frame = frame.drop(columns="perturbation")
        return RoundOutcome(metrics=metrics, path_rows=frame, sync=sync)

    def _check_results(self, plans, answers) -> tuple[list[ClientPlan], dict[int, str]]:
        """The plans whose results are accepted, and why the others were refused."""
        accepted, rejected = [], {}
        for plan in plans:
            reason = self.check_result(plan, answers[plan.client], self.cfg.zo.clip, self.algorithm,
                                       self.theta.numel(), self.cfg.vp.enabled)
            if reason:
                rejected[plan.client] = reason
            else:
                accepted.append(plan)
        return accepted, rejected

    def _paths(self, round_: int, accepted, by_client) -> list[ClientPath]:
        """Each accepted client's virtual path (as its algorithm logs it) with its weight p_k (0 in a
        probe round: the replay of path.parquet adds nothing for it)."""
        total = float(sum(self.sizes[p.client] for p in accepted))
        probe = self.is_probe(round_)
        paths = []
        for p in accepted:
            seeds, scalars = self.algorithm.path(p, by_client[p.client])
            paths.append(ClientPath(client=p.client, weight=0.0 if probe else float(self.sizes[p.client]) / total,
                                    seeds=seeds, scalars=scalars, lr=p.lr))
        return paths

    def _account(self, round_: int, plans, accepted, rejected, answers, sync, decided_now: bool) -> dict:
        """Bytes and steps into the counters; the server's part of the round's metrics.jsonl record."""
        up = sum(r.payload_bytes() for r in answers.values() if isinstance(r, ClientResult))  # refused ones too
        down = sum(p.payload_bytes() for p in plans) + self.num_clients * sync.payload_bytes()  # sync: to all
        self.uplink_bytes += up
        self.downlink_bytes += down
        steps = sum(p.steps for p in accepted)
        self.local_steps += steps
        losses = [v for p in accepted for v in answers[p.client].losses]
        metrics = {
            "round": round_,
            "train_loss": float(np.mean(losses)) if losses else None,
            # per client: the mean loss of its own steps (clients run different step counts once some are flagged)
            "client_train_loss": {str(p.client): float(np.mean(answers[p.client].losses))
                                  for p in accepted if answers[p.client].losses},
            "uplink_bytes": up,
            "downlink_bytes": down,
            "flagged_clients": list(self.vp.flagged),
            "vp_decided": decided_now,
            "calibration": self.in_calibration(round_),
            "rejected_clients": sorted(rejected),
            "rejected_reasons": {str(k): v for k, v in sorted(rejected.items())},
            "local_steps": steps,
        }
        if self.cfg.privacy.enabled:  # each client's (epsilon, privacy.delta)-DP for the steps it has run
            from .privacy import spent

            metrics["privacy_epsilon"] = spent(self.cfg, self.sizes.tolist(), self.private_steps.tolist())
        if len(plans) < self.num_clients:  # a sampled round
            metrics["participants"] = [p.client for p in plans]
        if decided_now:  # the decision, visible in the round it is made
            metrics["vpcs"] = {str(k): dict(st) for k, st in sorted(self.vp.stats.items())}
            metrics["vpcs_left_out_clients"] = sorted(self.vp.left_out)  # judged by no one, not flagged
            metrics["vpcs_left_out_reasons"] = {str(k): v for k, v in sorted(self.vp.left_out.items())}
            metrics["vp_calib_steps"] = self.cfg.vp.calib_steps
        return metrics


def is_id(value) -> bool:
    """A round or client id as a client must send it: an integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
