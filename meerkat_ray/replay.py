"""Replay: a run folder's sparse_final rebuilt from sparse_init.safetensors, path.parquet and
config.yaml alone.

Each round of path.parquet is read back into the accepted clients' paths (`paths_from_frame`) and
turned into terms by the run's own aggregation rule (`strategy.rule_for(cfg)`: the server's
construction, so a rule's parameters replay with the run's values), then applied in order
(`terms.apply_terms_`). seed_sharing=round: one term per step t with coef_t = sum_k p_k scalar_k^t;
seed_sharing=client: one term per (client, step). A run whose `fed.algorithm` is not
seed-replayable (first_order: its path rows carry seed -1) is refused, never replayed into a wrong
answer.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from .errors import MeerkatError
from .strategies.aggregation import Aggregation, ClientPath, decayed, make_rule
from .terms import apply_terms_


def paths_from_frame(rows: pd.DataFrame) -> list[ClientPath]:
    """One round of path.parquet back into ClientPaths."""
    out = []
    order = ["client", "step", "perturbation"] if "perturbation" in rows else ["client", "step"]
    for client, group in rows.sort_values(order).groupby("client", sort=True):
        out.append(ClientPath(client=int(client), weight=float(group["weight"].iloc[0]),
                              seeds=[int(s) for s in group["seed"]], scalars=[float(g) for g in group["scalar"]],
                              lr=float(group["lr"].iloc[0])))
    return out


def infer_sharing(rows: pd.DataFrame) -> str:
    """`round` when every step index carries one seed for all clients of a round, else `client`.

    With a single client per round both modes give the same terms, so the answer cannot matter."""
    step = ["round", "step", "perturbation"] if "perturbation" in rows else ["round", "step"]
    seeds_per_step = rows.groupby(step)["seed"].nunique()
    return "round" if bool((seeds_per_step == 1).all()) else "client"


def replay_path(theta_init: torch.Tensor, path: pd.DataFrame, sharing: str | None = None,
                rule: Aggregation | None = None, weight_decay: float = 0.0, perturbations: int = 1) -> torch.Tensor:
    """sparse_final from sparse_init and path.parquet: each round's terms by `rule` (a run's rule,
    `strategy.rule_for(cfg)`; None = FedAvg), the sharing mode read off the seeds unless given;
    with zo.weight_decay, each round's scale and decayed paths (`aggregation.decayed`)."""
    if len(path) and bool((path["seed"] < 0).any()):
        raise MeerkatError("path.parquet: steps without a seed (seed -1): the run's fed.algorithm is not "
                           "seed-replayable (first_order sends values, not scalars), so it cannot be replayed")
    sharing = sharing or infer_sharing(path)
    rule = rule or make_rule("mean")
    theta = theta_init.clone()
    for _, rows in path.groupby("round", sort=True):
        scale, paths = decayed(paths_from_frame(rows), weight_decay, perturbations)
        if scale != 1.0:
            theta.mul_(scale)
        apply_terms_(theta, rule.terms(paths, sharing))
    return theta


def replay_run(run_dir) -> torch.Tensor:
    """sparse_final of a run folder from its sparse_init, path.parquet and config.yaml alone;
    a run whose fed.algorithm is not seed-replayable is refused (MeerkatError, one line)."""
    from .algorithms import ALGORITHMS
    from .config import from_dict, read_yaml
    from .runlog import load_theta, read_path
    from .strategies.strategy import rule_for

    run_dir = Path(run_dir)
    cfg = from_dict(read_yaml(run_dir / "config.yaml"))
    if not ALGORITHMS[cfg.fed.algorithm].replayable:
        raise MeerkatError(f"{run_dir}: fed.algorithm={cfg.fed.algorithm} is not seed-replayable "
                           "(its clients send values, not scalars), so it cannot be replayed")
    return replay_path(load_theta(run_dir / "sparse_init.safetensors"), read_path(run_dir), cfg.fed.seed_sharing,
                       rule=rule_for(cfg),
                       weight_decay=cfg.zo.weight_decay, perturbations=cfg.zo.num_perturbations)
