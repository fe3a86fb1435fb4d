"""Where a run's clients and server run: the executor registry (`executor`).

The one round loop (`runner.federate`) drives an executor; the names below are the values of
`executor`, each mapped to a `module:function` builder `build(cfg, data, progress)` that is imported
only when chosen, so the core never imports Ray (tests/test_strategies.py checks it).

An executor is an `Executor` (below, a typed Protocol: the local and the Ray executor both
satisfy it, tests/test_interfaces.py checks their signatures); its server is a `ServerHandle` (the
Server itself, or the Ray server actor's proxy).
Nothing of size n crosses between the driver and the executor per round (first_order's sync aside,
which is n values by nature): the driver applies each SyncMessage to its own copy.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    import torch

    from .messages import ClientPlan, ClientResult, SyncMessage
    from .server import RoundOutcome

EXECUTORS = {
    "local": "meerkat_ray.local_executor:build",      # every client in this process, one after another
    "ray": "meerkat_ray.distributed.executor:build",  # client actors and a server actor on a Ray cluster
}

# per round in metrics.jsonl: clients re-run, client actors replaced, client actors lost from the pool,
# replacements that joined it, server actors restored from the last checkpoint, actors killed for
# missing a call's deadline (all 0 without Ray)
FAULT_COUNTERS = ("retries", "actor_restarts", "pool_shrinks", "pool_regrowths", "server_restarts",
                  "actor_timeouts")


def make_executor(cfg, data, progress: bool) -> Executor:
    """The executor of `executor`, set up: model, mask and theta_0 loaded where its workers run."""
    module, function = EXECUTORS[cfg.executor].split(":")
    return getattr(importlib.import_module(module), function)(cfg, data, progress)


class ServerHandle(Protocol):
    """The server as the round loop drives it."""

    def plan_round(self, round_: int) -> list[ClientPlan]:
        """The plans of round `round_` (kept by the server until it is finished)."""

    def finish_planned(self, round_: int, results: list[ClientResult | None]) -> RoundOutcome:
        """Check, replay and aggregate the results of the server's own plans for `round_`."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the server besides the global values."""

    def load_state(self, state: dict, theta: torch.Tensor) -> None:
        """Continue from a checkpoint's state and global values."""

    def theta_digest(self) -> str:
        """The server's global values, as `runlog.theta_digest`."""


class Executor(Protocol):
    """Where the clients (and the server) of one run execute."""
    mask: object                 # the run's Mask
    theta0: torch.Tensor         # the initial global values (fp32, mask order)

    def make_server(self, cfg, theta: torch.Tensor, g_pre: torch.Tensor | None,
                    client_sizes: list[int]) -> ServerHandle:
        """The run's server, holding `theta`."""

    def run_clients(self, plans: list[ClientPlan],
                    on_result: Callable[[ClientResult], None] | None = None) -> list[ClientResult | None]:
        """The results in plan order, whatever order they ran in; `on_result` sees each as it arrives."""

    def sync(self, msg: SyncMessage, theta: torch.Tensor) -> torch.Tensor:
        """Every worker applies the round's SyncMessage, and so do the driver's values `theta` (returned)."""

    def restore(self, theta: torch.Tensor, round_: int) -> None:
        """Every worker continues from a checkpoint's values."""

    def evaluate(self) -> tuple[float, float]:
        """(accuracy, test loss) of the current global values."""

    def fault_counts(self) -> dict:
        """FAULT_COUNTERS since the last call."""

    def theta_digests(self) -> list[str]:
        """Every worker's global values, as `runlog.theta_digest`."""

    def close(self) -> None:
        """Release the workers."""
