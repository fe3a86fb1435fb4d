"""`executor=local`: every virtual client runs on one worker in this process, one after another,
and the server is a plain local object. Nothing here imports Ray."""
from __future__ import annotations

import torch

from .client import ClientWorker, ForwardsToWorker
from .config import Config
from .executors import FAULT_COUNTERS
from .experiment import DataSetup, build_worker, prepare_model, test_batches
from .mask import Mask
from .runlog import theta_digest
from .server import Server


class LocalExecutor(ForwardsToWorker):
    """Runs every virtual client on one in-process worker, sequentially."""

    def __init__(self, worker: ClientWorker, eval_batches, mask: Mask, theta0: torch.Tensor):
        self.worker, self.eval_batches = worker, eval_batches
        self.mask, self.theta0 = mask, theta0

    def make_server(self, cfg: Config, theta: torch.Tensor, g_pre, client_sizes: list[int]) -> Server:
        return Server(cfg, theta, g_pre, client_sizes)

    def run_clients(self, plans, on_result=None):
        results = []
        for plan in plans:
            results.append(self.worker.run(plan))
            if on_result:
                on_result(results[-1])
        return results

    def sync(self, msg, theta: torch.Tensor | None = None) -> torch.Tensor:
        """The worker's global values are the driver's (one process): no second copy to update."""
        self.worker.sync(msg)
        return self.worker.theta_global

    def fault_counts(self) -> dict:
        return dict.fromkeys(FAULT_COUNTERS, 0)  # nothing here can die without the whole process

    def theta_digests(self) -> list[str]:
        return [theta_digest(self.worker.theta_global)]

    def close(self) -> None:
        pass


def build(cfg: Config, data: DataSetup, progress: bool) -> LocalExecutor:
    lm, mask, theta = prepare_model(cfg, progress=progress)
    worker = build_worker(cfg, data, lm, mask, theta)
    return LocalExecutor(worker, test_batches(lm.tokenizer, data.task, cfg), mask, theta)
