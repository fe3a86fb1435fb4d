"""A sweep file: a base experiment config, a grid over dotted keys, and Tune settings.

    base:                      # any experiment config, exactly as for `meerkat-ray run`
      model: {name: tiny-llama}
    grid:                      # dotted key -> list of values; trials = the cross product
      mask.density: [1.0e-3, 1.0e-4]
      fed.local_steps: [1, 10]
    tune:                      # see TuneSettings
      metric: accuracy

Command-line overrides: `tune.K=V` sets a Tune setting, `grid.K=[...]` replaces (or adds) an axis,
`base.K=V` or plain `K=V` sets a base key. Everything, including every grid point as a full
experiment config, is validated before Ray starts. Pure Python: no Ray, no model.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, _build, _field_types, from_dict, get_key, parse_override, read_yaml, set_dotted
from .errors import ConfigError

SECTIONS = ("base", "grid", "tune")
METRICS = ("accuracy", "best_accuracy", "test_loss", "train_loss")  # reported every round
# Keys a trial does not own: run folders are placed by the sweep, the cluster is the sweep's.
NOT_GRIDDABLE = ("name", "output_dir", "ray.address", "ray.num_gpus", "ray.dashboard_host")


@dataclass
class ASHASettings:
    grace_period: int = 1          # rounds every trial runs before it may be stopped
    reduction_factor: int = 2      # at each rung only the best 1/reduction_factor of trials go on
    max_t: int = 0                 # rounds after which a trial is complete (0 = the largest fed.rounds)


@dataclass
class TuneSettings:
    name: str = ""                 # sweep folder name under output_dir ("" = the sweep file's name)
    output_dir: str = "sweeps"     # parent folder of sweep folders
    metric: str = "accuracy"       # accuracy | best_accuracy | test_loss | train_loss
    mode: str = "max"              # max | min
    num_samples: int = 1           # repeats of the whole grid (grid over `seed` for different draws)
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's resources allow
    scheduler: str = "none"        # none | asha (stop weak trials early, at rungs of rounds)
    max_failures: int = 2          # a failed trial is retried this many times, from its last round's checkpoint
    asha: ASHASettings = field(default_factory=ASHASettings)


@dataclass
class Sweep:
    source: str                            # the sweep file
    base: dict                             # experiment config mapping (validated)
    grid: dict[str, list]                  # dotted key -> values, in file order
    tune: TuneSettings
    points: list[dict] = field(default_factory=list)    # every grid point: dotted key -> value
    configs: list[Config] = field(default_factory=list)  # the validated experiment config of each point

    @property
    def folder(self) -> Path:
        return Path(self.tune.output_dir).expanduser().resolve() / self.tune.name

    def spec(self) -> dict:
        """What defines the sweep's trials (stored in the sweep folder, compared on --resume)."""
        return {"base": self.base, "grid": self.grid}


def point_config(base: dict, point: dict) -> Config:
    data = copy.deepcopy(base)
    for key, value in point.items():
        set_dotted(data, key, value)
    return from_dict(data)


def point_tag(point: dict) -> str:
    """`density=0.001_local_steps=10`: the last part of each key, the whole key where those collide."""
    lasts = [k.rsplit(".", 1)[-1] for k in point]
    names = [last if lasts.count(last) == 1 else key for key, last in zip(point, lasts)]
    return "_".join(f"{n}={v:g}" if isinstance(v, float) else f"{n}={v}" for n, v in zip(names, point.values()))


def _leaf_keys(cls=Config, prefix: str = "") -> set[str]:
    keys = set()
    for name, typ in _field_types(cls).items():
        if dataclasses.is_dataclass(typ):
            keys |= _leaf_keys(typ, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _check_grid(grid: Any) -> dict[str, list]:
    if not isinstance(grid, dict):
        raise ConfigError(f"grid: expected a mapping of dotted keys to lists, got {type(grid).__name__}")
    leaves = _leaf_keys()
    for key, values in grid.items():
        if key not in leaves:
            raise ConfigError(f"grid.{key}: unknown config key")
        if key in NOT_GRIDDABLE:
            raise ConfigError(f"grid.{key}: set by the sweep, not per trial (not in a grid: {', '.join(NOT_GRIDDABLE)})")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}: expected a non-empty list of values, got {values!r}")
    return grid


