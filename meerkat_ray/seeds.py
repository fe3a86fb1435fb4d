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


def step_seeds(run_seed: int, round_: int, client: int, steps: int, sharing: str) -> list[int]:
    if sharing == "round":  # the paper: one seed list per round, shared by every client
        return [derive_seed(run_seed, "z", round_, t) for t in range(steps)]
    return [derive_seed(run_seed, "z", round_, "client", client, t) for t in range(steps)]
