"""The only things that cross between server and clients, with their payload sizes in bytes.

Byte accounting counts what a deployment would actually send (ids, seeds and scalars as 8-byte
values, per-step losses as float32 for monitoring), never the Python object overhead.
- downlink to each client per round: its ClientPlan + the SyncMessage that turns last round's
  global values into this round's (round sharing: T coefficients; client sharing: K*T seed+coef).
- uplink from each client per round: its ClientResult (T_k scalars + T_k losses).
"""
from __future__ import annotations

from dataclasses import dataclass, field

WORD = 8  # bytes of an id, a seed or a float64 scalar
LOSS_BYTES = 4  # per-step loss, sent as float32


@dataclass
class Term:
    """One aggregation term: every process applies theta <- theta - lr * coef * z(seed), in order."""
    seed: int
    lr: float
    coef: float


@dataclass
class ClientPlan:
    round: int
    client: int
    seeds: list[int]   # the round's seed list (round sharing: the same for every client)
    steps: int         # local steps to run: seeds[:steps] (1 for an early-stopped client)
    lr: float
    cursor: int        # position in this client's persistent data stream

    def payload_bytes(self) -> int:
        return WORD * (5 + len(self.seeds))  # round, client, steps, lr, cursor + seeds


@dataclass
class ClientResult:
    round: int
    client: int
    scalars: list[float]           # projected gradients, one per step
    losses: list[float]            # mean of the two perturbed losses per step
    worker: str = ""               # which worker ran it (diagnostics, not sent)
    compute_s: float = 0.0         # time in the two forwards and the update (diagnostics, not sent)

    def payload_bytes(self) -> int:
        return WORD * (2 + len(self.scalars)) + LOSS_BYTES * len(self.losses)


@dataclass
class SyncMessage:
    round: int                      # the round whose aggregate these terms are
    terms: list[Term] = field(default_factory=list)
    sharing: str = "round"

    def payload_bytes(self) -> int:
        if not self.terms:
            return WORD
        per_term = WORD if self.sharing == "round" else 2 * WORD  # round: seeds already known from the plan
        return WORD + per_term * len(self.terms)
