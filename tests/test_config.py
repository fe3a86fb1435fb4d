"""The config tree (defaults <- YAML <- overrides, strict) and the CLI's handling of bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meerkat_ray.config import RENAMED_KEYS, Config, from_dict, get_key, load_config, to_dict, validate
from meerkat_ray.errors import ConfigError

SST2 = Path(__file__).parent / "fixtures" / "hub" / "sst2"

# MEERKAT.md section 3: "Config keys ... At least:"
CONTRACT_KEYS = """name seed model.name model.dtype data.task data.num_clients data.partition data.alpha
data.extreme_fraction data.batch_size data.max_length mask.kind mask.density mask.calib_corpus zo.eps zo.lr
fed.rounds fed.local_steps fed.seed_sharing fed.eval_every vp.enabled vp.sigma vp.rho vp.min_quiet_fraction
vp.calib_steps ray.backend ray.num_actors ray.gpus_per_client ray.address output_dir""".split()


def test_defaults_validate_and_round_trip():
    cfg = load_config()
    assert cfg == Config() and validate(Config()) == cfg
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg  # what config.yaml holds


@pytest.mark.parametrize("key", CONTRACT_KEYS)
def test_every_contract_key_exists(key):
    """Each key is read; a key renamed since the contract was written (ray.backend -> executor) is
    read under its new name, which config.yaml holds."""
    if key in RENAMED_KEYS:
        old, key = key, RENAMED_KEYS[key]
        assert load_config(None, [f"{old}=local"]) == load_config(None, [f"{key}=local"]) != Config()
    node = to_dict(Config())  # what config.yaml holds
    for part in key.split("."):
        assert isinstance(node, dict) and part in node, (key, part)
        node = node[part]
    assert not isinstance(node, dict) and node == get_key(Config(), key)  # a leaf value, not a section
    assert load_config(None, [f"{key}={yaml.safe_dump(node).strip().removesuffix('...').strip()}"]) == Config()


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: from-yaml\nzo:\n  lr: 1e-4\nfed:\n  rounds: 5\n  local_steps: 3\nvp:\n  enabled: false\n")
    cfg = load_config(path, ["fed.rounds=7", "vp.sigma=2", "data.partition=iid"])
    assert cfg.name == "from-yaml" and cfg.fed.local_steps == 3 and cfg.vp.enabled is False  # YAML over defaults
    assert cfg.zo.lr == 1e-4 and isinstance(cfg.zo.lr, float)  # PyYAML reads `1e-4` as a string
    assert cfg.fed.rounds == 7 and cfg.vp.sigma == 2.0 and cfg.data.partition == "iid"  # overrides over YAML
    assert cfg.zo.eps == Config().zo.eps  # untouched keys keep the defaults
    assert load_config(path, ["fed.rounds=7", "fed.rounds=8"]).fed.rounds == 8  # the last override wins


def test_override_values_are_yaml_typed():
    cfg = load_config(None, ["vp.enabled=false", "zo.lr=3e-3", "zo.eps=1", "name=run-1", "ray.address=",
                             "mask.eligible=mlp\\.(up|down)"])
    assert cfg.vp.enabled is False and cfg.zo.lr == 3e-3 and cfg.zo.eps == 1.0 and isinstance(cfg.zo.eps, float)
    assert cfg.name == "run-1" and cfg.ray.address == "" and cfg.mask.eligible == "mlp\\.(up|down)"


@settings(max_examples=60, deadline=None)
@given(lr=st.floats(min_value=1e-12, max_value=1e6, allow_nan=False, allow_infinity=False),
       steps=st.integers(min_value=1, max_value=10**6))
def test_numeric_overrides_round_trip_exactly(lr, steps):
    cfg = load_config(None, [f"zo.lr={lr!r}", f"fed.local_steps={steps}"])
    assert cfg.zo.lr == lr and cfg.fed.local_steps == steps


BAD = [  # (override, the key the error must name)
    ("fed.roundz=3", "fed.roundz"),            # unknown key
    ("foo=1", "foo"),
    ("fed.rounds=abc", "fed.rounds"),          # wrong types
    ("fed.rounds=2.5", "fed.rounds"),
    ("fed.rounds=true", "fed.rounds"),
    ("vp.enabled=maybe", "vp.enabled"),
    ("zo.lr=nan", "zo.lr"),
    ("zo.lr=.inf", "zo.lr"),
    ("model=3", "model"),
    ("fed.rounds.x=1", "fed.rounds"),
    ("mask.density=0", "mask.density"),        # out of range
    ("mask.density=1.5", "mask.density"),
    ("mask.density=-0.1", "mask.density"),
    ("fed.local_steps=0", "fed.local_steps"),
    ("fed.rounds=0", "fed.rounds"),
    ("data.alpha=0", "data.alpha"),
    ("data.alpha=-1", "data.alpha"),
    ("data.num_clients=0", "data.num_clients"),
    ("data.extreme_fraction=1.5", "data.extreme_fraction"),
    ("zo.eps=0", "zo.eps"),
    ("zo.lr=-1e-3", "zo.lr"),
    ("vp.min_quiet_fraction=2", "vp.min_quiet_fraction"),
    ("vp.calib_steps=1", "vp.calib_steps"),
    ("vp.early_fraction=0.6", "vp.early_fraction"),  # 0.6 + late 0.5 > 1
    ("ray.gpus_per_client=1.5", "ray.gpus_per_client"),
    ("ray.gpus_per_client=-1", "ray.gpus_per_client"),
    ("seed=-1", "seed"),
    ("name=a/b", "name"),
    ("model.name=", "model.name"),
    ("data.partition=foo", "data.partition"),  # not one of the choices
    ("mask.kind=lora", "mask.kind"),
    ("fed.seed_sharing=both", "fed.seed_sharing"),
    ("model.dtype=int8", "model.dtype"),
    ("executor=spark", "executor"),
    ("ray.backend=spark", "executor"),  # the old name of the key
    ("vp.policy=oracle", "vp.policy"),
]


@pytest.mark.parametrize("override, key", BAD)
def test_bad_values_raise_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(f"{key}:"), str(err.value)


def test_bad_yaml_files(tmp_path):
    (tmp_path / "broken.yaml").write_text("fed:\n  rounds: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "deep.yaml").write_text("fed:\n  rounds: 0\n")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x81")
    cases = {"broken.yaml": "malformed YAML", "list.yaml": "mapping", "binary.yaml": "not a text file"}
    for name, what in cases.items():
        with pytest.raises(ConfigError, match=what) as err:
            load_config(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name))
    with pytest.raises(ConfigError, match="^fed.rounds:"):
        load_config(tmp_path / "deep.yaml")
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    assert load_config(_write(tmp_path / "empty.yaml", "")) == Config()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- the CLI

# Imported by the interpreter at start-up (PYTHONPATH): at exit, write which modules of the libraries
# that load models or start clusters the process had imported.
SITECUSTOMIZE = """
import atexit, os, sys

