"""Faults survived: hostile and broken clients (robust aggregation, clipping, NaN), client actors
killed at random (ray.chaos_kill_prob), a run killed with SIGKILL and resumed, a Tune trial that
fails and retries from its checkpoint. Every recovery must end bit for bit where a fault-free run
ends (`sparse_final.safetensors`, `path.parquet`, metrics rows)."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FLAG_ALL, TINY_RUN, assert_same_run

from meerkat_ray.cli import main
from meerkat_ray.client import ClientWorker
from meerkat_ray.config import load_config
from meerkat_ray.errors import ConfigError
from meerkat_ray.messages import ClientPlan, ClientResult
from meerkat_ray.replay import replay_path
from meerkat_ray.seeds import derive_seed
from meerkat_ray.strategies.aggregation import ClientPath, make_rule


def robust_location(values, aggregation, trim_fraction=None):
    return make_rule(aggregation, **({} if trim_fraction is None else {"trim_fraction": trim_fraction})).location(values)


def aggregation_terms(paths, sharing, aggregation):
    return make_rule(aggregation).terms(paths, sharing)
from meerkat_ray.runlog import load_theta, read_metrics, read_path
from meerkat_ray.executors import FAULT_COUNTERS
from meerkat_ray.runner import run_experiment
from meerkat_ray.server import Server

TINY = TINY_RUN


# ----------------------------------------------------------------------------- robust aggregation

def test_robust_statistics_on_hand_computed_numbers():
    assert robust_location([3.0, -1.0, 2.0], "median") == 2.0
    assert robust_location([4.0, 1.0, 3.0, 2.0], "median") == 2.5           # even: mean of the middle two
    assert robust_location([1e9, 1.0, 2.0, 3.0, -1e9], "trimmed_mean", 0.2) == 2.0  # one cut from each end
    assert robust_location([1.0, 2.0, 6.0], "trimmed_mean", 0.2) == 3.0     # floor(0.6) = 0: the plain mean
    assert robust_location([5.0], "median") == 5.0


def test_robust_terms_weigh_by_the_clients_that_ran_each_step():
    """Client 2 was early-stopped (1 step): step 0 has three voters, step 1 two; W_t is their weight."""
    seeds = [11, 22]
    paths = [ClientPath(0, 0.5, seeds, [1.0, 4.0], 0.1), ClientPath(1, 0.3, seeds, [3.0, 2.0], 0.1),
             ClientPath(2, 0.2, seeds[:1], [100.0], 0.1)]
    median = aggregation_terms(paths, "round", "median")
    assert [(t.seed, t.lr) for t in median] == [(11, 0.1), (22, 0.1)]
    assert median[0].coef == pytest.approx(1.0 * 3.0) and median[1].coef == pytest.approx(0.8 * 3.0)
    mean = aggregation_terms(paths, "round", "mean")  # FedAvg for comparison: the outlier dominates step 0
    assert mean[0].coef == pytest.approx(0.5 + 0.9 + 20.0) and mean[1].coef == pytest.approx(2.0 + 0.6)
    with pytest.raises(ValueError):
        aggregation_terms(paths, "client", "median")


@pytest.mark.parametrize("override", ["fed.aggregation=median", "fed.aggregation=trimmed_mean"])
def test_robust_aggregation_needs_round_shared_seeds(override):
    with pytest.raises(ConfigError, match="^fed.aggregation: .*fed.seed_sharing=round"):
        load_config(None, [override, "fed.seed_sharing=client"])
    assert load_config(None, [override]).fed.seed_sharing == "round"


def test_the_server_refuses_scalars_above_the_clip():
    plan = ClientPlan(round=1, client=0, seeds=[1, 2], steps=2, lr=0.1, cursor=0)
    ok = ClientResult(round=1, client=0, scalars=[0.5, -0.5], losses=[1.0, 1.0])
    big = ClientResult(round=1, client=0, scalars=[0.5, -0.7], losses=[1.0, 1.0])
    assert Server.check_result(plan, ok, clip=0.5) == "" and Server.check_result(plan, big, clip=0.0) == ""
    assert "zo.clip" in Server.check_result(plan, big, clip=0.5)


ROBUST = TINY + ["data.num_train=100", "data.num_clients=5", "data.partition=iid", "fed.rounds=2",
                 "fed.local_steps=3", "fed.eval_every=2", "vp.enabled=false", "executor=local"]
ATTACKER = 0


def run_with_attacker(monkeypatch, tmp_path, name, scale, *overrides) -> Path:
    """A local run in which client ATTACKER multiplies its scalars by `scale` (NaN: sends NaN)."""
    honest_run = ClientWorker.run

    def run(self, plan):
        result = honest_run(self, plan)
        if plan.client == ATTACKER:
            result.scalars = [s * scale for s in result.scalars]
        return result

    monkeypatch.setattr(ClientWorker, "run", run)
    run_experiment(load_config(None, [*ROBUST, *overrides, f"name={name}", f"output_dir={tmp_path}"]), progress=False)
    monkeypatch.undo()
    return tmp_path / name


def contract_coefficients(rows, aggregation: str, trim: float) -> dict[tuple[int, int], tuple[int, float, float]]:
    """(round, step) -> (seed, lr, coef) from path.parquet, by the README's definition and not the
    package's code: W_t = sum of the weights of the clients that ran step t; mean: sum of
    weight * scalar; median: W_t * the middle scalar; trimmed_mean: W_t * the mean of the scalars
    left after dropping floor(trim * m) from each end."""
    out = {}
    for (rnd, step), group in rows.sort_values(["round", "step", "client"]).groupby(["round", "step"], sort=True):
        scalars, weights = group["scalar"].to_numpy(), group["weight"].to_numpy()
        if aggregation == "mean":
            coef = float(sum(w * s for w, s in zip(weights, scalars)))
        else:
            ordered, cut = sorted(scalars), int(trim * len(scalars))
            middle = float(np.median(ordered)) if aggregation == "median" else float(np.mean(ordered[cut:len(ordered) - cut]))
            coef = float(weights.sum()) * middle
        out[(int(rnd), int(step))] = (int(group["seed"].iloc[0]), float(group["lr"].iloc[0]), coef)
    return out


def apply_contract_terms(init: torch.Tensor, coefs: dict) -> torch.Tensor:
    theta = init.clone()
    for key in sorted(coefs):
        seed, lr, coef = coefs[key]
        z = torch.randn(theta.numel(), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
        theta.add_(z, alpha=-(lr * coef))
    return theta


@pytest.mark.slow
def test_a_malicious_client_is_outvoted_by_the_median_but_wrecks_the_mean(monkeypatch, tmp_path):
    """Client 0 sends its scalars times 1e6 (finite, so not rejected). Reference: the same
    federation with the attacker's results refused (it sends NaN) - the honest-only result."""
    honest = run_with_attacker(monkeypatch, tmp_path, "honest", math.nan)
    median = run_with_attacker(monkeypatch, tmp_path, "median", 1e6, "fed.aggregation=median")
    trimmed = run_with_attacker(monkeypatch, tmp_path, "trimmed", 1e6, "fed.aggregation=trimmed_mean",
                                "fed.trim_fraction=0.2")
    mean = run_with_attacker(monkeypatch, tmp_path, "mean", 1e6)

    # the NaN client: rejected every round, counted, and the run went on without it
    rounds = read_metrics(honest)[1:]
    assert [m["rejected_clients"] for m in rounds] == [[ATTACKER]] * 2
    assert all("non-finite" in m["rejected_reasons"][str(ATTACKER)] for m in rounds)
    assert set(read_path(honest)["client"]) == {1, 2, 3, 4}

    init = load_theta(honest / "sparse_init.safetensors")
    theta = {run.name: load_theta(run / "sparse_final.safetensors") for run in (honest, median, trimmed, mean)}
    for run, aggregation, trim in ((honest, "mean", 0.0), (median, "median", 0.0), (trimmed, "trimmed_mean", 0.2),
                                   (mean, "mean", 0.0)):
        rows = read_path(run)
        coefs = contract_coefficients(rows, aggregation, trim)
        # the run applied exactly these coefficients (recomputed here from the README's definition)
        assert torch.allclose(apply_contract_terms(init, coefs), theta[run.name], rtol=0, atol=1e-6), run.name
        if run is honest:
            continue
        # per shared seed, a robust coefficient stays inside what the honest clients sent (times the
        # total weight W_t), however large the attacker's scalar; the mean's leaves it (in round 1,
        # while the model is intact, at every seed)
        for (rnd, step), coef in coefs.items():
            seed_rows = rows[(rows["round"] == rnd) & (rows["step"] == step)]
            honest_scalars = seed_rows[seed_rows["client"] != ATTACKER]["scalar"]
            total = float(seed_rows["weight"].sum())
            inside = total * honest_scalars.min() <= coef[2] <= total * honest_scalars.max()
            if aggregation != "mean":
                assert inside, (aggregation, rnd, step, coef)
            elif rnd == 1:
                assert not inside, (rnd, step, coef)
    # so the robust runs end within an order of magnitude of honest training's own movement from
    # init, while the mean is carried off by the attack: the attacker's scalars are x 1e6 at weight
    # about 1/5, so the mean lands at least 1e4 times farther than either robust rule (README's
    # figures are what this prints)
    moved = float((theta["honest"] - init).norm())
    off = {name: float((t - theta["honest"]).norm()) / moved for name, t in theta.items() if name != "honest"}
    print("distance from the honest-only result / honest movement:", off)
    assert moved > 0
    assert off["median"] < 10 and off["trimmed"] < 10, off
    assert off["mean"] > 1e4 * max(off["median"], off["trimmed"]), off
    for run in (median, trimmed):
        assert all(math.isfinite(m["test_loss"]) for m in read_metrics(run) if m.get("test_loss") is not None)
        assert read_metrics(run)[-1]["rejected_clients"] == []  # outvoted, not refused
    # path.parquet + the two config keys still replay sparse_final bit for bit
    assert torch.equal(replay_path(init, read_path(median), rule=make_rule("median")), theta["median"])
    assert torch.equal(replay_path(init, read_path(trimmed), rule=make_rule("trimmed_mean", trim_fraction=0.2)),
                       theta["trimmed"])


