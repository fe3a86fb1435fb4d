"""Where a run's clients and server run: the executor registry (`executor`).

The one round loop (`runner.federate`) drives an executor; the names below are the values of
`executor`, each mapped to a `module:function` builder `build(cfg, data, progress)` that is imported
only when chosen, so the core never imports Ray (tests/test_strategies.py checks it).

An executor has:
    mask, theta0                             the run's mask and initial global values (fp32, mask order)
    make_server(cfg, theta0, g_pre, sizes)   the Server, or a handle with its methods: plan_round(r),
                                             finish_planned(r, results) -> RoundOutcome (on the
                                             server's own plans), state_dict() -> dict,
                                             load_state(state, theta), theta_digest()
    run_clients(plans, on_result)            the results in plan order, whatever order they ran in
    sync(msg, theta) -> theta                every worker applies the round's SyncMessage, and so do
                                             the driver's own global values `theta` (returned after it)
    restore(theta, round)                    every worker continues from a checkpoint's values
    evaluate() -> (accuracy, test loss)      on the current global values
    fault_counts() -> dict                   FAULT_COUNTERS since the last call
    theta_digests() -> list[str]             every worker's global values, as `runlog.theta_digest`
    close()
Nothing of size n crosses between the driver and the executor per round (first_order's sync aside,
which is n values by nature): the driver applies each SyncMessage to its own copy.
"""
from __future__ import annotations

import importlib

EXECUTORS = {
    "local": "meerkat_ray.local_executor:build",      # every client in this process, one after another
    "ray": "meerkat_ray.distributed.executor:build",  # client actors and a server actor on a Ray cluster
}

# per round in metrics.jsonl: clients re-run, client actors replaced, client actors lost from the pool,
# replacements that joined it, server actors restored from the last checkpoint, actors killed for
# missing a call's deadline (all 0 without Ray)
FAULT_COUNTERS = ("retries", "actor_restarts", "pool_shrinks", "pool_regrowths", "server_restarts",
                  "actor_timeouts")


def make_executor(cfg, data, progress: bool):
    """The executor of `executor`, set up: model, mask and theta_0 loaded where its workers run."""
    module, function = EXECUTORS[cfg.executor].split(":")
    return getattr(importlib.import_module(module), function)(cfg, data, progress)
