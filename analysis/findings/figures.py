"""Figures and tables of analysis/findings/README.md that `meerkat-ray analyze` does not draw.

Reads only run-folder files (summary.json, config.yaml, clients.json, path.parquet) under
runs/findings/<part>/ as written by analysis/findings/run_all.sh (and, for (i), the copies that
script keeps in analysis/findings/data/i/), writes PNGs into analysis/findings/ and prints the
markdown tables the findings page quotes.

    .venv/bin/python analysis/findings/figures.py [--runs runs/findings] [--out analysis/findings]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

DPI = 110
VPCS = {"sigma": 0.5, "rho": 2.0, "min_quiet_fraction": 0.6, "early_fraction": 0.2, "late_fraction": 0.5}


# ----------------------------------------------------------------------------- reading

def runs_of(folder: Path) -> list[dict]:
    """Every finished run folder under `folder`: its name, flat config and summary."""
    out = []
    for summary in sorted(folder.glob("*/summary.json")):
        run = summary.parent
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        out.append({"name": run.name, "dir": run, "cfg": cfg, "summary": json.loads(summary.read_text())})
    return out


def save(fig, file: Path) -> None:
    fig.tight_layout()
    fig.savefig(file, dpi=DPI)
    plt.close(fig)


def se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n test examples."""
    return math.sqrt(p * (1 - p) / n)


def acc_cell(s: dict) -> str:
    p, n = s["final_accuracy"], s["num_test"]
    return f"{p:.3f} ± {se(p, n):.3f}"


# ----------------------------------------------------------------------------- (a) GradIP

def vpcs_statistics(traj: dict[str, np.ndarray], steps: int) -> pd.DataFrame:
    """The rule of meerkat_ray/gradip.py, re-implemented on |GradIP| of the first `steps` steps:
    population reference = median over clients of the early means."""
    n_early = max(1, round(VPCS["early_fraction"] * steps))
    n_late = max(1, min(steps - n_early, round(VPCS["late_fraction"] * steps)))
    absolute = {k: np.abs(v[:steps]) for k, v in traj.items()}
    early = {k: v[:n_early].mean() for k, v in absolute.items()}
    ref = float(np.median(list(early.values())))
    rows = []
    for k, v in absolute.items():
        late = v[steps - n_late:]
        rho = early[k] / late.mean()
        quiet = float((late < VPCS["sigma"] * ref).mean())
        rows.append({"client": k, "steps": steps, "rho_later": rho, "quiet": quiet,
                     "flagged": rho > VPCS["rho"] and quiet > VPCS["min_quiet_fraction"]})
    return pd.DataFrame(rows)


