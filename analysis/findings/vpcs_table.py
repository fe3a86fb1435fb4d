"""VPCS statistics recomputed from run folders alone (path.parquet, clients.json, config.yaml).

    .venv/bin/python analysis/findings/vpcs_table.py RUN_DIR [RUN_DIR ...] [--statistic mean|median]
        [--reference late|early] [--sigma S] [--rho R] [--min-quiet Q] [--markdown]
        [--grid-sigma S1,S2,... --grid-rho R1,R2,...]

For each run: every client's calibration trajectory (its first vp.calib_steps GradIP values, rounds
and steps in order), rho_later = S(early) / S(late) and the quiet fraction of the late phase below
sigma x the median over clients of S(late) (vp.reference=late; S(early) for early), with S the chosen statistic; the flags that follow
from the thresholds, and precision / recall against clients.json's truly extreme clients. Written
from MEERKAT.md section 1 without the training code, so it doubles as an audit of summary.json.
Thresholds default to each run's own config. With --grid-sigma and --grid-rho: one markdown table
of flagging precision and recall pooled over all the runs, per (sigma, rho) cell (the decision
depends on the calibration round alone, which every cell shares).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml


def phases(steps: int, early_fraction: float, late_fraction: float) -> tuple[int, int]:
    early = max(1, round(early_fraction * steps))
    return early, max(1, min(steps - early, round(late_fraction * steps)))


def statistics(run_dir: Path, statistic: str | None = None, reference: str | None = None) -> tuple[dict, dict]:
    """client -> its rho_later, late phase and the population reference; plus the run's vp config."""
    vp = yaml.safe_load((run_dir / "config.yaml").read_text())["vp"]
    stat = np.median if (statistic or vp.get("statistic", "mean")) == "median" else np.mean
    path = pd.read_parquet(run_dir / "path.parquet").sort_values(["client", "round", "step"])
    steps = int(vp["calib_steps"])
    traj = {int(k): np.abs(g["grad_ip"].to_numpy(float)[:steps]) for k, g in path.groupby("client")}
    traj = {k: v for k, v in traj.items() if len(v) == steps}
    n_early, n_late = phases(steps, vp["early_fraction"], vp["late_fraction"])
    early = {k: float(stat(v[:n_early])) for k, v in traj.items()}
    late = {k: v[steps - n_late:] for k, v in traj.items()}
    phase = {k: float(stat(v)) for k, v in late.items()} if (reference or vp.get("reference", "early")) == "late" else early
    reference = float(np.median(list(phase.values())))
    out = {k: {"rho_later": early[k] / float(stat(late[k])), "late": late[k], "reference": reference}
           for k in traj}
    return out, vp


def decide(stats: dict, sigma: float, rho: float, min_quiet: float) -> tuple[list[int], dict]:
    rows = {}
    for k, s in stats.items():
        quiet = float((s["late"] < sigma * s["reference"]).mean())
        rows[k] = {"rho_later": s["rho_later"], "quiet": quiet}
    flagged = sorted(k for k, r in rows.items() if r["rho_later"] > rho and r["quiet"] > min_quiet)
    return flagged, rows


def quality(flagged: list[int], extreme: list[int]) -> tuple[float | None, float | None]:
    hits = len(set(flagged) & set(extreme))
    return (hits / len(flagged) if flagged else None), (hits / len(extreme) if extreme else None)


def grid(runs: list[Path], sigmas: list[float], rhos: list[float], args) -> None:
    """Pooled precision / recall over the runs for every (sigma, rho)."""
    loaded = []
    for run_dir in runs:
        stats, vp = statistics(run_dir, args.statistic, args.reference)
        extreme = [c["client"] for c in json.loads((run_dir / "clients.json").read_text()) if c["extreme"]]
        loaded.append((stats, vp, extreme))
    print("| σ \\ ρ | " + " | ".join(f"{r:g}" for r in rhos) + " |")
    print("|---|" + "---|" * len(rhos))
    for sigma in sigmas:
        cells = []
        for rho in rhos:
            tp = fp = fn = 0
            for stats, vp, extreme in loaded:
                min_quiet = args.min_quiet if args.min_quiet is not None else vp["min_quiet_fraction"]
                flagged, _ = decide(stats, sigma, rho, min_quiet)
                hits = len(set(flagged) & set(extreme))
                tp, fp, fn = tp + hits, fp + len(flagged) - hits, fn + len(extreme) - hits
            cells.append(f"P {tp}/{tp + fp}, R {tp}/{tp + fn}")
        print(f"| {sigma:g} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--statistic", choices=("mean", "median"))
    ap.add_argument("--reference", choices=("late", "early"))
    ap.add_argument("--sigma", type=float)
    ap.add_argument("--rho", type=float)
    ap.add_argument("--min-quiet", type=float)
    ap.add_argument("--markdown", action="store_true", help="one table row per run")
    ap.add_argument("--grid-sigma", help="comma-separated sigmas: a pooled precision / recall table")
    ap.add_argument("--grid-rho", help="comma-separated rhos (with --grid-sigma)")
    args = ap.parse_args()
    if args.grid_sigma or args.grid_rho:
        if not (args.grid_sigma and args.grid_rho):
            ap.error("--grid-sigma and --grid-rho go together")
        grid(args.runs, [float(v) for v in args.grid_sigma.split(",")], [float(v) for v in args.grid_rho.split(",")], args)
        return
    for run_dir in args.runs:
        stats, vp = statistics(run_dir, args.statistic, args.reference)
        sigma = args.sigma if args.sigma is not None else vp["sigma"]
        rho = args.rho if args.rho is not None else vp["rho"]
        min_quiet = args.min_quiet if args.min_quiet is not None else vp["min_quiet_fraction"]
        flagged, rows = decide(stats, sigma, rho, min_quiet)
        extreme = [c["client"] for c in json.loads((run_dir / "clients.json").read_text()) if c["extreme"]]
        precision, recall = quality(flagged, extreme)
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        per_client = " ".join(f"{k}{'*' if k in extreme else ''}:{r['rho_later']:.2f}/{r['quiet']:.2f}"
                              for k, r in sorted(rows.items()))
        if args.markdown:
            print(f"| {run_dir.name} | {extreme} | {flagged} | {fmt(precision)} | {fmt(recall)} | {per_client} |")
        else:
            print(f"{run_dir}: extreme {extreme} flagged {flagged} precision {fmt(precision)} recall {fmt(recall)}"
                  f"\n  rho_later/quiet per client (* = truly extreme): {per_client}")


if __name__ == "__main__":
    main()