def _record():
    with open(os.environ["MEERKAT_TEST_IMPORTED"], "w") as f:
        f.write(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "ray"))))

atexit.register(_record)
"""


def cli(*args, cwd) -> subprocess.CompletedProcess:
    """`python -m meerkat_ray ARGS` in a fresh interpreter; `.imported` = the transformers and Ray
    modules it had imported when it exited."""
    hook = Path(cwd) / ".hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    record = hook / "imported.txt"
    record.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MEERKAT_TEST_IMPORTED": str(record),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "meerkat_ray", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    proc.imported = record.read_text().split() if record.is_file() else None
    return proc


def assert_one_error_line(proc, *names):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for name in names:
        assert name in lines[0], lines[0]
    assert proc.stdout == ""
    # refused before any model was loaded or cluster started: the process never even imported
    # transformers (no model can be built without it) or Ray
    assert proc.imported == [], proc.imported


@pytest.mark.slow
@pytest.mark.parametrize("args, name", [
    (["fed.roundz=3"], "fed.roundz"),
    (["mask.density=1.5"], "mask.density"),
    (["fed.local_steps=0"], "fed.local_steps"),
    (["data.alpha=-1"], "data.alpha"),
    (["data.partition=foo"], "data.partition"),
    (["fed.rounds=abc"], "fed.rounds"),
    (["x=1"], "x"),
    (["missing.yaml", "fed.rounds=2"], "missing.yaml"),
    (["broken.yaml"], "broken.yaml"),
    (["noequals"], "noequals"),
])
def test_cli_bad_input_exits_2_with_one_error_line_and_no_run_folder(tmp_path, args, name):
    (tmp_path / "broken.yaml").write_text("fed: {rounds: 2\n")
    proc = cli("run", *args, f"output_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert_one_error_line(proc, name)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "meerkat-vp-demo").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], ["frobnicate"], ["run", "--no-such-flag"], ["export", "only-one"]])
def test_cli_usage_errors_are_one_line_too(tmp_path, args):
    assert_one_error_line(cli(*args, cwd=tmp_path))


@pytest.mark.parametrize("argv, items, flags", [
    (["run", "a=1", "--quiet", "b=2", "--overwrite", "c=3"], ["a=1", "b=2", "c=3"], {"quiet", "overwrite"}),
    (["run", "exp.yaml", "--quiet", "a=1"], ["exp.yaml", "a=1"], {"quiet"}),
    (["run", "--quiet", "exp.yaml", "a=1", "--overwrite"], ["exp.yaml", "a=1"], {"quiet", "overwrite"}),
    (["tune", "s.yaml", "--resume", "tune.max_failures=0", "--quiet", "grid.seed=[1]"],
     ["s.yaml", "tune.max_failures=0", "grid.seed=[1]"], {"resume", "quiet"}),
])
def test_flags_may_stand_anywhere_among_the_items(argv, items, flags):
    from meerkat_ray.cli import parse_args

    args = parse_args(argv)
    assert args.items == items  # every item, in the order given
    assert {f for f in ("quiet", "overwrite", "resume") if getattr(args, f, None)} == flags


def test_analyze_takes_its_flag_before_or_after_the_folder():
    from meerkat_ray.cli import parse_args

    for argv in (["analyze", "d", "--out", "o"], ["analyze", "--out", "o", "d"]):
        args = parse_args(argv)
        assert (args.dir, args.out) == ("d", "o")


def test_an_item_after_a_flag_reaches_the_config(tmp_path, capfd, no_model_or_cluster):
    """The refused key comes after `--quiet`: it was parsed, not dropped or refused as unrecognized."""
    code, err, _ = run_main(capfd, "run", f"output_dir={tmp_path / 'runs'}", "--quiet", "fed.roundz=3")
    assert code == 2 and err[0].startswith("error: fed.roundz:"), err
    sweep = Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml"
    code, err, _ = run_main(capfd, "tune", str(sweep), "--quiet", "grid.mask.densty=[1]", f"tune.output_dir={tmp_path}")
    assert code == 2 and err[0].startswith("error: grid.mask.densty:"), err
    with pytest.raises(SystemExit) as exited:  # argparse's usage errors exit from the parser
        run_main(capfd, "run", "a=1", "--no-such-flag", "b=2")
    assert exited.value.code == 2 and capfd.readouterr().err == "error: unrecognized arguments: --no-such-flag\n"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "smoke").exists()


def fixture_data(tmp_path) -> list[str]:
    """Small hub-shaped data: the run refuses or fails before any step, in ~3 s."""
    return ["data.task=sst2", f"data.source={SST2}", "data.num_test=4", "data.num_clients=2",
            f"output_dir={tmp_path / 'runs'}", "name=exp", "vp.enabled=false"]


@pytest.mark.slow
def test_cli_refuses_an_existing_run_folder_and_leaves_it_untouched(tmp_path):
    run_dir = tmp_path / "runs" / "exp"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: exp\n")
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n')
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.iterdir()}
    proc = cli("run", *fixture_data(tmp_path), "model.name=tiny-llama", cwd=tmp_path)
    assert_one_error_line(proc, str(run_dir), "--overwrite")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.iterdir()} == before


# The cases below get past the config (imports, data), so they call the CLI's `main` in this
# process rather than pay for a fresh interpreter; the output contract is the same.

def run_main(capfd, *argv) -> tuple[int, list[str], str]:
    """main(argv) in this process; stderr and stdout as the file descriptors saw them."""
    from meerkat_ray.cli import main

    code = main(list(argv))
    out = capfd.readouterr()
    return code, out.err.splitlines(), out.out


@pytest.mark.parametrize("override, name", [("model.name={tmp}/no-model", "model.name"),
                                            ("data.source={tmp}/no-data", "data.source"),
                                            ("data.task=no-task", "data.task")])
def test_cli_missing_model_or_data_exits_2_without_a_run_folder(tmp_path, capfd, no_model_or_cluster, override,
                                                                name):
    code, err, out = run_main(capfd, "run", *fixture_data(tmp_path), override.format(tmp=tmp_path), "--quiet")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and name in err[0], err
    assert out == "" and not (tmp_path / "runs" / "exp").exists()


def test_cli_export_refuses_a_missing_or_unfinished_run_folder(tmp_path, capfd, no_model_or_cluster):
    code, err, _ = run_main(capfd, "export", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "nope" in err[0], err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("name: half\n")
    code, err, _ = run_main(capfd, "export", str(tmp_path / "half"), str(tmp_path / "out"))
    assert code == 2 and len(err) == 1 and "mask.safetensors" in err[0], err
    assert not (tmp_path / "out").exists()


def test_readme_config_reference_lists_every_key():
    """README's config table is the user's reference: every key of the tree must appear in it."""
    import dataclasses
    from pathlib import Path

    from meerkat_ray.config import Config

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type) or isinstance(f.default_factory, type):
                yield from keys(f.default_factory, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    missing = [k for k in keys(Config) if f"`{k}`" not in readme]
    assert not missing, f"README config table lacks {missing}"
    # and the default column says what the code does
    import ast
    import re

    from meerkat_ray.config import get_key

    defaults = {k: ast.literal_eval(v) for k, v in re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \|", readme, re.M)}
    wrong = {k: (v, get_key(Config(), k)) for k, v in defaults.items() if v != get_key(Config(), k)}
    assert set(defaults) == set(keys(Config)) and not wrong, wrong


# ----------------------------------------------------------------------------- renamed keys

def test_an_old_config_yaml_with_ray_backend_loads_under_executor():
    old = to_dict(Config())
    old.pop("executor")
    old["ray"]["backend"] = "local"  # config.yaml as runs wrote it before the rename
    cfg = from_dict(old)
    assert cfg.executor == "local" and "backend" not in to_dict(cfg)["ray"]
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("overrides", [["ray.backend=local", "executor=ray"], ["executor=ray", "ray.backend=local"]])
def test_old_and_new_name_together_are_refused_naming_the_new_key(overrides):
    with pytest.raises(ConfigError, match=r"^ray\.backend: renamed executor; give only executor$"):
        load_config(None, overrides)


def test_an_old_sweep_file_loads_with_the_renamed_key(tmp_path):
    from meerkat_ray.sweep_file import load_sweep

    path = tmp_path / "old.yaml"
    path.write_text("base:\n  fed: {rounds: 1}\n  ray: {backend: local, cpus_per_client: 0.5}\n"
                    "grid:\n  ray.backend: [local, ray]\ntune: {name: old}\n")
    sweep = load_sweep(path)
    assert sorted(p["executor"] for p in sweep.points) == ["local", "ray"]
    assert all(cfg.ray.cpus_per_client == 0.5 for cfg in sweep.configs)
