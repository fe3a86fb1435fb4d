"""Seeds, virtual paths and aggregation: everything the server rebuilds from seeds and scalars.

A client's virtual path in one round is its list of (seed_t, scalar_t) with the round's lr:
    theta_k^{t+1} = theta_k^t - lr * scalar_t * z(seed_t)
Aggregation w_{r+1} = sum_k p_k theta_k^{(T_k)} is linear in the z's, so it is applied as a list of
*terms* (seed, lr, coef), theta <- theta - lr * coef * z(seed):
- seed_sharing=round: one term per step t with coef_t = sum_k p_k scalar_k^t (clients in id order);
  the downlink is these T coefficients - dimension-free.
- seed_sharing=client: one term per (client, step) with coef = p_k * scalar_k^t.
Both the server and every client apply the same terms in the same order, so their global values
agree bit for bit; `replay_path` does the same from `path.parquet` alone (`replay_run` from a run
folder). A run whose `fed.algorithm` is not seed-replayable (first_order: its path rows carry seed
-1) is refused, never replayed into a wrong answer.

The rules that turn paths into terms (mean | median | trimmed_mean) live in
`strategies/aggregation.py`.
"""
from __future__ import annotations

import pandas as pd
import torch

from .errors import MeerkatError
from .messages import Term
from .seeds import derive_seed
from .strategies.aggregation import ClientPath, make_rule
from .zo import perturbation, perturbations

__all__ = ["ClientPath", "Term", "derive_seed"]  # re-exported: their home is a light module


def step_seeds(run_seed: int, round_: int, client: int, steps: int, sharing: str) -> list[int]:
    if sharing == "round":  # the paper: one seed list per round, shared by every client
        return [derive_seed(run_seed, "z", round_, t) for t in range(steps)]
    return [derive_seed(run_seed, "z", round_, "client", client, t) for t in range(steps)]


def replay_client_(theta: torch.Tensor, seeds, scalars, lr: float) -> torch.Tensor:
    """Rebuild a client's final values from its path (in place), exactly as the client computed them."""
    for seed, scalar in zip(seeds, scalars):
        theta.add_(perturbation(seed, theta.numel()), alpha=-(lr * float(scalar)))
    return theta


def robust_location(values: list[float], aggregation: str, trim_fraction: float = 0.0) -> float:
    """Unweighted median or trimmed mean of `values` (float64, deterministic)."""
    return make_rule(aggregation, trim_fraction=trim_fraction).location(values)


def aggregation_terms(paths: list[ClientPath], sharing: str, aggregation: str = "mean",
                      trim_fraction: float = 0.0) -> list[Term]:
    """The terms of rule `aggregation` (`fed.aggregation`) for one round's accepted paths."""
    return make_rule(aggregation, trim_fraction=trim_fraction).terms(paths, sharing)


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
    (first-order) the new values it carries. Workers and the driver apply syncs with this one function."""
    if msg.theta is not None:
        return msg.theta.clone()
    return apply_terms_(theta, msg.terms)


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
    if len(path) and bool((path["seed"] < 0).any()):
        raise MeerkatError("path.parquet: steps without a seed (seed -1): the run's fed.algorithm is not "
                           "seed-replayable (first_order sends values, not scalars), so it cannot be replayed")
    sharing = sharing or infer_sharing(path)
    theta = theta_init.clone()
    for _, rows in path.groupby("round", sort=True):
        apply_terms_(theta, aggregation_terms(paths_from_frame(rows), sharing, aggregation, trim_fraction))
    return theta


def replay_run(run_dir) -> torch.Tensor:
    """sparse_final of a run folder from its sparse_init, path.parquet and config.yaml alone;
    a run whose fed.algorithm is not seed-replayable is refused (MeerkatError, one line)."""
    from pathlib import Path

    from .algorithms import ALGORITHMS
    from .config import from_dict, read_yaml
    from .runlog import load_theta, read_path

    run_dir = Path(run_dir)
    cfg = from_dict(read_yaml(run_dir / "config.yaml"))
    if not ALGORITHMS[cfg.fed.algorithm].replayable:
        raise MeerkatError(f"{run_dir}: fed.algorithm={cfg.fed.algorithm} is not seed-replayable "
                           "(its clients send values, not scalars), so it cannot be replayed")
    return replay_path(load_theta(run_dir / "sparse_init.safetensors"), read_path(run_dir),
                       aggregation=cfg.fed.aggregation, trim_fraction=cfg.fed.trim_fraction)
