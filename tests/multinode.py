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
"""
import json
import sys
from pathlib import Path

KILL_ROUND = 2


def lost_node(out: Path, overrides: list[str]) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from meerkat_ray import federation
    from meerkat_ray.config import load_config
    from meerkat_ray.runner import run_experiment

    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        events: dict = {"pool": {}}
        executors = []
        real_init, real_run = federation.RayExecutor.__init__, federation.RayExecutor.run_clients

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

        federation.RayExecutor.__init__, federation.RayExecutor.run_clients = init, run_clients
        cfg = load_config(None, [*overrides, "name=multi", f"output_dir={out}"])
        run_experiment(cfg, progress=False, on_round=on_round)
        events["server_node_after"] = executors[0].server.node
        (out / "events.json").write_text(json.dumps(events))
    finally:
        ray.shutdown()
        cluster.shutdown()


SCENARIOS = {"lost-node": lost_node}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](Path(sys.argv[2]), sys.argv[3:])
