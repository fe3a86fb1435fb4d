"""The rules a config tree must satisfy beyond its types: the allowed values of the choice keys
(the strategy, policy and algorithm registries among them), the numeric ranges, the keys naming
paths, the form of an MLflow tracking URI, and the checks between keys; `validate` applies them
all, and each registered variant's own `check`.

`meerkat_ray.config` builds the tree and calls `validate` on it (and re-exports these names).
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from .choices import ALGORITHMS
from .errors import ConfigError
from .executors import EXECUTORS
from .mask_kinds import MASK_SCORES
from .partition import PARTITIONS
from .strategies.aggregation import AGGREGATIONS
from .schedule import round_steps
from .strategies.policies import POLICIES
from .strategies.vp_rules import VP_RULES

if TYPE_CHECKING:
    from .config import Config

CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.partition": tuple(PARTITIONS),
    "mask.kind": tuple(MASK_SCORES),
    "mask.calib_corpus": ("pydoc", "c4"),
    "fed.seed_sharing": ("round", "client"),
    "zo.estimator": ("central", "forward"),
    "data.sampler": ("stream", "poisson"),
    "fed.aggregation": tuple(AGGREGATIONS),  # the registries: a new variant is one entry there
    "fed.algorithm": tuple(ALGORITHMS),
    "vp.policy": tuple(name for name, p in POLICIES.items() if p.choice_of == "vp.policy"),
    "vp.rule": tuple(VP_RULES),
    "vp.calibration": ("first_round", "probe", "rounds"),
    "vp.statistic": ("mean", "median"),
    "vp.reference": ("late", "early"),
    "executor": tuple(EXECUTORS),
}
# old key -> new key: configs written before a rename (a run folder's config.yaml, a sweep file)
# still load, their values read under the new key (`config.renamed`)
RENAMED_KEYS = {"ray.backend": "executor"}

# (key, predicate, what the value must be)
RANGES = [
    ("seed", lambda v: v >= 0, ">= 0"),
    ("model.num_threads", lambda v: v >= 0, ">= 0"),
    ("data.min_confidence", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    ("data.num_train", lambda v: v >= 0, ">= 0"),
    ("data.num_test", lambda v: v >= 1, ">= 1"),
    ("data.num_clients", lambda v: v >= 1, ">= 1"),
    ("data.alpha", lambda v: v > 0, "> 0"),
    ("data.extreme_fraction", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    ("data.batch_size", lambda v: v >= 1, ">= 1"),
    ("data.max_length", lambda v: v >= 2, ">= 2"),
    ("data.eval_batch_size", lambda v: v >= 1, ">= 1"),
    ("mask.density", lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    ("mask.calib_num_seqs", lambda v: v >= 1, ">= 1"),
    ("mask.calib_seq_len", lambda v: v >= 2, ">= 2"),
    ("mask.calib_batch_size", lambda v: v >= 1, ">= 1"),
    ("zo.eps", lambda v: v > 0, "> 0"),
    ("zo.lr", lambda v: v > 0, "> 0"),
    ("zo.clip", lambda v: v >= 0, ">= 0"),
    ("fed.rounds", lambda v: v >= 1, ">= 1"),
    ("fed.local_steps", lambda v: v >= 1, ">= 1"),
    ("fed.first_round_steps", lambda v: v >= 0, ">= 0"),
    ("fed.eval_every", lambda v: v >= 1, ">= 1"),
    ("fed.trim_fraction", lambda v: 0.0 <= v < 0.5, "in [0, 0.5)"),
    ("fed.clients_per_round", lambda v: v >= 0, ">= 0"),
    ("fed.fo_lr", lambda v: v >= 0, ">= 0"),
    ("lora.rank", lambda v: v >= 1, ">= 1"),
    ("lora.alpha", lambda v: v > 0, "> 0"),
    ("vp.sigma", lambda v: v > 0, "> 0"),
    ("vp.rho", lambda v: v > 0, "> 0"),
    ("vp.min_quiet_fraction", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    ("vp.calib_steps", lambda v: v >= 2, ">= 2"),
    ("vp.outlier_z", lambda v: v > 0, "> 0"),
    ("zo.num_perturbations", lambda v: v >= 1, ">= 1"),
    ("zo.weight_decay", lambda v: v >= 0, ">= 0"),
    ("fed.seed_pool", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("privacy.clip", lambda v: v > 0, "> 0"),
    ("privacy.noise_multiplier", lambda v: v >= 0, ">= 0"),
    ("privacy.delta", lambda v: 0.0 < v < 1.0, "in (0, 1)"),
    ("privacy.target_epsilon", lambda v: v >= 0, ">= 0 (0 = no budget)"),
    ("vp.trend_alpha", lambda v: 0.0 < v < 1.0, "in (0, 1)"),
    ("vp.min_window", lambda v: v >= 2, ">= 2"),
    ("vp.early_fraction", lambda v: 0.0 < v < 1.0, "in (0, 1)"),
    ("vp.late_fraction", lambda v: 0.0 < v < 1.0, "in (0, 1)"),
    ("ray.num_actors", lambda v: v >= 1, ">= 1"),
    ("ray.gpus_per_client", lambda v: 0.0 <= v <= 1.0 or (v > 1 and float(v).is_integer()),
     "in [0, 1] or a whole number"),
    ("ray.cpus_per_client", lambda v: v > 0, "> 0"),
    ("ray.num_gpus", lambda v: v >= 0, ">= 0"),
    ("ray.max_actor_restarts", lambda v: v >= 0, ">= 0"),
    ("ray.chaos_kill_prob", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("ray.actor_start_timeout_s", lambda v: v > 0, "> 0"),
    ("ray.actor_setup_timeout_s", lambda v: v > 0, "> 0"),
    ("ray.plan_timeout_s", lambda v: v >= 0, ">= 0 (0 = derived from measured step times)"),
    ("ray.plan_timeout_floor_s", lambda v: v > 0, "> 0"),
]
# Keys naming files, folders or models: a NUL byte would reach the OS as a traceback, not an error line.
PATH_KEYS = ("name", "output_dir", "model.name", "model.cache_dir", "data.source", "tracking.mlflow_uri",
             "tracking.mlflow_experiment", "tracking.wandb_project", "tracking.wandb_group")
# MLflow tracking URIs: a database, a server, a folder (file: or a plain path)
MLFLOW_URI = re.compile(r"(sqlite|postgresql|mysql|mssql)(\+\w+)?://.*|https?://[^/\s]+.*|file:.+|[^:]+")


def _short(value: Any, limit: int = 80) -> str:
    """repr for an error line: one line, bounded length."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def get_key(cfg: Config, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> Config:
    for key, choices in CHOICES.items():
        value = get_key(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
    for key, ok, what in RANGES:
        value = get_key(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}: must be {what}, got {value!r}")
    if not cfg.name or "/" in cfg.name or cfg.name in (".", "..") or len(cfg.name.encode(errors="replace")) > 255:
        raise ConfigError(f"name: must be a plain folder name, got {_short(cfg.name)}")
    if not cfg.model.name:
        raise ConfigError("model.name: must not be empty")
    if cfg.vp.early_fraction + cfg.vp.late_fraction > 1.0:
        raise ConfigError("vp.early_fraction: early_fraction + late_fraction must be <= 1")
    if cfg.ray.gpus_per_client > 1 and not float(cfg.ray.gpus_per_client).is_integer():
        raise ConfigError("ray.gpus_per_client: above 1 it must be a whole number of GPUs")
    for key in PATH_KEYS:
        if "\0" in get_key(cfg, key):
            raise ConfigError(f"{key}: contains a NUL character")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.model.device):
        raise ConfigError(f"model.device: must be auto, cpu, mps, cuda or cuda:N, got {_short(cfg.model.device)}")
    if not re.fullmatch(r"[\w.:\[\]-]+", cfg.ray.dashboard_host):
        raise ConfigError(f"ray.dashboard_host: not a host name or IP address: {_short(cfg.ray.dashboard_host)}")
    if cfg.mask.eligible:
        try:
            re.compile(cfg.mask.eligible)
        except re.error as exc:
            raise ConfigError(f"mask.eligible: not a regular expression ({exc})") from None
    for variant in [*AGGREGATIONS.values(), *POLICIES.values(), *VP_RULES.values()]:
        variant.check(cfg)
    check_algorithm(cfg)
    check_calibration(cfg)
    check_privacy(cfg)
    if cfg.ray.chaos_kill_prob > 0 and cfg.executor != "ray":
        raise ConfigError("ray.chaos_kill_prob: kills client actors, so it needs executor=ray")
    if cfg.tracking.mlflow_uri and not MLFLOW_URI.fullmatch(cfg.tracking.mlflow_uri):
        raise ConfigError(f"tracking.mlflow_uri: not an MLflow tracking URI (sqlite:///FILE, http://HOST:PORT, "
                          f"file:FOLDER or a folder), got {_short(cfg.tracking.mlflow_uri)}")
    return cfg


