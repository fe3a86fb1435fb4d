"""The server strategy is built once from the config, and the server and the replay of a run folder
both build its aggregation rule from the run's config: a rule with a parameter of its own replays
with the run's value, with no edit to the server or the replay."""

import pytest
import torch
from conftest import TINY_RUN, run_folder

from meerkat_ray.config import load_config
from meerkat_ray.config_checks import CHOICES
from meerkat_ray.messages import Term
from meerkat_ray.replay import replay_path, replay_run
from meerkat_ray.runlog import load_theta, read_path
from meerkat_ray.strategies.aggregation import AGGREGATIONS, Mean, make_rule
from meerkat_ray.strategies.strategy import ServerStrategy, rule_for

BASE = TINY_RUN + ["data.num_train=48", "data.num_clients=3", "data.partition=iid", "fed.rounds=2",
                   "fed.local_steps=2", "vp.enabled=false", "executor=local", "seed=0"]


@pytest.fixture
def shrunk_mean(monkeypatch):
    """A rule that is not in the package: FedAvg with every coefficient scaled by (1 - shrink),
    where shrink is the FedConfig key it names (fed.trim_fraction serves as one)."""
    class ShrunkMean(Mean):
        name = "shrunk_mean"
        params = ("trim_fraction",)

        def __init__(self, trim_fraction: float = 0.0):
            self.shrink = trim_fraction

        def combine(self, paths, sharing):
            return [Term(t.seed, t.lr, t.coef * (1.0 - self.shrink)) for t in super().combine(paths, sharing)]

    monkeypatch.setitem(AGGREGATIONS, "shrunk_mean", ShrunkMean)
    monkeypatch.setitem(CHOICES, "fed.aggregation", (*CHOICES["fed.aggregation"], "shrunk_mean"))
    return ShrunkMean


def test_a_rule_with_its_own_parameter_replays_with_the_runs_value(tmp_path, shrunk_mean):
    run_dir = run_folder(BASE, tmp_path, "shrunk", "fed.aggregation=shrunk_mean", "fed.trim_fraction=0.4")
    final = load_theta(run_dir / "sparse_final.safetensors")
    init = load_theta(run_dir / "sparse_init.safetensors")
    assert torch.equal(replay_run(run_dir), final)
    path = read_path(run_dir)
    # the parameter matters: the rule's default, or plain FedAvg, replays to other values
    assert not torch.equal(replay_path(init, path, rule=shrunk_mean()), final)
    assert not torch.equal(replay_path(init, path), final)
    # and the run moved exactly 0.6 of FedAvg's coefficients: recomputed from path.parquet by hand
    theta = init.clone()
    for _, rows in path.groupby("round", sort=True):
        for step, group in rows.sort_values(["step", "client"]).groupby("step", sort=True):
            seed, lr = int(group["seed"].iloc[0]), float(group["lr"].iloc[0])
            coef = 0.0
            for weight, scalar in zip(group["weight"], group["scalar"]):
                coef += float(weight) * float(scalar)
            z = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(seed))
            theta.add_(z, alpha=-(lr * coef * 0.6))
    assert torch.equal(theta, final)


def test_the_rule_is_built_with_the_runs_values_of_its_parameters():
    cfg = load_config(None, ["fed.aggregation=trimmed_mean", "fed.trim_fraction=0.3"])
    assert rule_for(cfg).trim_fraction == 0.3
    assert ServerStrategy(cfg, 4).rule.trim_fraction == 0.3
    with pytest.raises(TypeError):  # a rule takes the parameters it names, nothing else
        make_rule("median", trim_fraction=0.3)


def test_the_strategy_state_round_trips_and_rebuilds_the_same_decisions():
    cfg = load_config(None, ["data.num_clients=4", "fed.clients_per_round=2", "vp.calib_steps=4",
                             "fed.local_steps=2", "vp.rho=1e-6", "vp.sigma=1e6", "vp.min_quiet_fraction=0",
                             "vp.policy=random"])
    a = ServerStrategy(cfg, 4)
    for round_ in (1, 2):
        participants = a.participants(round_)
        grad_ips = {k: [float(k + t + 1) for t in range(a.steps_for(k, round_))] for k in participants}
        a.end_round(round_, participants, {k: [0.5] * len(v) for k, v in grad_ips.items()}, grad_ips)
    b = ServerStrategy(cfg, 4)
    b.load_state(a.state_dict())
    assert b.flagged == a.flagged and b.state_dict() == a.state_dict()
    assert [b.participants(r) for r in (3, 4)] == [a.participants(r) for r in (3, 4)]
    assert [b.steps_for(k, 3) for k in range(4)] == [a.steps_for(k, 3) for k in range(4)]
