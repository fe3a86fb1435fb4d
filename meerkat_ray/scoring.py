"""The objective and the evaluation: verbalizer logits at the prompt's last token, their
cross-entropy (the loss every ZO and first-order step reads), and accuracy / test loss from
per-batch scores that combine exactly however a test set is sharded."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .batches import Batch


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


@torch.no_grad()
def example_losses(model, batch: Batch, label_ids: torch.Tensor) -> list[float]:
    """Each example's cross-entropy over the verbalizer logits (DP-ZO clips them one by one)."""
    logits = label_logits(model, batch, label_ids)
    return [float(v) for v in F.cross_entropy(logits, batch.labels, reduction="none")]


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
