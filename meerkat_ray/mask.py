"""The sparse mask m and the pre-training gradient g_pre on it.

Mask order (the contract every other piece relies on): parameters in `model.named_parameters()`
order, each contributing its sorted flat indices; n = sum of their counts.

Kinds (registry `MASK_SCORES`, in `mask_kinds.py`): a score per eligible coordinate, then one *global* top-k with
k = round(u * eligible):
- pretrain_grad: E_b[(d loss_b / d w)^2] of the causal-LM loss on a calibration corpus (Meerkat);
- weight_magnitude: |w|;
- random: i.i.d. uniform scores from the run seed;
- full: every eligible coordinate (Full-FedZO).
g_pre = E_b[d loss_b / d w] restricted to the mask (float32, mask order) comes from the same pass.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import MaskConfig
from .errors import MeerkatError
from .mask_kinds import MASK_SCORES
from .models import LoadedModel
from .runlog import atomic_path

PRETRAIN_GRAD_KEY = "pretrain_grad"


@dataclass
class Mask:
    indices: dict[str, torch.Tensor]           # parameter name -> sorted int64 flat indices (mask order)
    pretrain_grad: torch.Tensor | None = None  # g_pre, float32 [n], mask order
    meta: dict = field(default_factory=dict)   # kind, density, eligible count, fingerprint

    @property
    def n(self) -> int:
        return int(sum(idx.numel() for idx in self.indices.values()))


def eligible_parameters(model: torch.nn.Module, pattern: str = "") -> list[tuple[str, torch.nn.Parameter]]:
    """Default: 2-D weights of the transformer blocks (no embeddings, LM head, norms or biases)."""
    if pattern:
        regex = re.compile(pattern)
        return [(n, p) for n, p in model.named_parameters() if regex.search(n)]
    skip = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            skip.update(id(p) for p in module.parameters())
    return [(n, p) for n, p in model.named_parameters() if p.ndim == 2 and id(p) not in skip]


# ----------------------------------------------------------------------------- calibration

def calibration_texts(cfg: MaskConfig) -> list[str]:
    if cfg.calib_corpus == "pydoc":
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    try:
        from datasets import load_dataset

        stream = load_dataset("allenai/c4", "en", split="validation", streaming=True)
        return [row["text"] for _, row in zip(range(cfg.calib_num_seqs * 4), stream)]
    except Exception as exc:  # offline, or the hub refused
        raise MeerkatError(f"mask.calib_corpus: c4 is not available ({type(exc).__name__}); use pydoc offline") from None


def calibration_batches(lm: LoadedModel, cfg: MaskConfig) -> list[torch.Tensor]:
    """`calib_num_seqs` windows of `calib_seq_len` tokens, evenly spaced over the corpus."""
    eos = lm.tokenizer.eos_token_id
    ids: list[int] = []
    for text in calibration_texts(cfg):
        ids.extend(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    tokens = torch.tensor(ids, dtype=torch.long)
    length = cfg.calib_seq_len
    count = min(cfg.calib_num_seqs, max(1, len(tokens) // length))
    stride = max(length, (len(tokens) - length) // max(1, count))
    windows = torch.stack([tokens[i * stride: i * stride + length] for i in range(count)])
    return list(windows.split(cfg.calib_batch_size))


def calibration_gradients(lm: LoadedModel, params, cfg: MaskConfig, progress: bool = True):
    """Per eligible parameter: mean squared and mean gradient of the causal-LM loss (float32, flat)."""
    batches = calibration_batches(lm, cfg)
    sq = {name: torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for name, p in params}
    mean = {name: torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for name, p in params}
    for _, p in params:
        p.requires_grad_(True)
    try:
        from tqdm.auto import tqdm

        for batch in tqdm(batches, desc="mask calibration", disable=not progress, leave=False):
            batch = batch.to(lm.device)
            lm.model.zero_grad(set_to_none=True)
            loss = lm.model(input_ids=batch, labels=batch).loss
            loss.backward()
            for name, p in params:
                g = p.grad.detach().reshape(-1).float()
                sq[name].add_(g * g)
                mean[name].add_(g)
    finally:
        for _, p in params:
            p.requires_grad_(False)
            p.grad = None
    for name in sq:
        sq[name].div_(len(batches))
        mean[name].div_(len(batches))
    return sq, mean


def mask_size(density: float, eligible: int) -> int:
    return max(1, min(eligible, round(density * eligible)))


def top_k_mask(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Global top-k over all eligible coordinates, returned per parameter as sorted flat indices."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().float().cpu() for n in names])
    top = torch.topk(flat, k, sorted=False).indices
    top, _ = torch.sort(top)
    out, start = {}, 0
    for name in names:
        size = scores[name].numel()
        lo, hi = torch.searchsorted(top, torch.tensor([start, start + size]))
        if hi > lo:
            out[name] = top[lo:hi] - start
        start += size
    return out


# Version of the mask algorithm (scores, top-k, calibration batches, g_pre): part of the cache
# fingerprint, so a mask cached by older code is never reused. Bump it when the algorithm changes;
# the digest of the algorithm's source below also changes with any edit of those functions.
MASK_VERSION = 2


def algorithm_digest() -> str:
    """sha256 of the source of every function a mask's values depend on ('' where the source is
    not shipped): an edit of any of them is a new cache entry even if MASK_VERSION was not bumped.
    Taken once, at import (`ALGORITHM_DIGEST`)."""
    functions = [eligible_parameters, calibration_texts, calibration_batches, calibration_gradients, mask_size,
                 top_k_mask, compute_mask, *(f for f in MASK_SCORES.values() if f is not None)]
    try:
        source = "".join(inspect.getsource(f) for f in functions)
    except (OSError, TypeError):
        return ""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def fingerprint(lm: LoadedModel, params, cfg: MaskConfig, seed: int, need_g_pre: bool) -> str:
    weights = hashlib.sha256()
    for _, p in params:  # every 257th weight of every eligible tensor: cheap, and any re-export changes it
        weights.update(p.detach().reshape(-1)[::257].float().cpu().numpy().tobytes())
    key = {
        "model": lm.fingerprint, "weights": weights.hexdigest()[:16],
        "shapes": [[n, list(p.shape)] for n, p in params], "kind": cfg.kind, "density": cfg.density,
        "eligible": cfg.eligible, "seed": seed if cfg.kind == "random" else None,
        "version": MASK_VERSION, "code": ALGORITHM_DIGEST,
    }
    if cfg.kind == "pretrain_grad" or need_g_pre:
        key.update(corpus=cfg.calib_corpus, seqs=cfg.calib_num_seqs, len=cfg.calib_seq_len,
                   batch=cfg.calib_batch_size, g_pre=True)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def compute_mask(lm: LoadedModel, cfg: MaskConfig, seed: int, need_g_pre: bool, progress: bool = True) -> Mask:
    params = eligible_parameters(lm.model, cfg.eligible)
    if not params:
        raise MeerkatError(f"mask.eligible: no parameter name matches {cfg.eligible!r}")
    eligible = sum(p.numel() for _, p in params)
    calib = calibration_gradients(lm, params, cfg, progress) if (cfg.kind == "pretrain_grad" or need_g_pre) else None
    score_fn = MASK_SCORES[cfg.kind]
    if score_fn is None:
        indices = {name: torch.arange(p.numel(), dtype=torch.long) for name, p in params}
    else:
        indices = top_k_mask(score_fn(lm, params, cfg, seed, calib), mask_size(cfg.density, eligible))
    g_pre = None
    if calib is not None:
        g_pre = torch.cat([calib[1][name].cpu()[idx] for name, idx in indices.items()]).contiguous()
    meta = {"kind": cfg.kind, "density": cfg.density, "eligible_count": eligible,
            "eligible_names": [n for n, _ in params], "calib_corpus": cfg.calib_corpus if calib else "",
            "fingerprint": fingerprint(lm, params, cfg, seed, need_g_pre), "version": MASK_VERSION}
    return Mask(indices=indices, pretrain_grad=g_pre, meta=meta)


# ----------------------------------------------------------------------------- files

def save_mask(mask: Mask, path: str | Path) -> None:
    tensors = {name: idx.contiguous() for name, idx in mask.indices.items()}
    if mask.pretrain_grad is not None:
        tensors[PRETRAIN_GRAD_KEY] = mask.pretrain_grad.contiguous()
    meta = {"meerkat_mask": json.dumps(mask.meta), "order": json.dumps(list(mask.indices))}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_mask(path: str | Path) -> Mask:
    """Read a mask file (safetensors only: nothing is unpickled)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            order = json.loads(meta["order"])
            indices = {name: f.get_tensor(name) for name in order}
            g_pre = f.get_tensor(PRETRAIN_GRAD_KEY) if PRETRAIN_GRAD_KEY in f.keys() else None
            info = json.loads(meta["meerkat_mask"])
    except Exception as exc:
        raise MeerkatError(f"{path}: not a readable mask file ({type(exc).__name__})") from None
    return Mask(indices=indices, pretrain_grad=g_pre, meta=info)


