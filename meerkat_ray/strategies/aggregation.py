"""Aggregation rules: a round's accepted client paths -> the terms every process applies.

A rule is a class registered with `@register("name")`; the registry `AGGREGATIONS` is the list of
`fed.aggregation` choices (config validation reads it). `params` names the FedConfig keys the rule
takes as keywords: `strategy.rule_for(cfg)` builds it with the run's values, for the server and
for the replay alike; `check(cfg)` refuses a config the rule cannot run.

Aggregation w_{r+1} = sum_k p_k theta_k^{(T_k)} is linear in the z's, so a rule returns *terms*
(seed, lr, coef), applied as theta <- theta - lr * coef * z(seed) (`terms.apply_terms_`). Paths
reach `combine` in client-id order. A client's weight p_k is the server's (data size over the
round's accepted clients); the rules only combine.

Robust rules (median | trimmed_mean, round sharing only): for step t let P_t be the accepted
clients that ran step t (an early-stopped client runs only step 0) and W_t = sum_{k in P_t} p_k.
FedAvg's coefficient is W_t times the p-weighted mean of their scalars; a robust rule replaces that
mean by an *unweighted* location over P_t (one vote per client, as in coordinate-wise median /
trimmed mean, so that a client's data size cannot buy it the median). Keeping W_t means a step
that only part of the federation ran moves the model as much as under FedAvg. The statistic is
computed in float64 on Python floats (sorted), so every process agrees.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..messages import Term
from ..registry import registrar

AGGREGATIONS: dict[str, type[Aggregation]] = {}


register = registrar(AGGREGATIONS)


def make_rule(name: str, **params) -> Aggregation:
    """The rule `name` with the given values of its `params` (a run's rule: `strategy.rule_for`)."""
    return AGGREGATIONS[name](**params)


@dataclass
class ClientPath:
    """One client's accepted virtual path in one round."""
    client: int
    weight: float          # p_k in this round's aggregation
    seeds: list[int]
    scalars: list[float]
    lr: float


def decayed(paths: list[ClientPath], weight_decay: float, perturbations: int = 1) -> tuple[float, list[ClientPath]]:
    """Decoupled weight decay (zo.weight_decay = wd): each local step multiplies a client's values by
    a = 1 - lr wd before its update, so after T_k steps theta_k = a^T_k theta_0 - lr sum_t
    a^(T_k - 1 - t) g_t z_t. The round's average is then scale * theta + the rule's terms of the
    decayed paths: returns (scale = sum_k p_k a^T_k, the paths with coefficient a^(T_k - 1 - t) g
    for each of step t's P scalars). Every rule combines the decayed paths; wd = 0: (1.0, paths)."""
    if weight_decay == 0 or not paths or not any(p.weight for p in paths):
        return 1.0, paths  # (a probe round: weights 0, nothing is applied)
    scale, out = 0.0, []
    for p in sorted(paths, key=lambda p: p.client):  # client-id order, like FedAvg's sum
        a = 1.0 - p.lr * weight_decay
        steps = len(p.scalars) // perturbations
        scale += p.weight * a ** steps
        out.append(dataclasses.replace(p, scalars=[a ** (steps - 1 - i // perturbations) * float(g)
                                                   for i, g in enumerate(p.scalars)]))
    return scale, out


class Aggregation:
    name = ""
    round_sharing_only = False  # needs fed.seed_sharing=round (one seed per step for all clients)
    params: tuple[str, ...] = ()  # the FedConfig keys __init__ takes

    @classmethod
    def check(cls, cfg) -> None:
        fed = cfg.fed
        if fed.aggregation == cls.name and cls.round_sharing_only and fed.seed_sharing != "round":
            raise ConfigError(f"fed.aggregation: {cls.name} needs fed.seed_sharing=round (robust statistics "
                              "are taken over the clients' scalars for each shared seed)")

    def terms(self, paths: list[ClientPath], sharing: str) -> list[Term]:
        return self.combine(sorted(paths, key=lambda p: p.client), sharing)

    def combine(self, paths: list[ClientPath], sharing: str) -> list[Term]:
        raise NotImplementedError


@register("mean")
class Mean(Aggregation):
    """FedAvg. seed_sharing=round: one term per step t, coef_t = sum_k p_k scalar_k^t (clients in id
    order; the downlink is these T coefficients). seed_sharing=client: one term per (client, step),
    coef = p_k * scalar_k^t."""

    def combine(self, paths, sharing):
        if sharing == "client":
            return [Term(int(s), p.lr, p.weight * float(g)) for p in paths for s, g in zip(p.seeds, p.scalars)]
        terms: dict[int, Term] = {}  # insertion order = step order
        longest = max((len(p.seeds) for p in paths), default=0)
        for t in range(longest):
            for p in paths:
                if t < len(p.seeds):
                    seed = int(p.seeds[t])
                    term = terms.setdefault(seed, Term(seed, p.lr, 0.0))
                    term.coef += p.weight * float(p.scalars[t])
        return list(terms.values())


class Location(Aggregation):
    """A robust rule: coef_t = W_t * location(scalars of P_t), see the module docstring."""
    round_sharing_only = True

    def location(self, values: list[float]) -> float:
        raise NotImplementedError

    def combine(self, paths, sharing):
        if sharing != "round":
            raise ValueError(f"{self.name} aggregation needs round-shared seeds")
        terms = []
        for t in range(max((len(p.seeds) for p in paths), default=0)):
            ran = [p for p in paths if t < len(p.seeds)]
            seeds = {int(p.seeds[t]) for p in ran}
            if len(seeds) != 1:
                raise ValueError(f"step {t}: clients ran different seeds; robust aggregation needs round sharing")
            weight = 0.0
            for p in ran:  # client-id order, like FedAvg's sum
                weight += p.weight
            terms.append(Term(seeds.pop(), ran[0].lr, weight * self.location([p.scalars[t] for p in ran])))
        return terms


@register("median")
class Median(Location):
    """The middle value; the mean of the two middle values when the count is even."""

    def location(self, values):
        ordered = sorted(float(v) for v in values)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


@register("trimmed_mean")
class TrimmedMean(Location):
    """The mean after dropping the floor(beta * m) lowest and highest of m values (beta = fed.trim_fraction):
    the correctly rounded sum of the kept values (math.fsum) over their count."""

    params = ("trim_fraction",)

    def __init__(self, trim_fraction: float = 0.0):
        self.trim_fraction = trim_fraction

    def location(self, values):
        ordered = sorted(float(v) for v in values)
        cut = math.floor(self.trim_fraction * len(ordered))
        kept = ordered[cut: len(ordered) - cut]
        return math.fsum(kept) / len(kept)
