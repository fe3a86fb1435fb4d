"""Applying aggregation terms: the one arithmetic every process (server, clients, driver, replay)
uses to move the global values, so that they agree bit for bit.

A client's virtual path in one round is its list of (seed_t, scalar_t) with the round's lr:
    theta_k^{t+1} = theta_k^t - lr * scalar_t * z(seed_t)
Aggregation w_{r+1} = sum_k p_k theta_k^{(T_k)} is linear in the z's, so the rules
(`strategies/aggregation.py`) turn a round's paths into *terms* (seed, lr, coef), applied in order
as theta <- theta - lr * coef * z(seed), on float32 CPU tensors with lr * coef computed in float64
(another rounding order, e.g. `theta - lr*coef*z`, differs in the last bit of some coordinates).
"""
from __future__ import annotations

import torch

from .messages import Term
from .zo import perturbation, perturbations


def replay_client_(theta: torch.Tensor, seeds, scalars, lr: float, weight_decay: float = 0.0) -> torch.Tensor:
    """Rebuild a client's final values from its path (in place), exactly as the client computed them
    (one direction per step; with weight decay, theta <- (1 - lr wd) theta before each update)."""
    for seed, scalar in zip(seeds, scalars):
        if weight_decay:
            theta.mul_(1.0 - lr * weight_decay)
        theta.add_(perturbation(seed, theta.numel()), alpha=-(lr * float(scalar)))
    return theta


def apply_terms_(theta: torch.Tensor, terms: list[Term], on_z=None) -> torch.Tensor:
    """theta <- theta - lr * coef * z(seed) for each term in order; `on_z(seed, z)` sees every z once.
    (The next term's z is drawn while this one is applied: `zo.perturbations`.)"""
    for term, z in zip(terms, perturbations([t.seed for t in terms], theta.numel())):
        if on_z is not None:
            on_z(term.seed, z)
        theta.add_(z, alpha=-(term.lr * term.coef))
    return theta


def apply_sync_(theta: torch.Tensor, msg) -> torch.Tensor:
    """The global values after one round's SyncMessage: its terms applied to `theta` in place, or
    the new values it carries whole (`SyncMessage.replacement`). Workers and the driver apply syncs
    with this one function."""
    values = msg.replacement()
    if values is not None:
        return values.clone()
    if msg.scale != 1.0:
        theta.mul_(msg.scale)
    return apply_terms_(theta, msg.terms)
