"""Seeds, virtual paths and aggregation: everything the server rebuilds from seeds and scalars.

A client's virtual path in one round is its list of (seed_t, scalar_t) with the round's lr:
    theta_k^{t+1} = theta_k^t - lr * scalar_t * z(seed_t)
Aggregation w_{r+1} = sum_k p_k theta_k^{(T_k)} is linear in the z's, so it is applied as a list of
*terms* (seed, lr, coef), theta <- theta - lr * coef * z(seed):
- seed_sharing=round: one term per step t with coef_t = sum_k p_k scalar_k^t (clients in id order);
  the downlink is these T coefficients - dimension-free.
- seed_sharing=client: one term per (client, step) with coef = p_k * scalar_k^t.
Both the server and every client apply the same terms in the same order, so their global values
agree bit for bit; `replay_path` does the same from `path.parquet` alone.

Robust aggregation (fed.aggregation = median | trimmed_mean, round sharing only): for step t let
P_t be the accepted clients that ran step t (an early-stopped client runs only step 0) and
W_t = sum_{k in P_t} p_k. FedAvg's coefficient is W_t times the p-weighted mean of their scalars;
the robust rules replace that mean by an *unweighted* statistic over P_t (one vote per client, as
in coordinate-wise median / trimmed mean, so that a client's data size cannot buy it the median):
    median:       coef_t = W_t * median_{k in P_t} scalar_k^t   (mean of the two middle values when |P_t| is even)
    trimmed_mean: coef_t = W_t * mean of the scalars left after dropping the floor(beta * |P_t|) lowest and
                  highest (beta = fed.trim_fraction)
Keeping W_t means a step that only part of the federation ran moves the model as much as under
FedAvg. The statistic is computed in float64 on Python floats (sorted), so every process agrees.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import pandas as pd
import torch

from .zo import perturbation, perturbations


def derive_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of its parts (run seed, purpose, round, client, step)."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def step_seeds(run_seed: int, round_: int, client: int, steps: int, sharing: str) -> list[int]:
    if sharing == "round":  # the paper: one seed list per round, shared by every client
        return [derive_seed(run_seed, "z", round_, t) for t in range(steps)]
    return [derive_seed(run_seed, "z", round_, "client", client, t) for t in range(steps)]


@dataclass
class ClientPath:
    """One client's accepted virtual path in one round."""
    client: int
    weight: float          # p_k in this round's aggregation
    seeds: list[int]
    scalars: list[float]
    lr: float


@dataclass
class Term:
    seed: int
    lr: float
    coef: float


def replay_client_(theta: torch.Tensor, seeds, scalars, lr: float) -> torch.Tensor:
    """Rebuild a client's final values from its path (in place), exactly as the client computed them."""
    for seed, scalar in zip(seeds, scalars):
        theta.add_(perturbation(seed, theta.numel()), alpha=-(lr * float(scalar)))
    return theta


def robust_location(values: list[float], aggregation: str, trim_fraction: float = 0.0) -> float:
    """Unweighted median or trimmed mean of `values` (float64, deterministic)."""
    ordered = sorted(float(v) for v in values)
    m = len(ordered)
    if aggregation == "median":
        mid = m // 2
        return ordered[mid] if m % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    if aggregation == "trimmed_mean":
        cut = math.floor(trim_fraction * m)
        kept = ordered[cut: m - cut]
        return math.fsum(kept) / len(kept)
    raise ValueError(f"unknown robust aggregation {aggregation!r}")


def aggregation_terms(paths: list[ClientPath], sharing: str, aggregation: str = "mean",
                      trim_fraction: float = 0.0) -> list[Term]:
    paths = sorted(paths, key=lambda p: p.client)
    if aggregation != "mean":
        if sharing != "round":
            raise ValueError(f"{aggregation} aggregation needs round-shared seeds")
        return _robust_terms(paths, aggregation, trim_fraction)
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


def _robust_terms(paths: list[ClientPath], aggregation: str, trim_fraction: float) -> list[Term]:
    terms = []
    for t in range(max((len(p.seeds) for p in paths), default=0)):
        ran = [p for p in paths if t < len(p.seeds)]
        seeds = {int(p.seeds[t]) for p in ran}
        if len(seeds) != 1:
            raise ValueError(f"step {t}: clients ran different seeds; robust aggregation needs round sharing")
        weight = 0.0
        for p in ran:  # client-id order, like FedAvg's sum
            weight += p.weight
        stat = robust_location([p.scalars[t] for p in ran], aggregation, trim_fraction)
        terms.append(Term(seeds.pop(), ran[0].lr, weight * stat))
    return terms


def apply_terms_(theta: torch.Tensor, terms: list[Term], on_z=None) -> torch.Tensor:
    """theta <- theta - lr * coef * z(seed) for each term in order; `on_z(seed, z)` sees every z once.
    (The next term's z is drawn while this one is applied: `zo.perturbations`.)"""
    for term, z in zip(terms, perturbations([t.seed for t in terms], theta.numel())):
        if on_z is not None:
            on_z(term.seed, z)
        theta.add_(z, alpha=-(term.lr * term.coef))
    return theta


def paths_from_frame(rows: pd.DataFrame) -> list[ClientPath]:
    """One round of path.parquet back into ClientPaths."""
    out = []
    for client, group in rows.sort_values(["client", "step"]).groupby("client", sort=True):
        out.append(ClientPath(client=int(client), weight=float(group["weight"].iloc[0]),
                              seeds=[int(s) for s in group["seed"]], scalars=[float(g) for g in group["scalar"]],
                              lr=float(group["lr"].iloc[0])))
    return out


def infer_sharing(rows: pd.DataFrame) -> str:
    """`round` when every step index carries one seed for all clients of a round, else `client`.

    With a single client per round both modes give the same terms, so the answer cannot matter."""
    seeds_per_step = rows.groupby(["round", "step"])["seed"].nunique()
    return "round" if bool((seeds_per_step == 1).all()) else "client"


def replay_path(theta_init: torch.Tensor, path: pd.DataFrame, sharing: str | None = None,
                aggregation: str = "mean", trim_fraction: float = 0.0) -> torch.Tensor:
    """sparse_final from sparse_init and path.parquet alone (the sharing mode is read off the seeds;
    a robust `fed.aggregation` and its `fed.trim_fraction` come from config.yaml).

    The exact operation, per term: `theta.add_(z, alpha=-(lr * coef))` on float32 CPU tensors, with
    lr * coef computed in float64; another rounding order (e.g. `theta - lr*coef*z`) differs in the
    last bit of some coordinates."""
    sharing = sharing or infer_sharing(path)
    theta = theta_init.clone()
    for _, rows in path.groupby("round", sort=True):
        apply_terms_(theta, aggregation_terms(paths_from_frame(rows), sharing, aggregation, trim_fraction))
    return theta