def part_a(root: Path, out: Path) -> None:
    runs = {r["name"]: r for r in runs_of(root / "a")}
    if not runs:
        return
    traj, scal, labels = {}, {}, {}
    for name in ("single-label", "iid"):
        if name not in runs:
            continue
        run = runs[name]
        path = pd.read_parquet(run["dir"] / "path.parquet").sort_values(["client", "round", "step"])
        clients = json.loads((run["dir"] / "clients.json").read_text())
        for c in clients:
            rows = path[path.client == c["client"]]
            neg, pos = c["label_histogram"]
            key = f"{name} {c['client']}"
            labels[key] = (f"single-label ({'negative' if pos == 0 else 'positive'})" if name == "single-label"
                           else f"IID client {c['client']} ({neg}/{pos} neg/pos)")
            traj[key] = rows.grad_ip.to_numpy()
            scal[key] = rows.scalar.to_numpy()
    fig, axes = plt.subplots(3, 1, figsize=(9, 9.5), sharex=True)
    colours = {"single-label": ["#c0392b", "#e67e22"], "iid": ["#1f4e9c", "#16a085"]}
    window = 10
    for i, key in enumerate(traj):
        kind = key.split()[0]
        colour = colours[kind][int(key.split()[1]) % 2]
        steps = np.arange(1, len(traj[key]) + 1)
        axes[0].plot(steps, traj[key], color=colour, lw=0.8, alpha=0.8, label=labels[key])
        roll = pd.Series(np.abs(traj[key])).rolling(window, min_periods=1).mean()
        axes[1].plot(steps, roll, color=colour, lw=1.6, label=labels[key])
        roll_s = pd.Series(np.abs(scal[key])).rolling(window, min_periods=1).mean()
        axes[2].plot(steps, roll_s, color=colour, lw=1.6, label=labels[key])
    axes[0].set_yscale("symlog", linthresh=1.0)
    axes[0].set_ylabel("GradIP (symlog)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel(f"|GradIP|, running mean of {window}")
    axes[2].set_yscale("log")
    axes[2].set_ylabel(f"|projected gradient g|, running mean of {window}")
    axes[2].set_xlabel("local step (one round of 100 steps from the pre-trained model)")
    axes[0].legend(fontsize=8, ncol=2)
    axes[0].set_title("GradIP over 100 local steps: single-label vs IID clients (Meerkat mask, lr 5e-4)")
    for ax in axes:
        ax.grid(alpha=0.3)
    save(fig, out / "a_gradip.png")

    print("\n### (a) VPCS statistics on the 4 trajectories (population reference over all 4)\n")
    print("| calibration steps | client | rho_later | quiet fraction | flagged |")
    print("|---|---|---|---|---|")
    for steps in (15, 30, 50, 100):
        stats = vpcs_statistics(traj, steps)
        for _, row in stats.iterrows():
            print(f"| {steps} | {labels[row.client]} | {row.rho_later:.2f} | {row.quiet:.2f} | "
                  f"{'yes' if row.flagged else 'no'} |")
    print("\n| client | mean abs GradIP steps 1-20 | steps 51-100 | late/early | mean abs g 1-20 | 51-100 |")
    print("|---|---|---|---|---|---|")
    for key in traj:
        a, g = np.abs(traj[key]), np.abs(scal[key])
        print(f"| {labels[key]} | {a[:20].mean():.2f} | {a[50:].mean():.2f} | {a[50:].mean() / a[:20].mean():.2f} | "
              f"{g[:20].mean():.2f} | {g[50:].mean():.2f} |")
    for name, run in runs.items():
        s = run["summary"]
        print(f"\n{name}: zero-shot {s['zero_shot_accuracy']:.3f}, after 100 local steps (plain average) "
              f"{acc_cell(s)}, test loss {s['final_test_loss']:.4f}")


# ----------------------------------------------------------------------------- (b) masks

MASKS = [("pretrain_grad", "Meerkat (pretrain_grad)", "#c0392b"), ("full", "Full-FedZO (full)", "#555555"),
         ("weight_magnitude", "weight magnitude", "#1f4e9c"), ("random", "random", "#16a085")]


def part_b(root: Path, out: Path) -> None:
    runs = runs_of(root / "b")
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(8, 4.8))
    rows = []
    for kind, label, colour in MASKS:
        mine = sorted((r for r in runs if r["cfg"]["mask"]["kind"] == kind), key=lambda r: r["cfg"]["zo"]["lr"])
        if not mine:
            continue
        lrs = [r["cfg"]["zo"]["lr"] for r in mine]
        accs = [r["summary"]["final_accuracy"] for r in mine]
        errs = [se(a, r["summary"]["num_test"]) for a, r in zip(accs, mine)]
        ax.errorbar(lrs, accs, yerr=errs, marker="o", capsize=3, color=colour, label=label)
        for r in mine:
            s = r["summary"]
            path = pd.read_parquet(r["dir"] / "path.parquet")
            rows.append({"mask": label, "n": s["mask_size"], "lr": r["cfg"]["zo"]["lr"], "acc": acc_cell(s),
                         "p": s["final_accuracy"], "loss": s["final_test_loss"],
                         "rms_g": float(np.sqrt((path.scalar ** 2).mean())),
                         "up": s["uplink_bytes"], "down": s["downlink_bytes"], "steps": s["local_steps"],
                         "wall": s["train_wall_s"]})
    zero = runs[0]["summary"]["zero_shot_accuracy"]
    ax.axhline(zero, color="black", ls=":", lw=1, label=f"zero-shot {zero:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    n_test = runs[0]["summary"]["num_test"]
    ax.set_ylabel(f"test accuracy ({n_test} tweets, ± 1 s.e.)")
    ax.set_title("Masks at equal steps (3 clients, Dirichlet α=0.5, T=5, R=3): accuracy vs lr")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, out / "b_masks_lr.png")
    table = pd.DataFrame(rows)
    print("\n### (b) masks: every grid point\n")
    print("| mask | n | lr | accuracy ± s.e. | test loss | RMS of g | uplink B | downlink B | local steps | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table.itertuples():
        print(f"| {r.mask} | {r.n:,} | {r.lr:g} | {r.acc} | {r.loss:.4f} | {r.rms_g:.2f} | {r.up:,} | {r.down:,} | "
              f"{r.steps} | {r.wall:.0f} |")


# ----------------------------------------------------------------------------- (b6) the paper's baselines

METHODS = (("sparse_zo", "Meerkat (sparse ZO, pretrain_grad mask)", "tab:red"),
           ("lora_zo", "LoRA-FedZO (ZO on LoRA adapters)", "tab:blue"),
           ("first_order", "first-order FedAvg (masked backprop)", "tab:green"))


def method_lr(r: dict) -> float:
    fed, zo_lr = r["cfg"]["fed"], r["cfg"]["zo"]["lr"]
    return (fed["fo_lr"] or zo_lr) if fed["algorithm"] == "first_order" else zo_lr


def metrics_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def part_b6(root: Path, out: Path) -> None:
    """Accuracy against cumulative uplink bytes (log) per method at its best learning rate by final
    test loss, every grid point in a table."""
    runs = runs_of(root / "b6")
    if not runs:
        return
    fig, (ax, lax) = plt.subplots(1, 2, figsize=(13, 4.8))
    rows = []
    for algorithm, label, colour in METHODS:
        mine = sorted((r for r in runs if r["cfg"]["fed"]["algorithm"] == algorithm), key=method_lr)
        if not mine:
            continue
        best = min(mine, key=lambda r: r["summary"]["final_test_loss"])
        for r in mine:
            s, ms = r["summary"], metrics_of(r["dir"])
            clients, rounds = r["cfg"]["data"]["num_clients"], s["rounds"]
            rows.append({"method": label, "lr": method_lr(r), "n": s["mask_size"], "acc": acc_cell(s),
                         "loss": s["final_test_loss"], "up": s["uplink_bytes"], "down": s["downlink_bytes"],
                         "up_per": s["uplink_bytes"] / (clients * rounds), "wall": s["train_wall_s"],
                         "best": r is best})
        ms = [m for m in metrics_of(best["dir"]) if m["round"] > 0 and "accuracy" in m]
        cumulative = np.cumsum([m["uplink_bytes"] for m in metrics_of(best["dir"]) if m["round"] > 0])
        accs = [m["accuracy"] for m in ms]
        n_test = best["summary"]["num_test"]
        ax.errorbar(cumulative[: len(accs)], accs, yerr=[se(a, n_test) for a in accs], marker="o", capsize=3,
                    color=colour, label=f"{label}, lr {method_lr(best):g}")
        lax.plot(cumulative[: len(accs)], [m["test_loss"] for m in ms], marker="o", color=colour)
    zero = runs[0]["summary"]["zero_shot_accuracy"]
    ax.axhline(zero, color="black", ls=":", lw=1, label=f"zero-shot {zero:.3f}")
    zero_loss = metrics_of(runs[0]["dir"])[0]["test_loss"]
    lax.axhline(zero_loss, color="black", ls=":", lw=1)
    for a in (ax, lax):
        a.set_xscale("log")
        a.set_xlabel("cumulative uplink bytes, all clients (log)")
        a.grid(alpha=0.3, which="both")
    ax.set_ylabel(f"test accuracy ({runs[0]['summary']['num_test']} tweets, ± 1 s.e.)")
    lax.set_ylabel("test loss")
    fig.suptitle("Equal local steps (3 clients, Dirichlet α=0.5, T=5, R=3), rounds 1-3, each method at its best "
                 "lr by final test loss")
    ax.legend(fontsize=8)
    save(fig, out / "b_uplink.png")
    print("\n### (b6) the paper's baselines: every grid point (bold: best test loss of the method)\n")
    print("| method | lr | trained values n | accuracy ± s.e. | test loss | uplink B (all) | uplink B / client / round | downlink B (all) | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = "**" if r["best"] else ""
        print(f"| {b}{r['method']}{b} | {r['lr']:g} | {r['n']:,} | {r['acc']} | {r['loss']:.4f} | {r['up']:,} | "
              f"{r['up_per']:,.0f} | {r['down']:,} | {r['wall']:.0f} |")


# ----------------------------------------------------------------------------- (c) T, (d) vp

def grouped(runs: list[dict], key) -> dict:
    groups: dict = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    return groups


def seed_table(title: str, groups: dict) -> None:
    print(f"\n### {title}\n")
    print("| setting | seed | zero-shot | final accuracy ± s.e. | test loss | local steps | uplink B | downlink B | flagged | truly extreme |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, runs in groups.items():
        label = label.replace("\n", ", ")  # a figure's two-line tick label, on one table line
        for r in sorted(runs, key=lambda r: r["cfg"]["seed"]):
            s = r["summary"]
            print(f"| {label} | {r['cfg']['seed']} | {s['zero_shot_accuracy']:.3f} | {acc_cell(s)} | "
                  f"{s['final_test_loss']:.4f} | {s['local_steps']} | {s['uplink_bytes']:,} | {s['downlink_bytes']:,} | "
                  f"{s['flagged_clients'] if s['vp_decided_round'] is not None else '-'} | {s['extreme_clients']} |")
        accs = [r["summary"]["final_accuracy"] for r in runs]
        if len(accs) > 1:
            print(f"| {label} | mean of {len(accs)} | | {np.mean(accs):.3f} (seed s.d. {np.std(accs, ddof=1):.3f}) | | | | | | |")


def bar_plot(groups: dict, file: Path, title: str, xlabel: str, loss: bool = False) -> None:
    """Final accuracy per setting (one point per seed, ± 1 s.e.; red bar = mean); with `loss`, a
    second panel with the final test loss."""
    if loss:
        fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.2))
    else:
        fig, ax = plt.subplots(figsize=(7, 4.2))
    labels = list(groups)
    for i, label in enumerate(labels):
        runs = sorted(groups[label], key=lambda r: r["cfg"]["seed"])
        accs = [r["summary"]["final_accuracy"] for r in runs]
        errs = [se(a, r["summary"]["num_test"]) for a, r in zip(accs, runs)]
        xs = i + np.linspace(-0.15, 0.15, len(runs)) if len(runs) > 1 else [i]
        ax.errorbar(xs, accs, yerr=errs, fmt="o", capsize=3, color="#1f4e9c")
        for x, r in zip(xs, runs):
            ax.annotate(f"s{r['cfg']['seed']}", (x, r["summary"]["final_accuracy"]), fontsize=7,
                        xytext=(4, 0), textcoords="offset points")
        ax.plot([i - 0.25, i + 0.25], [np.mean(accs)] * 2, color="#c0392b", lw=2)
    first_run = next(iter(groups.values()))[0]
    zero = first_run["summary"]["zero_shot_accuracy"]
    ax.axhline(zero, color="black", ls=":", lw=1, label=f"zero-shot {zero:.3f} (seed {first_run['cfg']['seed']})")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(xlabel)
    n_test = next(iter(groups.values()))[0]["summary"]["num_test"]
    ax.set_ylabel(f"test accuracy ({n_test} tweets, ± 1 s.e.)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="lower right")
    if loss:
        first = next(iter(groups.values()))[0]["dir"] / "metrics.jsonl"
        zero_loss = json.loads(first.read_text().splitlines()[0])["test_loss"]  # round 0 = zero-shot
        for i, label in enumerate(labels):
            values = [r["summary"]["final_test_loss"] for r in groups[label]]
            ax_loss.plot([i] * len(values), values, "o", color="#1f4e9c")
        ax_loss.axhline(zero_loss, color="black", ls=":", lw=1, label=f"zero-shot {zero_loss:.3f}")
        ax_loss.set_xticks(range(len(labels)), labels)
        ax_loss.set_xlabel(xlabel)
        ax_loss.set_ylabel("test loss")
        ax_loss.grid(alpha=0.3, axis="y")
        ax_loss.legend(fontsize=8)
    save(fig, file)


def part_c(root: Path, out: Path) -> None:
    runs = runs_of(root / "c")
    if not runs:
        return
    runs = sorted(runs, key=lambda r: (r["cfg"]["zo"]["lr"], r["cfg"]["fed"]["local_steps"]))
    groups = grouped(runs, lambda r: f"T={r['cfg']['fed']['local_steps']} R={r['cfg']['fed']['rounds']}\n"
                                     f"lr {r['cfg']['zo']['lr']:g}")
    seed_table("(c) local steps per round at 40 local steps per client", groups)
    bar_plot(groups, out / "c_local_steps.png",
             "Sync frequency at equal total steps (3 clients, Dirichlet α=0.5)", "local steps per round, rounds, lr",
             loss=True)


def part_d(root: Path, out: Path) -> None:
    runs = runs_of(root / "d")
    if not runs:
        return

    order = {"Meerkat": 0, "Meerkat-vp": 1, "random stop": 2}
    groups = grouped(sorted(runs, key=lambda r: order[method_label(r)]), method_label)
    seed_table("(d) Meerkat vs Meerkat-vp vs random early stopping (mixed partition)", groups)
    print("\nVPCS statistics per run (decided after round 3 on 15 steps per client):\n")
    for r in runs:
        s = r["summary"]
        if s["vpcs"]:
            stats = ", ".join(f"{k}: rho {v['rho_later']:.2f} quiet {v['quiet_fraction']:.2f}" for k, v in s["vpcs"].items())
            print(f"- {r['name']} (seed {r['cfg']['seed']}): flagged {s['flagged_clients']}, extreme {s['extreme_clients']}; {stats}")
    bar_plot(groups, out / "d_vp.png", "Early stopping on a mixed partition (4 clients, 2 single-label)", "method")


def method_label(r: dict) -> str:
    vp = r["cfg"]["vp"]
    return "Meerkat" if not vp["enabled"] else ("Meerkat-vp" if vp["policy"] == "gradip" else "random stop")


def paired_differences(groups: dict, baseline: str) -> None:
    """Each method minus the baseline on the same seed (same partition and test set), mean ± s.e."""
    base = {r["cfg"]["seed"]: r["summary"] for r in groups.get(baseline, [])}
    print(f"\n| method − {baseline.replace(chr(10), ', ')} (same seed) | seeds | accuracy, mean ± s.e. | test loss, mean ± s.e. |")
    print("|---|---|---|---|")
    for label, group in groups.items():
        pairs = [(r["summary"], base[r["cfg"]["seed"]]) for r in group if label != baseline and r["cfg"]["seed"] in base]
        if not pairs:
            continue
        acc = np.array([s["final_accuracy"] - b["final_accuracy"] for s, b in pairs])
        loss = np.array([s["final_test_loss"] - b["final_test_loss"] for s, b in pairs])
        sem = (lambda v: f"{np.std(v, ddof=1) / math.sqrt(len(v)):.4f}") if len(pairs) > 1 else (lambda v: "-")
        print(f"| {label.replace(chr(10), ', ')} | {len(pairs)} | {acc.mean():+.3f} ± {sem(acc)} | {loss.mean():+.4f} ± {sem(loss)} |")


def part_f(root: Path, out: Path) -> None:
    """The accuracy claim on the embedded default: per seed, then mean ± s.e. over seeds."""
    runs = runs_of(root / "f")
    if not runs:
        return
    order = {"Meerkat": 0, "Meerkat-vp": 1, "random stop": 2}
    groups = grouped(sorted(runs, key=lambda r: order[method_label(r)]), method_label)
    seed_table("(f) Meerkat vs Meerkat-vp vs random early stopping (embedded default)", groups)
    print("\n| method | seeds | final accuracy, mean ± s.e. over seeds | final test loss, mean ± s.e. | "
          "local steps (mean) | flagging precision / recall (pooled) |")
    print("|---|---|---|---|---|---|")
    for label, group in groups.items():
        acc = np.array([r["summary"]["final_accuracy"] for r in group])
        loss = np.array([r["summary"]["final_test_loss"] for r in group])
        steps = np.mean([r["summary"]["local_steps"] for r in group])
        n = len(group)
        sem = (lambda v: float(np.std(v, ddof=1) / math.sqrt(n))) if n > 1 else (lambda v: float("nan"))
        flags = [r["summary"].get("flagging") for r in group if r["summary"].get("flagging")]
        if flags:
            tp, fp, fn = (sum(f[k] for f in flags) for k in ("true_positives", "false_positives", "false_negatives"))
            quality = f"{tp}/{tp + fp} / {tp}/{tp + fn}"
        else:
            quality = "-"
        print(f"| {label} | {n} | {acc.mean():.3f} ± {sem(acc):.3f} | {loss.mean():.4f} ± {sem(loss):.4f} | "
              f"{steps:.0f} | {quality} |")
    paired_differences(groups, "Meerkat")
    bar_plot(groups, out / "f_vp.png", "Early stopping on the embedded default (6 clients, 2 single-label)",
             "method", loss=True)


def sweep_table(sweep: Path) -> pd.DataFrame | None:
    """One row per finished trial, from the trials' own run folders (so an interrupted sweep, whose
    results.csv is written at its end, can be drawn too)."""
    rows = []
    for summary in sorted(sweep.glob("runs/*/summary.json")):
        cfg = yaml.safe_load((summary.parent / "config.yaml").read_text())
        s = json.loads(summary.read_text())
        quality = s.get("flagging") or {}
        rows.append({"vp.sigma": cfg["vp"]["sigma"], "vp.rho": cfg["vp"]["rho"], "flagged_clients": s["flagged_clients"],
                     "flag_precision": quality.get("precision"), "flag_recall": quality.get("recall"),
                     "final_accuracy": s["final_accuracy"], "final_test_loss": s["final_test_loss"],
                     "run_dir": str(summary.parent)})
    return pd.DataFrame(rows) if rows else None


def thresholds(sweep: Path, out: Path) -> None:
    """The sigma x rho sweep (tune_configs/vp_thresholds.yaml): flagging precision, recall, final
    accuracy and test loss per cell, each cell annotated with its value and the flagged clients."""
    table = sweep_table(sweep)
    if table is None:
        return
    grid = yaml.safe_load((sweep / "sweep.yaml").read_text()).get("grid", {}) if (sweep / "sweep.yaml").exists() else {}
    sigmas = sorted(set(table["vp.sigma"]) | set(grid.get("vp.sigma", [])))  # cells not run yet stay blank
    rhos = sorted(set(table["vp.rho"]) | set(grid.get("vp.rho", [])))
    panels = [("flag_precision", "flagging precision", "Greens"), ("flag_recall", "flagging recall", "Greens"),
              ("final_accuracy", "final accuracy", "Blues"), ("final_test_loss", "final test loss", "Reds_r")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    print("\n| σ | ρ | flagged | precision | recall | final accuracy | final test loss |")
    print("|---|---|---|---|---|---|---|")
    for _, row in table.sort_values(["vp.sigma", "vp.rho"]).iterrows():
        fmt = lambda v: "-" if pd.isna(v) else f"{v:.2f}"  # noqa: E731
        print(f"| {row['vp.sigma']:g} | {row['vp.rho']:g} | {row['flagged_clients']} | {fmt(row['flag_precision'])} | "
              f"{fmt(row['flag_recall'])} | {row['final_accuracy']:.3f} | {row['final_test_loss']:.4f} |")
    for ax, (column, title, cmap) in zip(axes, panels):
        grid = np.full((len(sigmas), len(rhos)), np.nan)
        for _, row in table.iterrows():
            grid[sigmas.index(row["vp.sigma"]), rhos.index(row["vp.rho"])] = row[column]
        ax.imshow(grid, cmap=cmap, origin="lower", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            match = table[(table["vp.sigma"] == sigmas[i]) & (table["vp.rho"] == rhos[j])]
            flagged = match["flagged_clients"].iloc[0] if len(match) else ""
            text = "-" if np.isnan(value) else (f"{value:.3f}" if "final" in column else f"{value:.2f}")
            ax.text(j, i, f"{text}\n{flagged}", ha="center", va="center", fontsize=8,
                    bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1.5})
        ax.set_xticks(range(len(rhos)), [f"{r:g}" for r in rhos])
        ax.set_yticks(range(len(sigmas)), [f"{v:g}" for v in sigmas])
        ax.set_xlabel("ρ")
        ax.set_ylabel("σ")
        ax.set_title(title, fontsize=10)
    summaries = [Path(d) / "summary.json" for d in table.get("run_dir", pd.Series(dtype=str)).dropna()]
    extreme = next((json.loads(f.read_text())["extreme_clients"] for f in summaries if f.exists()), "?")
    fig.suptitle(f"VPCS thresholds on the embedded default (cell: value, flagged clients; truly extreme {extreme})",
                 fontsize=10)
    save(fig, out / "d_thresholds.png")


def part_claim4(sweeps: Path, out: Path) -> None:
    """Claim (4) where the stop can matter (findings (h)): Meerkat vs Meerkat-vp vs random stop over
    16 rounds after the decision, per round mean ± s.e. over seeds, and the paired final differences."""
    runs = runs_of(sweeps / "claim4" / "runs") + runs_of(sweeps / "claim4_meerkat" / "runs")
    if not runs:
        return
    order = {"Meerkat": 0, "Meerkat-vp": 1, "random stop": 2}
    groups = grouped(sorted(runs, key=lambda r: order[method_label(r)]), method_label)
    seed_table("(h) claim (4): 16 rounds after the decision (embedded default)", groups)
    paired_differences(groups, "Meerkat")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, group in groups.items():
        curves = [pd.DataFrame(metrics_of(r["dir"])).dropna(subset=["accuracy"]).set_index("round") for r in group]
        rounds = sorted(set.intersection(*(set(c.index) for c in curves)))
        for ax, column in zip(axes, ("accuracy", "test_loss")):
            values = np.array([[c.loc[r, column] for r in rounds] for c in curves], dtype=float)
            mean = values.mean(axis=0)
            sem = values.std(axis=0, ddof=1) / math.sqrt(len(curves)) if len(curves) > 1 else np.zeros_like(mean)
            ax.plot(rounds, mean, marker="o", markersize=3, label=f"{label} ({len(curves)} seeds)")
            ax.fill_between(rounds, mean - sem, mean + sem, alpha=0.2)
    axes[0].set(xlabel="round", ylabel="test accuracy", title="accuracy, mean ± s.e. over seeds")
    axes[1].set(xlabel="round", ylabel="test loss", title="test loss, mean ± s.e. over seeds")
    for ax in axes:
        ax.axvline(1.5, color="black", linestyle="--", linewidth=1)  # the decision, after round 1
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save(fig, out / "h_claim4.png")


# ----------------------------------------------------------------------------- (i) DP-ZO, estimators

def dp_label(r: dict) -> str:
    return f"σ={r['cfg']['privacy']['noise_multiplier']:g}" if r["cfg"]["privacy"]["enabled"] else "non-private"


def epsilon_of(r: dict) -> float:
    """The largest client epsilon of a private run (inf where sigma = 0: clipping alone bounds nothing)."""
    eps = r["summary"]["privacy"]["max_epsilon"]
    return math.inf if eps is None else float(eps)


def part_i_dp(root: Path, out: Path) -> None:
    """Accuracy and test loss against epsilon (findings (i)): per run, the paired differences to the
    non-private default of the same seed, and the VPCS flags as sigma grows."""
    runs = [r for r in runs_of(root) if r["name"].startswith(("i-dp-", "i-nonprivate-"))]
    if not runs:
        return
    runs.sort(key=lambda r: (r["cfg"]["privacy"]["enabled"], r["cfg"]["privacy"]["noise_multiplier"]))
    groups = grouped(runs, dp_label)
    print("\n### (i) DP-ZO on the embedded default (clip C = 10, delta = 1e-5)\n")
    print("| setting | seed | epsilon (largest client) | final accuracy ± s.e. | test loss | flagged | truly extreme | "
          "precision / recall | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, group in groups.items():
        for r in sorted(group, key=lambda r: r["cfg"]["seed"]):
            s = r["summary"]
            eps = "-" if not s.get("privacy") else ("∞ (no bound)" if epsilon_of(r) == math.inf else f"{epsilon_of(r):.2f}")
            f = s["flagging"] or {}
            quality = f"{_q(f.get('precision'))} / {_q(f.get('recall'))}" if f else "-"
            print(f"| {label} | {r['cfg']['seed']} | {eps} | {acc_cell(s)} | {s['final_test_loss']:.4f} | "
                  f"{s['flagged_clients']} | {s['extreme_clients']} | {quality} | {s['total_wall_s']:.0f} |")
    paired_differences(groups, "non-private")
    fig, (ax, lax) = plt.subplots(1, 2, figsize=(12, 4.2))
    finite = [epsilon_of(r) for r in runs if r["cfg"]["privacy"]["enabled"] and epsilon_of(r) < math.inf]
    right = 2 * max(finite) if finite else 10.0  # where the runs without a bound are drawn
    markers, dashes = ("o", "s", "^", "D"), ("--", "-.", ":", (0, (5, 1)))
    seeds = sorted({r["cfg"]["seed"] for r in runs})
    for label, group in groups.items():  # one marker (and one non-private line) per seed: seeds differ in data
        for r in group:
            i = seeds.index(r["cfg"]["seed"]) % len(markers)
            s = r["summary"]
            if label == "non-private":
                for a, key in ((ax, "final_accuracy"), (lax, "final_test_loss")):
                    a.axhline(s[key], color="black", ls=dashes[i], lw=1, label=f"non-private, seed {r['cfg']['seed']}")
                continue
            colour = f"C{list(groups).index(label)}"
            x = min(epsilon_of(r), right)
            ax.errorbar([x], [s["final_accuracy"]], yerr=[se(s["final_accuracy"], s["num_test"])], fmt=markers[i],
                        capsize=3, color=colour, label=f"{label}, seed {r['cfg']['seed']}")
            lax.plot([x], [s["final_test_loss"]], markers[i], color=colour)
    zero = runs[0]["summary"]["zero_shot_accuracy"]
    ax.axhline(zero, color="black", ls=":", lw=1, label=f"zero-shot {zero:.3f} (seed {runs[0]['cfg']['seed']})")
    for a, ylabel in ((ax, f"test accuracy ({runs[0]['summary']['num_test']} tweets, ± 1 s.e.)"), (lax, "test loss")):
        a.set_xscale("log")
        a.set_xlabel(f"epsilon at delta 1e-5, largest client (log; σ=0 drawn at {right:.3g}: no bound)")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle("DP-ZO on the embedded default: clip C = 10, Poisson sampling, 2 seeds")
    save(fig, out / "i_dp.png")


def _q(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def est_label(r: dict) -> str:
    zo, fed = r["cfg"]["zo"], r["cfg"]["fed"]
    return f"{zo['estimator']} P={zo['num_perturbations']}\nT={fed['local_steps']}"


def part_i_est(root: Path, out: Path) -> None:
    """The estimators at equal forward passes per client and round (findings (i))."""
    runs = [r for r in runs_of(root) if r["name"].startswith(("i-central-", "i-forward-"))]
    if not runs:
        return
    order = {"central P=1\nT=8": 0, "forward P=1\nT=8": 1, "central P=2\nT=4": 2, "forward P=3\nT=4": 3}
    groups = grouped(sorted(runs, key=lambda r: order.get(est_label(r), 9)), est_label)
    seed_table("(i) estimators at 16 forward passes per client and round (VPCS off)", groups)
    paired_differences(groups, "central P=1\nT=8")
    bar_plot(groups, out / "i_estimators.png", "Estimators at equal forward passes (embedded default, VPCS off)",
             "estimator, directions per step, local steps per round", loss=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/findings", help="folder holding the parts' run folders")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="where the PNGs go")
    parser.add_argument("--sweep", default="sweeps/vp_thresholds", help="the sigma x rho sweep folder")
    parser.add_argument("--sweeps", default="sweeps", help="where the claim (4) sweeps of (h) are")
    parser.add_argument("--kept", default=str(Path(__file__).parent / "data"),
                        help="the committed run files of (h) and (i) (analysis/findings/data)")
    args = parser.parse_args()
    root, out = Path(args.runs), Path(args.out)
    for part in (part_a, part_b, part_b6, part_c, part_d, part_f):
        part(root, out)
    thresholds(Path(args.sweep), out)
    part_claim4(Path(args.sweeps), out)
    part_i_dp(Path(args.kept) / "i", out)
    part_i_est(Path(args.kept) / "i", out)


if __name__ == "__main__":
    main()
