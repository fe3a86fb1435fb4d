"""Every registered variant on the tiny model - aggregation rule, selection policy, client
algorithm, mask kind, partition - and a sampled run
(fed.clients_per_round) checked against the documented draw, its weights and the independent
audit of path.parquet."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import FLAG_ALL, TINY_RUN
from test_e2e import audit_replay
from test_strategies import documented_draw

from meerkat_ray.algorithms import ALGORITHMS
from meerkat_ray.config import load_config
from meerkat_ray.mask_kinds import MASK_SCORES
from meerkat_ray.partition import PARTITIONS
from meerkat_ray.replay import replay_path, replay_run
from meerkat_ray.runlog import load_theta, read_metrics, read_path
from meerkat_ray.runner import run_experiment
from meerkat_ray.strategies.aggregation import AGGREGATIONS
from meerkat_ray.strategies.policies import POLICIES

pytestmark = pytest.mark.slow

BASE = TINY_RUN + ["data.num_train=64", "data.partition=iid", "fed.local_steps=2", "fed.eval_every=2",
                   "vp.calib_steps=2", *FLAG_ALL, "executor=local", "seed=0"]
# policies switched on by a key of their own (not a vp.policy choice): how the table turns each on
SWITCHED_ON = {"clients_per_round": ["fed.clients_per_round=2"]}
BASE_CHOICE = {"fed.algorithm": "sparse_zo", "mask.kind": "pretrain_grad", "data.partition": "iid"}  # in BASE already
VARIANTS = ([(f"aggregation={n}", [f"fed.aggregation={n}"]) for n in AGGREGATIONS]
            + [(f"policy={n}", [f"vp.policy={n}"] if p.choice_of else SWITCHED_ON[n]) for n, p in POLICIES.items()]
            + [(f"{key}={n}", [f"{key}={n}"]) for key, names in
               (("fed.algorithm", ALGORITHMS), ("mask.kind", MASK_SCORES), ("data.partition", PARTITIONS))
               for n in names if n != BASE_CHOICE[key]])


def run(tmp_path, name, *extra):
    cfg = load_config(None, [*BASE, *extra, f"name={name}", f"output_dir={tmp_path}"])
    run_experiment(cfg, progress=False)
    return cfg, tmp_path / name


PINNED = json.loads((Path(__file__).parent / "fixtures" / "variant_digests.json").read_text())["variants"]


def digests(run_dir) -> dict:
    """sha256 of sparse_final's float32 bytes, and of path.parquet column by column (name, values)."""
    path, h = read_path(run_dir), hashlib.sha256()
    for column in path.columns:
        h.update(column.encode())
        h.update(path[column].to_numpy().tobytes())
    theta = load_theta(run_dir / "sparse_final.safetensors").numpy().tobytes()
    return {"sparse_final": hashlib.sha256(theta).hexdigest(), "path": h.hexdigest()}


@pytest.mark.parametrize("ident,extra", VARIANTS, ids=[i for i, _ in VARIANTS])
def test_every_registered_variant_runs_and_replays(tmp_path, ident, extra):
    """... and ends with the bits it had before the code was reorganised (digests pinned at
    6758c49: a variant registered since has no pin yet and must get one)."""
    cfg, run_dir = run(tmp_path, "v", "data.num_clients=3", "fed.rounds=2", *extra)
    assert digests(run_dir) == PINNED[ident], ident
    init, final = load_theta(run_dir / "sparse_init.safetensors"), load_theta(run_dir / "sparse_final.safetensors")
    path = read_path(run_dir)
    assert not torch.equal(init, final)
    replayable = ALGORITHMS[cfg.fed.algorithm].replayable
    assert json.loads((run_dir / "summary.json").read_text())["replayable"] is replayable
    if replayable:  # a first-order run says it is not and is refused (tests/test_algorithms.py)
        assert torch.equal(replay_run(run_dir), final)
    flagged = read_metrics(run_dir)[1]["flagged_clients"]
    steps = path[path["round"] == 2].groupby("client").size()
    assert all(count == (1 if k in flagged else 2) for k, count in steps.items())


def test_a_sampled_run_plans_the_draw_and_replays_bit_for_bit(tmp_path):
    K, M, ROUNDS = 4, 2, 3
    _, run_dir = run(tmp_path, "sampled", f"data.num_clients={K}", f"fed.clients_per_round={M}",
                     f"fed.rounds={ROUNDS}")
    path, metrics = read_path(run_dir), read_metrics(run_dir)
    sizes = {c["client"]: c["size"] for c in json.loads((run_dir / "clients.json").read_text())}
    calibrated = documented_draw(0, 1, K, M)
    for r in range(1, ROUNDS + 1):
        rows = path[path["round"] == r]
        drawn = documented_draw(0, r, K, M)
        assert sorted(rows["client"].unique()) == drawn == metrics[r]["participants"]
        total = sum(sizes[k] for k in drawn)
        for k, group in rows.groupby("client"):
            assert (group["weight"] == sizes[k] / total).all()
            assert len(group) == (1 if r > 1 and k in calibrated else 2)  # Meerkat-vp's flags, when sampled
        assert metrics[r]["flagged_clients"] == calibrated
    init = load_theta(run_dir / "sparse_init.safetensors")
    final = load_theta(run_dir / "sparse_final.safetensors")
    assert torch.equal(audit_replay(init, path), final)
    assert torch.equal(replay_path(init, path), final)


@pytest.mark.ray
def test_a_sampled_run_on_ray_is_bit_identical_to_local(ray_cluster, tmp_path):
    from conftest import assert_same_run

    sampled = ["data.num_clients=5", "fed.clients_per_round=3", "fed.rounds=2"]
    run(tmp_path, "local", *sampled)
    run(tmp_path, "ray", *sampled, "executor=ray", "ray.num_actors=2", "ray.cpus_per_client=0.5")
    assert_same_run(tmp_path / "local", tmp_path / "ray")
    assert read_metrics(tmp_path / "ray")[1]["participants"] == documented_draw(0, 1, 5, 3)
