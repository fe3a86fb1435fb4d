"""Mask kinds: the registry `MASK_SCORES` (kind -> score function; None = every eligible coordinate),
the `mask.kind` choices. `mask.compute_mask` takes a global top-k of the scores.

Light at import (config validation reads the kind names): torch is imported when a score is
first computed. A score function's source is part of the mask cache fingerprint (`mask.ALGORITHM_DIGEST`).
"""
from __future__ import annotations


class _Torch:
    """torch, imported on first use."""

    def __getattr__(self, name):
        import torch as module

        return getattr(module, name)


torch = _Torch()


def _scores_pretrain_grad(lm, params, cfg, seed, calib):
    return calib[0]


def _scores_weight_magnitude(lm, params, cfg, seed, calib):
    return {name: p.detach().reshape(-1).float().abs() for name, p in params}


def _scores_random(lm, params, cfg, seed, calib):
    gen = torch.Generator("cpu").manual_seed(seed)
    return {name: torch.rand(p.numel(), generator=gen) for name, p in params}


MASK_SCORES = {
    "pretrain_grad": _scores_pretrain_grad,
    "weight_magnitude": _scores_weight_magnitude,
    "random": _scores_random,
    "full": None,  # every eligible coordinate
}
