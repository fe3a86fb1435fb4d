"""The client side: a worker that holds one model and serves any number of virtual clients.

A worker keeps the global masked values in sync by applying each round's aggregation terms (the
dimension-free downlink), and runs a client's plan from there: theta_k = theta_global, then T_k
local steps of the run's algorithm (`fed.algorithm`, `algorithms/`; sparse SPSA by default) on
that client's persistent data stream. Under the ZO algorithms nothing of size n leaves the worker.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .algorithms import make_algorithm
from .messages import ClientPlan, ClientResult, SyncMessage
from .seeds import derive_seed
from .terms import apply_sync_
from .runlog import theta_digest
from .batches import Batch, collate
from .masked_view import MaskedView
from .scoring import accuracy_and_loss, batch_scores


class PrivateNoise:
    """DP-ZO's clip and noise multiplier, and the worker's own generator for the Poisson samples and
    the noise, seeded from the operating system: nothing of it derives from the run seed, so no
    replay and no server can know it (the scalars it makes are what the replay uses)."""

    def __init__(self, clip: float, noise_multiplier: float):
        import secrets

        self.clip, self.noise_multiplier = clip, noise_multiplier
        self.generator = torch.Generator("cpu").manual_seed(secrets.randbits(63))


class ClientData:
    """Tokenised training examples and which belong to which client.

    Client k's stream is an endless sequence of epochs over its examples, each epoch a permutation
    drawn from (run seed, k, epoch); `cursor` counts examples consumed so far, so a client that
    runs fewer steps in a round (early stopping) simply continues where it stopped.
    """

    def __init__(self, tokens: list[list[int]], labels: list[int], client_indices: list[np.ndarray],
                 seed: int, pad_id: int):
        self.tokens, self.labels = tokens, labels
        self.client_indices = [np.asarray(ix, dtype=np.int64) for ix in client_indices]
        self.seed, self.pad_id = seed, pad_id

    def _epoch_order(self, client: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(derive_seed(self.seed, "data", client, epoch))
        return self.client_indices[client][rng.permutation(len(self.client_indices[client]))]

    def batch(self, client: int, cursor: int, size: int) -> Batch:
        count = len(self.client_indices[client])
        picked, orders = [], {}
        for pos in range(cursor, cursor + size):
            epoch, i = divmod(pos, count)
            if epoch not in orders:
                orders[epoch] = self._epoch_order(client, epoch)
            picked.append(int(orders[epoch][i]))
        return collate([self.tokens[i] for i in picked], [self.labels[i] for i in picked], self.pad_id)


    def poisson_batch(self, client: int, batch_size: int, generator: torch.Generator) -> Batch | None:
        """Each of the client's n examples with probability batch_size / n, from `generator` (DP-ZO's
        sampling, `data.sampler=poisson`); None when none was drawn."""
        own = self.client_indices[client]
        picked = own[(torch.rand(len(own), generator=generator, dtype=torch.float64) < batch_size / len(own)).numpy()]
        if not len(picked):
            return None
        return collate([self.tokens[int(i)] for i in picked], [self.labels[int(i)] for i in picked], self.pad_id)


class ForwardsToWorker:
    """What hosts a ClientWorker (the in-process executor, a client actor) pass straight through.

    Subclasses set `self.worker` (a ClientWorker) and `self.eval_batches` (the test set)."""

    def sync(self, msg: SyncMessage) -> None:
        self.worker.sync(msg)

    def restore(self, theta: torch.Tensor, round_: int) -> None:
        self.worker.restore(theta, round_)

    def evaluate(self) -> tuple[float, float]:
        return self.worker.evaluate(self.eval_batches)

    def evaluate_shard(self, shard: int, num_shards: int) -> list[tuple[int, float, int]]:
        """Per-batch scores of every num_shards-th test batch, from batch `shard` on."""
        return self.worker.batch_scores(self.eval_batches[shard::num_shards])

    def theta_digest(self) -> str:
        return theta_digest(self.worker.theta_global)


class ClientWorker:
    def __init__(self, model: torch.nn.Module, mask, theta: torch.Tensor, data: ClientData,
                 label_ids: torch.Tensor, eps: float, batch_size: int, device, name: str = "local",
                 clip: float = 0.0, algorithm: str = "sparse_zo", grad_ip: bool = False, perturbations: int = 1,
                 estimator: str = "central", weight_decay: float = 0.0, privacy=None):
        self.view = MaskedView(model, mask)
        self.algorithm = make_algorithm(algorithm, perturbations, estimator, privacy is not None)
        self.privacy = privacy  # PrivateNoise (privacy.enabled) or None
        # g_pre on a worker only where its algorithm computes GradIP itself (first-order under Meerkat-vp)
        self.g_pre = mask.pretrain_grad if grad_ip and self.algorithm.needs_g_pre else None
        self.theta_global = theta.clone()
        self.data, self.eps, self.batch_size, self.clip = data, eps, batch_size, clip
        self.weight_decay = weight_decay
        self.device = device
        self.label_ids = label_ids.to(device)
        self.name = name
        self.synced_round = 0  # round 0 = the initial values every worker starts from
        self.last_theta = self.theta_global
        self.view.write_(self.theta_global)

    def sync(self, msg: SyncMessage) -> None:
        """Apply one round's aggregation terms to the global values (each round exactly once)."""
        if msg.round != self.synced_round + 1:
            raise RuntimeError(f"worker {self.name}: sync for round {msg.round} after round {self.synced_round}")
        self.theta_global = apply_sync_(self.theta_global, msg)
        self.synced_round = msg.round
        self.view.write_(self.theta_global)

    def restore(self, theta: torch.Tensor, round_: int) -> None:
        """Continue from a checkpoint: `theta` are the global values after round `round_`."""
        self.theta_global = theta.clone()
        self.synced_round = round_
        self.view.write_(self.theta_global)

    def run(self, plan: ClientPlan) -> ClientResult:
        """Run one virtual client's local steps from the current global values."""
        start = time.perf_counter()
        theta = self.theta_global.clone()
        try:
            out = self.algorithm.local_steps(self, plan, theta)
        finally:  # the model must never be left holding a perturbed or local point
            self.view.write_(self.theta_global)
        self.last_theta = theta  # the client's final local values (tests compare them with the server's replay)
        return self.algorithm.make_result(plan, out, self.name, time.perf_counter() - start)

    def evaluate(self, batches: list[Batch]) -> tuple[float, float]:
        return accuracy_and_loss(self.batch_scores(batches))

    def batch_scores(self, batches: list[Batch]) -> list[tuple[int, float, int]]:
        self.view.write_(self.theta_global)
        return batch_scores(self.view.model, batches, self.label_ids, self.device)
