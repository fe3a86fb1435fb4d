"""One config tree: defaults <- YAML file <- dotted `key=value` overrides, strictly validated.

Every key of an experiment lives here, with a trailing comment saying what it is for. The same
tree is used by the CLI, the Tune trainable and the tests; `to_dict` is what `config.yaml` in a
run folder holds, and `from_dict` reads it back. Here each value is checked against its declared
type; the allowed choices, ranges and checks between keys are `config_checks.validate`'s.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config_checks import CHOICES, MLFLOW_URI, PATH_KEYS, RANGES, RENAMED_KEYS, _short, get_key, target_names, validate
from .errors import ConfigError
from .schedule import round_steps
from .uris import is_uri, scratch_dir

__all__ = ["CHOICES", "MLFLOW_URI", "PATH_KEYS", "RANGES", "RENAMED_KEYS", "get_key", "round_steps", "target_names", "validate"]  # re-exported: their homes are config_checks and schedule


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"     # built-in name (smollm2-135m, tiny-llama, tiny-qwen2), hub id or local folder
    dtype: str = "float32"         # weights dtype on the device: float32 | bfloat16 | float16
    device: str = "auto"           # auto (cuda when present) | cpu | cuda | cuda:N
    cache_dir: str = ""            # converted models and masks; "" = $MEERKAT_RAY_CACHE or ~/.cache/meerkat-ray
    num_threads: int = 0           # torch CPU threads per process; 0 = leave torch's default


@dataclass
class DataConfig:
    task: str = "tweets2"          # tweets | tweets2 | sst2 | ag_news | yelp_polarity | boolq | rte | wsc | wic
    source: str = ""               # local folder of <split>.jsonl rows shaped like the hub's ("" = hub / embedded)
    min_confidence: float = 0.0    # tweets only: keep rows whose annotator confidence is at least this
    num_train: int = 0             # training examples shared out to clients (0 = all)
    num_test: int = 300            # held-out test examples (never seen by any client)
    num_clients: int = 6           # K
    partition: str = "mixed"       # iid | dirichlet | extreme | mixed
    alpha: float = 2.0             # Dirichlet concentration (smaller = more skewed)
    extreme_fraction: float = 0.34  # mixed: fraction of single-label clients (6 clients -> 2)
    batch_size: int = 8            # examples per forward pass (both forwards of a ZO step share it)
    sampler: str = "stream"        # stream: each client's epochs of shuffled examples, B per step | poisson: each example with rate B / n_k per step
    max_length: int = 48           # prompt tokens kept (left-truncated: the end of the prompt matters)
    eval_batch_size: int = 16      # examples per forward pass during evaluation (test set sorted by length: less padding)


@dataclass
class MaskConfig:
    kind: str = "pretrain_grad"    # pretrain_grad | weight_magnitude | random | full
    density: float = 1e-3          # u: fraction of eligible weights that are trained
    eligible: str = ""             # regex on parameter names; "" = 2-D weights of the blocks (no embeddings / head)
    calib_corpus: str = "pydoc"    # pydoc (embedded CPython docs) | c4 (hub, online only)
    calib_num_seqs: int = 16       # calibration sequences for pretrain_grad / g_pre
    calib_seq_len: int = 128       # tokens per calibration sequence
    calib_batch_size: int = 4      # sequences per backward pass during calibration
    cache: bool = True             # reuse a mask computed before for the same fingerprint


@dataclass
class ZOConfig:
    eps: float = 1e-3              # perturbation scale epsilon
    lr: float = 5e-4               # learning rate eta (sparse masks need far larger values than dense MeZO)
    clip: float = 0.0              # clip each step's |scalar| to this on the client (0 = off); the server rejects larger ones
    num_perturbations: int = 1     # P: seeded directions per step, one scalar each; the step moves by their mean
    estimator: str = "central"     # central: [f(w+eps z) - f(w-eps z)] / (2 eps) | forward: [f(w+eps z) - f(w)] / eps
    weight_decay: float = 0.0      # decoupled, on the masked values: each step theta <- (1 - lr wd) theta - lr g z


@dataclass
class FedConfig:
    rounds: int = 4                # R
    local_steps: int = 8           # T: local ZO steps per client per round
    first_round_steps: int = 0     # local steps of round 1; 0 = T (at least vp.calib_steps when Meerkat-vp calibrates in round 1)
    seed_sharing: str = "round"    # round: one seed list per round for all clients | client: seeds per client
    eval_every: int = 2            # evaluate the global model every E rounds (and always after the last); training is the same whatever E
    aggregation: str = "mean"      # mean (FedAvg) | median | trimmed_mean: per shared seed, over the clients' scalars
    trim_fraction: float = 0.1     # trimmed_mean: fraction of the lowest and of the highest scalars dropped per seed
    clients_per_round: int = 0     # clients sampled uniformly per round (seeded by run seed and round); 0 = all
    seed_pool: int = 0             # K > 0: every step direction is one of K fixed per-run seeds (FedKSeed); 0 = fresh seeds
    algorithm: str = "sparse_zo"   # sparse_zo (Meerkat) | first_order (backprop + FedAvg of the masked values) | lora_zo (LoRA-FedZO)
    fo_lr: float = 0.0             # first_order: SGD learning rate on the masked values; 0 = zo.lr


@dataclass
class VPConfig:
    enabled: bool = True           # Meerkat-vp: flag extreme non-IID clients from GradIP and early-stop them
    policy: str = "gradip"         # gradip (VPCS) | random (stop as many clients, chosen at random)
    rule: str = "paper"            # VPCS decision rule: paper (sigma, rho, quiet fraction) | stepwise | trend (strategies/vp_rules.py)
    sigma: float = 0.55            # a step is quiet when |GradIP| < sigma * population reference
    rho: float = 1.0               # flag when |GradIP| early / late (vp.statistic) exceeds rho ...
    min_quiet_fraction: float = 0.5  # ... and the late phase has more than this fraction of quiet steps
    calibration: str = "first_round"  # first_round: round 1 runs calib_steps uninterrupted steps, aggregated as usual |
                                      # probe: the same round 1, its update discarded | rounds: calib_steps spread over T-step rounds
    calib_steps: int = 30          # local steps per client recorded before deciding (paper: ~50-100)
    statistic: str = "median"      # mean | median: how the early and late phases of |GradIP| are summarised
    reference: str = "late"        # population reference for "quiet": median over clients of S(late) | S(early)
    early_fraction: float = 0.2    # first part of the calibration trajectory used as the "early" phase
    late_fraction: float = 0.5     # last part used as the "late" phase
    outlier_z: float = 3.5         # stepwise: flag a robust z of the late relative level below -outlier_z
    trend_alpha: float = 0.05      # trend: one-sided Mann-Kendall level, Bonferroni over the judged clients
    min_window: int = 10           # a client whose data holds fewer one-pass steps than this (at most calib_steps) is left out of the decision


@dataclass
class LoRAConfig:
    rank: int = 8                  # lora_zo: adapter rank r
    alpha: float = 16.0            # lora_zo: the adapter's update is scaled by alpha / r
    targets: str = "q_proj,v_proj"  # lora_zo: comma-separated names of the linear modules that get adapters


@dataclass
class RayConfig:
    num_actors: int = 2            # client actors (each loads the model once, serves many clients)
    gpus_per_client: float = 0.0   # GPU fraction per client actor (e.g. 0.25)
    cpus_per_client: float = 1.0   # CPUs per client actor
    num_gpus: int = 0              # GPUs an embedded cluster declares (0 = detect; more than exist = logical ones)
    address: str = ""              # "" = start an embedded cluster; "auto" or host:port joins one
    dashboard_host: str = "127.0.0.1"  # embedded cluster's dashboard bind address
    max_actor_restarts: int = 8    # dead client actors replaced per run (their clients re-run); then the rest carry on
    chaos_kill_prob: float = 0.0   # fault injection: kill a client actor after a dispatch with this probability (seeded)
    actor_start_timeout_s: float = 300.0  # wait this long for a lost server actor's replacement (or any client actor when none is left), then stop with an error
    actor_setup_timeout_s: float = 900.0  # wait this long for the run's actors to be placed and load the model at start, then stop with an error
    plan_timeout_s: float = 0.0    # a client plan not answered within this many seconds: its actor is killed and replaced, the plan runs elsewhere (0 = derived: 10 x the slowest measured time per step x steps)
    plan_timeout_floor_s: float = 60.0  # derived deadlines (plans, syncs, evaluations, server calls) are never shorter than this
    task_events: bool = True       # Ray's per-task event records in client actors (dashboard task view); false saves ~30 KB of actor memory per client of a round


@dataclass
class PrivacyConfig:
    enabled: bool = False          # DP-ZO: per-example clipped scalar differences + Gaussian noise, Poisson-sampled batches
    clip: float = 1.0              # C: each example's (l_i(w+eps z) - l_i(w-eps z)) / (2 eps) is clipped to [-C, C]
    noise_multiplier: float = 1.0  # sigma: N(0, sigma^2 C^2) is added to the sum of the clipped differences
    delta: float = 1e-5            # epsilon is reported at this delta (record-level DP of each client's data)
    target_epsilon: float = 0.0    # > 0: a run whose planned steps would give a client more epsilon is refused
    noise_from_target: bool = False  # choose noise_multiplier from target_epsilon (the accountant's smallest sigma)


@dataclass
class TrackingConfig:
    mlflow_uri: str = ""           # MLflow tracking URI ("" = off): sqlite:///mlruns.db, http://127.0.0.1:5000, a folder
    mlflow_experiment: str = "meerkat-ray"  # MLflow experiment the runs are logged under
    mlflow_parent_run: str = ""    # MLflow run id this run is nested under (`tune` sets it: the sweep's run)
    wandb_project: str = ""        # Weights & Biases project ("" = off); WANDB_MODE (default offline) writes RUN_DIR/wandb/
    wandb_group: str = ""          # W&B group of the run (`tune` sets it: the sweep's name)


@dataclass
class Config:
    name: str = "meerkat-vp-demo"  # run folder name under output_dir
    seed: int = 0                  # every random draw derives from this
    output_dir: str = "runs"       # parent folder of run folders, or a storage URI (s3://, gs://, file://: uploaded every round)
    executor: str = "ray"          # where clients run: ray (client actors + a server actor, ray.*) | local (sequential, in this process); was ray.backend (still read)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    zo: ZOConfig = field(default_factory=ZOConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    vp: VPConfig = field(default_factory=VPConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # lora_zo's adapters (algorithms/lora_zo.py)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    @property
    def run_dir(self) -> Path:
        """Where this process writes the run folder: under output_dir, or (output_dir a storage URI)
        in this node's scratch folder of this attempt, uploaded to the URI (meerkat_ray.storage)."""
        if is_uri(self.output_dir):
            return scratch_dir(self.output_dir, self.name, attempt=True)
        return Path(self.output_dir) / self.name


