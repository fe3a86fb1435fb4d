"""A sweep file: a base experiment config, a grid over dotted keys, a search space, Tune settings.

    base:                      # any experiment config, exactly as for `meerkat-ray run`
      model: {name: tiny-llama}
    grid:                      # dotted key -> list of values; trials = the cross product
      mask.density: [1.0e-3, 1.0e-4]
    space:                     # dotted key -> one distribution, sampled by tune.search (random | optuna)
      zo.lr: {loguniform: [1.0e-5, 1.0e-2]}
      fed.local_steps: {randint: [1, 11]}      # [low, high): high excluded, as in Ray Tune
    tune:                      # see TuneSettings
      search: random
      num_samples: 8           # random: samples per grid point; optuna: trials in all
      metric: accuracy

Distributions (SPACE): uniform [low, high], loguniform [low, high] (low > 0), randint [low, high)
(integers), choice [v1, v2, ...], quniform [low, high, q] and qloguniform [low, high, q] (multiples
of q; low and high multiples of q too). `grid:` and `space:` mix under tune.search=random (every
grid point gets num_samples sampled points); tune.search=optuna samples `space:` only (TPE proposes
every key: write a fixed set of values as `choice`).

Command-line overrides: `tune.K=V` sets a Tune setting, `grid.K=[...]` replaces (or adds) an axis,
`space.K={DIST: [...]}` replaces (or adds) a sampled key, `base.K=V` or plain `K=V` sets a base
key. Everything is validated before Ray starts: every grid point as a full experiment config, and
every distribution's bounds (each corner of the space, at every grid point) the same way. Pure
Python: no Ray, no model.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import (RENAMED_KEYS, Config, _build, _field_types, from_dict, get_key, parse_override, read_yaml,
                     renamed, set_dotted)
from .errors import ConfigError
from .uris import is_uri, scratch_dir

SECTIONS = ("base", "grid", "space", "tune")
METRICS = ("accuracy", "best_accuracy", "test_loss", "train_loss")  # reported every round
# Keys a trial does not own: run folders are placed by the sweep, the cluster is the sweep's.
NOT_GRIDDABLE = ("name", "output_dir", "ray.address", "ray.num_gpus", "ray.dashboard_host")
SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("none", "fifo", "asha")  # none = fifo: every trial runs to its last round
# distribution -> number of numbers it takes ([low, high] or [low, high, q]); choice takes a list
DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "randint": 2, "quniform": 3, "qloguniform": 3, "choice": None}
LOG_DISTRIBUTIONS = ("loguniform", "qloguniform")


@dataclass
class ASHASettings:
    grace_period: int = 1          # rounds every trial runs before it may be stopped
    reduction_factor: int = 2      # at each rung only the best 1/reduction_factor of trials go on
    max_t: int = 0                 # rounds after which a trial is complete (0 = the largest fed.rounds)


@dataclass
class OptunaSettings:
    n_startup_trials: int = 4      # trials sampled at random before TPE starts modelling (Optuna's default: 10)


@dataclass
class TuneSettings:
    name: str = ""                 # sweep folder name under output_dir ("" = the sweep file's name)
    output_dir: str = "sweeps"     # parent folder of sweep folders
    metric: str = "accuracy"       # accuracy | best_accuracy | test_loss | train_loss
    mode: str = "max"              # max | min
    search: str = "grid"           # grid (every grid point) | random (sample space:) | optuna (TPE over space:)
    seed: int = 0                  # seed of the search: the same sweep file samples the same points
    num_samples: int = 1           # grid: repeats of the grid; random: samples per grid point; optuna: trials in all
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's resources allow (optuna: set it, TPE learns from finished trials only)
    scheduler: str = "none"        # none = fifo (every trial runs all rounds) | asha (stop weak trials early, at rungs of rounds)
    max_failures: int = 2          # a failed trial is retried this many times, from its last round's checkpoint
    reuse_actors: bool = True      # the next trial may start in a finished one's process (same resources; Tune
                                   # does so when it has not staged the next trial yet, e.g. one at a time):
                                   # no fresh process importing torch + transformers (false: one each)
    asha: ASHASettings = field(default_factory=ASHASettings)
    optuna: OptunaSettings = field(default_factory=OptunaSettings)


@dataclass
class Sweep:
    source: str                            # the sweep file
    base: dict                             # experiment config mapping (validated)
    grid: dict[str, list]                  # dotted key -> values, in file order
    tune: TuneSettings
    space: dict[str, dict] = field(default_factory=dict)  # dotted key -> {distribution: arguments}
    points: list[dict] = field(default_factory=list)    # every grid point: dotted key -> value
    configs: list[Config] = field(default_factory=list)  # the validated experiment config of each point
    corners: list[Config] = field(default_factory=list)  # configs at the space's bounds (checked, sized for)

    @property
    def folder(self) -> Path:
        """The sweep folder; for a tune.output_dir URI the driver's local staging copy (meerkat_ray.staging)."""
        if is_uri(self.tune.output_dir):
            return scratch_dir(self.tune.output_dir, self.tune.name)
        return Path(self.tune.output_dir).expanduser().resolve() / self.tune.name

    @property
    def searched(self) -> bool:
        return bool(self.space)

    @property
    def expected_trials(self) -> int:
        """Trials a finished sweep has: optuna proposes num_samples in all; grid and random run
        num_samples per grid point."""
        if self.tune.search == "optuna":
            return self.tune.num_samples
        return len(self.points) * self.tune.num_samples

    def spec(self) -> dict:
        """What defines the sweep's trials (stored in the sweep folder, compared on --resume)."""
        t = self.tune
        return {"base": self.base, "grid": self.grid, "space": self.space,
                "search": {"search": t.search, "seed": t.seed, "num_samples": t.num_samples, "metric": t.metric,
                           "mode": t.mode, "n_startup_trials": t.optuna.n_startup_trials}}


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


