"""The algorithm registry and the interface every client algorithm implements.

An algorithm is a class registered with `@register("name")`; it has three parts:
- `local_steps(worker, plan, theta)`: on the client, `plan.steps` local steps from the global
  values `theta` (fp32, mask order, updated in place) on the client's persistent data stream
  (step t reads the batch at `plan.cursor + t * batch_size`, whatever the algorithm);
- `check_upload(plan, result, n, clip)`: on the server, why a result is refused ('' = accepted);
- `aggregate(server, round_, paths, results, probe)`: on the server, the new global values and the
  SyncMessage that brings every worker to them, plus each accepted client's GradIP trajectory.
Hooks with defaults (the plain model and the run's mask): `adapt_model(lm, cfg)` changes the model
every process builds (lora_zo: attaches adapters), `make_mask(lm, cfg, progress)` gives the trained
coordinates (None = the mask of `mask.*`), `export_model(model)` the model `meerkat-ray export` saves.
Class attributes say what the run folder can promise: `replayable` (path.parquet and
sparse_init.safetensors rebuild sparse_final) and `uses_seeds` (plans carry the round's seeds).

This module stays light (config validation imports it): torch-level code is imported where used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..registry import registrar

ALGORITHMS: dict[str, type[Algorithm]] = {}


register = registrar(ALGORITHMS)


def make_algorithm(name: str) -> Algorithm:
    return ALGORITHMS[name]()


@dataclass
class LocalOutcome:
    scalars: list[float]                  # one per step (ZO: the projected gradients); empty otherwise
    losses: list[float]                   # one per step
    values: object = None                 # the client's final masked values (first-order only)
    grad_ips: list[float] | None = None   # per-step GradIP computed on the client (first-order only)


class Algorithm:
    name = ""
    replayable = True
    uses_seeds = True

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse (ConfigError naming the keys) a config this algorithm cannot run."""

    def local_steps(self, worker, plan, theta) -> LocalOutcome:
        raise NotImplementedError

    def check_upload(self, plan, result, n: int, clip: float) -> str:
        raise NotImplementedError

    def aggregate(self, server, round_: int, paths, results: dict, probe: bool):
        """-> (SyncMessage, {client: GradIP per step}); updates server.theta."""
        raise NotImplementedError

    def adapt_model(self, lm, cfg):
        return lm

    def make_mask(self, lm, cfg, progress: bool):
        return None

    def export_model(self, model):
        return model


def finite(values) -> bool:
    try:
        return all(math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False
