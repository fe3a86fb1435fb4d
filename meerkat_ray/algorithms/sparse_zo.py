"""`sparse_zo` (the default): Meerkat's sparse SPSA step on the masked coordinates.

Client, per step t with seed s_t: z = randn(n) from s_t, two forwards at theta +- eps z, one scalar
g_t, theta <- theta - lr g_t z (`zo.zo_step_`). With P = zo.num_perturbations directions z_{t,p}
(seeds `seeds.step_seeds`), P scalars g_{t,p} at the same theta and
theta <- theta - lr sum_p (g_{t,p} / P) z_{t,p} (added p by p); zo.estimator=forward gives
g = [f(theta + eps z) - f(theta)] / eps, f(theta) shared by the step's P directions. Server:
replays the virtual paths from (seeds, g / P), GradIP_t = sum_p (g_{t,p} / P) <g_pre, z_{t,p}>
(the inner product of g_pre with the step's update direction; P = 1: g_t <g_pre, z_t>),
aggregation terms of `fed.aggregation`; every worker applies the same terms, so the run replays
bit for bit from path.parquet.

Bytes per client per round: uplink 8 (round) + 8 (client) + 8 P T (scalars) + 4 T (losses);
downlink the plan, 8 (5 + P T) with the round's seed list, plus the sync message, 8 + 8 P T (round
sharing) or 8 + 16 K P T (client sharing). Nothing of size n or d. Memory: the model for inference
(no gradients, no optimizer state), the fp32 master values theta and P + 1 z's of n floats.
"""
from __future__ import annotations

from ..messages import ClientResult, SyncMessage
from .base import Algorithm, LocalOutcome, numbers_problem, register


@register("sparse_zo")
class SparseZO(Algorithm):
    replayable = True

    def local_steps(self, worker, plan, theta) -> LocalOutcome:
        from ..zo import multi_step_, perturbations

        if self.private:
            return self.private_steps(worker, plan, theta)
        scalars, losses = [], []
        P = self.perturbations
        seeds = plan.seeds[: plan.steps * P]
        draws = perturbations(seeds, theta.numel())  # the next z is drawn while this step's forwards run
        try:
            for t in range(plan.steps):
                batch = worker.data.batch(plan.client, plan.cursor + t * worker.batch_size, worker.batch_size)
                batch = batch.to(worker.device)
                zs = [next(draws) for _ in range(P)]
                step_scalars, loss = multi_step_(worker.view, theta, zs, batch, worker.label_ids, worker.eps,
                                                 plan.lr, worker.clip, self.estimator, plan.lr * worker.weight_decay)
                scalars += step_scalars
                losses.append(loss)
        finally:
            draws.close()
        return LocalOutcome(scalars=scalars, losses=losses)

    def private_steps(self, worker, plan, theta) -> LocalOutcome:
        """DP-ZO (privacy.enabled): each step on a Poisson sample of the client's data, one noisy
        scalar per step (`zo.dp_step_`); no loss is uploaded (it would be an unprotected release)."""
        from ..zo import dp_step_, perturbations

        dp = worker.privacy
        seeds = plan.seeds[: plan.steps]
        scalars = []
        draws = perturbations(seeds, theta.numel())
        try:
            for z in draws:
                batch = worker.data.poisson_batch(plan.client, worker.batch_size, dp.generator)
                scalars.append(dp_step_(worker.view, theta, z, batch.to(worker.device) if batch is not None else None,
                                        worker.label_ids, worker.eps, plan.lr, self.estimator, dp.clip,
                                        dp.noise_multiplier, worker.batch_size, dp.generator,
                                        plan.lr * worker.weight_decay))
        finally:
            draws.close()
        return LocalOutcome(scalars=scalars, losses=[])

    def check_upload(self, plan, result, n: int, clip: float, vp: bool = False) -> str:
        """`plan.steps` finite scalars and losses, nothing else (no values, no GradIPs: the server
        computes GradIP itself). With `clip` > 0 (zo.clip) honest clients never send |scalar| > clip,
        so a larger one is refused."""
        reason = numbers_problem("scalars", result.scalars, plan.steps * self.perturbations) or \
            numbers_problem("losses", result.losses, 0 if self.private else plan.steps)
        if reason:
            return reason
        if type(result) is not ClientResult:  # more than scalars and losses: an upload of another algorithm
            return f"sent a {type(result).__name__}, but {self.name} uploads a ClientResult (scalars and losses)"
        if clip > 0 and any(abs(v) > clip for v in result.scalars):
            return f"scalars: above zo.clip={clip:g}"
        return ""

    def aggregate(self, theta, round_: int, paths, results: dict, strategy, g_pre, probe: bool):
        import math

        import torch

        from ..terms import apply_terms_
        from ..zo import perturbations

        scale, terms = strategy.update(paths)
        dots: dict[int, float] = {}

        def on_z(seed: int, z: torch.Tensor) -> None:
            if g_pre is not None:
                dots[seed] = float(torch.dot(g_pre, z.double()))

        if probe:  # GradIP still needs every z; nothing is applied, nothing is sent to sync
            seeds = [t.seed for t in terms]
            for seed, z in zip(seeds, perturbations(seeds, theta.numel())):
                on_z(seed, z)
            scale, terms = 1.0, []
        else:
            if scale != 1.0:
                theta.mul_(scale)
            apply_terms_(theta, terms, on_z)
        grad_ips = {p.client: [g * dots.get(s, math.nan) for s, g in zip(p.seeds, p.scalars)] for p in paths}
        return theta, SyncMessage(round=round_, terms=terms, sharing=strategy.cfg.fed.seed_sharing,
                                  scale=scale), grad_ips
