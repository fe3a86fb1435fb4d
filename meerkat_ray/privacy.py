"""DP-ZO's accounting (`privacy.*`): each client's epsilon at privacy.delta for the steps it ran.

Every step of client k releases one noisy scalar: its Poisson-sampled examples (rate q_k = B / n_k,
B = data.batch_size, n_k its examples) each contribute a difference clipped to [-C, C], and
N(0, sigma^2 C^2) is added to their sum - the sampled Gaussian mechanism with noise multiplier
sigma. Composed over its steps, client k's record-level guarantee is (epsilon_k, delta)-DP, from
opacus's RDP accountant (`opacus.accountants.RDPAccountant`); sigma from a target epsilon comes
from `opacus.accountants.utils.get_noise_multiplier`. Nothing here is hand-written accounting.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from .errors import ConfigError
from .schedule import round_steps

if TYPE_CHECKING:
    from .config import Config


def epsilon(sigma: float, rate: float, steps: int, delta: float) -> float:
    """(epsilon, delta)-DP of `steps` sampled Gaussian steps (noise multiplier sigma, rate q)."""
    if steps <= 0:
        return 0.0
    if sigma <= 0:
        return float("inf")
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(sigma), float(rate), int(steps))]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, only looser
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


def rates(cfg: Config, sizes: list[int]) -> list[float]:
    return [cfg.data.batch_size / n if n else 1.0 for n in sizes]


def planned_steps(cfg: Config) -> int:
    """The local steps a client that is never early-stopped runs over the whole run."""
    return sum(round_steps(cfg, r) for r in range(1, cfg.fed.rounds + 1))


def check_plan(cfg: Config, sizes: list[int]) -> None:
    """Before the run: refuse a full-batch sample, choose sigma from the target (noise_from_target),
    and refuse a plan whose epsilon exceeds privacy.target_epsilon for some client (one line each)."""
    p = cfg.privacy
    if not p.enabled:
        return
    q = rates(cfg, sizes)
    full = [k for k, r in enumerate(q) if r >= 1.0]
    if full:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is at least the {sizes[full[0]]} examples of client "
                          f"{full[0]}: a full-batch sample has no privacy amplification; lower data.batch_size")
    steps = planned_steps(cfg)
    if p.noise_from_target:
        from opacus.accountants.utils import get_noise_multiplier

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p.noise_multiplier = max(float(get_noise_multiplier(target_epsilon=p.target_epsilon, target_delta=p.delta,
                                                                 sample_rate=r, steps=steps, accountant="rdp"))
                                     for r in q)
    if p.target_epsilon:
        worst = max(range(len(q)), key=lambda k: q[k])
        eps = epsilon(p.noise_multiplier, q[worst], steps, p.delta)
        if eps > p.target_epsilon:
            raise ConfigError(f"privacy.target_epsilon: the plan gives client {worst} epsilon {eps:.3g} at delta "
                              f"{p.delta:g} over {steps} steps (sampling rate {q[worst]:.3g}, noise_multiplier "
                              f"{p.noise_multiplier:g}), above {p.target_epsilon:g}; raise privacy.noise_multiplier "
                              "or run fewer steps")


def spent(cfg: Config, sizes: list[int], steps: list[int]) -> dict[str, float]:
    """client -> epsilon for the steps it has run so far."""
    p = cfg.privacy
    return {str(k): epsilon(p.noise_multiplier, r, int(s), p.delta) for k, (r, s) in enumerate(zip(rates(cfg, sizes), steps))}
