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
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pandas as pd
import torch

from .zo import perturbation


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


def aggregation_terms(paths: list[ClientPath], sharing: str) -> list[Term]:
    paths = sorted(paths, key=lambda p: p.client)
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


def apply_terms_(theta: torch.Tensor, terms: list[Term], on_z=None) -> torch.Tensor:
    """theta <- theta - lr * coef * z(seed) for each term in order; `on_z(seed, z)` sees every z once."""
    for term in terms:
        z = perturbation(term.seed, theta.numel())
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


def replay_path(theta_init: torch.Tensor, path: pd.DataFrame, sharing: str | None = None) -> torch.Tensor:
    """sparse_final from sparse_init and path.parquet alone (the sharing mode is read off the seeds).

    The exact operation, per term: `theta.add_(z, alpha=-(lr * coef))` on float32 CPU tensors, with
    lr * coef computed in float64; another rounding order (e.g. `theta - lr*coef*z`) differs in the
    last bit of some coordinates."""
    sharing = sharing or infer_sharing(path)
    theta = theta_init.clone()
    for _, rows in path.groupby("round", sort=True):
        apply_terms_(theta, aggregation_terms(paths_from_frame(rows), sharing))
    return theta
