"""`first_order`: backprop on the masked coordinates and FedAvg of the masked values - the
first-order upper bound the paper compares Meerkat against.

Client, per local step t: the same batch a ZO run would read (the client's persistent data stream),
one forward and one backward pass with only the parameters that hold masked coordinates requiring
gradients, g_t = the gradient of the same verbalizer cross-entropy at the masked coordinates (fp32,
mask order), plain SGD theta <- theta - lr g_t with lr = `fed.fo_lr` (0 = `zo.lr`; a first-order
step needs its own value: the ZO step's size grows with sqrt(n), SGD's does not). With Meerkat-vp
on, the client also reports GradIP_t = <g_pre, g_t> - the exact quantity the ZO GradIP
g_t <g_pre, z_t> estimates - so VPCS runs unchanged on the server (g_pre is public: it comes with
the mask). A step whose loss or gradient is not finite leaves theta as it was and shows in the upload
(the loss; under Meerkat-vp a NaN GradIP): the server refuses it, as it refuses a ZO client's
non-finite scalar. Server: w_{r+1} = sum_k p_k theta_k^{(T_k)} over the accepted clients (float64
sum, one fp32 rounding), sent whole to every worker.

Bytes per client per round: uplink 4 n (the client's final masked values, float32) + 8 (round) +
8 (client) + 4 T (losses) [+ 8 T GradIPs under Meerkat-vp]; downlink 4 n (the new global values)
+ 8 (the sync's round) + 40 (the plan: round, client, steps, lr, cursor - no seeds). Memory: the
model plus one backward pass (activations of a batch and a gradient buffer for every parameter
tensor that holds a masked coordinate - with the default mask nearly every block weight), the
fp32 master values and the masked gradient (n floats each); no optimizer state.

Not seed-replayable: sparse_final depends on the clients' data, not on seeds and scalars alone.
path.parquet keeps one row per (round, client, step) - the steps counted, lr, weight p_k and GradIP
(NaN without Meerkat-vp) - with seed = -1 and scalar = NaN (there are none); `replay.replay_path`
refuses such a path and summary.json says `"replayable": false`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..messages import WORD, ClientResult, SyncMessage, entries
from .base import Algorithm, LocalOutcome, numbers_problem, register, short

NO_SEED = -1  # path.parquet's seed for a step that has none
VALUE_BYTES = 4  # a masked value up or down, float32


@dataclass
class FirstOrderOutcome(LocalOutcome):
    values: Any = None                    # the client's final masked values
    grad_ips: list[float] | None = None   # per-step GradIP computed on the client (Meerkat-vp)


@dataclass
class ValuesResult(ClientResult):
    """A first-order upload: no scalars, the client's final masked values, and under Meerkat-vp the
    GradIP of each step (computed by the client)."""
    values: Any = None                    # float32 [n]
    grad_ips: list[float] | None = None

    def payload_bytes(self) -> int:
        return super().payload_bytes() + VALUE_BYTES * entries(self.values) + WORD * entries(self.grad_ips)


@dataclass
class ValuesSync(SyncMessage):
    """A first-order sync: the new global values themselves."""
    values: Any = None                    # float32 [n]

    def replacement(self) -> Any:
        return self.values

    def payload_bytes(self) -> int:
        return WORD + VALUE_BYTES * self.values.numel()


@register("first_order")
class FirstOrder(Algorithm):
    replayable = False
    needs_g_pre = True  # the client computes GradIP itself when Meerkat-vp runs

    def plan_seeds(self, cfg, round_: int, client: int, steps: int) -> list[int]:
        return []  # no directions: the plan carries no seeds

    def lr(self, cfg) -> float:
        return cfg.fed.fo_lr or cfg.zo.lr

    def path(self, plan, result) -> tuple[list[int], list[float]]:
        return [NO_SEED] * plan.steps, [math.nan] * plan.steps  # logged steps, with nothing to replay

    def local_steps(self, worker, plan, theta) -> LocalOutcome:
        losses, grad_ips = [], []
        g_pre = worker.g_pre.double() if worker.g_pre is not None else None
        for t in range(plan.steps):
            batch = worker.data.batch(plan.client, plan.cursor + t * worker.batch_size, worker.batch_size)
            loss, grad = masked_sgd_step_(worker.view, theta, batch.to(worker.device), worker.label_ids, plan.lr)
            losses.append(loss)
            grad_ips.append(float(g_pre.dot(grad.double())) if g_pre is not None and grad is not None else math.nan)
        return FirstOrderOutcome(scalars=[], losses=losses, values=theta,
                                 grad_ips=grad_ips if g_pre is not None else None)

    def make_result(self, plan, outcome: FirstOrderOutcome, worker: str, compute_s: float) -> ValuesResult:
        return ValuesResult(round=plan.round, client=plan.client, scalars=[], losses=outcome.losses, worker=worker,
                            compute_s=compute_s, values=outcome.values, grad_ips=outcome.grad_ips)

    def check_upload(self, plan, result, n: int, clip: float, vp: bool = False) -> str:
        """`plan.steps` finite losses, the n finite masked values (a float32 CPU vector), no scalars,
        and under Meerkat-vp (`vp`) `plan.steps` finite GradIPs, else none."""
        import torch

        if not isinstance(result, ValuesResult):
            return f"sent a {type(result).__name__}, but {self.name} uploads a ValuesResult (the masked values)"
        if not isinstance(result.scalars, (list, tuple)) or len(result.scalars):
            return f"scalars: {short(result.scalars)}, but {self.name} uploads an empty list"
        reason = numbers_problem("losses", result.losses, plan.steps)
        if reason:
            return reason
        values = result.values
        if not (isinstance(values, torch.Tensor) and values.dtype == torch.float32 and values.shape == (n,)
                and values.layout == torch.strided and values.device.type == "cpu"):
            got = (f"{values.dtype} {tuple(values.shape)} on {values.device}" if isinstance(values, torch.Tensor)
                   else f"a {type(values).__name__}")
            return f"values: {got}, not the float32 CPU vector of the {n} masked values"
        bad = torch.nonzero(~torch.isfinite(values))
        if len(bad):
            return f"non-finite values[{int(bad[0])}]"
        if vp:
            return numbers_problem("grad_ips", result.grad_ips, plan.steps)
        if result.grad_ips is not None:
            return "grad_ips: sent, but Meerkat-vp is off (vp.enabled=false)"
        return ""

    def aggregate(self, theta, round_: int, paths, results: dict, strategy, g_pre, probe: bool):
        import torch

        grad_ips = {p.client: list(results[p.client].grad_ips) if results[p.client].grad_ips is not None
                    else [math.nan] * len(p.seeds) for p in paths}
        if probe or not paths:  # nothing to apply: every worker keeps its values
            return theta, SyncMessage(round=round_, terms=[], sharing=strategy.cfg.fed.seed_sharing), grad_ips
        total = torch.zeros(theta.numel(), dtype=torch.float64)
        for p in sorted(paths, key=lambda p: p.client):
            total.add_(results[p.client].values.double(), alpha=p.weight)
        theta = total.float()
        return theta, ValuesSync(round=round_, values=theta.clone()), grad_ips


def masked_sgd_step_(view, theta, batch, label_ids, lr: float):
    """One SGD step on the masked coordinates; updates theta in place and leaves the model holding it.

    Returns (loss, masked gradient g: fp32, mask order). A non-finite loss or gradient leaves theta
    as it was and returns (loss, None) for the caller to report."""
    import torch
    import torch.nn.functional as F

    from ..scoring import verbalizer_logits

    view.write_(theta)
    params = dict(view.model.named_parameters())
    touched = [params[name] for name in view.names]
    flags = [(p, p.requires_grad) for p in view.model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in touched:
            p.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(verbalizer_logits(view.model, batch, label_ids), batch.labels)
            grads = torch.autograd.grad(loss, touched)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    g = torch.cat([(grad.reshape(-1) if idx is None else grad.reshape(-1)[idx]).float().cpu()
                   for grad, (_, idx, _, _) in zip(grads, view.slots)])
    value = float(loss.detach())
    if not (math.isfinite(value) and bool(torch.isfinite(g).all())):
        return value, None
    theta.add_(g, alpha=-lr)
    view.write_(theta)
    return value, g