@pytest.mark.slow
def test_clipped_scalars_reach_the_path_and_replay(tmp_path):
    run_experiment(load_config(None, [*ROBUST, "zo.clip=0.05", "name=clip", f"output_dir={tmp_path}"]),
                   progress=False)
    path = read_path(tmp_path / "clip")
    assert path["scalar"].abs().max() == 0.05  # clipped on the client (and some steps did hit the clip)
    assert (path["scalar"].abs() < 0.05).any()
    init = load_theta(tmp_path / "clip" / "sparse_init.safetensors")
    assert torch.equal(replay_path(init, path), load_theta(tmp_path / "clip" / "sparse_final.safetensors"))


# ----------------------------------------------------------------------------- dead client actors

CHAOS = TINY + ["data.num_train=120", "data.num_clients=5", "data.partition=mixed", "fed.rounds=2",
                "fed.local_steps=3", "vp.calib_steps=3", *FLAG_ALL]
KILL_PROB = 0.3


@pytest.mark.ray
def test_client_actors_killed_at_random_change_nothing_but_the_retry_counts(ray_cluster, tmp_path):
    """2 actors, each dispatch followed by a kill with probability 0.3; the killed actor's clients
    are re-run on the other actor or on its replacement. The draws are seeded: the first ten (one
    per client and round at least) contain a kill, so this run really does lose actors."""
    assert (np.random.default_rng(derive_seed(0, "chaos")).random(10) < KILL_PROB).any()
    run_experiment(load_config(None, [*CHAOS, "executor=local", "name=calm", f"output_dir={tmp_path}"]),
                   progress=False)
    run_experiment(load_config(None, [*CHAOS, "executor=ray", "ray.num_actors=2", "ray.cpus_per_client=0.5",
                                      f"ray.chaos_kill_prob={KILL_PROB}", "name=chaos", f"output_dir={tmp_path}"]),
                   progress=False)
    calm, chaos = tmp_path / "calm", tmp_path / "chaos"
    assert_same_run(calm, chaos, ignore=FAULT_COUNTERS)
    rounds = read_metrics(chaos)[1:]
    assert sum(m["actor_restarts"] for m in rounds) >= 1 and sum(m["retries"] for m in rounds) >= 1
    assert all(m[k] == 0 for m in read_metrics(calm)[1:] for k in FAULT_COUNTERS)
    assert sum(m["pool_shrinks"] for m in rounds) == sum(m["actor_restarts"] for m in rounds)  # every kill replaced
    assert ray_cluster.is_initialized()


