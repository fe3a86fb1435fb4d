"""Method labels from a run's config, and the groups of runs that one line of a figure stands for.

The method is named the way the paper names it, from `mask.kind`, `vp.enabled` and `vp.policy`:
Meerkat (pretrain_grad mask), Meerkat-vp (+ VPCS early stopping), Full-FedZO (`full`), the
weight-magnitude and random masks, and "+ random stop" for `vp.policy=random`; another
`fed.algorithm` than sparse_zo names the method first (First-order FedAvg, LoRA-FedZO). When the runs of
a folder differ in other keys too (u, T, lr, ...), those keys are added to the label; runs that
differ only in `seed` share a label and are averaged (one line, a min-max band).
"""
from __future__ import annotations

from collections import defaultdict

from .runs import Run

MASK_METHODS = {
    "pretrain_grad": "Meerkat",
    "full": "Full-FedZO",
    "weight_magnitude": "Weight-magnitude mask",
    "random": "Random mask",
}
METHOD_KEYS = ("mask.kind", "vp.enabled", "vp.policy", "fed.algorithm")
ALGORITHM_METHODS = {"first_order": "First-order FedAvg", "lora_zo": "LoRA-FedZO"}
# Keys that never distinguish methods: where a run is stored, how it is executed, repeats.
IGNORED_KEYS = ("name", "output_dir", "seed", "model.cache_dir", "model.num_threads", "model.device",
                "mask.cache", "data.eval_batch_size")
IGNORED_PREFIXES = ("ray.",)
SHORT_NAMES = {
    "mask.density": "u", "fed.local_steps": "T", "fed.rounds": "R", "vp.sigma": "σ", "vp.rho": "ρ",
    "zo.lr": "lr", "zo.eps": "ε", "data.alpha": "α", "data.num_clients": "K",
}


def method_label(config: dict) -> str:
    """`Meerkat-vp`, `Meerkat`, `Full-FedZO`, `Random mask + random stop`, ..."""
    mask = (config.get("mask") or {}).get("kind", "pretrain_grad")
    vp = config.get("vp") or {}
    base = MASK_METHODS.get(mask, f"mask={mask}")
    algorithm = (config.get("fed") or {}).get("algorithm", "sparse_zo")
    if algorithm == "lora_zo":  # the adapters are the trained vector: no mask
        base = "LoRA-FedZO"
    elif algorithm != "sparse_zo":
        name = ALGORITHM_METHODS.get(algorithm, algorithm)
        base = name if mask == "pretrain_grad" else f"{name}, {base}"
    if not vp.get("enabled", False):
        return base
    if vp.get("policy", "gradip") == "random":
        return f"{base} + random stop"
    return "Meerkat-vp" if mask == "pretrain_grad" and algorithm == "sparse_zo" else f"{base} + VPCS"


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def inert(key: str, flat: dict) -> bool:
    """A key that has no effect on this run: the VPCS settings with `vp.enabled` false, the trim
    fraction without trimmed-mean aggregation, what another `fed.algorithm` reads (fo_lr, lora.*,
    the mask size under lora_zo, the ZO step's eps / lr under first_order with its own lr)."""
    if key.startswith("vp.") and not flat.get("vp.enabled", False):
        return True
    algorithm = flat.get("fed.algorithm", "sparse_zo")
    if key == "fed.fo_lr" and algorithm != "first_order" or key.startswith("lora.") and algorithm != "lora_zo":
        return True
    if algorithm == "lora_zo" and key in ("mask.density", "mask.eligible"):  # the adapters are trained instead
        return True
    if algorithm == "first_order" and (key == "zo.eps" or key == "zo.lr" and flat.get("fed.fo_lr", 0.0) > 0):
        return True
    return key == "fed.trim_fraction" and flat.get("fed.aggregation", "mean") != "trimmed_mean"


def varying_keys(runs: list[Run]) -> list[str]:
    """Dotted config keys whose value differs between the runs it has an effect on (in config
    order), except method keys, seeds and keys that only say where / how a run was executed."""
    flat = [flatten(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    out = []
    for key in keys:
        if key in METHOD_KEYS or key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
            continue
        values = {repr(f.get(key)) for f in flat if not inert(key, f)}
        if len(values) > 1:
            out.append(key)
    return out


def short_name(key: str, keys: list[str]) -> str:
    if key in SHORT_NAMES:
        return SHORT_NAMES[key]
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def format_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def run_label(run: Run, keys: list[str]) -> str:
    """The method, plus `k=v` for each key in `keys` (the keys that vary over the folder)."""
    parts = [f"{short_name(k, keys)}={format_value(run.get(k))}" for k in keys]
    return method_label(run.config) + (f" ({', '.join(parts)})" if parts else "")


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """label -> runs with that label (seeds of one setting), in the order of first appearance."""
    keys = varying_keys(runs)
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run_label(run, keys)].append(run)
    return dict(groups)