def check_mask(mask: Mask, model: torch.nn.Module, path: str | Path = "mask") -> None:
    """A mask must fit the model: known names, in-range sorted unique indices, g_pre of length n."""
    params = dict(model.named_parameters())
    for name, idx in mask.indices.items():
        if name not in params:
            raise MeerkatError(f"{path}: mask names parameter {name!r}, which the model does not have")
        if idx.dtype != torch.long or idx.ndim != 1 or idx.numel() == 0:
            raise MeerkatError(f"{path}: indices of {name!r} are not a 1-D int64 tensor")
        if int(idx[0]) < 0 or int(idx[-1]) >= params[name].numel() or not bool((idx[1:] > idx[:-1]).all()):
            raise MeerkatError(f"{path}: indices of {name!r} are not sorted, unique and in range")
    order = [n for n in params if n in mask.indices]
    if order != list(mask.indices):
        raise MeerkatError(f"{path}: mask order differs from the model's parameter order")
    if mask.pretrain_grad is not None and mask.pretrain_grad.numel() != mask.n:
        raise MeerkatError(f"{path}: pretrain_grad has {mask.pretrain_grad.numel()} values for {mask.n} masked weights")


def get_mask(lm: LoadedModel, cfg: MaskConfig, seed: int, need_g_pre: bool, progress: bool = True) -> Mask:
    """Computed once per fingerprint and cached on disk under <cache>/masks/."""
    params = eligible_parameters(lm.model, cfg.eligible)
    if not params:
        raise MeerkatError(f"mask.eligible: no parameter name matches {cfg.eligible!r}")
    key = fingerprint(lm, params, cfg, seed, need_g_pre)
    path = lm.cache / "masks" / f"{key}.safetensors"
    if cfg.cache and path.is_file():
        try:
            mask = load_mask(path)
            check_mask(mask, lm.model, path)
            if mask.meta.get("fingerprint") == key and mask.n == (sum(p.numel() for _, p in params) if cfg.kind == "full"
                          else mask_size(cfg.density, mask.meta["eligible_count"])):
                return mask
        except MeerkatError:
            pass  # a damaged cache entry is recomputed, never trusted
    mask = compute_mask(lm, cfg, seed, need_g_pre, progress)
    if cfg.cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_mask(mask, path)
    return mask


ALGORITHM_DIGEST = algorithm_digest()  # the code this process computes masks with
