"""VPCS statistics recomputed from run folders alone (path.parquet, clients.json, config.yaml).

    .venv/bin/python analysis/findings/vpcs_table.py RUN_DIR [RUN_DIR ...] [--statistic mean|median]
        [--reference late|early] [--sigma S] [--rho R] [--min-quiet Q] [--markdown]
        [--grid-sigma S1,S2,... --grid-rho R1,R2,...]

For each run: every client's calibration trajectory (its first vp.calib_steps GradIP values, rounds
and steps in order), rho_later = S(early) / S(late) and the quiet fraction of the late phase below
sigma x the median over clients of S(late) (vp.reference=late; S(early) for early), with S the chosen statistic; the flags that follow
from the thresholds, and precision / recall against clients.json's truly extreme clients. Written
from MEERKAT.md section 1 without the training code, so it doubles as an audit of summary.json
(of the paper rule, every client on its whole calibration: runs whose clients all hold a pass).
Thresholds default to each run's own config. With --grid-sigma and --grid-rho: one markdown table
of flagging precision and recall pooled over all the runs, per (sigma, rho) cell (the decision
depends on the calibration round alone, which every cell shares).

    .venv/bin/python analysis/findings/vpcs_table.py RUN_DIR ... --rules paper,stepwise,trend --lengths 30,50,100

scores every registered decision rule (`vp.rule`, the platform's own implementations: this mode
is a scoring tool, not an audit) at every calibration length L <= the recorded one, each L from
the first L steps of round 1 (the L-step calibration: same seeds and batches), each client on its
window min(L, n_k // batch) and left out under vp.min_window. Prints flagging precision and recall
pooled over the runs with Wilson 95% intervals, then per setting (a run's name without "-s<seed>").
"""
from __future__ import annotations

import argparse
import json
import math
import re
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
    path = pd.read_parquet(run_dir / "path.parquet")
    if "perturbation" in path:  # P > 1 directions: a step's GradIP is the sum of its rows
        path = path.groupby(["client", "round", "step"], as_index=False)["grad_ip"].sum()
    path = path.sort_values(["client", "round", "step"])
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


def wilson(hits: int, total: int, z: float = 1.959964) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion hits / total (95% by default)."""
    if total == 0:
        return None
    p = hits / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


def rule_flags(run_dir: Path, rule: str, length: int) -> tuple[list[int], list[int], list[int]] | None:
    """(flagged, truly extreme, judged clients) of `rule` on the first `length` steps of round 1, or None
    when the run recorded fewer steps."""
    from meerkat_ray.config import from_dict
    from meerkat_ray.gradip import calibration_windows, min_window
    from meerkat_ray.strategies.vp_rules import vp_rule

    data = yaml.safe_load((run_dir / "config.yaml").read_text())
    data["vp"].update(rule=rule, calib_steps=length)
    cfg = from_dict(data)
    clients = json.loads((run_dir / "clients.json").read_text())
    extreme = [c["client"] for c in clients if c["extreme"]]
    sizes = [int(c["size"]) for c in sorted(clients, key=lambda c: c["client"])]
    path = pd.read_parquet(run_dir / "path.parquet")
    path = path[path["round"] == 1].sort_values(["client", "step"])
    windows = calibration_windows(sizes, cfg.data.batch_size, length)
    traj = {}
    for k, g in path.groupby("client"):
        values = g["grad_ip"].to_numpy(float)
        if len(values) < length:
            return None
        if windows[int(k)] >= min_window(cfg.vp):
            traj[int(k)] = values[:windows[int(k)]]
    judge = vp_rule(cfg.vp)
    return judge.flags(judge.statistics(traj)), extreme, sorted(traj)


def setting_of(run_dir: Path) -> str:
    return re.sub(r"-s\d+$", "", run_dir.name)


def rules_table(runs: list[Path], rules: list[str], lengths: list[int]) -> None:
    def cell(tp, fp, fn):
        out = []
        for hits, total in ((tp, tp + fp), (tp, tp + fn)):
            ci = wilson(hits, total)
            out.append(f"{hits}/{total} = {hits / total:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if total else "-")
        return out

    settings = sorted({setting_of(r) for r in runs})
    print("| rule | length | runs | precision [95% CI] | recall [95% CI] | " + " | ".join(f"{s} P / R" for s in settings) + " |")
    print("|---|---|---|---|---|" + "---|" * len(settings))
    for rule in rules:
        for length in lengths:
            pooled, per = [0, 0, 0], {s: [0, 0, 0] for s in settings}
            count = 0
            for run_dir in runs:
                got = rule_flags(run_dir, rule, length)
                if got is None:
                    continue
                count += 1
                flagged, extreme, _ = got
                hits = len(set(flagged) & set(extreme))
                for acc in (pooled, per[setting_of(run_dir)]):
                    acc[0] += hits
                    acc[1] += len(flagged) - hits
                    acc[2] += len(extreme) - hits
            p, r = cell(*pooled)
            parts = [f"{a[0]}/{a[0] + a[1]} / {a[0]}/{a[0] + a[2]}" for a in per.values()]
            print(f"| {rule} | {length} | {count} | {p} | {r} | " + " | ".join(parts) + " |")


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
    ap.add_argument("--rules", help="comma-separated vp.rule names: the pooled table per rule and length")
    ap.add_argument("--lengths", default="30,50,100", help="calibration lengths for --rules (prefixes of round 1)")
    args = ap.parse_args()
    if args.rules:
        rules_table(args.runs, args.rules.split(","), [int(v) for v in args.lengths.split(",")])
        return
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
