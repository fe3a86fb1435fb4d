"""Search spaces and search algorithms: `space:` is validated before Ray starts (one `error:` line
naming the key), random search is seeded and mixes with the grid, and an interrupted Optuna search
resumes with its searcher state: one trial at a time it proposes exactly the points an
uninterrupted search proposes; with several at a time the restored searcher knows every finished
trial (none repeated, none forgotten). The Ray tests use a scored stand-in for a federation (a
closed-form accuracy of the sampled values) so that a search is seconds, not minutes."""

import math
import os
import pickle
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from meerkat_ray.cli import main
from meerkat_ray.sweep_file import load_sweep

ROOT = Path(__file__).resolve().parents[1]
BASE = """base:
  model: {name: tiny-llama}
  data: {task: tweets2, num_train: 64, num_test: 16, num_clients: 2, batch_size: 4, max_length: 32}
  fed: {rounds: 2}
  executor: local
  ray: {cpus_per_client: 0.5}
"""


def write_sweep(tmp_path: Path, body: str, name: str = "search") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(BASE + body)
    return path


def test_a_space_mixes_with_the_grid_and_every_corner_is_a_checked_config(tmp_path):
    path = write_sweep(tmp_path, """grid: {mask.density: [1.0e-3, 1.0e-2]}
space:
  zo.lr: {loguniform: [1.0e-5, 1.0e-2]}
  fed.local_steps: {randint: [1, 5]}
  vp.sigma: {choice: [0.25, 0.5, 1]}
  zo.eps: {quniform: [1.0e-3, 5.0e-3, 1.0e-3]}
tune: {search: random, num_samples: 3}
""")
    sweep = load_sweep(path)
    assert sweep.space["zo.lr"] == {"loguniform": [1e-5, 1e-2]}  # "1.0e-5" read as a number
    assert sweep.space["vp.sigma"] == {"choice": [0.25, 0.5, 1.0]}  # typed as the config types them
    assert len(sweep.configs) == 2 and sweep.expected_trials == 2 * 3
    # corners: 2 grid points x 2 x 2 x 3 x 2 bounds; randint's high is excluded
    assert len(sweep.corners) == 2 * 2 * 2 * 3 * 2
    assert {c.fed.local_steps for c in sweep.corners} == {1, 4}
    assert {c.zo.lr for c in sweep.corners} == {1e-5, 1e-2}


BAD = [  # sweep body, extra CLI items, what the one error line must name
    ("space: {zo.lr: {logunifrom: [1.0e-5, 1.0e-2]}}\ntune: {search: random}\n", [], "space.zo.lr: unknown distribution"),
    ("space: {zo.lr: {uniform: [0.1, 0.01]}}\ntune: {search: random}\n", [], "space.zo.lr: uniform needs low < high"),
    ("space: {zo.lr: {loguniform: [0, 0.01]}}\ntune: {search: random}\n", [], "space.zo.lr: loguniform needs low > 0"),
    ("space: {zo.lr: {qloguniform: [-1, 1, 0.5]}}\ntune: {search: random}\n", [], "space.zo.lr: qloguniform needs low > 0"),
    ("space: {zo.lrate: {uniform: [0.1, 0.2]}}\ntune: {search: random}\n", [], "space.zo.lrate: unknown config key"),
    ("space: {mask.density: {uniform: [0.5, 2.0]}}\ntune: {search: random}\n", [], "space.mask.density: must be in (0, 1]"),
    ("space: {fed.local_steps: {randint: [0, 4]}}\ntune: {search: random}\n", [], "space.fed.local_steps: must be >= 1"),
    ("space: {fed.local_steps: {uniform: [1, 4]}}\ntune: {search: random}\n", [], "space.fed.local_steps"),
    ("space: {vp.policy: {choice: [gradip, coin]}}\ntune: {search: random}\n", [], "space.vp.policy: must be one of"),
    ("space: {zo.lr: {quniform: [0.1, 1.05, 0.1]}}\ntune: {search: random}\n", [], "multiples of q"),
    ("space: {zo.lr: [0.1, 0.2]}\ntune: {search: random}\n", [], "space.zo.lr: expected one distribution"),
    ("space: {name: {choice: [a, b]}}\ntune: {search: random}\n", [], "space.name: set by the sweep"),
    ("space: {zo.lr: {uniform: [0.1, 0.2]}}\n", [], "tune.search"),
    ("grid: {zo.eps: [0.001]}\nspace: {zo.lr: {uniform: [0.1, 0.2]}}\ntune: {search: optuna}\n", [], "grid.zo.eps"),
    ("space: {zo.lr: {qloguniform: [0.1, 1.0, 0.1]}}\ntune: {search: optuna}\n", [], "space.zo.lr: qloguniform"),
    ("tune: {search: optuna}\n", [], "tune.search: optuna needs a space"),
    ("tune: {search: bayes}\n", [], "tune.search"),
    ("space: {zo.lr: {uniform: [0.1, 0.2]}}\ntune: {search: random}\n", ["space.zo.eps={uniform: [2, 1]}"], "space.zo.eps"),
    ("grid: {zo.lr: [0.1]}\nspace: {zo.lr: {uniform: [0.1, 0.2]}}\ntune: {search: random}\n", [], "space.zo.lr: also a grid"),
    ("space: {tracking.mlflow_uri: {choice: [a, b]}}\ntune: {search: random}\n", [], "space.tracking.mlflow_uri"),
]


