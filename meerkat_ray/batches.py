"""A tokenized batch of prompts and labels, left-padded so that the last position of every row is
the prompt's last token (where the verbalizer logits are read)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