# ----------------------------------------------------------------------------- building

def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check one leaf value against its declared type (int accepted for float, nothing else)."""
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, str) and _looks_like_float(value):
            value = float(value)  # YAML 1.1 (PyYAML) reads `1e-4` as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float range
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(f"{key}: must be a finite number, got {_short(value)}")
            return number
    elif typ is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{key}: expected {name}, got {type(value).__name__} {_short(value)}")


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    types = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in types:
            known = ", ".join(sorted(f"{prefix}{k}" for k in types))
            raise ConfigError(f"{dotted}: unknown config key (known here: {known})")
        typ = types[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(dotted, value, typ)
    return cls(**kwargs)



def from_dict(data: dict | None) -> Config:
    """A validated Config from a mapping (config.yaml, a YAML file, a sweep's base): keys renamed
    since (`RENAMED_KEYS`) are read under their new names."""
    return validate(_build(Config, renamed(data or {}), ""))


def renamed(data: dict) -> dict:
    """`data` with every old key of RENAMED_KEYS moved to its new place (a copy; `data` may be
    anything `_build` refuses); an old key given beside its new one is refused, naming both."""
    import copy

    if not isinstance(data, dict):
        return data
    data = copy.deepcopy(data)
    for old, new in RENAMED_KEYS.items():
        section, _, leaf = old.rpartition(".")
        node = data.get(section) if section else data
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        if not node and section:
            data.pop(section)
        try:
            get_dotted(data, new)
        except KeyError:
            set_dotted(data, new, value)
            continue
        raise ConfigError(f"{old}: renamed {new}; give only {new}")
    return data


def get_dotted(data: dict, key: str) -> Any:
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", YAML-typed value): `zo.lr=1e-4` gives a float, `vp.enabled=false` a bool."""
    if "=" not in item:
        raise ConfigError(f"{item}: overrides are written key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{item}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _looks_like_float(raw: str) -> bool:
    try:
        float(raw)
    except ValueError:
        return False
    return raw.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


def set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path, key_name: str = "config") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the {key_name} must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """defaults <- YAML file <- overrides, then strict validation."""
    data = read_yaml(path) if path else {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return from_dict(data)
