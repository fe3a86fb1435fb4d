"""Client-selection policies: which clients take part in a round, and which of them are early-stopped.

A policy is a class registered with `@register("name")`. `choice_of = "vp.policy"` makes its name a
`vp.policy` choice (Meerkat-vp's early-stop rule, used when vp.enabled); a policy with
`choice_of = ""` is switched on by its own key (`active`). Config validation reads this registry
for the `vp.policy` choices and runs every policy's `check`.

The server asks every active policy, in registry order, each round:
- before planning, `participants(round_, clients)`: the clients planned this round (a sorted
  subset of `clients`, which is what the policies before it left; all K to start);
- after aggregating, `early_stop(view)` with the round's `RoundView` (its losses, GradIP and, in
  the round the calibration completes, the VPCS statistics): the clients that from then on run
  1 local step per round, or None to leave that set as it is.
A policy draws only from the `rng` it is given (Meerkat-vp's stream, checkpointed with the run) or
from generators derived from the run seed and the round, so resume and Ray vs local stay exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from ..seeds import derive_seed
from ..registry import registrar
from .vp_rules import vp_rule

POLICIES: dict[str, type[Policy]] = {}


register = registrar(POLICIES)


def active_policies(cfg, rng: np.random.Generator) -> list[Policy]:
    return [cls(cfg, rng) for cls in POLICIES.values() if cls.active(cfg)]


@dataclass
class RoundView:
    """What a policy sees after round `round`: per accepted client, its per-step losses and GradIP."""
    round: int
    participants: list[int] = field(default_factory=list)  # the clients planned this round
    losses: dict[int, list[float]] = field(default_factory=dict)
    grad_ips: dict[int, list[float]] = field(default_factory=dict)  # nan where the mask has no g_pre
    stats: dict[int, dict[str, float]] = field(default_factory=dict)  # the vp.rule's statistics, in the decision round only
    flagged: list[int] = field(default_factory=list)  # the clients early-stopped so far


class Policy:
    name = ""
    choice_of = "vp.policy"

    def __init__(self, cfg, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.vp.enabled and cfg.vp.policy == cls.name

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse (ConfigError) a config this policy cannot run; called for every registered policy."""

    def participants(self, round_: int, clients: list[int]) -> list[int]:
        return clients

    def early_stop(self, view: RoundView) -> list[int] | None:
        return None


@register("gradip")
class GradIPPolicy(Policy):
    """VPCS: stop the clients the decision rule `vp.rule` flags from their GradIP trajectories."""

    def early_stop(self, view):
        return vp_rule(self.cfg.vp).flags(view.stats) if view.stats else None


@register("random")
class RandomPolicy(Policy):
    """Baseline: stop as many clients as VPCS would, chosen uniformly at random (from `rng`)."""

    def early_stop(self, view):
        if not view.stats:
            return None
        count = len(vp_rule(self.cfg.vp).flags(view.stats))
        return sorted(int(k) for k in self.rng.choice(sorted(view.stats), size=count, replace=False))


@register("clients_per_round")
class ClientSampling(Policy):
    """Per-round client sampling, `fed.clients_per_round` = m > 0: round r plans m clients drawn
    uniformly without replacement from `clients` (c_0 < c_1 < ...; all K unless another policy
    narrowed them), from a generator that depends on the run seed and r only:
        g = numpy.random.default_rng(derive_seed(seed, "clients", r))
        participants = sorted(c_i for i in g.choice(len(clients), size=min(m, len(clients)), replace=False))
    (`seeds.derive_seed`). Nothing else draws from g, and it draws from nothing else.
    Aggregation weights are renormalised over the participants: p_k = n_k / sum_{j in A_r} n_j, with
    n_k the client's data size and A_r the round's accepted participants (a rejected one drops out
    of the sum, as without sampling). Meerkat-vp composes: VPCS decides at its usual round from the
    clients that have calib_steps recorded by then (those sampled while it calibrates), and a
    flagged client, when sampled, runs 1 local step. Every client is sent each round's sync terms
    (downlink bytes count them for all K: a client must rebuild the global values when next sampled)."""
    choice_of = ""

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.fed.clients_per_round > 0

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.fed.clients_per_round > cfg.data.num_clients:
            raise ConfigError(f"fed.clients_per_round: {cfg.fed.clients_per_round} is more than the "
                              f"data.num_clients={cfg.data.num_clients} clients there are")

    def participants(self, round_, clients):
        draw = np.random.default_rng(derive_seed(self.cfg.seed, "clients", round_))
        picked = draw.choice(len(clients), size=min(self.cfg.fed.clients_per_round, len(clients)), replace=False)
        return sorted(clients[int(i)] for i in picked)
