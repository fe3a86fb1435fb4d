"""Federation on a real local Ray cluster (one per session, `ray_cluster` in conftest.py):
executor=ray against executor=local bit for bit, fractional-GPU packing, a lost actor.
(1,000 virtual clients on one actor at the memory of 10: tests/test_memory.py.)"""

import time

import pytest
import torch

from meerkat_ray.config import load_config
from meerkat_ray.experiment import build_worker, prepare_data, prepare_model
from meerkat_ray.runlog import load_theta, read_metrics, read_path
from meerkat_ray.runner import run_experiment
from meerkat_ray.server import Server

TINY = ["model.name=tiny-llama", "data.task=tweets2", "data.max_length=32", "data.num_test=32",
        "mask.calib_num_seqs=2", "mask.calib_seq_len=32", "mask.cache=false"]
RUN = TINY + ["data.num_train=120", "data.num_clients=5", "data.partition=mixed", "data.batch_size=4",
              "mask.density=0.01", "zo.lr=1e-2", "fed.rounds=2", "fed.local_steps=3", "vp.calib_steps=3",
              "vp.rho=1e-6", "vp.sigma=1e6", "vp.min_quiet_fraction=0"]  # VPCS flags clients after round 1


def config(*overrides):
    return load_config(None, [*RUN, *overrides])


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    run_experiment(config("executor=local", "model.num_threads=1", "name=local", f"output_dir={root}"),
                   progress=False)
    return root / "local"


