"""Bad input, everywhere: every config key with a wrong type and with an out-of-range value,
malformed YAML, unusable paths, random configs thrown at the loader (hypothesis); and nothing
unsafe: no module unpickles a file, the dashboard binds 127.0.0.1 unless configured.

Every refusal goes through the CLI's `main` in this process (the output contract is the same as
a fresh interpreter's, see test_config.py for those): exit status 2, exactly one stderr line
`error: <key or path>: ...`, no traceback, no run folder."""

import ast
import dataclasses
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meerkat_ray.cli import main
from meerkat_ray.config import CHOICES, Config, _field_types, get_key, load_config
from meerkat_ray.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[1] / "meerkat_ray"


def leaf_types(cls=Config, prefix="") -> dict[str, type]:
    out = {}
    for name, typ in _field_types(cls).items():
        if dataclasses.is_dataclass(typ):
            out.update(leaf_types(typ, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = typ
    return out


LEAVES = leaf_types()
WRONG_TYPE = {int: ["abc", "2.5", "true", "[1, 2]"], float: ["abc", "true", "{a: 1}"], bool: ["maybe", "2"],
              str: ["[1, 2]", "{a: 1}"]}


# What each numeric key must accept and refuse, at the boundary, written by hand from what the key
# means (README's config reference) - never from config.RANGES, so a wrong range is caught.
# key -> (accepted, refused[, companion overrides that make the accepted values valid together])
BOUNDS = {
    "seed": ([0, 2**31], [-1]),
    "model.num_threads": ([0, 1], [-1]),                            # 0 = torch's default
    "data.min_confidence": ([0.0, 1.0], [-0.01, 1.01]),             # a confidence is a probability
    "data.num_train": ([0, 1], [-1]),                               # 0 = all
    "data.num_test": ([1], [0]),
    "data.num_clients": ([1], [0]),
    "data.alpha": ([1e-9], [0.0, -1.0]),                            # a Dirichlet concentration is > 0
    "data.extreme_fraction": ([0.0, 1.0], [-0.01, 1.01]),
    "data.batch_size": ([1], [0]),
    "data.max_length": ([2], [1, 0]),                               # a prompt and the token it predicts from
    "data.eval_batch_size": ([1], [0]),
    "mask.density": ([1e-9, 1.0], [0.0, -0.1, 1.0001]),             # u in (0, 1]
    "mask.calib_num_seqs": ([1], [0]),
    "mask.calib_seq_len": ([2], [1]),                               # a causal-LM loss needs two tokens
    "mask.calib_batch_size": ([1], [0]),
    "zo.eps": ([1e-12], [0.0, -1e-3]),
    "zo.lr": ([1e-12], [0.0, -1e-3]),
    "zo.clip": ([0.0, 1e-9], [-1e-9]),                              # 0 = off
    "zo.num_perturbations": ([1, 4], [0, -1]),                      # P >= 1 directions per step
    "zo.weight_decay": ([0.0, 1.0], [-1e-9]),                       # (and zo.lr x weight_decay < 1)
    "privacy.clip": ([1e-9], [0.0]),
    "privacy.noise_multiplier": ([0.0, 2.0], [-1e-9]),
    "privacy.delta": ([1e-9, 0.5], [0.0, 1.0]),
    "privacy.target_epsilon": ([0.0, 8.0], [-1e-9], ["privacy.enabled=true", "data.sampler=poisson"]),  # 0 = none
    "fed.rounds": ([1], [0]),
    "fed.local_steps": ([1], [0]),
    "fed.first_round_steps": ([0, 30], [-1]),                       # 0 = T (or vp.calib_steps)
    "fed.eval_every": ([1], [0]),
    "fed.trim_fraction": ([0.0, 0.49], [0.5, -0.01]),               # dropping half from each end leaves nothing
    "fed.clients_per_round": ([0, 1, 6], [-1, 7]),                 # 0 = all; at most the 6 clients there are
    "fed.seed_pool": ([0, 1, 4096], [-1]),                          # 0 = off
    "fed.fo_lr": ([0.0, 1e-12], [-1e-3]),                           # 0 = zo.lr
    "lora.rank": ([1], [0]),
    "lora.alpha": ([1e-9], [0.0]),
    "vp.sigma": ([1e-9], [0.0]),
    "vp.rho": ([1e-9], [0.0]),
    "vp.min_quiet_fraction": ([0.0, 1.0], [-0.01, 1.01]),
    "vp.calib_steps": ([2], [1]),                                   # an early and a late phase
    "vp.outlier_z": ([1e-9], [0.0]),
    "vp.trend_alpha": ([1e-9, 0.5], [0.0, 1.0]),
    "vp.min_window": ([2], [1]),                                    # at most vp.calib_steps (30)
    "vp.early_fraction": ([0.01, 0.5], [0.0, 1.0]),                 # with late_fraction 0.5: at most 0.5
    "vp.late_fraction": ([0.01, 0.8], [0.0, 1.0]),                  # with early_fraction 0.2: at most 0.8
    "ray.num_actors": ([1], [0]),
    "ray.gpus_per_client": ([0.0, 0.25, 1.0, 2.0], [-0.01, 1.5]),   # a fraction of one GPU, or whole GPUs
    "ray.cpus_per_client": ([0.01], [0.0]),
    "ray.num_gpus": ([0, 1], [-1]),                                 # 0 = detect
    "ray.max_actor_restarts": ([0], [-1]),
    "ray.chaos_kill_prob": ([0.0, 0.99], [1.0, -0.01]),             # 1 would kill after every dispatch
    "ray.actor_start_timeout_s": ([0.01], [0.0]),
    "ray.actor_setup_timeout_s": ([0.01], [0.0]),
    "ray.plan_timeout_s": ([0.0, 5.0], [-1.0]),
    "ray.plan_timeout_floor_s": ([0.01], [0.0]),
}
# Choice keys and their values, by hand from the README's config reference.
CONTRACT_CHOICES = {
    "model.dtype": {"float32", "bfloat16", "float16"},
    "data.partition": {"iid", "dirichlet", "extreme", "mixed"},
    "mask.kind": {"pretrain_grad", "weight_magnitude", "random", "full"},
    "mask.calib_corpus": {"pydoc", "c4"},
    "fed.seed_sharing": {"round", "client"},
    "zo.estimator": {"central", "forward"},
    "data.sampler": {"stream", "poisson"},
    "fed.aggregation": {"mean", "median", "trimmed_mean"},
    "fed.algorithm": {"sparse_zo", "first_order", "lora_zo"},
    "vp.policy": {"gradip", "random"},
    "vp.rule": {"paper", "stepwise", "trend"},
    "vp.calibration": {"first_round", "probe", "rounds"},
    "vp.statistic": {"mean", "median"},
    "vp.reference": {"late", "early"},
    "executor": {"ray", "local"},
}
NUMERIC = sorted(k for k, t in LEAVES.items() if t in (int, float))


def test_every_numeric_key_has_hand_written_bounds_and_every_choice_key_its_values():
    """The tables above are the contract: a new key needs its entry, a changed range or choice list
    shows up as a difference here (and in the boundary tests below)."""
    assert sorted(BOUNDS) == NUMERIC
    assert {k: set(v) for k, v in CHOICES.items()} == CONTRACT_CHOICES
    readme = (PACKAGE.parent / "README.md").read_text()
    for key, values in CONTRACT_CHOICES.items():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{key}` |")), "")
        assert all(re.search(rf"\b{v}\b", row) for v in values), (key, row)


BOUNDARY = [(key, value, ok) for key, (good, bad, *_) in BOUNDS.items() for value, ok in
            [(v, True) for v in good] + [(v, False) for v in bad]]


@pytest.mark.parametrize("key,value,ok", BOUNDARY, ids=[f"{k}={v}" for k, v, _ in BOUNDARY])
def test_each_numeric_key_accepts_and_refuses_at_its_boundaries(key, value, ok):
    companions = BOUNDS[key][2] if len(BOUNDS[key]) > 2 else []
    item = f"{key}={value!r}"
    if ok:
        assert get_key(load_config(None, [*companions, item]), key) == value
    else:
        with pytest.raises(ConfigError) as err:
            load_config(None, [*companions, item])
        assert str(err.value).startswith(f"{key}:"), str(err.value)


NEEDS = {("data.sampler", "poisson"): ["privacy.enabled=true"]}  # a choice valid only with another key


@pytest.mark.parametrize("key", sorted(CONTRACT_CHOICES))
def test_each_choice_key_accepts_its_values_and_nothing_else(key):
    for value in CONTRACT_CHOICES[key]:
        assert get_key(load_config(None, [f"{key}={value}", *NEEDS.get((key, value), [])]), key) == value
    for value in ("no-such-choice", sorted(CONTRACT_CHOICES[key])[0].upper(), ""):
        with pytest.raises(ConfigError, match=f"^{re.escape(key)}:"):
            load_config(None, [f"{key}={value}"])


MATRIX = (
    [(f"{key}={bad}", key) for key, typ in LEAVES.items() for bad in WRONG_TYPE[typ]]
    + [(f"{key}={BOUNDS[key][1][0]!r}", key) for key in NUMERIC]
    + [(f"{key}=no-such-choice", key) for key in CHOICES]
    + [  # keys whose bad values are not a type or a number range
        ("name=a/b", "name"), ("name=..", "name"), (f"name={'x' * 300}", "name"), ("name=", "name"),
        ("model.name=", "model.name"), ("model.device=tpu", "model.device"), ("model.device=cuda:x", "model.device"),
        ("mask.eligible=(unclosed", "mask.eligible"), ("ray.dashboard_host=a b", "ray.dashboard_host"),
        ("vp.early_fraction=0.6", "vp.early_fraction"), ("ray.gpus_per_client=2.5", "ray.gpus_per_client"),
        ("fed.aggregation=median;fed.seed_sharing=client", "fed.aggregation"),
        ("ray.chaos_kill_prob=0.5;executor=local", "ray.chaos_kill_prob"),
        ("fed.rounds=1e400", "fed.rounds"), ("zo.lr=1e400", "zo.lr"), ("zo.lr=nan", "zo.lr"),
        ("fed=3", "fed"), ("fed.rounds.deeper=1", "fed.rounds"), ("no_such_key=1", "no_such_key"),
        ("fed.no_such_key=1", "fed.no_such_key"), ("noequals", "noequals"),
    ]
)


def refused(capfd, *argv) -> str:
    """main(argv) refuses: status 2, exactly one `error:` line on the process's stderr (file
    descriptor 2, so C-level or child-process writes would show too), nothing on stdout. Callers
    also take `no_model_or_cluster`: no model loader or cluster start is entered."""
    code = main(list(argv))
    out = capfd.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out.err[-2000:])
    assert "Traceback" not in out.err and out.out == ""
    return lines[0]


def test_the_matrix_names_every_key():
    assert set(LEAVES) <= {key for _, key in MATRIX}


@pytest.mark.parametrize("items,key", MATRIX, ids=[m[0][:60] for m in MATRIX])
def test_every_bad_value_exits_2_with_one_line_naming_the_key(tmp_path, capfd, no_model_or_cluster, items, key):
    # the bad items come last: a later item overrides an earlier one
    line = refused(capfd, "run", "--quiet", f"output_dir={tmp_path / 'runs'}", *items.split(";"))
    assert line.startswith(f"error: {key}:") or line.startswith(f"error: {items}:"), line
    assert not (tmp_path / "runs").exists()


YAML_FILES = {  # file text -> what the error line names
    "fed: {rounds: [1, 2\n": "malformed YAML",
    "fed:\n\trounds: 2\n": "malformed YAML",                        # a tab
    "- 1\n- 2\n": "mapping",
    "just a string\n": "mapping",
    "fed: 3\n": "fed: expected a mapping",
    "1: 2\n": "1: unknown config key",
    "!!python/object/apply:os.system [echo hacked]\n": "malformed YAML",  # never constructed
    "fed: {rounds: !!binary aGk=}\n": "fed.rounds: expected int",
    "model: {cache_dir: \"a\\0b\"}\n": "model.cache_dir: contains a NUL character",
    "zo: {lr: 2024-01-01}\n": "zo.lr: expected float",
}


@pytest.mark.parametrize("text", YAML_FILES, ids=list(range(len(YAML_FILES))))
def test_malformed_or_hostile_yaml_is_refused(tmp_path, capfd, no_model_or_cluster, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    # the overrides keep a wrongly accepted file cheap (a tiny model in process) and out of ./runs
    line = refused(capfd, "run", "--quiet", str(path), f"output_dir={tmp_path / 'runs'}", "model.name=tiny-llama",
                   "executor=local", "data.num_train=20", "data.num_test=4")
    assert YAML_FILES[text] in line, line
    assert not (tmp_path / "runs").exists()


def test_unusable_folders_are_refused_before_anything_loads(tmp_path, capfd, no_model_or_cluster):
    (tmp_path / "a-file").write_text("x")
    tiny = ["run", "--quiet", "model.name=tiny-llama", "data.num_train=20", "data.num_test=4", "data.num_clients=2"]
    line = refused(capfd, *tiny, f"output_dir={tmp_path / 'a-file' / 'runs'}")
    assert line.startswith("error: output_dir: ") and "a-file" in line
    line = refused(capfd, *tiny, f"model.cache_dir={tmp_path / 'a-file'}", f"output_dir={tmp_path / 'runs'}")
    assert line.startswith("error: model.cache_dir: ")
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- random configs

SECTIONS = [k for k, t in _field_types(Config).items() if dataclasses.is_dataclass(t)]
KEYS = st.one_of(st.sampled_from(sorted(LEAVES)), st.sampled_from(SECTIONS), st.text(max_size=12))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-10**400, max_value=10**400),
                    st.floats(), st.text(max_size=20), st.sampled_from(["1e-4", "nan", "-inf", "1_000", "0x10", ""]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
SECTION_DICTS = st.dictionaries(st.one_of(st.sampled_from(sorted({k.split(".")[1] for k in LEAVES if "." in k})),
                                          st.text(max_size=8)), VALUES, max_size=4)
CONFIGS = st.dictionaries(KEYS, st.one_of(VALUES, SECTION_DICTS), max_size=6)
OVERRIDES = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", KEYS, st.text(max_size=20)),
                               st.builds(lambda k, v: f"{k}={v}", st.sampled_from(sorted(LEAVES)),
                                         SCALARS.map(str)),
                               st.text(max_size=30)), max_size=4)


def loads_or_refuses(path, overrides):
    try:
        cfg = load_config(path, overrides)
    except ConfigError as exc:
        assert str(exc) and ":" in str(exc)
        return None
    assert isinstance(cfg, Config)
    return cfg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=CONFIGS, overrides=OVERRIDES)
def test_random_configs_load_or_fail_cleanly(data, overrides):
    """Either a valid Config or a ConfigError - never another exception - for random nested
    mappings (written as YAML) and random override strings."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.yaml"
        try:
            path.write_text(yaml.safe_dump(data, allow_unicode=True))
        except (yaml.YAMLError, UnicodeEncodeError):
            return  # not representable as a YAML file at all
        loads_or_refuses(path, overrides)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_random_yaml_text_loads_or_fails_cleanly(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.yaml"
        path.write_bytes(text.encode("utf-8", "replace"))
        loads_or_refuses(path, [])


# ----------------------------------------------------------------------------- nothing unsafe

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}


def unsafe_calls(source: str) -> list[str]:
    """Unpickling and code execution in a module's source: imports of pickle-like modules,
    torch.load without weights_only=True, np.load(allow_pickle=True), pandas.read_pickle,
    yaml.load / unsafe_load / full_load, eval / exec."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            kwargs = {k.arg: k.value for k in node.keywords}
            true = lambda key: isinstance(kwargs.get(key), ast.Constant) and kwargs[key].value is True  # noqa: E731
            if name == "load" and owner == "torch" and not true("weights_only"):
                found.append("torch.load without weights_only=True")
            elif name == "load" and owner in ("np", "numpy") and "allow_pickle" in kwargs and not (
                    isinstance(kwargs["allow_pickle"], ast.Constant) and kwargs["allow_pickle"].value is False):
                found.append("np.load(allow_pickle=...)")
            elif name == "read_pickle" or (owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all")):
                found.append(f"{owner}.{name}")
            elif isinstance(func, ast.Name) and name in ("eval", "exec"):
                found.append(name)
    return found


def test_the_scanner_catches_unsafe_loading():
    bad = ("import pickle\nfrom joblib import load\nimport torch, numpy as np, yaml\ntorch.load(p)\n"
           "torch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\nyaml.load(t)\neval('1')\n")
    assert unsafe_calls(bad) == ["pickle", "joblib", "torch.load without weights_only=True",
                                 "torch.load without weights_only=True", "np.load(allow_pickle=...)", "yaml.load", "eval"]
    good = "import torch, numpy as np, yaml\ntorch.load(p, weights_only=True)\nnp.load(p)\nyaml.safe_load(t)\n"
    assert unsafe_calls(good) == []


@pytest.mark.parametrize("module", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_unpickles_or_executes_loaded_data(module):
    assert unsafe_calls(module.read_text()) == [], module.name


@pytest.mark.parametrize("host", ["", "0.0.0.0"])
def test_the_embedded_cluster_dashboard_binds_localhost_unless_configured(monkeypatch, host):
    import ray

    from meerkat_ray.distributed import cluster
    from meerkat_ray.config import RayConfig

    seen = {}

    class Started(Exception):
        pass

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise Started

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = RayConfig(dashboard_host=host) if host else RayConfig()
    with pytest.raises(Started):
        cluster.connect(rc)
    assert seen["dashboard_host"] == (host or "127.0.0.1")
    assert RayConfig().dashboard_host == "127.0.0.1"


@pytest.mark.parametrize("backend, entered", [("local", "load_model"), ("ray", "ray.init")])
def test_the_guard_stops_a_run_that_gets_as_far_as_a_model_or_a_cluster(tmp_path, no_model_or_cluster, backend,
                                                                          entered):
    """The refusal tests above would notice a wrongly accepted input: a valid run hits the guard."""
    from conftest import ModelLoaded

    with pytest.raises(ModelLoaded, match=entered):
        main(["run", "--quiet", "model.name=tiny-llama", "data.num_train=40", "data.num_test=4", "vp.enabled=false",
              f"executor={backend}", f"output_dir={tmp_path / 'runs'}"])
