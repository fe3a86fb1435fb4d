"""Memory of a client actor: against the same model doing inference only, and as K grows.

Peak RSS is the kernel's high-water mark of the actor process (VmHWM in /proc/PID/status), read
from the driver; it is reset (`clear_refs` 5) once set-up is over, so "work peak" is the peak
while the federation's rounds run, and "set-up peak" the peak of loading model, mask and data.

1. Client actor vs inference only: one client actor (`executor=ray`, `ray.num_actors=1`) runs
   R rounds of K clients x T steps; an inference actor, started the same way with the same model,
   thread count and batches, runs the same number of plain forward passes (2 per step).
   Target: client work peak <= 1.2 x inference work peak.
2. Virtual clients: the same client actor set-up for K = 10 .. 1000 clients (1 step each per
   round, same training data in total): work peak and time per client. Target: flat within 5%.

    flock /tmp/meerkat-cpu.lock .venv/bin/python bench/memory.py --model smollm2-135m --skip-scan
    flock /tmp/meerkat-cpu.lock .venv/bin/python bench/memory.py --model tiny-llama
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, fail, int_list, median, require_positive, table  # noqa: E402

MiB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--clients", type=int, default=4, help="K of the comparison with inference")
    p.add_argument("--local-steps", type=int, default=5, help="T of the comparison with inference")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--scan", default="10,100,1000", help="K values of the virtual-client scan")
    p.add_argument("--skip-scan", action="store_true")
    p.add_argument("--skip-compare", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=48)
    args = p.parse_args(argv)
    args.scan = int_list(args.scan, "--scan")
    require_positive(args, "clients", "local_steps", "rounds", "batch_size", "max_length")
    if not os.path.exists("/proc/self/status"):
        fail("this benchmark reads /proc/PID/status (Linux only)")
    return args


def proc_memory(pid: int) -> dict:
    """Current RSS and its high-water mark, bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def config(args, K: int, T: int, num_train: int):
    from meerkat_ray.config import load_config

    return load_config(None, [
        f"model.name={args.model}", "model.num_threads=1", "executor=ray", "ray.num_actors=1",
        "data.task=tweets2", f"data.num_train={num_train}", "data.num_test=16", f"data.num_clients={K}",
        "data.partition=iid", f"data.batch_size={args.batch_size}", f"data.max_length={args.max_length}",
        f"fed.local_steps={T}", f"fed.rounds={args.rounds}", f"vp.calib_steps={T * args.rounds + 1}",
        "name=bench-memory"])


def client_run(cfg) -> dict:
    """One client actor through cfg.fed.rounds rounds (no evaluation): memory and time per client."""
    from meerkat_ray.experiment import prepare_data
    from meerkat_ray.executors import make_executor

    data = prepare_data(cfg)
    executor = make_executor(cfg, data, progress=False)
    try:
        server = executor.make_server(cfg, executor.theta0, executor.mask.pretrain_grad, data.client_sizes)
        theta = executor.theta0.clone()
        pid = executor.actor_info()[0]["pid"]
        setup = proc_memory(pid)
        reset_peak(pid)
        walls = []
        for r in range(1, cfg.fed.rounds + 1):
            start = time.perf_counter()
            plans = server.plan_round(r)
            outcome = server.finish_planned(r, executor.run_clients(plans))
            theta = executor.sync(outcome.sync, theta)  # the driver's own copy too, as `runner.federate`
            walls.append(time.perf_counter() - start)
        work = proc_memory(pid)
    finally:
        executor.close()
    K = cfg.data.num_clients
    return {"clients": K, "local_steps": cfg.fed.local_steps, "setup_peak": setup["VmHWM"],
            "work_peak": work["VmHWM"], "rss_after": work["VmRSS"], "round_s": walls,
            "per_client_s": median(walls[1:] if len(walls) > 1 else walls) / K}


