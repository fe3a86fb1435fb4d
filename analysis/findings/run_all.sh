#!/usr/bin/env bash
# run_all.sh - the exact commands behind analysis/findings/README.md, in the order they were run.
#
#   analysis/findings/run_all.sh [PART ...]     PART: probe a b c d figures (default: all, in order)
#
# Run from anywhere inside the repository. Run folders go to runs/findings/<part>/ (git-ignored);
# a run whose summary.json already exists is skipped, so the script can be re-run after an
# interruption. Runs go in batches of at most ~8 minutes, each batch holding the shared CPU lock
# (one heavy job at a time on the 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
CFG=analysis/findings/configs
LOCK=${MEERKAT_CPU_LOCK:-/tmp/meerkat-cpu.lock}

run() {  # run PART CONFIG NAME [key=value ...]
  local part=$1 cfg=$2 name=$3; shift 3
  local out=runs/findings/$part
  if [[ -f $out/$name/summary.json ]]; then echo "skip $part/$name (done)"; return; fi
  rm -rf "${out:?}/$name"  # an interrupted run leaves a partial folder
  echo "== $part/$name"
  .venv/bin/meerkat-ray run "$CFG/$cfg.yaml" "output_dir=$out" "name=$name" "$@" --quiet
  .venv/bin/python - "$out/$name/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"   zero-shot {s['zero_shot_accuracy']:.3f}  final {s['final_accuracy']:.3f}  "
      f"test loss {s['final_test_loss']:.4f}  flagged {s['flagged_clients']}  wall {s['total_wall_s']:.0f} s")
PY
}

locked() {  # locked FUNCTION: run a batch of runs while holding the CPU lock
  ( flock 9; "$@" ) 9>"$LOCK"
}

# Cost probes: seconds per step of a sparse and of the full mask on this machine.
part_probe() { locked probe_runs; }
probe_runs() {
  run probe base probe-pg fed.rounds=1 fed.local_steps=10 fed.eval_every=1 data.num_train=0
  run probe base probe-full mask.kind=full zo.lr=3e-6 fed.rounds=1 fed.local_steps=4 fed.eval_every=1
}

# (a) GradIP over 100 local steps: 2 single-label clients (one per class) vs 2 IID clients.
part_a() { locked a_single; locked a_iid; }
a_single() {
  run a gradip single-label data.partition=extreme
}
a_iid() {
  run a gradip iid data.partition=iid
}

# (b) masks, each on its own learning-rate grid (full: 2 points, its steps cost ~3x more).
part_b() { locked b_1; locked b_2; locked b_3; locked b_4; }
b_pg() { run b masks "pretrain_grad-lr$1" mask.kind=pretrain_grad zo.lr=$1; }
b_wm() { run b masks "weight_magnitude-lr$1" mask.kind=weight_magnitude zo.lr=$1; }
b_rnd() { run b masks "random-lr$1" mask.kind=random zo.lr=$1; }
b_full() { run b masks "full-lr$1" mask.kind=full zo.lr=$1; }
b_1() { b_pg 1e-4; b_pg 3e-4; b_pg 1e-3; b_wm 1e-2; }
b_2() { b_wm 3e-3; b_wm 3e-2; b_rnd 3e-3; b_rnd 1e-2; }
b_3() { b_rnd 3e-2; b_full 3e-6; }
b_4() { b_full 1e-5; }

main() {
  local parts=("$@")
  [[ ${#parts[@]} -gt 0 ]] || parts=(probe a b c d figures)
  for part in "${parts[@]}"; do
    declare -F "part_$part" >/dev/null || { echo "error: unknown part '$part'" >&2; exit 2; }
    "part_$part"
  done
}

main "$@"