def _check_grid(grid: Any) -> dict[str, list]:
    if not isinstance(grid, dict):
        raise ConfigError(f"grid: expected a mapping of dotted keys to lists, got {type(grid).__name__}")
    grid = new_names(grid, "grid")
    for key, values in grid.items():
        _check_key("grid", key)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}: expected a non-empty list of values, got {values!r}")
    return grid


def new_names(keys: dict, section: str) -> dict:
    """A grid's or space's dotted keys with renamed ones (`config.RENAMED_KEYS`) under their new names."""
    out = {}
    for key, value in keys.items():
        new = RENAMED_KEYS.get(key, key) if isinstance(key, str) else key
        if new in out or (new != key and new in keys):
            raise ConfigError(f"{section}.{key}: renamed {new}; give only {new}")
        out[new] = value
    return out


def _check_key(section: str, key: Any) -> None:
    if not isinstance(key, str) or key not in _leaf_types():
        raise ConfigError(f"{section}.{key}: unknown config key")
    if key in NOT_GRIDDABLE or key.startswith("tracking."):
        raise ConfigError(f"{section}.{key}: set by the sweep, not per trial (not in a {section}: "
                          f"{', '.join(NOT_GRIDDABLE)}, tracking.*)")


def _number(key: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 (PyYAML) reads `1e-4` as a string
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return value


def _multiple(value: float, q: float) -> bool:
    ratio = value / q
    return math.isclose(ratio, round(ratio), rel_tol=1e-9, abs_tol=1e-9)


def _check_distribution(key: str, spec: Any, typ: Any) -> dict:
    """One `space:` entry -> {name: arguments} with numbers as numbers (bounds are checked later
    against the config itself)."""
    where = f"space.{key}"
    names = ", ".join(DISTRIBUTIONS)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one distribution, e.g. {{loguniform: [1.0e-5, 1.0e-2]}} ({names}), "
                          f"got {spec!r}")
    (name, args), = spec.items()
    if name not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {name!r} (one of {names})")
    if name == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: choice takes a non-empty list of values, got {args!r}")
        return {name: args}
    count = DISTRIBUTIONS[name]
    shape = "[low, high]" if count == 2 else "[low, high, q]"
    if not isinstance(args, list) or len(args) != count:
        raise ConfigError(f"{where}: {name} takes {shape}, got {args!r}")
    numbers = [_number(f"{where}.{name}", v) for v in args]
    low, high = numbers[:2]
    if typ is int and name != "randint" and name != "choice":
        raise ConfigError(f"{where}: {key} is an integer key; {name} draws floats (use randint or choice)")
    if typ not in (int, float):
        raise ConfigError(f"{where}: {key} is not a number; only choice applies to it")
    if not low < high:
        raise ConfigError(f"{where}: {name} needs low < high, got {args!r}")
    if name in LOG_DISTRIBUTIONS and low <= 0:
        raise ConfigError(f"{where}: {name} needs low > 0 (a log scale), got {args!r}")
    if name == "randint" and not all(isinstance(v, int) for v in numbers):
        raise ConfigError(f"{where}: randint takes integer bounds [low, high), got {args!r}")
    if count == 3:
        q = numbers[2]
        if q <= 0:
            raise ConfigError(f"{where}: {name} needs q > 0, got {args!r}")
        if not (_multiple(low, q) and _multiple(high, q)):
            raise ConfigError(f"{where}: {name} needs low and high to be multiples of q, got {args!r}")
    return {name: numbers}


def bounds(spec: dict) -> list:
    """The extreme values a distribution can give (every value of a choice)."""
    (name, args), = spec.items()
    if name == "choice":
        return list(args)
    if name == "randint":
        return [args[0], args[1] - 1]  # high is excluded
    return [args[0], args[1]]