@pytest.mark.parametrize("body,items,needle", BAD, ids=[b[2] for b in BAD])
def test_a_bad_space_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys, body, items, needle):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for an invalid sweep")

    monkeypatch.setattr(ray, "init", no_ray)
    path = write_sweep(tmp_path, body, "bad")
    assert main(["tune", str(path), *items, f"tune.output_dir={tmp_path}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- searches on Ray

def score(lr: float, eps: float) -> float:
    """The stand-in's accuracy: best at lr = 1e-3, eps = 1e-3 (a smooth bowl in log space)."""
    return 1.0 - 0.1 * ((math.log10(lr) + 3) ** 2 + (math.log10(eps) + 3) ** 2)


def scored_trial(params, base, runs_dir):
    """A trial that reports two 'rounds' of a closed-form accuracy instead of federating."""
    from ray import tune as ray_tune

    value = score(params["zo.lr"], params.get("zo.eps", 1e-3))
    for round_ in (1, 2):
        ray_tune.report({"round": round_, "accuracy": value, "run_dir": ""})


class InterruptAfter:
    """A Tune callback that stops the sweep like Ctrl-C (SIGUSR1, which Tune handles the same way:
    it stops the running trials and saves the experiment and searcher state) once `count` trials
    have finished; only once (a marker file), because a restored sweep restores its callbacks."""

    def __new__(cls, count, marker):
        from ray.tune import Callback

        class _Interrupt(Callback):
            def __init__(self):
                self.count, self.marker, self.done = count, str(marker), 0

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.done += 1
                if self.done == self.count and not os.path.exists(self.marker):
                    Path(self.marker).touch()
                    os.kill(os.getpid(), signal.SIGUSR1)

        return _Interrupt()


OPTUNA = """space:
  zo.lr: {loguniform: [1.0e-5, 1.0e-1]}
  zo.eps: {loguniform: [1.0e-5, 1.0e-1]}
tune: {search: optuna, num_samples: 6, seed: 7, metric: accuracy, mode: max, optuna: {n_startup_trials: 2}}
"""


def run_search(sweep, folder=None, resume=False, callbacks=()):
    from ray import cloudpickle

    from meerkat_ray.distributed.tune import make_tuner, open_sweep_folder

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the trial process cannot import tests/
    folder = open_sweep_folder(sweep, resume=resume, overwrite=False)
    results = make_tuner(sweep, folder, resume=resume, progress=False, trial_fn=scored_trial,
                         callbacks=callbacks).fit()
    return folder, results


def proposals(results, keys=("zo.lr", "zo.eps")) -> list[tuple]:
    """The sampled points in the order the searcher proposed them (Tune numbers its trials)."""
    trials = sorted(results, key=lambda r: int(r.metrics["experiment_tag"].split("_")[0]))
    return [tuple(r.config[k] for k in keys) for r in trials]


def sequential_reference(sweep) -> list[tuple]:
    """What the same searcher proposes uninterrupted, one trial at a time, driven here in-process
    the way Tune drives it: suggest, one result per round, complete, next."""
    from meerkat_ray.distributed.tune import param_space, searcher

    alg, _ = searcher(sweep)
    alg.set_search_properties(sweep.tune.metric, sweep.tune.mode, param_space(sweep))
    points = []
    for i in range(sweep.tune.num_samples):
        config = alg.suggest(f"t{i}")
        value = score(config["zo.lr"], config["zo.eps"])
        for round_ in (1, 2):
            result = {"round": round_, "accuracy": value, "training_iteration": round_}
            if round_ < 2:
                alg.on_trial_result(f"t{i}", result)
        alg.on_trial_complete(f"t{i}", result)
        points.append((config["zo.lr"], config["zo.eps"]))
    return points


def searcher_trials(folder: Path):
    """The Optuna study inside the searcher state Tune saved in the experiment folder."""
    from ray.tune.search.optuna import OptunaSearch

    state = sorted((folder / "tune").glob("searcher-state-*.pkl"))[-1]
    searcher = OptunaSearch()
    searcher.restore(str(state))
    return searcher._ot_study.trials


@pytest.mark.ray
def test_an_interrupted_optuna_search_resumes_to_the_same_proposals(ray_cluster, tmp_path):
    """One trial at a time: after 3 of 6 trials the sweep is interrupted and resumed; the 6 points
    it proposes are exactly those of the uninterrupted search (TPE models from trial 3 on, so a
    restored searcher that fell back to a fresh state, or lost a result, proposes other points)."""
    sweep = load_sweep(write_sweep(tmp_path, OPTUNA, "cut"),
                       [f"tune.output_dir={tmp_path}", "tune.max_concurrent_trials=1"])
    expected = sequential_reference(sweep)
    assert len(set(expected)) == 6 and expected != sequential_reference(
        load_sweep(write_sweep(tmp_path, OPTUNA, "other"), ["tune.seed=8"]))  # the seed matters

    folder, first = run_search(sweep, callbacks=[InterruptAfter(3, tmp_path / "interrupted")])
    assert (tmp_path / "interrupted").exists()
    done = [r for r in first if r.metrics and r.metrics.get("round") == 2]
    assert 3 <= len(done) < 6  # it did stop early
    _, resumed = run_search(sweep, folder, resume=True)
    assert proposals(resumed) == expected
    assert all(r.metrics["round"] == 2 for r in resumed)


@pytest.mark.ray
def test_an_interrupted_concurrent_optuna_search_forgets_and_repeats_nothing(ray_cluster, tmp_path):
    """Two trials at a time: interrupted after 3 finished, resumed; the searcher state at the end
    holds every trial exactly once, each complete with the value its trial reported."""
    sweep = load_sweep(write_sweep(tmp_path, OPTUNA, "concurrent"),
                       [f"tune.output_dir={tmp_path}", "tune.max_concurrent_trials=2"])
    folder, first = run_search(sweep, callbacks=[InterruptAfter(3, tmp_path / "interrupted")])
    assert (tmp_path / "interrupted").exists()
    finished_before = {tuple(r.config[k] for k in ("zo.lr", "zo.eps")) for r in first
                       if r.metrics and r.metrics.get("round") == 2}
    assert 3 <= len(finished_before) < 6
    _, resumed = run_search(sweep, folder, resume=True)
    points = proposals(resumed)
    assert len(points) == 6 and len(set(points)) == 6           # none repeated
    assert finished_before <= set(points)                       # none lost
    from optuna.trial import TrialState

    study = searcher_trials(folder)
    assert [t.state for t in study] == [TrialState.COMPLETE] * 6  # the searcher knows every one
    told = sorted((t.params["zo.lr"], t.params["zo.eps"], t.value) for t in study)
    assert told == sorted((lr, eps, pytest.approx(score(lr, eps))) for lr, eps in points)


def random_points(sweep) -> list[tuple]:
    """The trials Tune's variant generator makes for a random sweep (in-process: no cluster)."""
    from ray.tune.experiment import Experiment

    from meerkat_ray.distributed.tune import param_space, searcher

    alg, _ = searcher(sweep)
    alg.add_configurations([Experiment("x", lambda config: None, config=param_space(sweep), num_samples=sweep.tune.num_samples,
                                       storage_path=str(sweep.folder))])
    points = []
    while (trial := alg.next_trial()) is not None:
        points.append((trial.config["zo.lr"], trial.config["zo.eps"]))
    return points


def test_random_search_is_seeded_and_mixes_with_the_grid(tmp_path):
    body = """grid: {zo.eps: [1.0e-3, 1.0e-2]}
space: {zo.lr: {loguniform: [1.0e-5, 1.0e-1]}}
tune: {search: random, num_samples: 3, seed: 3}
"""
    path = write_sweep(tmp_path, body)
    a, b = (random_points(load_sweep(path, [f"tune.output_dir={tmp_path}"])) for _ in range(2))
    c = random_points(load_sweep(path, [f"tune.output_dir={tmp_path}", "tune.seed=4"]))
    assert len(a) == 6 and sorted(e for _, e in a) == [1e-3] * 3 + [1e-2] * 3  # every grid point, 3 samples
    assert all(1e-5 <= lr <= 1e-1 for lr, _ in a) and len({lr for lr, _ in a}) == 6
    assert a == b and a != c
    logs = sorted(math.log10(lr) for lr, _ in random_points(load_sweep(path, ["tune.num_samples=200"])))
    assert logs[0] < -4.5 and logs[-1] > -1.5 and -3.5 < logs[len(logs) // 2] < -2.5  # uniform in log space


def test_the_searcher_state_is_optuna_not_a_default(tmp_path):
    """make_tuner builds Tune's OptunaSearch around a seeded TPE sampler with the sweep's startup
    trials, and Tune's seeded variant generator for grid and random search."""
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from meerkat_ray.distributed.tune import searcher

    sweep = load_sweep(write_sweep(tmp_path, OPTUNA), ["tune.max_concurrent_trials=2"])
    alg, limit = searcher(sweep)
    assert isinstance(alg, OptunaSearch) and limit == 2
    sampler = pickle.loads(pickle.dumps(alg._sampler))
    assert sampler._n_startup_trials == 2
    sweep = load_sweep(write_sweep(tmp_path, "space: {zo.lr: {uniform: [0.1, 0.2]}}\ntune: {search: random, seed: 5}\n"))
    alg, limit = searcher(sweep)
    assert isinstance(alg, BasicVariantGenerator) and limit is None


# ----------------------------------------------------------------------------- the search files

def test_the_search_files_search_what_they_say(tmp_path):
    lr = load_sweep(ROOT / "tune_configs" / "lr_search.yaml")
    assert lr.tune.search == "optuna" and lr.tune.scheduler == "asha" and lr.tune.num_samples == 12
    assert set(lr.space) == {"zo.lr", "zo.eps"} and not lr.grid
    assert all(next(iter(spec)) == "loguniform" for spec in lr.space.values())
    assert {c.model.name for c in lr.corners} == {"smollm2-135m"}  # the embedded model
    assert lr.configs[0].tracking.mlflow_uri.startswith("sqlite:///")
    vp = load_sweep(ROOT / "tune_configs" / "vp_search.yaml")
    assert vp.tune.search == "random" and set(vp.space) == {"vp.sigma", "vp.rho", "vp.calib_steps"}
    assert {c.vp.calib_steps for c in vp.corners} == {20, 100} and all(c.vp.enabled for c in vp.corners)
    for name in ("lr_search", "vp_search"):
        head = (ROOT / "tune_configs" / f"{name}.yaml").read_text().split("\nbase:")[0]
        assert f"meerkat-ray tune tune_configs/{name}.yaml --resume" in head and "meerkat-ray analyze" in head


@pytest.mark.ray
@pytest.mark.slow
def test_a_tiny_optuna_search_runs_end_to_end_and_is_analysed(ray_cluster, tmp_path):
    """Through the CLI on tiny federations: the results carry the sampled values, and `analyze`
    draws the metric against each searched key, the best-so-far curve and lists the best trials."""
    from analysis import analyze

    args = ["tune", str(ROOT / "tune_configs" / "smoke_search.yaml"), "tune.search=optuna", "tune.name=optuna",
            f"tune.output_dir={tmp_path}", "base.mask.cache=false", "--quiet"]
    assert main(args) == 0
    folder = tmp_path / "optuna"
    table = pd.read_parquet(folder / "results.parquet")
    assert len(table) == 2 and (table["status"] == "done").all()
    assert table["zo.lr"].between(1e-4, 1e-2).all() and set(table["fed.local_steps"]) <= {1, 2, 3}
    assert sorted(table["trial_index"]) == list(table["trial_index"]) and table["trial_index"].is_unique
    for run_dir, lr, steps in zip(table["run_dir"], table["zo.lr"], table["fed.local_steps"]):
        config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())  # each trial ran what the table says
        assert config["zo"]["lr"] == lr and config["fed"]["local_steps"] == steps
    report = analyze(folder)
    names = {p.name for p in report.figures}
    assert {"search_keys.png", "search_best_so_far.png"} <= names
    page = report.html.read_text()
    assert "Best trials (by accuracy, max)" in page and "optuna search over" in page


def test_search_figures_use_log_axes_for_log_sampled_keys_and_track_the_best():
    from analysis import search

    space = {"zo.lr": {"loguniform": [1e-5, 1e-2]}, "fed.local_steps": {"randint": [1, 5]}}
    table = pd.DataFrame({"run": ["t2", "t0", "t1"], "zo.lr": [1e-4, 1e-3, 1e-2], "fed.local_steps": [1, 2, 4],
                          "final_accuracy": [0.5, 0.7, 0.6], "final_test_loss": [0.9, 0.6, 0.7],
                          "best_accuracy": [0.5, 0.7, 0.6], "status": "done", "rounds": "2/2"})
    fig = search.against_keys(table, space)
    assert [ax.get_xscale() for ax in fig.axes] == ["log", "linear", "log", "linear"]  # rows: accuracy, loss
    order = pd.Series([2, 0, 1])  # proposed: t0, t1, t2 (no results table: by name)
    fig = search.best_so_far(table, order)
    best = fig.axes[0].lines[0].get_ydata()
    assert list(best) == [0.7, 0.7, 0.7]  # t0 = 0.7 first, then 0.6, 0.5 never beat it
    loss = fig.axes[1].lines[0].get_ydata()
    assert list(loss) == [0.6, 0.6, 0.6]
    top = search.best_trials(table, space, "test_loss", "min", order)
    assert list(top["run"]) == ["t0", "t1", "t2"] and list(top["trial"]) == [1, 2, 3]
