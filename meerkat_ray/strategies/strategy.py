"""The server strategy: one stateful object, built once from the config, that owns a round's
decisions - who takes part (`participants`), how many steps each runs (`steps_for`), who is
early-stopped (the selection policies, on the VPCS state it keeps), and how the accepted paths
become the terms every process applies (`terms`, the aggregation rule of `fed.aggregation`). The
server, the replay of a run folder (`replay.replay_run`) and every other reader of a run build it
with `ServerStrategy(cfg, num_clients)` or, for the rule alone, `rule_for(cfg)`: one construction,
so a rule or policy with a parameter of its own is built with the run's value everywhere.

In the spirit of Flower's `Strategy` (configure_fit / aggregate_fit): the server keeps the global
values, the data cursors and the byte counters; the strategy keeps what decides the rounds, and
its `state_dict` goes into the run's checkpoint.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..gradip import calibration_windows, min_window
from ..messages import Term
from ..schedule import round_steps
from .aggregation import AGGREGATIONS, Aggregation, ClientPath, decayed
from .policies import RoundView, active_policies
from .vp_rules import vp_rule

if TYPE_CHECKING:
    from ..config import Config, VPConfig


def rule_for(cfg: Config) -> Aggregation:
    """The aggregation rule of `fed.aggregation`, with the run's values of the parameters it names
    (`Aggregation.params`: FedConfig keys)."""
    cls = AGGREGATIONS[cfg.fed.aggregation]
    return cls(**{key: getattr(cfg.fed, key) for key in cls.params})


class ServerStrategy:
    def __init__(self, cfg: Config, num_clients: int, client_sizes: list[int] | None = None):
        self.cfg = cfg
        self.num_clients = num_clients
        windows = calibration_windows(client_sizes, cfg.data.batch_size, cfg.vp.calib_steps) if client_sizes else None
        self.vp = VPState(cfg.vp, num_clients, cfg.seed, windows)
        self.policies = active_policies(cfg, self.vp.rng)
        self.rule = rule_for(cfg)

    @property
    def flagged(self) -> list[int]:
        return self.vp.flagged

    def participants(self, round_: int) -> list[int]:
        """The clients planned in round `round_` (every active policy narrows the list in turn)."""
        clients = list(range(self.num_clients))
        for policy in self.policies:
            clients = policy.participants(round_, clients)
        return clients

    def steps_for(self, client: int, round_: int) -> int:
        return 1 if client in self.vp.flagged else round_steps(self.cfg, round_)

    def is_probe(self, round_: int) -> bool:
        """Round 1 under vp.calibration=probe: run and replayed for VPCS, its update discarded."""
        vp = self.cfg.vp
        return round_ == 1 and vp.enabled and vp.calibration == "probe"

    def in_calibration(self, round_: int) -> bool:
        """Whether round `round_` recorded calibration steps for VPCS."""
        return bool(self.cfg.vp.enabled and (self.vp.decided_round is None or round_ <= self.vp.decided_round))

    def terms(self, paths: list[ClientPath]) -> list[Term]:
        return self.rule.terms(paths, self.cfg.fed.seed_sharing)

    def update(self, paths: list[ClientPath]) -> tuple[float, list[Term]]:
        """The round's aggregate as (scale, terms): theta <- scale * theta, then the terms (scale 1
        unless zo.weight_decay > 0, `aggregation.decayed`)."""
        scale, paths = decayed(paths, self.cfg.zo.weight_decay, self.cfg.zo.num_perturbations)
        return scale, self.terms(paths)

    def end_round(self, round_: int, participants: list[int], losses: dict[int, list[float]],
                  grad_ips: dict[int, list[float]]) -> bool:
        """Record the accepted clients' GradIP, decide VPCS when its calibration is complete, and let
        the policies set the early-stopped clients. Returns whether the decision was made now."""
        for client, values in grad_ips.items():
            self.vp.record(client, values)
        decided_now = self.vp.maybe_decide(round_, sum(round_steps(self.cfg, r) for r in range(1, round_ + 1)))
        view = RoundView(round_, participants, losses, grad_ips, self.vp.stats if decided_now else {},
                         list(self.vp.flagged))
        for policy in self.policies:
            flagged = policy.early_stop(view)
            if flagged is not None:
                self.vp.flagged = view.flagged = flagged
        return decided_now

    def state_dict(self) -> dict:
        return self.vp.state_dict()

    def load_state(self, state: dict) -> None:
        self.vp.load_state(state)


class VPState:
    """Collects |GradIP| per client until every client has `calib_steps`, then computes the
    statistics of `vp.rule` once, each client on its calibration window (`windows`: its first pass
    over its data; all calib_steps when not given); the early-stop policies read them and set
    `flagged` (the run's stopped set)."""

    def __init__(self, cfg: VPConfig, num_clients: int, seed: int, windows: list[int] | None = None):
        self.cfg = cfg
        self.windows = list(windows) if windows is not None else [cfg.calib_steps] * num_clients
        self.trajectories: dict[int, list[float]] = {k: [] for k in range(num_clients)}
        self.flagged: list[int] = []
        self.stats: dict[int, dict[str, float]] = {}
        self.left_out: dict[int, str] = {}  # client -> why the decision left it out
        self.decided_round: int | None = None
        self.rng = np.random.default_rng([seed, 7])

    @property
    def decided(self) -> bool:
        return self.decided_round is not None

    def record(self, client: int, grad_ips: list[float]) -> None:
        """Keep a client's first `calib_steps` GradIP values while the decision is open: nothing
        more is ever read, and keeping every step (VPCS off, or steps past the window) grew the
        server by K x T values per round for the whole run."""
        trajectory = self.trajectories[client]
        if self.cfg.enabled and not self.decided:
            trajectory.extend(grad_ips[: max(0, self.cfg.calib_steps - len(trajectory))])

    def maybe_decide(self, round_: int, planned_steps: int) -> bool:
        """Decide after the first round by which every client could have run `calib_steps` steps
        (`planned_steps`: the local steps of rounds 1..round_ for a client that was not stopped).

        Clients with a short or non-finite trajectory then are left out (`left_out`, the reason), and
        so is a client whose window is under `vp.min_window` steps (too few examples to judge)."""
        if self.decided or not self.cfg.enabled:
            return False
        steps = self.cfg.calib_steps
        if planned_steps < steps:
            return False
        full = {k: np.asarray(v[:self.windows[k]], dtype=np.float64)
                for k, v in self.trajectories.items() if len(v) >= steps}
        if not full:
            return False
        left_out = {k: f"{len(v)} of {steps} calibration GradIPs (results refused, or not sampled)"
                    for k, v in self.trajectories.items() if len(v) < steps}
        left_out.update({k: f"its data is {self.windows[k]} steps of one pass, under vp.min_window={min_window(self.cfg)}"
                         for k in full if self.windows[k] < min_window(self.cfg)})
        for k, a in full.items():
            bad = np.flatnonzero(~np.isfinite(a))
            if bad.size:
                left_out[k] = f"non-finite GradIP at calibration step {int(bad[0])}: {a[bad[0]]}"
        self.left_out = dict(sorted(left_out.items()))
        self.stats = vp_rule(self.cfg).statistics({k: a for k, a in full.items() if k not in left_out})
        self.decided_round = round_
        return True

    def state_dict(self) -> dict:
        """JSON-able state for a checkpoint (a decision reads only the first calib_steps of each trajectory)."""
        steps = self.cfg.calib_steps
        return {
            "trajectories": {str(k): [float(v) for v in t[:steps]] for k, t in self.trajectories.items()},
            "flagged": list(self.flagged),
            "stats": {str(k): dict(s) for k, s in self.stats.items()},
            "left_out": {str(k): reason for k, reason in self.left_out.items()},
            "decided_round": self.decided_round,
            "rng": self.rng.bit_generator.state,
        }

    def load_state(self, vp: dict) -> None:
        self.trajectories = {int(k): list(t) for k, t in vp["trajectories"].items()}
        self.flagged = list(vp["flagged"])
        self.stats = {int(k): dict(s) for k, s in vp["stats"].items()}
        self.left_out = {int(k): reason for k, reason in vp.get("left_out", {}).items()}  # none in older checkpoints
        self.decided_round = vp["decided_round"]
        self.rng.bit_generator.state = vp["rng"]
