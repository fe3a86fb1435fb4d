"""Tables of a report: one row per run (results), and flagged vs truly extreme clients (VPCS)."""
from __future__ import annotations

import pandas as pd

from .methods import method_label, run_label, varying_keys
from .runs import Collection, Run


def results_table(collection: Collection) -> pd.DataFrame:
    """One row per run: method, the keys that vary (a sweep's grid axes first), accuracy, bytes,
    steps, flagged clients and flagging precision / recall."""
    runs = collection.runs
    varying = varying_keys(runs)
    keys = list(dict.fromkeys([*collection.grid, *varying]))
    rows = []
    for run in runs:
        s = run.summary or {}
        quality = flag_counts(run)
        rows.append({
            "run": run.name,
            "method": method_label(run.config),
            "label": run_label(run, varying),
            **{key: run.get(key) for key in keys},
            "seed": run.get("seed"),
            "status": "done" if run.finished else "unfinished",
            "rounds": f"{run.rounds_done}/{run.get('fed.rounds', '?')}",
            "final_accuracy": run.final_accuracy,
            "best_accuracy": s.get("best_accuracy", run.metrics["accuracy"].max()),
            "zero_shot_accuracy": s.get("zero_shot_accuracy", run.metrics["accuracy"].iloc[0] if len(run.metrics) else None),
            "final_test_loss": s.get("final_test_loss", run.last("test_loss")),
            "uplink_bytes": int(run.metrics["uplink_bytes"].fillna(0).sum()),
            "downlink_bytes": int(run.metrics["downlink_bytes"].fillna(0).sum()),
            "local_steps": s.get("local_steps", int(run.metrics.get("local_steps", pd.Series(dtype=float)).fillna(0).sum())),
            "flagged": " ".join(map(str, run.flagged_clients)) if run.decided_round is not None else "",
            "extreme": " ".join(map(str, run.extreme_clients or [])),
            "flag_precision": quality["precision"] if quality else None,
            "flag_recall": quality["recall"] if quality else None,
            "train_wall_s": s.get("train_wall_s", float(run.metrics["wall_s"].fillna(0).sum())),
            "run_dir": str(run.dir),
        })
        if run.get("privacy.enabled"):  # DP-ZO: the largest client epsilon at the run's delta
            privacy = s.get("privacy") or {}
            rows[-1]["privacy_epsilon"] = privacy["max_epsilon"] if "max_epsilon" in privacy else private_epsilon(run)
            rows[-1]["privacy_delta"] = run.get("privacy.delta")
    return pd.DataFrame(rows)


def private_epsilon(run: Run) -> float | None:
    """The largest client epsilon of the last round recorded (a run still going has no summary)."""
    if "privacy_epsilon" not in run.metrics:
        return None
    values = [v for v in run.metrics["privacy_epsilon"].dropna()]
    last = [e for e in values[-1].values() if e is not None] if values else []
    return max(last) if last and len(last) == len(values[-1]) else None  # None: no bound (sigma 0)


def flag_counts(run: Run) -> dict | None:
    """The confusion counts of one run's early-stopping decision, or None where there is none
    (policy disabled or not decided yet) or the partition does not know the extreme clients."""
    extreme = run.extreme_clients
    if not run.get("vp.enabled") or run.decided_round is None or extreme is None:
        return None
    flagged, extreme = set(run.flagged_clients), set(extreme)
    everyone = set(range(run.num_clients)) | flagged | extreme
    return _with_rates({"tp": len(flagged & extreme), "fp": len(flagged - extreme), "fn": len(extreme - flagged),
                        "tn": len(everyone - flagged - extreme)})


def _with_rates(c: dict) -> dict:
    return {**c, "precision": c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else None,
            "recall": c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else None}


def flagging_rows(groups: dict[str, list[Run]]) -> list[dict]:
    """Per group of runs (seeds of one setting): confusion counts summed over its runs."""
    rows = []
    for label, runs in groups.items():
        decided = [(r, c) for r, c in ((r, flag_counts(r)) for r in runs) if c is not None]
        if not decided:
            continue
        counts = [c for _, c in decided]
        total = {k: sum(c[k] for c in counts) for k in ("tp", "fp", "fn", "tn")}
        single = decided[0][0] if len(decided) == 1 else None
        rows.append({"label": label, "runs": len(counts), **_with_rates(total),
                     "flagged": " ".join(map(str, single.flagged_clients)) if single else "",
                     "extreme": " ".join(map(str, single.extreme_clients)) if single else ""})
    return rows
