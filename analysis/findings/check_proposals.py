"""Did an interrupted Optuna sweep propose what the uninterrupted search proposes?

For a sweep run one trial at a time (`tune.max_concurrent_trials=1`), the search is a pure function
of its seed and of the values its finished trials reported. This script rebuilds it from scratch in
this process - the sweep's own searcher (`distributed.tune.searcher`, same seed and space), fed the
final reported metric of each trial in proposal order, as Tune feeds it - and compares every point
it proposes with the point the real sweep (interrupted and resumed or not) actually ran.

    .venv/bin/python analysis/findings/check_proposals.py sweeps/lr_search [key=value ...]

The overrides are those the sweep was started with (e.g. tune.max_concurrent_trials=1). Exit status 0
when every proposal matches exactly, 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import yaml


COLUMN = {"accuracy": "final_accuracy", "best_accuracy": "best_accuracy", "test_loss": "final_test_loss"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from meerkat_ray.distributed.tune import param_space, searcher
    from meerkat_ray.sweep_file import load_sweep

    folder = Path(args.sweep_dir)
    source = yaml.safe_load((folder / "sweep.yaml").read_text())["source"]
    sweep = load_sweep(source, args.overrides)
    if sweep.tune.metric not in COLUMN:
        print(f"error: tune.metric {sweep.tune.metric} is not a column of results.parquet", file=sys.stderr)
        return 2
    if sweep.tune.search != "optuna" or sweep.tune.max_concurrent_trials != 1:
        print("error: only an Optuna sweep run one trial at a time proposes a fixed sequence", file=sys.stderr)
        return 2
    table = pd.read_parquet(folder / "results.parquet").sort_values("trial_index")
    keys, metric = list(sweep.space), sweep.tune.metric
    alg, _ = searcher(sweep)
    alg.set_search_properties(metric, sweep.tune.mode, param_space(sweep))
    print(f"{len(table)} trials of {folder}, searched keys {keys}, metric {metric}")
    print(f"{'#':>3} {'ran':>32}   {'uninterrupted search proposes':>32}  same  {metric}  rounds")
    same = 0
    for i, row in enumerate(table.to_dict("records")):
        proposed = alg.suggest(f"check{i}")
        ran, wanted = tuple(row[k] for k in keys), tuple(proposed[k] for k in keys)
        same += ran == wanted
        value = row[COLUMN[metric]]  # the trial's last report, as Tune hands it to the searcher
        print(f"{i:>3} {' '.join(f'{v:.6g}' for v in ran):>32}   {' '.join(f'{v:.6g}' for v in wanted):>32}  "
              f"{'yes' if ran == wanted else 'NO':>4}  {value:.4f}  {row['rounds_done']}")
        alg.on_trial_complete(f"check{i}", {metric: value, "training_iteration": int(row["rounds_done"])})
    print(f"{same} of {len(table)} proposals identical")
    return 0 if same == len(table) else 1


if __name__ == "__main__":
    sys.exit(main())