# ----------------------------------------------------------------------------- killed runs resume

RESUMABLE = TINY + ["data.num_train=96", "data.num_clients=3", "data.partition=mixed", "fed.rounds=30",
                    "fed.local_steps=2", "fed.eval_every=10", "vp.calib_steps=4", "executor=local"]


# A run of 4 rounds (evaluations after rounds 0, 3 and 4) whose round 1 is Meerkat-vp's calibration
# (vp.calibration=first_round: 4 uninterrupted steps per client, then the decision), killed with
# SIGKILL at each named point of tests/killpoints.py and resumed; every resumed run must end bit for
# bit as the uninterrupted one.
KILLABLE = TINY + ["data.num_train=96", "data.num_clients=3", "data.partition=mixed", "fed.rounds=4",
                   "fed.local_steps=2", "fed.eval_every=3", "vp.calibration=first_round", "vp.calib_steps=4",
                   "executor=local"]
KILLS = {  # kill point -> the round it strikes in
    "atomic-path": 3, "atomic-checkpoint": 3, "after-metrics": 3, "after-checkpoint": 3, "mid-round": 3,
    "evaluation": 3, "calibration": 1, "decision": 1,
}
KILLPOINTS = Path(__file__).with_name("killpoints.py")


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted run ("whole") and one run killed at each point (forked from one process)."""
    root = tmp_path_factory.mktemp("killed")
    jobs = [{"point": point, "round": rnd, "marker": str(root / f"{point}.marker"),
             "argv": ["run", *KILLABLE, f"name={point}", f"output_dir={root}", "--quiet"]}
            for point, rnd in KILLS.items()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "KILLPOINT_EVAL_EVERY": "3"}
    done = subprocess.run([sys.executable, str(KILLPOINTS), str(root / "jobs.json")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads((root / "jobs.status.json").read_text())
    assert status == {job["marker"]: -signal.SIGKILL for job in jobs}, (status, done.stderr[-3000:])
    run_experiment(load_config(None, [*KILLABLE, "name=whole", f"output_dir={root}"]), progress=False)
    return {name: root / name for name in ["whole", *KILLS]}


def checkpoint_round(run: Path) -> int:
    from meerkat_ray.checkpoint import RunCheckpoint

    return RunCheckpoint.load(run).round


@pytest.mark.slow
@pytest.mark.parametrize("point", KILLS)
def test_a_run_killed_at_any_point_resumes_bit_for_bit(killed_runs, capsys, point):
    run, whole, rnd = killed_runs[point], killed_runs["whole"], KILLS[point]
    seen = (run.parent / f"{point}.marker").read_text()
    assert seen.startswith(point), seen  # killed at that point, not anywhere else
    assert not (run / "sparse_final.safetensors").exists() and not (run / "summary.json").exists()
    # what the kill left: the last checkpoint is the round before (after-checkpoint: that round's own)
    assert checkpoint_round(run) == (rnd if point == "after-checkpoint" else rnd - 1), seen
    rounds = [m["round"] for m in read_metrics(run)]
    written = point in ("after-metrics", "after-checkpoint", "atomic-path", "atomic-checkpoint")  # round's line
    assert rounds == list(range(rnd + 1 if written else rnd)), (point, rounds)
    temps = [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    if point.startswith("atomic-"):  # the interrupted write's complete temp file is still there
        assert len(temps) == 1 and temps[0].startswith(".path.parquet." if point == "atomic-path" else
                                                       ".checkpoint.safetensors."), temps
    else:
        assert temps == [], temps

    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    assert_same_run(whole, run)
    summary, expected = (json.loads((r / "summary.json").read_text()) for r in (run, whole))
    drop = lambda d: {k: v for k, v in d.items() if not k.endswith("_s") and k != "name"}  # noqa: E731
    assert drop(summary) == drop(expected)
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []


def test_every_kill_point_is_tested():
    import importlib.util

    spec = importlib.util.spec_from_file_location("killpoints", KILLPOINTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.POINTS) == set(KILLS)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    """A finished 2-round run (its checkpoint is the last round's)."""
    root = tmp_path_factory.mktemp("short")
    run_experiment(load_config(None, [*RESUMABLE, "fed.rounds=2", "name=short", f"output_dir={root}"]),
                   progress=False)
    return root / "short"


def copy_run(run: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, to))


