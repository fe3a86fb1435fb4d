"""Every registered variant on the tiny model - aggregation rule, selection policy, client
algorithm, mask kind paired with a partition - and a sampled run (fed.clients_per_round), checked
against the documented draw, its weights and an independent audit of path.parquet written from each
rule's contract."""

import hashlib
import itertools
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RUN
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

# With vp.calib_steps=2 each phase is one step: rho_later = |GradIP_0| / |GradIP_1|, and sigma = 1e6
# makes every late step quiet, so VPCS flags exactly the clients with rho_later > 0.1 - on this
# setting clients 0 and 2 of 3, a strict subset (so `random`, stopping as many, can differ from it).
SUBSET = ["vp.rho=0.1", "vp.sigma=1e6", "vp.min_quiet_fraction=0"]
BASE = TINY_RUN + ["data.num_train=64", "data.partition=iid", "fed.local_steps=2", "fed.eval_every=2",
                   "vp.calib_steps=2", *SUBSET, "executor=local", "seed=0"]
# policies switched on by a key of their own (not a vp.policy choice): how the table turns each on
SWITCHED_ON = {"clients_per_round": ["fed.clients_per_round=2"]}
BASE_CHOICE = {"fed.algorithm": "sparse_zo", "mask.kind": "pretrain_grad", "data.partition": "iid"}  # in BASE already


def paired(*keys_and_names) -> list[tuple[str, list[str]]]:
    """Choices of independent keys (mask kind, partition) share runs: the i-th other choice of each
    key in one run (a key with fewer choices keeps its base choice there)."""
    columns = [[f"{key}={n}" for n in names if n != BASE_CHOICE[key]] for key, names in keys_and_names]
    rows = [[o for o in row if o] for row in itertools.zip_longest(*columns, fillvalue="")]
    return [("+".join(row), row) for row in rows]


VARIANTS = ([(f"aggregation={n}", [f"fed.aggregation={n}"]) for n in AGGREGATIONS]
            + [(f"policy={n}", [f"vp.policy={n}"] if p.choice_of else SWITCHED_ON[n]) for n, p in POLICIES.items()]
            + [(f"fed.algorithm={n}", [f"fed.algorithm={n}"]) for n in ALGORITHMS if n != BASE_CHOICE["fed.algorithm"]]
            + paired(("mask.kind", MASK_SCORES), ("data.partition", PARTITIONS)))


def trimmed_mean(beta: float):
    """fed.trim_fraction's contract: drop the floor(beta m) lowest and highest of m, mean of the rest."""
    def location(values):
        cut = math.floor(beta * len(values))
        kept = sorted(values)[cut: len(values) - cut]
        return statistics.fmean(kept)
    return location


# each rule from its written contract (strategies/aggregation.py), not from its code
LOCATIONS = {"mean": lambda cfg: None, "median": lambda cfg: statistics.median,
             "trimmed_mean": lambda cfg: trimmed_mean(cfg["fed"]["trim_fraction"])}


def run(tmp_path, name, *extra):
    cfg = load_config(None, [*BASE, *extra, f"name={name}", f"output_dir={tmp_path}"])
    run_experiment(cfg, progress=False)
    return cfg, tmp_path / name


PINS = json.loads((Path(__file__).parent / "fixtures" / "variant_digests.json").read_text())["by_cpu_capability"]


