"""Named seeds: every random draw of a run derives from the run seed and what it is for.

Light on purpose (hashlib only): config validation and the selection policies use it without torch.
"""
from __future__ import annotations

import hashlib


def derive_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of its parts (run seed, purpose, round, client, step):
    the first 8 bytes (little-endian) of blake2b over the parts joined by "/", top bit cleared."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def step_seeds(run_seed: int, round_: int, client: int, steps: int, sharing: str, perturbations: int = 1,
               pool: int = 0) -> list[int]:
    """The seeds of `steps` local steps, P = `perturbations` per step, step-major (step t's are
    [t P, (t + 1) P)); the first of each step is the seed of a one-direction step, and direction
    p >= 1 appends ("p", p) to its parts. With a seed pool of K = `pool` > 0 candidates (FedKSeed,
    fed.seed_pool): candidate j is derive_seed(run_seed, "pool", j), and a step direction takes
    candidate (its seed above) mod K."""
    if sharing == "round":  # the paper: one seed list per round, shared by every client
        parts = lambda t: (run_seed, "z", round_, t)  # noqa: E731
    else:
        parts = lambda t: (run_seed, "z", round_, "client", client, t)  # noqa: E731
    seeds = [derive_seed(*parts(t)) if p == 0 else derive_seed(*parts(t), "p", p)
             for t in range(steps) for p in range(perturbations)]
    return [derive_seed(run_seed, "pool", s % pool) for s in seeds] if pool else seeds
