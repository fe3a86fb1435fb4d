"""Sparse SPSA on the masked coordinates: the client's whole computation.

For a step with seed s and fp32 master values theta (length n, mask order):
    z = randn(n) from torch.Generator("cpu").manual_seed(s)          (mask support only)
    g = [f(theta + eps z; B) - f(theta - eps z; B)] / (2 eps)         (the projected gradient: one scalar)
    theta <- theta - lr * g * z
The model's own tensors (any dtype, any device) only ever *receive* theta (or theta +- eps z) cast to
their dtype; the restore writes theta back from the master copy, never subtracts, so nothing drifts.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .mask import Mask


def perturbation(seed: int, n: int) -> torch.Tensor:
    """z ~ N(0, I_n), float32 on the CPU, a pure function of the seed (the contract's stream)."""
    return torch.randn(n, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)


DRAW_AHEAD_MIN_N = 1 << 16  # below this a draw (~0.4 ms at 2^16) costs less than handing it to a thread


def perturbations(seeds, n: int):
    """z for each seed in turn, exactly `perturbation(seed, n)`; from n = DRAW_AHEAD_MIN_N on, the
    next z is drawn in a background thread while the caller works with the current one (torch
    releases the GIL while it draws), so the draw overlaps the forward passes. Two z's are alive
    at once."""
    seeds = [int(s) for s in seeds]
    if n < DRAW_AHEAD_MIN_N or len(seeds) < 2:
        for seed in seeds:
            yield perturbation(seed, n)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="z-draw") as pool:
        pending = pool.submit(perturbation, seeds[0], n)
        for i in range(len(seeds)):
            z = pending.result()
            if i + 1 < len(seeds):
                pending = pool.submit(perturbation, seeds[i + 1], n)
            yield z


class MaskedView:
    """Reads and writes the masked coordinates of a model's parameters, in mask order."""

    def __init__(self, model: torch.nn.Module, mask: Mask):
        self.model = model
        self.names = list(mask.indices)  # the masked parameters, in mask order (one slot each)
        params = dict(model.named_parameters())
        # (flat parameter view, indices on its device or None when the mask covers the whole
        # parameter, start, end) in mask order. Mask indices are sorted and unique, so covering
        # every element means arange: a plain copy then replaces the indexed one (dense masks).
        self.slots = []
        start = 0
        for name, idx in mask.indices.items():
            flat = params[name].data.view(-1)
            end = start + idx.numel()
            self.slots.append((flat, None if idx.numel() == flat.numel() else idx.to(flat.device), start, end))
            start = end
        self.n = start
        self.device = self.slots[0][0].device if self.slots else torch.device("cpu")

    def gather(self) -> torch.Tensor:
        """The model's current masked values as fp32 on the CPU (mask order)."""
        return torch.cat([(flat if idx is None else flat[idx]).float().cpu() for flat, idx, _, _ in self.slots])

    @torch.no_grad()
    def write_(self, theta: torch.Tensor, z: torch.Tensor | None = None, alpha: float = 0.0) -> None:
        """Set the masked coordinates to theta (fp32, length n), or to theta + alpha * z, cast to each
        parameter's dtype. A dense fp32 parameter on the CPU receives the sum straight from
        torch.add(out=...); everything else gets slices of one fp32 vector (sent to the device once)."""
        dense_sum = z is not None and self.device.type == "cpu"
        values = None
        for flat, idx, start, end in self.slots:
            if dense_sum and idx is None and flat.dtype == torch.float32:
                torch.add(theta[start:end], z[start:end], alpha=alpha, out=flat)
                continue
            if values is None:
                values = (theta if z is None else torch.add(theta, z, alpha=alpha)).to(self.device, non_blocking=True)
            _put_(flat, idx, values[start:end])


def _put_(flat: torch.Tensor, idx: torch.Tensor | None, values: torch.Tensor) -> None:
    """flat[idx] = values cast to flat's dtype (idx None: the whole tensor)."""
    if idx is None:
        flat.copy_(values)
    else:
        flat.index_copy_(0, idx, values.to(flat.dtype))


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, L] left-padded
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor          # [B] class ids

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(token_lists: list[list[int]], labels: list[int], pad_id: int) -> Batch:
    """Left-pad so that the last position of every row is the prompt's last token."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        att[row, width - len(tokens):] = 1
    return Batch(ids, att, torch.tensor(labels, dtype=torch.long))


def verbalizer_logits(model: torch.nn.Module, batch: Batch, label_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the verbalizer tokens at the last position: [B, C] float32 (differentiable)."""
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=position_ids, logits_to_keep=1, use_cache=False)
    return out.logits[:, -1, :].index_select(-1, label_ids).float()


@torch.no_grad()
def label_logits(model: torch.nn.Module, batch: Batch, label_ids: torch.Tensor) -> torch.Tensor:
    """`verbalizer_logits` without autograd (every ZO forward and every evaluation)."""
    return verbalizer_logits(model, batch, label_ids)


def classification_loss(model, batch: Batch, label_ids: torch.Tensor) -> float:
    """Cross-entropy over the verbalizer logits (mean over the batch)."""
    return float(F.cross_entropy(label_logits(model, batch, label_ids), batch.labels))


def zo_step_(view: MaskedView, theta: torch.Tensor, seed: int, batch: Batch, label_ids: torch.Tensor,
             eps: float, lr: float, clip: float = 0.0, z: torch.Tensor | None = None) -> tuple[float, float]:
    """One sparse SPSA step; updates theta in place and leaves the model holding it.

    Returns (scalar g, loss = mean of the two perturbed losses); with `clip` > 0, g is clipped to
    [-clip, clip] before the update (the clipped value is the one sent). A non-finite loss leaves
    theta and the model exactly as they were and returns the non-finite values for the caller to report.
    `z`, when given, must be `perturbation(seed, n)` (drawn ahead by `perturbations`).
    """
    z = perturbation(seed, theta.numel()) if z is None else z
    view.write_(theta, z, eps)
    loss_plus = classification_loss(view.model, batch, label_ids)
    view.write_(theta, z, -eps)
    loss_minus = classification_loss(view.model, batch, label_ids)
    scalar = (loss_plus - loss_minus) / (2.0 * eps)
    if clip > 0 and math.isfinite(scalar):
        scalar = max(-clip, min(clip, scalar))
    if math.isfinite(scalar):
        theta.add_(z, alpha=-(lr * scalar))
    view.write_(theta)
    return scalar, 0.5 * (loss_plus + loss_minus)


@torch.no_grad()
def batch_scores(model, batches: list[Batch], label_ids: torch.Tensor, device) -> list[tuple[int, float, int]]:
    """(correct, summed loss, examples) per batch, so shards of a test set combine exactly."""
    scores = []
    for batch in batches:
        batch = batch.to(device)
        logits = label_logits(model, batch, label_ids)
        scores.append((int((logits.argmax(-1) == batch.labels).sum()),
                       float(F.cross_entropy(logits, batch.labels, reduction="sum")), len(batch.labels)))
    return scores


def accuracy_and_loss(scores: list[tuple[int, float, int]]) -> tuple[float, float]:
    """(accuracy, mean loss) from per-batch scores in test-set order (the same sum, however sharded)."""
    correct, loss_sum, total = 0, 0.0, 0
    for c, loss, n in scores:
        correct, loss_sum, total = correct + c, loss_sum + loss, total + n
    return correct / max(1, total), loss_sum / max(1, total)
