"""The algorithm registry and the interface every client algorithm implements.

An algorithm is a class registered with `@register("name")`; it has three parts:
- `local_steps(worker, plan, theta)`: on the client, `plan.steps` local steps from the global
  values `theta` (fp32, mask order, updated in place) on the client's persistent data stream
  (step t reads the batch at `plan.cursor + t * batch_size`, whatever the algorithm);
- `check_upload(plan, result, n, clip, vp)`: on the server, why a result is refused ('' = accepted):
  every field of the upload it may carry, and that the upload is of its own type (no extra fields)
  (`vp`: Meerkat-vp runs; `Server.check_result` has checked the result's type, round and client);
- `aggregate(theta, round_, paths, results, strategy, g_pre, probe)`: on the server, the new global
  values and the SyncMessage that brings every worker to them, plus each accepted client's GradIP.
Hooks with defaults (the plain model and the run's mask): `adapt_model(lm, cfg)` changes the model
every process builds (lora_zo: attaches adapters), `make_mask(lm, cfg, progress)` gives the trained
coordinates (None = the mask of `mask.*`), `export_model(model)` the model `meerkat-ray export` saves.
What the server plans and logs for it (defaults: a seeded ZO algorithm): `plan_seeds(cfg, round_,
client, steps)` the seeds a plan carries, `lr(cfg)` the plans' learning rate, `path(plan, result)`
the (seeds, scalars) a path.parquet row holds per step. Class attributes say what the run folder
can promise, `replayable` (path.parquet and sparse_init.safetensors rebuild sparse_final), and
what the client needs, `needs_g_pre` (the pre-training gradient, to compute GradIP itself).

This module stays light (the registry and the server import it): torch-level code is imported where used.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ..choices import ALGORITHMS as NAMES
from ..registry import registrar
from ..schedule import round_steps
from ..seeds import step_seeds

ALGORITHMS: dict[str, type[Algorithm]] = {}


register = registrar(ALGORITHMS, NAMES)


def make_algorithm(name: str, perturbations: int = 1, estimator: str = "central", private: bool = False) -> Algorithm:
    """The algorithm `name`; a ZO one takes `perturbations` (zo.num_perturbations) directions per
    step with the `estimator` (zo.estimator) of each direction's scalar; `private`
    (privacy.enabled): DP-ZO steps, whose uploads carry no losses."""
    return ALGORITHMS[name](perturbations, estimator, private)


@dataclass
class LocalOutcome:
    scalars: list[float]                  # one per step (ZO: the projected gradients); empty otherwise
    losses: list[float]                   # one per step


class Algorithm:
    name = ""
    replayable = True
    needs_g_pre = False

    def __init__(self, perturbations: int = 1, estimator: str = "central", private: bool = False):
        self.perturbations, self.estimator, self.private = int(perturbations), estimator, private

    def plan_seeds(self, cfg, round_: int, client: int, steps: int) -> list[int]:
        """The seed list of a plan: round sharing, the round's list (every client the same, as long as
        the longest plan of the round); client sharing, the client's own `steps` seeds; P seeds per
        step (`seeds.step_seeds`)."""
        sharing = cfg.fed.seed_sharing
        return step_seeds(cfg.seed, round_, client, round_steps(cfg, round_) if sharing == "round" else steps,
                          sharing, self.perturbations, cfg.fed.seed_pool)

    def lr(self, cfg) -> float:
        return cfg.zo.lr

    def make_result(self, plan, outcome: LocalOutcome, worker: str, compute_s: float):
        """The upload of a client's local steps (a ClientResult; an algorithm that sends more
        defines its own subclass, with its byte accounting)."""
        from ..messages import ClientResult

        return ClientResult(round=plan.round, client=plan.client, scalars=outcome.scalars, losses=outcome.losses,
                            worker=worker, compute_s=compute_s)

    def path(self, plan, result) -> tuple[list[int], list[float]]:
        """A checked result's steps as path.parquet logs them: their seeds and the coefficient of each
        seed's z in the client's update, scalar / P (P = 1: the scalar itself), P per step."""
        count = plan.steps * self.perturbations
        if self.perturbations == 1:
            return plan.seeds[:count], [float(s) for s in result.scalars]
        return plan.seeds[:count], [float(s) / self.perturbations for s in result.scalars]

    def local_steps(self, worker, plan, theta) -> LocalOutcome:
        raise NotImplementedError

    def check_upload(self, plan, result, n: int, clip: float, vp: bool = False) -> str:
        raise NotImplementedError

    def aggregate(self, theta, round_: int, paths, results: dict, strategy, g_pre, probe: bool):
        """The round's new global values from `theta` (fp32; may be updated in place), the SyncMessage
        that brings every worker there, and {client: GradIP per path entry} (P per step: the server
        sums a step's): from the accepted `paths` and
        their `results`, the server's `strategy` (its aggregation rule), g_pre (float64, or None) and
        whether the round is a probe (nothing applied)."""
        raise NotImplementedError

    def adapt_model(self, lm, cfg):
        return lm

    def make_mask(self, lm, cfg, progress: bool):
        return None

    def export_model(self, model):
        return model


def numbers_problem(field: str, values, steps: int) -> str:
    """Why the uploaded `field` is not a list of `steps` finite real numbers ('' = it is). A tuple
    counts as a list; bools, strings, tensors and complex numbers are not numbers."""
    if not isinstance(values, (list, tuple)):
        return f"{field}: a {type(values).__name__}, not a list of {steps} numbers"
    if len(values) != steps:
        return f"sent {len(values)} {field} for {steps} steps"
    for t, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return f"non-numeric {field}[{t}]: {short(v)}"
        try:
            finite = math.isfinite(v)
        except (TypeError, ValueError, OverflowError):  # a Real that has no float value
            return f"non-numeric {field}[{t}]: {short(v)}"
        if not finite:
            return f"non-finite {field}[{t}]: {short(v)}"
    return ""


def short(value, limit: int = 40) -> str:
    """A bounded repr of something a client sent, for a one-line reason."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
