"""Bytes per client per round: Meerkat (both seed-sharing modes) against what peers would send.

Meerkat's numbers are *measured*: a tiny federation runs end to end (executor=local, tiny-llama)
in each seed-sharing mode and its metrics.jsonl byte counters (meerkat_ray/messages.py accounting:
seeds, ids and scalars at 8 B, per-step losses at 4 B) are divided by clients and rounds; the
same accounting is then driven with K clients through the real `Server` (messages do not depend on
the model: nothing of size n or d is ever sent). The peers are formulas for the same T and K:

- Full-FedZO with model sync: dense ZO on all d weights with per-client seeds; a client uploads its
  T scalars like Meerkat, and rebuilds the global model by downloading it (d weights).
- FedAvg of full weights: upload the d local weights, download the d global weights.
- FedKSeed-style seed pool (Qin et al., 2024): seeds drawn from a fixed pool of S candidates; a
  client uploads T (pool index 4 B, scalar 4 B) pairs and downloads one accumulated scalar (4 B) per
  pool seed to update its model. S = 4096 by default.
Weights are counted at 2 bytes (bf16); fp32 doubles those rows. Meerkat's one-time set-up cost
(the mask: n int64 indices; the pre-trained weights are assumed to be on the client already) is
listed apart.

    flock /tmp/meerkat-cpu.lock .venv/bin/python bench/comm.py
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, fail, require_positive, table  # noqa: E402

# total parameters d and mask-eligible block weights (2-D matrices of the transformer blocks)
MODELS = {
    "135M (SmolLM2-135M)": (134_515_008, 106_168_320),
    "1B (Llama-3.2-1B)": (1_235_814_400, 973_078_528),
    "7B (Llama-2-7B)": (6_738_415_616, 6_476_005_376),
}
WEIGHT_BYTES = 2  # bf16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--local-steps", type=int, default=10, help="T")
    p.add_argument("--clients", type=int, default=100, help="K for the accounting of the formula table")
    p.add_argument("--density", type=float, default=1e-3, help="Meerkat's mask density u")
    p.add_argument("--pool", type=int, default=4096, help="FedKSeed seed-pool size S")
    p.add_argument("--no-run", action="store_true", help="skip the tiny end-to-end runs (accounting only)")
    args = p.parse_args(argv)
    require_positive(args, "local_steps", "clients", "pool")
    if not 0 < args.density <= 1:
        fail("--density: must be in (0, 1]")
    return args


def measured_run(sharing: str, T: int, K: int, rounds: int = 3) -> dict:
    """A tiny federation end to end; bytes per client per round from its metrics.jsonl."""
    from meerkat_ray.config import load_config
    from meerkat_ray.runlog import read_metrics
    from meerkat_ray.runner import run_experiment

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [
            "model.name=tiny-llama", "model.num_threads=1", "executor=local", f"output_dir={out}", "name=comm",
            "data.num_train=200", "data.num_test=16", f"data.num_clients={K}", "data.batch_size=2",
            "data.max_length=16", "mask.kind=random", "mask.density=0.01", "vp.enabled=false",
            f"fed.rounds={rounds}", f"fed.local_steps={T}", f"fed.seed_sharing={sharing}", f"fed.eval_every={rounds}"])
        run_experiment(cfg, progress=False)
        metrics = [m for m in read_metrics(os.path.join(out, "comm")) if m["round"] >= 1]
    up = sum(m["uplink_bytes"] for m in metrics) / (K * len(metrics))
    down = sum(m["downlink_bytes"] for m in metrics) / (K * len(metrics))
    return {"sharing": sharing, "clients": K, "local_steps": T, "rounds": len(metrics),
            "uplink_per_client": up, "downlink_per_client": down}


def accounted(sharing: str, T: int, K: int, rounds: int = 2) -> dict:
    """The same accounting through the real Server with K clients (synthetic scalars)."""
    import torch

    from meerkat_ray.config import load_config
    from meerkat_ray.messages import ClientResult
    from meerkat_ray.server import Server

    cfg = load_config(None, [f"fed.local_steps={T}", f"fed.seed_sharing={sharing}", "vp.enabled=false",
                             f"data.num_clients={K}"])
    server = Server(cfg, torch.zeros(16), None, [100] * K)
    up = down = 0
    for r in range(1, rounds + 1):
        plans = server.plan_round(r)
        results = [ClientResult(r, p.client, [0.1] * p.steps, [0.7] * p.steps) for p in plans]
        m = server.finish_round(r, plans, results).metrics
        up, down = up + m["uplink_bytes"], down + m["downlink_bytes"]
    return {"sharing": sharing, "clients": K, "local_steps": T,
            "uplink_per_client": up / (K * rounds), "downlink_per_client": down / (K * rounds)}


def peers(d: int, T: int, pool: int) -> dict[str, tuple[float, float]]:
    """(uplink, downlink) bytes per client per round of the peer methods."""
    return {
        "Full-FedZO + model sync": (8 * T, WEIGHT_BYTES * d),
        "FedAvg (full weights)": (WEIGHT_BYTES * d, WEIGHT_BYTES * d),
        f"FedKSeed (pool {pool})": (8 * T, 4 * pool),
    }


def human(b: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    T, K = args.local_steps, args.clients
    runs = [] if args.no_run else [measured_run(s, T, 4) for s in ("round", "client")]
    acc = {s: accounted(s, T, K) for s in ("round", "client")}
    if runs:
        print(f"measured (tiny-llama federation, K=4, T={T}, metrics.jsonl), bytes per client per round:")
        print(table(["seed sharing", "uplink", "downlink"],
                    [[r["sharing"], r["uplink_per_client"], r["downlink_per_client"]] for r in runs]))
        for r in runs:  # the run and the Server accounting must agree
            check = accounted(r["sharing"], T, 4, r["rounds"])
            r["matches_accounting"] = (check["uplink_per_client"], check["downlink_per_client"]) == (
                r["uplink_per_client"], r["downlink_per_client"])
    rows, models = [], []
    for model, (d, eligible) in MODELS.items():
        n = max(1, round(args.density * eligible))
        methods = {f"Meerkat, seeds per round": (acc["round"]["uplink_per_client"], acc["round"]["downlink_per_client"]),
                   f"Meerkat, seeds per client": (acc["client"]["uplink_per_client"], acc["client"]["downlink_per_client"]),
                   **peers(d, T, args.pool)}
        entry = {"model": model, "d": d, "n": n, "mask_setup_bytes": 8 * n, "methods": {}}
        for name, (up, down) in methods.items():
            entry["methods"][name] = {"uplink": up, "downlink": down, "total": up + down}
            rows.append([model, name, human(up), human(down), human(up + down)])
        ratio = (WEIGHT_BYTES * d * 2) / (acc["round"]["uplink_per_client"] + acc["round"]["downlink_per_client"])
        entry["fedavg_over_meerkat_round"] = ratio
        models.append(entry)
        rows.append([model, f"(Meerkat one-time mask set-up, n={n:,})", "", human(8 * n), ""])
    print(f"\nbytes per client per round, T={T}, K={K} (Meerkat per-client seeds grow with K), weights at "
          f"{WEIGHT_BYTES} B:")
    print(table(["model", "method", "uplink", "downlink", "total"], rows))
    emit("comm", {"local_steps": T, "clients": K, "density": args.density, "pool": args.pool,
                  "weight_bytes": WEIGHT_BYTES, "measured_runs": runs, "accounting": acc, "models": models})


if __name__ == "__main__":
    main()
