"""Sparse SPSA on the masked coordinates: the seeded directions and the step (the model's masked
coordinates are read and written through `masked_view`, batches are `batches`, losses `scoring`).

For a step with seed s and fp32 master values theta (length n, mask order):
    z = randn(n) from torch.Generator("cpu").manual_seed(s)          (mask support only)
    g = [f(theta + eps z; B) - f(theta - eps z; B)] / (2 eps)         (the projected gradient: one scalar)
    theta <- theta - lr * g * z
With P directions z_1..z_P (zo.num_perturbations, `multi_step_`): P scalars at the same theta, then
theta <- theta - lr * (g_p / P) * z_p for p = 1..P in turn (after theta <- (1 - lr wd) theta with
zo.weight_decay = wd > 0); zo.estimator=forward takes
g_p = [f(theta + eps z_p; B) - f(theta; B)] / eps, with f(theta; B) computed once per step.
The model's own tensors (any dtype, any device) only ever *receive* theta (or theta +- eps z) cast to
their dtype; the restore writes theta back from the master copy, never subtracts, so nothing drifts.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from .batches import Batch
from .masked_view import MaskedView
from .scoring import classification_loss, example_losses


def perturbation(seed: int, n: int) -> torch.Tensor:
    """z ~ N(0, I_n), float32 on the CPU, a pure function of the seed (the contract's stream)."""
    return torch.randn(n, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)


DRAW_AHEAD_MIN_N = 1 << 16  # below this a draw (~0.4 ms at 2^16) costs less than handing it to a thread


def perturbations(seeds, n: int):
    """z for each seed in turn, exactly `perturbation(seed, n)`; from n = DRAW_AHEAD_MIN_N on, the
    next z is drawn in a background thread while the caller works with the current one (torch
    releases the GIL while it draws), so the draw overlaps the forward passes. Two z's are alive
    at once."""
    seeds = [int(s) for s in seeds]
    if n < DRAW_AHEAD_MIN_N or len(seeds) < 2:
        for seed in seeds:
            yield perturbation(seed, n)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="z-draw") as pool:
        pending = pool.submit(perturbation, seeds[0], n)
        for i in range(len(seeds)):
            z = pending.result()
            if i + 1 < len(seeds):
                pending = pool.submit(perturbation, seeds[i + 1], n)
            yield z


def zo_step_(view: MaskedView, theta: torch.Tensor, seed: int, batch: Batch, label_ids: torch.Tensor,
             eps: float, lr: float, clip: float = 0.0, z: torch.Tensor | None = None) -> tuple[float, float]:
    """One sparse SPSA step; updates theta in place and leaves the model holding it.

    Returns (scalar g, loss = mean of the two perturbed losses); with `clip` > 0, g is clipped to
    [-clip, clip] before the update (the clipped value is the one sent). A non-finite loss leaves
    theta and the model exactly as they were and returns the non-finite values for the caller to report.
    `z`, when given, must be `perturbation(seed, n)` (drawn ahead by `perturbations`).
    """
    z = perturbation(seed, theta.numel()) if z is None else z
    (scalar,), loss = multi_step_(view, theta, [z], batch, label_ids, eps, lr, clip)  # P = 1: g / 1 is g
    return scalar, loss


def multi_step_(view: MaskedView, theta: torch.Tensor, zs: list[torch.Tensor], batch: Batch, label_ids: torch.Tensor,
                eps: float, lr: float, clip: float = 0.0, estimator: str = "central",
                decay: float = 0.0) -> tuple[list[float], float]:
    """One step with P = len(zs) directions (`zs`: the step's perturbations, in seed order) and the
    `estimator` (central | forward); updates theta in place and leaves the model holding it.

    Returns (the P scalars, loss): central, the mean over p of the two perturbed losses' mean;
    forward, f(theta) (the unperturbed loss, computed once and shared by the P directions). Each
    scalar is clipped to [-clip, clip] when clip > 0. A non-finite loss leaves theta and the model
    exactly as they were (the non-finite values are returned for the caller to report). `decay`
    = lr x zo.weight_decay: theta <- (1 - decay) theta before the update (decoupled weight decay)."""
    P = len(zs)
    scalars, losses = [], []
    base = None
    if estimator == "forward":
        view.write_(theta)
        base = classification_loss(view.model, batch, label_ids)
    for z in zs:
        view.write_(theta, z, eps)
        loss_plus = classification_loss(view.model, batch, label_ids)
        if estimator == "forward":
            scalar = (loss_plus - base) / eps
        else:
            view.write_(theta, z, -eps)
            loss_minus = classification_loss(view.model, batch, label_ids)
            scalar = (loss_plus - loss_minus) / (2.0 * eps)
            losses.append(0.5 * (loss_plus + loss_minus))
        if clip > 0 and math.isfinite(scalar):
            scalar = max(-clip, min(clip, scalar))
        scalars.append(scalar)
    if all(math.isfinite(g) for g in scalars):
        if decay:
            theta.mul_(1.0 - decay)
        for z, g in zip(zs, scalars):
            theta.add_(z, alpha=-(lr * (g / P)))
    view.write_(theta)
    loss = base if estimator == "forward" else math.fsum(losses) / P
    return scalars, loss


def dp_scalar(differences: list[float], clip: float, noise_multiplier: float, batch_size: int,
              generator: torch.Generator) -> float:
    """DP-ZO's released scalar: (sum_i clip(d_i, -C, C) + N(0, sigma^2 C^2)) / B, the sum in float64
    (math.fsum), the noise from `generator` (the client's own, which no replay sees)."""
    total = math.fsum(max(-clip, min(clip, d)) for d in differences)
    noise = float(torch.randn(1, generator=generator, dtype=torch.float64)) * noise_multiplier * clip
    return (total + noise) / batch_size


def dp_step_(view: MaskedView, theta: torch.Tensor, z: torch.Tensor, batch: Batch | None, label_ids: torch.Tensor,
             eps: float, lr: float, estimator: str, clip: float, noise_multiplier: float, batch_size: int,
             generator: torch.Generator, decay: float = 0.0) -> float:
    """One DP-ZO step on a Poisson-sampled `batch` (None: no example was drawn): each example's
    difference d_i = [l_i(theta + eps z) - l_i(theta - eps z)] / (2 eps) (forward: [l_i(theta + eps z)
    - l_i(theta)] / eps), then the noisy scalar of `dp_scalar`; theta <- (1 - decay) theta - lr g z.
    Returns g (a non-finite loss leaves theta as it was and returns NaN)."""
    differences: list[float] = []
    if batch is not None:
        if estimator == "forward":
            view.write_(theta)
            base = example_losses(view.model, batch, label_ids)
        view.write_(theta, z, eps)
        plus = example_losses(view.model, batch, label_ids)
        if estimator == "forward":
            differences = [(a - b) / eps for a, b in zip(plus, base)]
        else:
            view.write_(theta, z, -eps)
            minus = example_losses(view.model, batch, label_ids)
            differences = [(a - b) / (2.0 * eps) for a, b in zip(plus, minus)]
    if not all(math.isfinite(d) for d in differences):
        view.write_(theta)
        return math.nan
    scalar = dp_scalar(differences, clip, noise_multiplier, batch_size, generator)
    if decay:
        theta.mul_(1.0 - decay)
    theta.add_(z, alpha=-(lr * scalar))
    view.write_(theta)
    return scalar