def check_algorithm(cfg: Config) -> None:
    """What a client algorithm (`fed.algorithm`, algorithms/) needs of the rest of the config."""
    fed = cfg.fed
    if fed.algorithm == "first_order":
        if fed.aggregation != "mean":
            raise ConfigError(f"fed.aggregation: {fed.aggregation} combines ZO scalars per seed; "
                              "fed.algorithm=first_order averages the masked values (use fed.aggregation=mean)")
        if cfg.zo.clip > 0:
            raise ConfigError("zo.clip: clips ZO scalars, and fed.algorithm=first_order sends none (set zo.clip=0)")
        if cfg.zo.num_perturbations != 1:
            raise ConfigError("zo.num_perturbations: ZO directions per step, and fed.algorithm=first_order "
                              "takes a gradient instead (set zo.num_perturbations=1)")
        if cfg.fed.seed_pool:
            raise ConfigError("fed.seed_pool: a pool of ZO step seeds, and fed.algorithm=first_order sends "
                              "values (set fed.seed_pool=0)")
        if cfg.zo.weight_decay > 0:
            raise ConfigError("zo.weight_decay: decays the ZO steps' values, and fed.algorithm=first_order takes "
                              "gradient steps (set zo.weight_decay=0)")
        if cfg.zo.estimator != "central":
            raise ConfigError("zo.estimator: a ZO estimator, and fed.algorithm=first_order takes a gradient "
                              "instead (set zo.estimator=central)")
    if cfg.zo.weight_decay * cfg.zo.lr >= 1:
        raise ConfigError(f"zo.weight_decay: zo.lr x weight_decay = {cfg.zo.lr * cfg.zo.weight_decay:g} must be below 1 "
                          "(each step multiplies the values by 1 - lr x weight_decay)")
    if fed.algorithm == "lora_zo" and not target_names(cfg.lora):
        raise ConfigError("lora.targets: names no module (comma-separated module names, e.g. q_proj,v_proj)")