def pinned(ident: str) -> dict:
    """The pin of a variant on this machine's kind of vector unit (float bits depend on it)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in PINS:
        pytest.fail(f"no pinned digests for CPU capability {capability} (pinned: {sorted(PINS)}): take them at "
                    "6758c49 with tests/fixtures/take_variant_digests.py and add them to variant_digests.json")
    return PINS[capability][ident]


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
    assert digests(run_dir) == pinned(ident), ident
    final = load_theta(run_dir / "sparse_final.safetensors")
    path = read_path(run_dir)
    replayable = ALGORITHMS[cfg.fed.algorithm].replayable
    assert json.loads((run_dir / "summary.json").read_text())["replayable"] is replayable
    if replayable:  # a first-order run says it is not and is refused (tests/test_algorithms.py)
        stored = yaml.safe_load((run_dir / "config.yaml").read_text())
        location = LOCATIONS[stored["fed"]["aggregation"]](stored)
        init = load_theta(run_dir / "sparse_init.safetensors")
        assert torch.equal(audit_replay(init, path, location), final)
        assert torch.equal(replay_run(run_dir), final)
    flagged = read_metrics(run_dir)[1]["flagged_clients"]
    steps = path[path["round"] == 2].groupby("client").size()
    assert all(count == (1 if k in flagged else 2) for k, count in steps.items())


def vpcs_flags_of_two_steps(path) -> list[int]:
    """SUBSET's flags from round 1's grad_ip column: |GradIP_0| / |GradIP_1| > 0.1."""
    round_1 = path[path["round"] == 1].sort_values(["client", "step"])
    return sorted(int(k) for k, rows in round_1.groupby("client")
                  if abs(rows["grad_ip"].iloc[0]) / abs(rows["grad_ip"].iloc[1]) > 0.1)


def test_gradip_stops_a_strict_subset_and_random_as_many_others(tmp_path):
    """On BASE, VPCS stops what its formula gives (a strict, non-empty subset), and `random` stops
    as many clients - here not the same ones - each of which then runs 1 step per round."""
    runs = {name: run(tmp_path, name, "data.num_clients=3", "fed.rounds=3", f"vp.policy={name}")[1]
            for name in ("gradip", "random")}
    paths = {name: read_path(d) for name, d in runs.items()}
    expected = vpcs_flags_of_two_steps(paths["gradip"])
    assert 0 < len(expected) < 3
    stopped = {name: read_metrics(d)[1]["flagged_clients"] for name, d in runs.items()}
    assert stopped["gradip"] == expected
    assert len(stopped["random"]) == len(expected) and stopped["random"] != expected
    assert paths["random"][paths["random"]["round"] == 1].equals(paths["gradip"][paths["gradip"]["round"] == 1])
    for name, path in paths.items():
        for r in (2, 3):
            steps = path[path["round"] == r].groupby("client").size()
            assert {k: n for k, n in steps.items()} == {k: 1 if k in stopped[name] else 2 for k in range(3)}


def test_first_order_ends_at_the_fedavg_of_the_clients_finals(tmp_path, monkeypatch):
    """w = sum_k p_k theta_k (float64 sum in client order, one fp32 rounding) over the uploads of the
    last round, p_k from path.parquet's weight column: recomputed here from the values each client
    uploaded (caught on their way out of the client)."""
    from meerkat_ray.algorithms.first_order import FirstOrder

    uploads = {}
    make_result = FirstOrder.make_result

    def catching(self, plan, outcome, *args, **kwargs):
        uploads[(plan.round, plan.client)] = outcome.values.clone()
        return make_result(self, plan, outcome, *args, **kwargs)

    monkeypatch.setattr(FirstOrder, "make_result", catching)
    _, run_dir = run(tmp_path, "fo", "data.num_clients=3", "fed.rounds=2", "fed.algorithm=first_order")
    path = read_path(run_dir)
    weights = path[path["round"] == 2].groupby("client")["weight"].first()
    assert sorted(k for r, k in uploads if r == 2) == list(weights.index) == [0, 1, 2]
    total = torch.zeros_like(uploads[(2, 0)], dtype=torch.float64)
    for k, p in weights.items():
        total += float(p) * uploads[(2, k)].double()
    final = load_theta(run_dir / "sparse_final.safetensors")
    assert torch.equal(total.float(), final)
    assert not torch.equal(uploads[(2, 0)], uploads[(2, 1)])  # the clients did end apart


def test_a_sampled_run_plans_the_draw_and_replays_bit_for_bit(tmp_path):
    K, M, ROUNDS = 4, 2, 3
    _, run_dir = run(tmp_path, "sampled", f"data.num_clients={K}", f"fed.clients_per_round={M}",
                     f"fed.rounds={ROUNDS}")
    path, metrics = read_path(run_dir), read_metrics(run_dir)
    sizes = {c["client"]: c["size"] for c in json.loads((run_dir / "clients.json").read_text())}
    calibrated = documented_draw(0, 1, K, M)
    flagged = vpcs_flags_of_two_steps(path)  # VPCS decides on the clients it calibrated in round 1
    assert flagged and set(flagged) < set(calibrated) and sorted(path[path["round"] == 1]["client"].unique()) == calibrated
    for r in range(1, ROUNDS + 1):
        rows = path[path["round"] == r]
        drawn = documented_draw(0, r, K, M)
        assert sorted(rows["client"].unique()) == drawn == metrics[r]["participants"]
        total = sum(sizes[k] for k in drawn)
        for k, group in rows.groupby("client"):
            assert (group["weight"] == sizes[k] / total).all()
            assert len(group) == (1 if r > 1 and k in flagged else 2)  # Meerkat-vp's flags, when sampled
        assert metrics[r]["flagged_clients"] == flagged
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