def run_as_a_tune_trial(ray, cfg):
    """Run a federation where a Tune trial would: in a placement group laid out by `trial_bundles`,
    from a task in bundle 0 whose child actors the group captures."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from meerkat_ray.distributed.cluster import CONTROL_CPUS, trial_bundles
    from meerkat_ray.distributed.executor import RayExecutor

    @ray.remote
    def trial(cfg):
        assert RayExecutor._own_placement_group(cfg) is not None  # actors go to bundles 1 (server), 2.. (clients)
        return run_experiment(cfg, progress=False)

    pg = placement_group(trial_bundles(cfg))
    try:
        ray.get(pg.ready(), timeout=300)  # generous: CI machines may be loaded
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0,
                                                    placement_group_capture_child_tasks=True)
        return ray.get(trial.options(num_cpus=CONTROL_CPUS, scheduling_strategy=strategy).remote(cfg), timeout=900)
    finally:
        remove_placement_group(pg)


@pytest.mark.ray
@pytest.mark.parametrize("num_actors,as_trial", [(1, True), (2, False)], ids=["1-actor-in-trial-pg", "2-actors"])
def test_ray_backend_is_bit_identical_to_local(ray_cluster, local_run, tmp_path, num_actors, as_trial):
    cfg = config("executor=ray", f"ray.num_actors={num_actors}", "ray.cpus_per_client=0.5", "name=ray",
                 f"output_dir={tmp_path}")
    summary = run_as_a_tune_trial(ray_cluster, cfg) if as_trial else run_experiment(cfg, progress=False)
    run = tmp_path / "ray"
    assert torch.equal(load_theta(run / "sparse_final.safetensors"), load_theta(local_run / "sparse_final.safetensors"))
    assert read_path(run).equals(read_path(local_run))
    timeless = [{k: v for k, v in m.items() if not k.endswith("_s")} for m in read_metrics(run)]
    assert timeless == [{k: v for k, v in m.items() if not k.endswith("_s")} for m in read_metrics(local_run)]
    assert summary["flagged_clients"]  # the server actor ran VPCS: flagged clients ran 1 step in round 2
    assert ray_cluster.is_initialized()  # the session's cluster was used, not replaced or shut down


@pytest.fixture(scope="module")
def round_one():
    """Round-1 plans of a 16-client federation and the results of an in-process worker."""
    cfg = config("data.num_clients=16", "executor=ray", "ray.num_actors=4", "ray.gpus_per_client=0.5",
                 "ray.cpus_per_client=0.25", "vp.enabled=false")  # ~7 examples a client: too few to calibrate
    data = prepare_data(cfg)
    lm, mask, theta = prepare_model(cfg, progress=False)
    plans = Server(cfg, theta, mask.pretrain_grad, data.client_sizes).plan_round(1)
    worker = build_worker(cfg, data, lm, mask, theta)
    return cfg, data, mask, theta, plans, [worker.run(p) for p in plans]


@pytest.mark.ray
def test_four_actors_share_two_gpus_and_serve_a_queue(ray_cluster, round_one):
    from meerkat_ray.distributed.executor import RayExecutor

    cfg, data, mask, theta, plans, expected = round_one
    executor = RayExecutor(cfg, data)
    try:
        assert torch.equal(executor.theta0, theta)  # actor 0's mask pass = this process's
        assert all(torch.equal(executor.mask.indices[k], v) for k, v in mask.indices.items())
        infos = executor.actor_info()  # every actor answers: all 4 are alive at the same time
        assert len({i["pid"] for i in infos}) == 4
        gpu_ids = sorted(i["gpu_ids"][0] for i in infos)
        assert gpu_ids == ["0"] * 2 + ["1"] * 2  # 2 x 0.5 of each logical GPU
        assert ray_cluster.available_resources().get("GPU", 0.0) == 0.0
        assert all(i["device"] == "cpu" for i in infos)  # logical GPUs: the models stay on the CPU

        results = executor.run_clients(plans)
        assert {r.worker for r in results} == {f"client-actor-{i}" for i in range(4)}  # all served clients
        assert [(r.client, r.scalars, r.losses) for r in results] == [(r.client, r.scalars, r.losses) for r in expected]
        few = executor.run_clients(plans[:4])  # as many clients as actors: one each, no actor idle
        assert sorted(r.worker for r in few) == sorted(f"client-actor-{i}" for i in range(4))

        executor.fault_counts()
        for actor in executor.actors[:2]:  # lose two actors: their clients re-run, fresh actors take their slots
            ray_cluster.kill(actor)
        again = executor.run_clients(plans)
        counts = executor.fault_counts()  # the replacements join once started (maybe after this round)
        assert len(executor.actors) + len(executor.starting) == 4 and counts["actor_restarts"] == 2
        assert counts["pool_shrinks"] == 2 and counts["pool_regrowths"] == len(executor.actors) - 2
        assert [(r.client, r.scalars) for r in again] == [(r.client, r.scalars) for r in expected]
    finally:
        executor.close()
    deadline = time.monotonic() + 20
    while ray_cluster.available_resources().get("GPU", 0.0) < 2.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("GPU", 0.0) == 2.0  # released by close()


@pytest.mark.parametrize("address,says", [("127.0.0.1:1", "no Ray cluster answers"), ("localhost", "no Ray cluster")])
def test_an_unreachable_address_is_refused_in_seconds(monkeypatch, capsys, tmp_path, address, says):
    import ray

    from meerkat_ray.cli import main

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init reached with an unreachable address"))
    assert main(["run", *RUN, "executor=ray", f"ray.address={address}", f"output_dir={tmp_path}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ray.address: ") and says in err[0]


@pytest.mark.ray
def test_a_run_whose_actors_cannot_fit_the_cluster_stops_with_an_error_not_a_wait(ray_cluster, tmp_path, capsys):
    """3 client actors of 1 CPU (+ the server's 0.25) on the 2-CPU test cluster can never be placed:
    the run stops after ray.actor_setup_timeout_s with one error line (exit 2) naming what it needs
    and what the cluster has, and the unplaced actors are gone (a 2-CPU task runs right after)."""
    from conftest import TINY_RUN

    from meerkat_ray.cli import main

    rc = main(["run", "--quiet", *TINY_RUN, "data.num_train=40", "data.num_test=4", "vp.enabled=false",
               "executor=ray", "ray.num_actors=3", "ray.cpus_per_client=1", "ray.actor_setup_timeout_s=2",
               f"output_dir={tmp_path}"])
    assert rc == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    for part in ("did not start within 2 s", "ray.actor_setup_timeout_s", "needs 3.25 CPUs", "has 2 CPUs"):
        assert part in errors[0], (part, errors[0])

    @ray_cluster.remote(num_cpus=2)
    def whole_cluster():
        return 1

    assert ray_cluster.get(whole_cluster.remote(), timeout=60) == 1
