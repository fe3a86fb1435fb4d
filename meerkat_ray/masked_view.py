"""The masked coordinates of a model's parameters as one fp32 vector in mask order: read
(`gather`) and written (`write_`, cast to each parameter's dtype and device)."""
from __future__ import annotations

import torch

from .mask import Mask


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
