"""Ray actors: thin wrappers that unpack a message and call the pure core.

- `ClientActor`: one model copy serving any number of virtual clients (a `ClientWorker`), pinned
  to `ray.cpus_per_client` CPUs and `ray.gpus_per_client` of a GPU. Client actor 0 also runs the
  one-time mask pass (pre-trained model, public calibration corpus, no client data) where the
  model and a GPU already are; the mask and theta_0 then belong to the server.
- `ServerActor`: the `Server` (global masked values, mask's g_pre, virtual-path logs, GradIP
  trajectories, Meerkat-vp state, byte accounting).
Only plans, results and sync messages (seeds and scalars) cross them once they are set up; the
driver keeps its own copy of the global values (it applies every sync itself).
"""
from __future__ import annotations

import os

import ray
import torch

from ..client import ForwardsToWorker
from ..config import Config
from ..experiment import DataSetup, build_worker, load_run_model, prepare_mask, test_batches
from ..mask import Mask
from ..messages import ClientPlan, ClientResult
from ..server import RoundOutcome, Server


@ray.remote
class ClientActor(ForwardsToWorker):
    def __init__(self, cfg: Config, data: DataSetup, name: str):
        torch.set_num_threads(cfg.model.num_threads or max(1, int(cfg.ray.cpus_per_client)))
        self.cfg, self.data, self.name = cfg, data, name
        self.lm = load_run_model(cfg)
        self.worker = None

    def compute_mask(self) -> tuple[Mask, torch.Tensor]:
        return prepare_mask(self.cfg, self.lm, progress=False)

    def start(self, mask: Mask, theta: torch.Tensor) -> str:
        """Build the worker; mask and theta_0 come through the object store once, at set-up.
        Returns the node this actor runs on (named in warnings when it is lost)."""
        self.worker = build_worker(self.cfg, self.data, self.lm, mask, theta, name=self.name)
        self.eval_batches = test_batches(self.lm.tokenizer, self.data.task, self.cfg)  # any actor can evaluate
        self.data = None  # the worker keeps the tokenised training data, not the texts
        return ray.get_runtime_context().get_node_id()

    def run(self, plan: ClientPlan) -> ClientResult:
        return self.worker.run(plan)

    def info(self) -> dict:
        """Where this actor lives and what it holds (placement and memory checks)."""
        import psutil

        return {"name": self.name, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "rss_bytes": psutil.Process().memory_info().rss,
                "device": str(self.lm.device)}


@ray.remote
class ServerActor:
    def __init__(self):
        torch.set_num_threads(1)  # started with the client actors, set up once the mask is known
        self.server = None

    def setup(self, cfg: Config, theta: torch.Tensor, g_pre: torch.Tensor | None, client_sizes: list[int]) -> str:
        """Returns the node this actor runs on (named in the error when it is lost)."""
        self.server = Server(cfg, theta, g_pre, client_sizes)
        return ray.get_runtime_context().get_node_id()

    def plan_round(self, round_: int) -> list[ClientPlan]:
        return self.server.plan_round(round_)

    def finish_planned(self, round_: int, results: list[ClientResult | None]) -> RoundOutcome:
        return self.server.finish_planned(round_, results)

    def state_dict(self) -> dict:
        return self.server.state_dict()

    def theta_digest(self) -> str:
        """The digest of the global values after the last finished round (the driver checks its own copy)."""
        return self.server.theta_digest()

    def load_state(self, state: dict, theta: torch.Tensor) -> None:
        self.server.load_state(state, theta)
