"""The server's cost per round against the clients' compute for that round.

The real `Server` (plan, check, replay of the virtual paths as aggregation terms, GradIP, VPCS,
byte accounting, the path rows) runs on synthetic client results for n masked values and K
clients with T local steps each; nothing of the model is needed, so n and K can be large.

    server_s   = median over rounds of plan_round + finish_round (VPCS decides in one of them)
    clients_s  = K x T x step_s(n)     (the K clients' ZO steps of that round, one after another)
    step_s(n)  = ref_step_s x n / ref_n

The reference is a measured ZO step (`bench/zo_step.py`; default: SmolLM2-135M, u = 1e-3, n = 106,168,
batch 8 x 48, one CPU thread). At a fixed density the masked count n is proportional to the block
weights, and a forward's cost is too, so step_s(n) is the step of the model whose mask has n values
at that density (n = 1e4: a ~10M-weight model; 1e6: a ~1B one). `headroom` says how many times faster
the clients could be (e.g. on GPUs) before the server reached the 1% target.

    flock /tmp/meerkat-cpu.lock .venv/bin/python bench/server.py
    .venv/bin/python bench/server.py --n 10000,1000000 --clients 10,1000 --sharing round --rounds 3
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, fail, int_list, median, require_positive, table  # noqa: E402

TARGET = 0.01


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="10000,100000,1000000", help="masked values n (comma list)")
    p.add_argument("--clients", default="10,100,1000", help="clients K (comma list)")
    p.add_argument("--sharing", default="round,client", help="fed.seed_sharing modes (comma list)")
    p.add_argument("--local-steps", type=int, default=10, help="T")
    p.add_argument("--rounds", type=int, default=3, help="rounds timed per configuration (median)")
    p.add_argument("--ref-step-s", type=float, default=2.9, help="measured ZO step time of the reference model")
    p.add_argument("--ref-n", type=int, default=106168, help="n of the reference model's mask")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the server")
    args = p.parse_args(argv)
    args.n, args.clients = int_list(args.n, "--n"), int_list(args.clients, "--clients")
    args.sharing = [s for s in args.sharing.split(",") if s]
    if not args.sharing or any(s not in ("round", "client") for s in args.sharing):
        fail(f"--sharing: choose from round, client (got {args.sharing})")
    require_positive(args, "local_steps", "rounds", "ref_n", "threads")
    if args.ref_step_s <= 0:
        fail("--ref-step-s: must be > 0")
    return args


def run_config(n: int, k: int, sharing: str, args) -> dict:
    import numpy as np
    import torch

    from meerkat_ray.config import load_config
    from meerkat_ray.messages import ClientResult
    from meerkat_ray.server import Server

    T = args.local_steps
    # VPCS decides once every client has 2T steps: inside the timed rounds when rounds >= 2
    cfg = load_config(None, [f"fed.local_steps={T}", f"fed.seed_sharing={sharing}", "vp.enabled=true",
                             f"vp.calib_steps={2 * T}", f"data.num_clients={k}"])
    gen = torch.Generator().manual_seed(0)
    theta, g_pre = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    rng = np.random.default_rng(0)
    server = Server(cfg, theta, g_pre, [int(s) for s in rng.integers(50, 500, size=k)])
    times, parts = [], []
    for r in range(1, args.rounds + 1):
        results_rng = np.random.default_rng(r)
        t0 = time.perf_counter()
        plans = server.plan_round(r)
        t1 = time.perf_counter()
        results = [ClientResult(round=p.round, client=p.client, scalars=results_rng.standard_normal(p.steps).tolist(),
                                losses=[0.69] * p.steps) for p in plans]  # (not timed: the clients' side)
        t2 = time.perf_counter()
        outcome = server.finish_round(r, plans, results)
        t3 = time.perf_counter()
        times.append((t1 - t0) + (t3 - t2))
        parts.append({"plan_s": t1 - t0, "finish_s": t3 - t2, "terms": len(outcome.sync.terms),
                      "steps": outcome.metrics["local_steps"]})
    steps = median([p["steps"] for p in parts])  # after VPCS flags a client it runs 1 step, not T
    step_s = args.ref_step_s * n / args.ref_n
    clients_s = steps * step_s
    server_s = median(times)
    return {"n": n, "clients": k, "sharing": sharing, "local_steps": T, "server_s": server_s,
            "server_max_s": max(times), "client_steps": steps, "client_step_s": step_s, "clients_s": clients_s,
            "ratio": server_s / clients_s, "headroom": TARGET * clients_s / server_s, "rounds": parts,
            "z_draws_per_round": median([p["terms"] for p in parts])}


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results, rows = [], []
    for sharing in args.sharing:
        for n in args.n:
            for k in args.clients:
                res = run_config(n, k, sharing, args)
                results.append(res)
                rows.append([sharing, n, k, res["z_draws_per_round"], res["server_s"] * 1e3, res["clients_s"],
                             100 * res["ratio"], res["headroom"]])
                print(f"  done: {sharing} n={n} K={k}", file=sys.stderr, flush=True)
    print(f"server per round vs the clients' compute; T={args.local_steps}, step_s(n) = {args.ref_step_s} s x n / "
          f"{args.ref_n}, medians of {args.rounds} rounds, {args.threads} thread(s)")
    print(table(["sharing", "n", "K", "z draws", "server ms", "clients s", "ratio %", "headroom x"], rows))
    print(f"target: ratio <= {100 * TARGET:g}% ; headroom = how many times faster the clients could be before "
          "the server reaches it")
    emit("server", {"local_steps": args.local_steps, "ref_step_s": args.ref_step_s, "ref_n": args.ref_n,
                    "threads": args.threads, "target": TARGET, "results": results,
                    "all_met": all(r["ratio"] <= TARGET for r in results)})


if __name__ == "__main__":
    main()