def resume_error(capsys, *argv) -> str:
    code = main(["run", *argv, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


@pytest.mark.slow
def test_resuming_a_finished_run_rewrites_the_same_results(short_run, tmp_path, capsys):
    run = copy_run(short_run, tmp_path / "again")
    stale = run / ".path.parquet.k1ll3d.tmp"  # what a SIGKILL in the middle of an atomic write leaves
    stale.write_bytes((run / "path.parquet").read_bytes()[:100])
    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    assert_same_run(short_run, run)
    assert not stale.exists()


def _damage_config(run: Path) -> str:
    text = (run / "config.yaml").read_text().replace("lr: 0.01", "lr: 0.02")
    (run / "config.yaml").write_text(text)
    return "zo.lr"


def _truncate(run: Path, name: str) -> str:
    data = (run / name).read_bytes()
    (run / name).write_bytes(data[: len(data) // 2])
    return name


def _foreign_mask(run: Path) -> str:
    """A mask of another density from another run: its size does not fit the checkpoint."""
    from meerkat_ray.mask import load_mask, save_mask

    mask = load_mask(run / "mask.safetensors")
    first = next(iter(mask.indices))
    mask.indices[first] = mask.indices[first][:-1]
    mask.pretrain_grad = mask.pretrain_grad[:-1] if mask.pretrain_grad is not None else None
    save_mask(mask, run / "mask.safetensors")
    return "mask"


DAMAGE = {  # how a run folder is broken -> what the error line must name
    "config-differs": _damage_config,
    "no-checkpoint": lambda run: (run / "checkpoint.safetensors").unlink() or "checkpoint.safetensors",
    "truncated-checkpoint": lambda run: _truncate(run, "checkpoint.safetensors"),
    "truncated-mask": lambda run: _truncate(run, "mask.safetensors"),
    "foreign-mask": _foreign_mask,
    "no-config": lambda run: (run / "config.yaml").unlink() or "config.yaml",
    "broken-metrics": lambda run: ((run / "metrics.jsonl").write_text("{round: \n"), "metrics.jsonl")[1],
    "truncated-path": lambda run: _truncate(run, "path.parquet"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_refuses_a_damaged_or_changed_run_folder_and_leaves_it_alone(short_run, tmp_path, capsys, damage):
    run = copy_run(short_run, tmp_path / "run")
    name = DAMAGE[damage](run)
    files = lambda: {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    line = resume_error(capsys, "--resume", str(run))
    assert name in line and str(run) in line, line
    assert files() == before


@pytest.mark.slow
def test_resume_refuses_a_missing_folder_extra_items_and_overwrite(short_run, tmp_path, capsys):
    assert "no such run folder" in resume_error(capsys, "--resume", str(tmp_path / "nope"))
    assert "takes no config" in resume_error(capsys, "--resume", str(short_run), "fed.rounds=5")
    assert "exclude each other" in resume_error(capsys, "--resume", str(short_run), "--overwrite")


@pytest.mark.slow
def test_an_existing_run_folder_is_refused_unless_resume_or_overwrite(short_run, tmp_path, capsys):
    line = resume_error(capsys, *RESUMABLE, "fed.rounds=2", "name=short", f"output_dir={short_run.parent}")
    assert "already exists" in line and "--resume" in line and "--overwrite" in line


# ----------------------------------------------------------------------------- Tune trials retry

def flaky_trial(params, base, runs_dir):
    """run_trial, except that the first attempt of each trial fails right after reporting round 1."""
    from ray import tune as ray_tune

    from meerkat_ray.distributed import tune as sweep_tune

    real = ray_tune.report
    marker = Path(runs_dir).parent / f"failed-{ray_tune.get_context().get_trial_id()}"

    def report(metrics, checkpoint=None):
        real(metrics, checkpoint=checkpoint)
        if metrics["round"] == 1 and not marker.exists():
            marker.touch()
            raise RuntimeError("injected trial failure")

    ray_tune.report = report
    try:
        sweep_tune.run_trial(params, base, runs_dir)
    finally:
        ray_tune.report = real


@pytest.mark.ray
def test_a_failed_tune_trial_retries_from_its_checkpoint(ray_cluster, tmp_path):
    from ray import cloudpickle

    from meerkat_ray.sweep_file import load_sweep, point_config
    from meerkat_ray.distributed.tune import make_tuner, open_sweep_folder

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the trial process cannot import tests/
    root = Path(__file__).resolve().parents[1]
    sweep = load_sweep(root / "tune_configs" / "smoke.yaml",
                       ["grid.mask.density=[0.01]", "grid.fed.local_steps=[2]", "fed.rounds=3", "mask.cache=false",
                        "model.num_threads=1", f"tune.output_dir={tmp_path}", "tune.max_failures=1"])
    folder = open_sweep_folder(sweep, resume=False, overwrite=False)
    results = make_tuner(sweep, folder, resume=False, progress=False, trial_fn=flaky_trial).fit()
    assert len(results) == 1 and results[0].error is None and results[0].metrics["round"] == 3
    assert len(list(folder.glob("failed-*"))) == 1  # it did fail once
    trial_run = Path(results[0].metrics["run_dir"])

    cfg = point_config(sweep.base, sweep.points[0])
    cfg.name, cfg.output_dir = "straight", str(tmp_path)
    run_experiment(cfg, progress=False)
    assert_same_run(tmp_path / "straight", trial_run)
