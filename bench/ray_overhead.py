"""Wall time per round on Ray against the same rounds in process.

The round is the loop of `runner.federate` without evaluation and without the run folder:
    plans = server.plan_round(r) -> executor.run_clients(plans) -> server.finish_planned -> the driver
    applies the SyncMessage to its own values -> executor.sync
built by `executors.make_executor` exactly as `meerkat-ray run` builds it, for
- local:  executor=local, one process, `--threads` torch threads (the in-process reference);
- ray1:   executor=ray with one client actor (1 CPU, 1 thread) and the server actor;
- ray2:   two client actors (the speed-up a second core buys);
- local2: in process with 2 torch threads (what intra-op threads buy instead of a second actor).
The first round is a warm-up; the table gives the median of the others. Results are bit-identical
between backends (tests/test_ray.py), so the rounds do the same work.

    flock /tmp/meerkat-cpu.lock .venv/bin/python bench/ray_overhead.py --model tiny-llama --local-steps 1,10
    flock /tmp/meerkat-cpu.lock .venv/bin/python bench/ray_overhead.py --model smollm2-135m --local-steps 1 --rounds 6
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, fail, int_list, median, table  # noqa: E402

BACKENDS = {  # name -> config overrides
    "local": ["executor=local", "model.num_threads=1"],
    "ray1": ["executor=ray", "ray.num_actors=1", "model.num_threads=1"],
    "ray2": ["executor=ray", "ray.num_actors=2", "model.num_threads=1"],
    "local2": ["executor=local", "model.num_threads=2"],
}
TARGETS = {1: 1.30, 10: 1.10}  # ray1 / local per round, by T


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--local-steps", default="1,10", help="T values (comma list)")
    p.add_argument("--backends", default="local,ray1,ray2", help=f"comma list of {', '.join(BACKENDS)}")
    p.add_argument("--clients", type=int, default=4, help="K")
    p.add_argument("--rounds", type=int, default=6, help="rounds per run; the first is a warm-up")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=48)
    args = p.parse_args(argv)
    args.local_steps = int_list(args.local_steps, "--local-steps")
    args.backends = [b for b in args.backends.split(",") if b]
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad or not args.backends:
        fail(f"--backends: unknown backend {bad[0] if bad else '(empty)'!r} (choose from {', '.join(BACKENDS)})")
    if args.clients < 1 or args.rounds < 2 or args.batch_size < 1 or args.max_length < 2:
        fail("--clients >= 1, --rounds >= 2, --batch-size >= 1 and --max-length >= 2 are required")
    return args


def config(args, backend: str, T: int):
    from meerkat_ray.config import load_config

    # VPCS on (GradIP for every step), its calibration round 1 of max(2, T) steps (the warm-up), and a
    # rho no client reaches: it never early-stops a client, so every round has K x T steps
    return load_config(None, [
        f"model.name={args.model}", "data.task=tweets2", "data.num_train=800", "data.num_test=16",
        f"data.num_clients={args.clients}", "data.partition=iid", f"data.batch_size={args.batch_size}",
        f"data.max_length={args.max_length}", f"fed.local_steps={T}", f"fed.rounds={args.rounds}",
        f"vp.calib_steps={max(2, T)}", "vp.rho=1e300", "name=bench-ray-overhead", *BACKENDS[backend]])


def time_rounds(args, backend: str, T: int) -> dict:
    from meerkat_ray.experiment import prepare_data
    from meerkat_ray.executors import make_executor

    cfg = config(args, backend, T)
    t0 = time.perf_counter()
    data = prepare_data(cfg)
    executor = make_executor(cfg, data, progress=False)
    try:
        server = executor.make_server(cfg, executor.theta0, executor.mask.pretrain_grad, data.client_sizes)
        theta = executor.theta0.clone()
        setup_s = time.perf_counter() - t0
        walls, compute = [], []
        for r in range(1, cfg.fed.rounds + 1):
            start = time.perf_counter()
            plans = server.plan_round(r)
            results = executor.run_clients(plans)
            outcome = server.finish_planned(r, results)
            theta = executor.sync(outcome.sync, theta)  # the driver's own copy too, as `runner.federate`
            walls.append(time.perf_counter() - start)
            compute.append(sum(res.compute_s for res in results))
        final = theta
    finally:
        executor.close()
    return {"backend": backend, "local_steps": T, "setup_s": setup_s, "round_s": median(walls[1:]),
            "rounds_s": walls, "client_compute_s": median(compute[1:]), "final_theta_sum": float(final.double().sum())}


def main(argv=None) -> None:
    args = parse_args(argv)
    results, rows = [], []
    for T in args.local_steps:
        by_backend = {}
        for backend in args.backends:
            res = time_rounds(args, backend, T)
            by_backend[backend] = res
            print(f"  done: {backend} T={T}: {res['round_s']:.3f} s per round", file=sys.stderr, flush=True)
        base = by_backend.get("local")
        for backend, res in by_backend.items():
            res["ratio_to_local"] = res["round_s"] / base["round_s"] if base else None
            res["speedup_vs_ray1"] = (by_backend["ray1"]["round_s"] / res["round_s"]) if "ray1" in by_backend else None
            results.append(res)
            rows.append([T, backend, res["setup_s"], res["round_s"], res["client_compute_s"],
                         res["ratio_to_local"] if base else "", res["speedup_vs_ray1"] or ""])
        if base and len({round(r["final_theta_sum"], 9) for r in by_backend.values()}) != 1:
            print(f"warning: backends ended with different global values at T={T}", file=sys.stderr)
    print(f"{args.model}, K={args.clients} clients, batch {args.batch_size} x <= {args.max_length} tokens, "
          f"median of rounds 2..{args.rounds}")
    print(table(["T", "backend", "setup s", "round s", "client compute s", "ratio to local", "speed-up vs ray1"], rows))
    print("targets: ray1 / local <= 1.10 at T=10 and <= 1.30 at T=1; ray2 speed-up on 2 cores (ideal 2)")
    emit("ray_overhead", {"model": args.model, "clients": args.clients, "rounds": args.rounds,
                          "batch_size": args.batch_size, "max_length": args.max_length, "results": results,
                          "targets": {str(k): v for k, v in TARGETS.items()}})


if __name__ == "__main__":
    main()