def _check_tune(data: Any, source: Path) -> TuneSettings:
    settings = _build(TuneSettings, data if data is not None else {}, "tune.")
    if not settings.name:
        settings.name = source.stem
    if "/" in settings.name or settings.name in (".", ".."):
        raise ConfigError(f"tune.name: must be a plain folder name, got {settings.name!r}")
    checks = [
        ("tune.metric", settings.metric in METRICS, f"one of {', '.join(METRICS)}", settings.metric),
        ("tune.mode", settings.mode in ("max", "min"), "max or min", settings.mode),
        ("tune.scheduler", settings.scheduler in ("none", "asha"), "none or asha", settings.scheduler),
        ("tune.num_samples", settings.num_samples >= 1, ">= 1", settings.num_samples),
        ("tune.max_concurrent_trials", settings.max_concurrent_trials >= 0, ">= 0", settings.max_concurrent_trials),
        ("tune.max_failures", settings.max_failures >= 0, ">= 0", settings.max_failures),
        ("tune.asha.grace_period", settings.asha.grace_period >= 1, ">= 1", settings.asha.grace_period),
        ("tune.asha.reduction_factor", settings.asha.reduction_factor >= 2, ">= 2", settings.asha.reduction_factor),
        ("tune.asha.max_t", settings.asha.max_t >= 0, ">= 0", settings.asha.max_t),
    ]
    for key, ok, what, value in checks:
        if not ok:
            raise ConfigError(f"{key}: must be {what}, got {value!r}")
    return settings


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read, override and validate a sweep file; every grid point becomes a validated Config."""
    path = Path(path)
    data = read_yaml(path, key_name="sweep")
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"{path}: unknown section {unknown[0]!r} (a sweep has {', '.join(SECTIONS)})")
    base = data.get("base") or {}
    grid = data.get("grid") or {}
    tune = data.get("tune") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"base: expected a mapping (an experiment config), got {type(base).__name__}")
    if not isinstance(tune, dict):
        raise ConfigError(f"tune: expected a mapping, got {type(tune).__name__}")
    for item in overrides:
        key, value = parse_override(item)
        section, _, rest = key.partition(".")
        if section == "grid" and rest:
            grid = {**grid, rest: value} if isinstance(grid, dict) else grid
        elif section == "tune" and rest:
            set_dotted(tune, rest, value)
        else:
            set_dotted(base, rest if section == "base" and rest else key, value)
    if "output_dir" in base:  # trial run folders go to <tune.output_dir>/<tune.name>/runs/: it would do nothing
        raise ConfigError(f"base.output_dir: a sweep places its trials' run folders under "
                          f"<tune.output_dir>/<tune.name>/runs/; set tune.output_dir={base['output_dir']} instead")
    try:
        from_dict(base)
    except ConfigError as exc:
        raise ConfigError(f"base.{exc}") from None
    grid = _check_grid(grid)
    sweep = Sweep(source=str(path), base=base, grid=grid, tune=_check_tune(tune, path))
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        try:
            cfg = point_config(base, point)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (grid point {point_tag(point)})") from None
        sweep.configs.append(cfg)
        sweep.points.append({key: get_key(cfg, key) for key in grid})  # typed: "1e-4" -> 0.0001
    sweep.grid = {key: list(dict.fromkeys(p[key] for p in sweep.points)) for key in grid}
    for key, values in grid.items():
        if len(sweep.grid[key]) != len(values):
            raise ConfigError(f"grid.{key}: the same value twice in {values!r}")
    return sweep
