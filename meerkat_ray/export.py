"""`meerkat-ray export`: a finished run folder as a plain Hugging Face model folder."""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import MeerkatError


def export_model(run_dir: str | Path, out_dir: str | Path) -> Path:
    """A Hugging Face model folder with sparse_final applied to the masked coordinates (lora_zo:
    to the adapters, then merged into the base weights)."""
    from .algorithms import make_algorithm
    from .config import from_dict
    from .experiment import load_run_model
    from .mask import check_mask, load_mask
    from .runlog import load_theta
    from .masked_view import MaskedView

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    for name in ("config.yaml", "mask.safetensors", "sparse_final.safetensors"):
        if not (run_dir / name).is_file():
            raise MeerkatError(f"{run_dir / name}: missing (is {run_dir} a finished run folder?)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise MeerkatError(f"{out_dir}: exists and is not empty")
    cfg = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    lm = load_run_model(cfg)
    mask = load_mask(run_dir / "mask.safetensors")
    check_mask(mask, lm.model, run_dir / "mask.safetensors")
    theta = load_theta(run_dir / "sparse_final.safetensors")
    if theta.numel() != mask.n:
        raise MeerkatError(f"{run_dir / 'sparse_final.safetensors'}: {theta.numel()} values for a mask of {mask.n}")
    MaskedView(lm.model, mask).write_(theta)
    model = make_algorithm(cfg.fed.algorithm).export_model(lm.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    lm.tokenizer.save_pretrained(out_dir)
    return out_dir
