"""DP-ZO's accounting (`privacy.*`): each client's epsilon at privacy.delta for the steps it ran.

Every step of client k releases one noisy scalar: its Poisson-sampled examples (rate q_k = B / n_k,
B = data.batch_size, n_k its examples) each contribute a difference clipped to [-C, C], and
N(0, sigma^2 C^2) is added to their sum - the sampled Gaussian mechanism with noise multiplier
sigma. Composed over its steps, client k's record-level guarantee is (epsilon_k, delta)-DP, from
opacus's RDP accountant (`opacus.accountants.RDPAccountant`); sigma from a target epsilon comes
from `opacus.accountants.utils.get_noise_multiplier`. Nothing here is hand-written accounting.
"""
from __future__ import annotations

import functools
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


def noise_multiplier(cfg: Config, sizes: list[int]) -> float:
    """The run's sigma: privacy.noise_multiplier, or with noise_from_target the accountant's smallest
    sigma that keeps every client within privacy.target_epsilon over the planned steps (a pure
    function of the config and the client sizes: every process computes the same; the config
    itself is never changed, so a resumed run or a retried trial keeps its config)."""
    p = cfg.privacy
    if not p.noise_from_target:
        return p.noise_multiplier
    steps = planned_steps(cfg)
    try:  # the most-sampled client needs the most noise
        return _sigma_for(p.target_epsilon, p.delta, max(rates(cfg, sizes)), steps)
    except ValueError as exc:  # opacus: "The privacy budget is too low."
        raise ConfigError(f"privacy.target_epsilon: {p.target_epsilon:g} at delta {p.delta:g} over {steps} steps is "
                          f"out of the accountant's reach ({exc}); raise it or run fewer steps") from None


@functools.lru_cache(maxsize=64)
def _sigma_for(target_epsilon: float, delta: float, rate: float, steps: int) -> float:
    """opacus's smallest noise multiplier for the target (a search over sigma: computed once a run)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=rate,
                                          steps=steps, accountant="rdp"))


def check_plan(cfg: Config, sizes: list[int]) -> float:
    """Before the run: refuse a full-batch sample and a plan whose epsilon exceeds
    privacy.target_epsilon for some client (one line each); returns the run's sigma."""
    p = cfg.privacy
    if not p.enabled:
        return p.noise_multiplier
    q = rates(cfg, sizes)
    full = [k for k, r in enumerate(q) if r >= 1.0]
    if full:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is at least the {sizes[full[0]]} examples of client "
                          f"{full[0]}: a full-batch sample has no privacy amplification; lower data.batch_size")
    steps = planned_steps(cfg)
    sigma = noise_multiplier(cfg, sizes)
    if p.target_epsilon:
        worst = max(range(len(q)), key=lambda k: q[k])
        eps = epsilon(sigma, q[worst], steps, p.delta)
        if eps > p.target_epsilon:
            raise ConfigError(f"privacy.target_epsilon: the plan gives client {worst} epsilon {eps:.3g} at delta "
                              f"{p.delta:g} over {steps} steps (sampling rate {q[worst]:.3g}, noise_multiplier "
                              f"{sigma:g}), above {p.target_epsilon:g}; raise privacy.noise_multiplier "
                              "or run fewer steps")
    return sigma


def spent(cfg: Config, sizes: list[int], steps: list[int]) -> dict[str, float]:
    """client -> epsilon for the steps it has run so far."""
    sigma, delta = noise_multiplier(cfg, sizes), cfg.privacy.delta
    return {str(k): epsilon(sigma, r, int(s), delta) for k, (r, s) in enumerate(zip(rates(cfg, sizes), steps))}
