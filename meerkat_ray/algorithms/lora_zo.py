"""`lora_zo` (LoRA-FedZO, the paper's baseline): Meerkat's SPSA step, seeds as data, on the weights
of LoRA adapters instead of a sparse mask of the pre-trained weights.

Every process that builds the model attaches the same adapters with `peft` (`lora.rank`,
`lora.alpha`, `lora.targets`; A drawn from a generator of the run seed, B = 0, so the adapted model
starts exactly as the pre-trained one). The "mask" is then every coordinate of every adapter
weight (mask.safetensors names them; `mask.kind` / `mask.density` are not used), so the seed/scalar
contract holds unchanged over the flattened adapter vector: z = randn(n) from the step's seed,
theta <- theta - lr g z, and path.parquet replays sparse_final bit for bit. With Meerkat-vp, g_pre
is the mean calibration gradient on the adapter weights (zero on A while B = 0). Export merges
the adapters into the base weights (`merge_and_unload`): a plain model folder.

Bytes per client per round: as sparse_zo - uplink 16 + 12 T, downlink the plan 8 (5 + T) plus the
sync 8 + 8 T (round sharing); nothing of size n. Memory: the model for inference plus the adapters,
n = sum over targeted matrices of r (d_in + d_out) values, the fp32 master copy and two z's of n.
"""
from __future__ import annotations

from ..config import target_names
from .base import register
from .sparse_zo import SparseZO

ADAPTER_WEIGHTS = r"\.lora_[AB]\."  # parameter names of the adapter weights (peft's naming)


@register("lora_zo")
class LoRAZO(SparseZO):
    replayable = True

    def adapt_model(self, lm, cfg):
        return attach_adapters(lm, cfg)

    def make_mask(self, lm, cfg, progress: bool):
        import dataclasses

        from ..mask import compute_mask

        mask_cfg = dataclasses.replace(cfg.mask, kind="full", eligible=ADAPTER_WEIGHTS, cache=False)
        mask = compute_mask(lm, mask_cfg, cfg.seed, need_g_pre=cfg.vp.enabled, progress=progress)
        mask.meta.update(kind="lora", rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=cfg.lora.targets)
        return mask

    def export_model(self, model):
        return model.merge_and_unload()


def attach_adapters(lm, cfg):
    """`lm` with its model wrapped by peft (same adapters in every process: A from the run seed)."""
    import dataclasses
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    from ..errors import MeerkatError
    from ..seeds import derive_seed

    spec = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=target_names(cfg.lora),
                      lora_dropout=0.0, bias="none", init_lora_weights=True)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        torch.manual_seed(derive_seed(cfg.seed, "lora"))
        try:
            model = get_peft_model(lm.model, spec)
        except ValueError as exc:
            raise MeerkatError(f"lora.targets: {exc}".splitlines()[0]) from None
    model.eval()
    return dataclasses.replace(lm, model=model)