def _check_space(space: Any, grid: dict) -> dict[str, dict]:
    if not isinstance(space, dict):
        raise ConfigError(f"space: expected a mapping of dotted keys to distributions, got {type(space).__name__}")
    space = new_names(space, "space")
    types = _leaf_types()
    checked = {}
    for key, spec in space.items():
        _check_key("space", key)
        if key in grid:
            raise ConfigError(f"space.{key}: also a grid axis (a key is either a grid axis or sampled)")
        checked[key] = _check_distribution(key, spec, types[key])
    return checked


def _leaf_types(cls=Config, prefix: str = "") -> dict[str, Any]:
    types = {}
    for name, typ in _field_types(cls).items():
        if dataclasses.is_dataclass(typ):
            types |= _leaf_types(typ, f"{prefix}{name}.")
        else:
            types[f"{prefix}{name}"] = typ
    return types


def _check_search(settings: TuneSettings, grid: dict, space: dict) -> None:
    if settings.search == "grid" and space:
        raise ConfigError(f"space.{next(iter(space))}: sampled keys need tune.search=random or optuna "
                          "(tune.search=grid runs the grid only)")
    if settings.search == "optuna":
        if not space:
            raise ConfigError("tune.search: optuna needs a space: section (the keys TPE proposes)")
        if grid:
            raise ConfigError(f"grid.{next(iter(grid))}: tune.search=optuna proposes every key itself; write the "
                              "values as space: {KEY: {choice: [...]}} (or use tune.search=random, which mixes both)")
        for key, spec in space.items():
            if "qloguniform" in spec:  # Ray's OptunaSearch would drop the quantization silently
                raise ConfigError(f"space.{key}: qloguniform is not supported by tune.search=optuna "
                                  "(use loguniform, quniform or tune.search=random)")


def _corner_configs(base: dict, points: list[dict], space: dict[str, dict]) -> list[Config]:
    """A config at every corner of the space (each key at each of its extreme values), at every
    grid point: a bound the config refuses is an error now, not a failed trial later."""
    configs = []
    keys = list(space)
    for point in points:
        for values in itertools.product(*(bounds(space[k]) for k in keys)):
            corner = {**point, **dict(zip(keys, values))}
            try:
                configs.append(point_config(base, corner))
            except ConfigError as exc:
                named = str(exc).split(":", 1)[0] in space  # the refused value is a bound of that key
                raise ConfigError(f"space{'.' if named else ': '}{exc} (at {point_tag(corner)}, a bound of the "
                                  "space)") from None
    return configs


def _check_tune(data: Any, source: Path) -> TuneSettings:
    settings = _build(TuneSettings, data if data is not None else {}, "tune.")
    if not settings.name:
        settings.name = source.stem
    if "/" in settings.name or settings.name in (".", ".."):
        raise ConfigError(f"tune.name: must be a plain folder name, got {settings.name!r}")
    checks = [
        ("tune.metric", settings.metric in METRICS, f"one of {', '.join(METRICS)}", settings.metric),
        ("tune.mode", settings.mode in ("max", "min"), "max or min", settings.mode),
        ("tune.scheduler", settings.scheduler in SCHEDULERS, " | ".join(SCHEDULERS), settings.scheduler),
        ("tune.search", settings.search in SEARCHES, " | ".join(SEARCHES), settings.search),
        ("tune.seed", settings.seed >= 0, ">= 0", settings.seed),
        ("tune.optuna.n_startup_trials", settings.optuna.n_startup_trials >= 1, ">= 1", settings.optuna.n_startup_trials),
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
    space = data.get("space") or {}
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
        elif section == "space" and rest:
            space = {**space, rest: value} if isinstance(space, dict) else space
        elif section == "tune" and rest:
            set_dotted(tune, rest, value)
        else:
            set_dotted(base, rest if section == "base" and rest else key, value)
    try:
        base = renamed(base)  # a sweep file written before a key was renamed
    except ConfigError as exc:
        raise ConfigError(f"base.{exc}") from None
    if "output_dir" in base:  # trial run folders go to <tune.output_dir>/<tune.name>/runs/: it would do nothing
        raise ConfigError(f"base.output_dir: a sweep places its trials' run folders under "
                          f"<tune.output_dir>/<tune.name>/runs/; set tune.output_dir={base['output_dir']} instead")
    try:
        from_dict(base)
    except ConfigError as exc:
        raise ConfigError(f"base.{exc}") from None
    grid = _check_grid(grid)
    space = _check_space(space, grid)
    sweep = Sweep(source=str(path), base=base, grid=grid, tune=_check_tune(tune, path), space=space)
    _check_search(sweep.tune, grid, space)
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
    sweep.corners = _corner_configs(base, sweep.points, space)
    for key, spec in space.items():  # choices typed as the config reads them ("1e-4" -> 0.0001)
        if "choice" in spec:
            typed = [get_key(point_config(base, {**sweep.points[0], key: v}), key) for v in spec["choice"]]
            if len(set(map(repr, typed))) != len(typed):
                raise ConfigError(f"space.{key}: the same value twice in {spec['choice']!r}")
            space[key] = {"choice": typed}
    return sweep