def inference_run(cfg, forwards: int) -> dict:
    """The same model in the same kind of actor, `forwards` plain forwards on the training batches."""
    import ray

    from meerkat_ray.experiment import prepare_data
    from meerkat_ray.distributed.cluster import connect, federation_demand

    @ray.remote(num_cpus=1)
    class InferenceActor:
        def __init__(self, cfg, data):
            import torch

            from meerkat_ray.client import ClientData
            from meerkat_ray.experiment import label_token_ids, tokenize
            from meerkat_ray.models import load_model

            torch.set_num_threads(1)
            self.lm = load_model(cfg.model, cfg.seed)
            tokens = tokenize(self.lm.tokenizer, data.task.train_texts, cfg.data.max_length)
            self.data = ClientData(tokens, data.task.train_labels, data.partition.client_indices, cfg.seed,
                                   self.lm.tokenizer.pad_token_id)
            self.label_ids = label_token_ids(self.lm.tokenizer, data.task.spec.label_words)
            self.bs = cfg.data.batch_size

        def pid(self) -> int:
            return os.getpid()

        def run(self, forwards: int) -> None:
            from meerkat_ray.scoring import label_logits

            for i in range(forwards // 2):
                batch = self.data.batch(i % len(self.data.client_indices), 0, self.bs)
                label_logits(self.lm.model, batch, self.label_ids)
                label_logits(self.lm.model, batch, self.label_ids)

    connect(cfg.ray, *federation_demand(cfg))
    actor = InferenceActor.remote(cfg, prepare_data(cfg))
    try:
        pid = ray.get(actor.pid.remote())
        setup = proc_memory(pid)
        reset_peak(pid)
        ray.get(actor.run.remote(forwards))
        work = proc_memory(pid)
    finally:
        ray.kill(actor)
    return {"forwards": forwards, "setup_peak": setup["VmHWM"], "work_peak": work["VmHWM"], "rss_after": work["VmRSS"]}


def main(argv=None) -> None:
    args = parse_args(argv)
    import ray

    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, logging_level="WARNING")
    payload = {"model": args.model, "batch_size": args.batch_size, "max_length": args.max_length}
    try:
        if not args.skip_compare:
            cfg = config(args, args.clients, args.local_steps, 800)
            client = client_run(cfg)
            infer = inference_run(cfg, 2 * args.clients * args.local_steps * args.rounds)
            ratio = client["work_peak"] / infer["work_peak"]
            payload["compare"] = {"client": client, "inference": infer, "work_peak_ratio": ratio,
                                  "setup_peak_ratio": client["setup_peak"] / infer["setup_peak"]}
            print(f"{args.model}: client actor (K={args.clients}, T={args.local_steps}, R={args.rounds}) vs "
                  "inference actor (same number of forwards), MiB")
            print(table(["actor", "set-up peak", "work peak", "RSS after"],
                        [["client (ZO training)", client["setup_peak"] / MiB, client["work_peak"] / MiB,
                          client["rss_after"] / MiB],
                         ["inference only", infer["setup_peak"] / MiB, infer["work_peak"] / MiB,
                          infer["rss_after"] / MiB]]))
            print(f"work peak ratio {ratio:.3f} (target <= 1.2)\n")
        if not args.skip_scan:
            scan = []
            for K in args.scan:
                scan.append(client_run(config(args, K, 1, max(2000, 2 * max(args.scan)))))
                print(f"  done: K={K}", file=sys.stderr, flush=True)
            base = scan[0]
            for s in scan:
                s["work_peak_vs_first"] = s["work_peak"] / base["work_peak"]
                s["per_client_vs_first"] = s["per_client_s"] / base["per_client_s"]
            payload["scan"] = scan
            print(f"{args.model}: one client actor serving K virtual clients (T=1, R={args.rounds}, "
                  "same training data)")
            print(table(["K", "work peak MiB", "vs first", "s per client", "vs first"],
                        [[s["clients"], s["work_peak"] / MiB, s["work_peak_vs_first"], s["per_client_s"],
                          s["per_client_vs_first"]] for s in scan]))
            print("target: flat within 5% (memory and time per client)")
    finally:
        ray.shutdown()
    emit("memory", payload)


if __name__ == "__main__":
    main()