def target_names(lora) -> list[str]:
    """lora.targets as a list of module names."""
    return [name.strip() for name in lora.targets.split(",") if name.strip()]


def check_privacy(cfg: Config) -> None:
    """DP-ZO (`privacy.*`): what the accountant's assumptions need of the rest of the config."""
    p = cfg.privacy
    if p.target_epsilon and not p.enabled:
        raise ConfigError("privacy.target_epsilon: a privacy budget, but privacy.enabled is false")
    if cfg.data.sampler == "poisson" and not p.enabled:
        raise ConfigError("data.sampler: poisson sampling is the accountant's, used under privacy.enabled only")
    if p.noise_from_target and not p.target_epsilon:
        raise ConfigError("privacy.noise_from_target: chooses sigma from privacy.target_epsilon, which is 0")
    if not p.enabled:
        return
    if cfg.data.sampler != "poisson":
        raise ConfigError(f"privacy.enabled: the accountant assumes Poisson sampling, so it needs data.sampler=poisson "
                          f"(got {cfg.data.sampler})")
    if cfg.fed.algorithm not in ("sparse_zo", "lora_zo"):
        raise ConfigError(f"privacy.enabled: privatises ZO scalars, and fed.algorithm={cfg.fed.algorithm} sends values")
    if cfg.zo.num_perturbations != 1:
        raise ConfigError("zo.num_perturbations: privacy.enabled accounts one noisy scalar per step (set it to 1)")
    if cfg.zo.clip > 0:
        raise ConfigError("zo.clip: privacy.clip clips each example's difference under privacy.enabled (set zo.clip=0)")


def check_calibration(cfg: Config) -> None:
    """Meerkat-vp must be able to decide, and early enough to matter (never a silent no-op)."""
    vp, fed = cfg.vp, cfg.fed
    if not vp.enabled:
        return
    if vp.calibration == "rounds":
        needed = math.ceil(max(0, vp.calib_steps - round_steps(cfg, 1)) / fed.local_steps) + 1
        if needed > fed.rounds:
            raise ConfigError(f"vp.calib_steps: {vp.calib_steps} calibration steps spread over rounds of "
                              f"{fed.local_steps} need {needed} rounds, the run has fed.rounds={fed.rounds}")
        return
    if fed.first_round_steps and fed.first_round_steps < vp.calib_steps:
        raise ConfigError(f"fed.first_round_steps: {fed.first_round_steps} is shorter than the {vp.calib_steps} "
                          f"calibration steps vp.calibration={vp.calibration} takes in round 1")
    if vp.calibration == "probe" and fed.rounds < 2:
        raise ConfigError("fed.rounds: vp.calibration=probe discards round 1, so the run needs at least 2 rounds")
