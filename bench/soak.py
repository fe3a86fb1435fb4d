"""Soak: a long tiny federation whose process memory must not grow.

One `meerkat-ray run` (in process, tiny-llama, a few clients, T = 1 local step, an evaluation every
`--eval-every` rounds) for `--rounds` rounds, reading this process's resident memory (VmRSS in
/proc/self/status) after every round. Growth is measured after a warm-up (allocator pools, lazy
imports and the first evaluation settle in the first rounds): the slope of a least-squares line
through RSS vs round, in KiB per round, and the last-quarter median minus the second-quarter
median. Target: no growth beyond noise (|slope| x rounds well under the RSS).

    flock /tmp/meerkat-cpu.lock .venv/bin/python bench/soak.py --rounds 500
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, fail, table  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=50, help="rounds left out of the growth measures")
    args = parser.parse_args(argv)
    if args.rounds < 4 or not 0 <= args.warmup < args.rounds // 2:
        fail("--rounds must be >= 4 and --warmup in [0, rounds / 2)")

    import torch

    from meerkat_ray.config import load_config
    from meerkat_ray.runner import run_experiment

    torch.set_num_threads(1)
    samples: list[tuple[int, float, float]] = []  # (round, rss MiB, seconds since start)
    start = time.perf_counter()

    def on_round(round_, metrics, last, checkpoint):
        samples.append((round_, rss_mib(), time.perf_counter() - start))
        if round_ % 50 == 0:
            print(f"round {round_:5d}  rss {samples[-1][1]:8.1f} MiB  {samples[-1][2]:7.1f} s", flush=True)

    with tempfile.TemporaryDirectory(prefix="soak-") as out:
        cfg = load_config(None, [
            "model.name=tiny-llama", "model.num_threads=1", "data.task=tweets2", "data.max_length=32",
            f"data.num_clients={args.clients}", "data.partition=mixed", "data.num_test=32", "data.batch_size=4",
            "mask.density=0.01", "mask.cache=false", "mask.calib_num_seqs=2", "mask.calib_seq_len=32",
            f"fed.rounds={args.rounds}", "fed.local_steps=1", f"fed.eval_every={args.eval_every}",
            "vp.calib_steps=20", "zo.lr=1e-3", "executor=local", "name=soak", f"output_dir={out}"])
        run_experiment(cfg, progress=False, on_round=on_round)

    kept = [s for s in samples if s[0] > args.warmup]
    xs, ys = [float(s[0]) for s in kept], [s[1] for s in kept]
    q = len(ys) // 4
    per_round_kib = slope(xs, ys) * 1024
    quarter_growth = statistics.median(ys[-q:]) - statistics.median(ys[q:2 * q])
    rows = [[r, f"{m:.1f}", f"{t:.1f}"] for r, m, t in samples[:: max(1, len(samples) // 10)] + samples[-1:]]
    print(table(["round", "rss MiB", "elapsed s"], rows))
    print(f"after round {args.warmup}: slope {per_round_kib:+.2f} KiB/round "
          f"({per_round_kib * args.rounds / 1024:+.2f} MiB over {args.rounds} rounds), "
          f"last-quarter minus second-quarter median {quarter_growth:+.2f} MiB; rss {ys[0]:.1f} -> {ys[-1]:.1f} MiB")
    emit("soak", {"rounds": args.rounds, "clients": args.clients, "warmup": args.warmup,
                  "rss_first_mib": round(samples[0][1], 1), "rss_after_warmup_mib": round(ys[0], 1),
                  "rss_last_mib": round(ys[-1], 1), "rss_max_mib": round(max(s[1] for s in samples), 1),
                  "slope_kib_per_round": round(per_round_kib, 3), "quarter_growth_mib": round(quarter_growth, 2),
                  "seconds": round(samples[-1][2], 1)})


if __name__ == "__main__":
    main()
