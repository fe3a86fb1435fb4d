"""Multi-node scenarios on a real Ray cluster of several nodes (`ray.cluster_utils.Cluster`: a head
without CPUs or GPUs for work, plus worker nodes with one logical GPU each). tests/test_multinode.py
runs each in a process of its own: a hang becomes that test's timeout, and this cluster never meets
the test session's own Ray. Every process it starts belongs to the Cluster object and stops with it.

    python tests/multinode.py lost-node OUT_DIR key=value ...

lost-node: a federation of 2 client actors at 1 GPU each, one per worker node, whose server actor
shares a node with one of them. In round KILL_ROUND, right after the first client result, the
server's node is removed: its client actor and the server actor die, the other node has no GPU to
spare, so the client's replacement cannot be placed. After that round a third node joins; the test
waits until the replacement is up. OUT_DIR/events.json says what happened; OUT_DIR/multi is the run.

    python tests/multinode.py lost-node-sweep OUT_DIR SWEEP.yaml key=value ...

lost-node-sweep: see `lost_node_sweep`; OUT_DIR/results.parquet is the sweep's results table.
"""
import json
import sys
from pathlib import Path

KILL_ROUND = 2


def lost_node(out: Path, overrides: list[str]) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from meerkat_ray.distributed import executor as ray_executor
    from meerkat_ray.config import load_config
    from meerkat_ray.runner import run_experiment

    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        events: dict = {"pool": {}}
        executors = []
        real_init, real_run = ray_executor.RayExecutor.__init__, ray_executor.RayExecutor.run_clients

        def init(self, *args, **kwargs):
            real_init(self, *args, **kwargs)
            executors.append(self)

        def run_clients(self, plans, on_result=None):
            def after_result(result):
                if on_result:
                    on_result(result)
                if result.round == KILL_ROUND and "killed" not in events:
                    node = self.server.node
                    victim = next(w for w in workers if w.node_id == node)
                    events["killed"] = {"node": node, "round": result.round,
                                        "client_actors_there": sum(n == node for n in self.node_of.values())}
                    cluster.remove_node(victim)
            return real_run(self, plans, after_result)

        def on_round(round_, metrics, last, checkpoint):
            ex = executors[0]
            events["pool"][round_] = len(ex.actors)
            if round_ == KILL_ROUND:
                events["starting_after_loss"] = len(ex.starting)
                cluster.add_node(num_cpus=2, num_gpus=1)  # the autoscaler's part: capacity returns
                ready, _ = ray.wait(list(ex.starting), num_returns=len(ex.starting), timeout=120)
                events["replacements_up"] = len(ready)

        ray_executor.RayExecutor.__init__, ray_executor.RayExecutor.run_clients = init, run_clients
        cfg = load_config(None, [*overrides, "name=multi", f"output_dir={out}"])
        run_experiment(cfg, progress=False, on_round=on_round)
        events["server_node_after"] = executors[0].server.node
        (out / "events.json").write_text(json.dumps(events))
    finally:
        ray.shutdown()
        cluster.shutdown()


def trial_losing_its_node(params, base, runs_dir):
    """run_trial, except that the first trial to report round LOST_ROUND (first attempt) tells the
    driver its node (OUT/lose-node) and waits there until the node is removed under it."""
    import os
    import time

    import ray
    from ray import tune as ray_tune

    from meerkat_ray.distributed import tune as sweep_tune

    real = ray_tune.report
    marker = Path(os.environ["MEERKAT_TEST_OUT"]) / "lose-node"

    def report(metrics, checkpoint=None):
        real(metrics, checkpoint=checkpoint)
        if metrics["round"] == LOST_ROUND:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, json.dumps({"node": ray.get_runtime_context().get_node_id(),
                                     "trial": ray_tune.get_context().get_trial_id()}).encode())
            os.close(fd)
            time.sleep(120)  # the node goes away under this process

    ray_tune.report = report
    try:
        sweep_tune.run_trial(params, base, runs_dir)
    finally:
        ray_tune.report = real


LOST_ROUND = 2


def lost_node_sweep(out: Path, overrides: list[str]) -> None:
    """A sweep of 2 trials at 2 CPUs each on 2 worker nodes of 2 CPUs (one trial per node), run
    folders at a file:// URI, each node with its own scratch folder. The node of the first trial
    to report round LOST_ROUND is removed; Tune retries that trial from its checkpoint on the node
    left (once the other trial has finished there). OUT/events.json: what was lost."""
    import os
    import threading
    import time

    import ray
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    from meerkat_ray.sweep_file import load_sweep
    from meerkat_ray.distributed.tune import make_tuner, open_sweep_folder, results_table, write_results

    os.environ["MEERKAT_TEST_OUT"] = str(out)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # trial processes cannot import tests/
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False})
    try:
        workers, scratch = {}, {}
        for i in range(2):
            node = cluster.add_node(num_cpus=2, env_vars={"MEERKAT_RAY_SCRATCH": str(out / f"scratch-{i}")})
            workers[node.node_id], scratch[node.node_id] = node, f"scratch-{i}"
        cluster.wait_for_nodes()
        events: dict = {}

        def lose_the_node() -> None:
            marker = out / "lose-node"
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                if marker.is_file() and marker.read_text():
                    events.update(json.loads(marker.read_text()))
                    events["lost_scratch"] = scratch[events["node"]]
                    cluster.remove_node(workers[events["node"]])
                    return
                time.sleep(0.1)

        thread = threading.Thread(target=lose_the_node, daemon=True)
        thread.start()
        sweep = load_sweep(overrides[0], overrides[1:])
        folder = open_sweep_folder(sweep, resume=False, overwrite=False)
        results = make_tuner(sweep, folder, resume=False, progress=False, trial_fn=trial_losing_its_node).fit()
        thread.join(timeout=1)
        table = results_table(sweep, results)
        write_results(table, out)
        events["errors"] = [str(r.error) for r in results if r.error]
        (out / "events.json").write_text(json.dumps(events))
    finally:
        ray.shutdown()
        cluster.shutdown()


SCENARIOS = {"lost-node": lost_node, "lost-node-sweep": lost_node_sweep}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](Path(sys.argv[2]), sys.argv[3:])
