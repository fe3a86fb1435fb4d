"""The only things that cross between server and clients, with their payload sizes in bytes.

Byte accounting counts what a deployment would actually send (ids, seeds and scalars as 8-byte
values, per-step losses as float32 for monitoring), never the Python object overhead.
- downlink to each client per round: its ClientPlan + the SyncMessage that turns last round's
  global values into this round's (round sharing: T coefficients; client sharing: K*T seed+coef).
- uplink from each client per round: its ClientResult (T_k scalars + T_k losses).
A client algorithm whose uploads or syncs carry more (`algorithms/first_order.py`: the n masked
values up, the new global values down) defines them as subclasses in its own module, with their
own byte accounting; the server and the workers only call `payload_bytes` and `replacement`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

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
        """Counted for every result, refused ones included, so a malformed field (the server's check
        names it) counts as the numbers it holds, if it is a list or a tensor, else 0."""
        return WORD * (2 + entries(self.scalars)) + LOSS_BYTES * entries(self.losses)


def entries(value) -> int:
    """How many numbers an uploaded field holds: a list's or tuple's length, a tensor's elements, else 0."""
    if isinstance(value, (list, tuple)):
        return len(value)
    torch = sys.modules.get("torch")  # a tensor exists only where torch is loaded: no import here
    return int(value.numel()) if torch is not None and isinstance(value, torch.Tensor) else 0


@dataclass
class SyncMessage:
    round: int                      # the round whose aggregate these terms are
    terms: list[Term] = field(default_factory=list)
    sharing: str = "round"
    scale: float = 1.0              # theta <- scale * theta before the terms (zo.weight_decay > 0)

    def replacement(self) -> Any:
        """The new global values whole, for a sync that sends them (None: apply the terms)."""
        return None

    def payload_bytes(self) -> int:
        scale = WORD if self.scale != 1.0 else 0
        if not self.terms:
            return WORD + scale
        per_term = WORD if self.sharing == "round" else 2 * WORD  # round: seeds already known from the plan
        return WORD + scale + per_term * len(self.terms)


def measured_s(result) -> float:
    """The compute time a result reports, where it is a usable number (diagnostics and deadlines
    read it before the server has checked the result; a malformed one counts 0)."""
    seconds = getattr(result, "compute_s", 0.0)
    return float(seconds) if isinstance(seconds, (int, float)) and 0 <= seconds < float("inf") else 0.0
