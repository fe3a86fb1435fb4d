#!/usr/bin/env bash
# run_all.sh - the exact commands behind analysis/findings/README.md, in the order they were run.
#
#   analysis/findings/run_all.sh [PART ...]     PART: probe a b b5 b6 c c2 d d2 e e2 f h_dev h_held h4 dp est figures
#                                               (default: a b b5 b6 c c2 e e2 f figures; d, d2: the old (d))
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

run_default() {  # run_default PART NAME [key=value ...]: the embedded default (`meerkat-ray run`), locally
  local part=$1 name=$2; shift 2
  local out=runs/findings/$part
  if [[ -f $out/$name/summary.json ]]; then echo "skip $part/$name (done)"; return; fi
  rm -rf "${out:?}/$name"
  echo "== $part/$name"
  .venv/bin/meerkat-ray run "output_dir=$out" "name=$name" executor=local model.num_threads=1 "$@" --quiet
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
# weight-magnitude, random and full were best at the top of their grids: points higher up
part_b5() { locked b_5; }
b_5() { b_wm 1e-1; b_rnd 1e-1; b_wm 3e-1; b_full 3e-5; }

# (b6) the paper's baselines on (b)'s setting, equal local steps, every round evaluated (for the
# accuracy vs cumulative uplink bytes figure): Meerkat at (b)'s two best learning rates again,
# LoRA-FedZO (ZO on peft LoRA adapters, rank 8 on q_proj/v_proj) and first-order FedAvg of the
# masked values, each on its own learning-rate grid. One thread each (runs beside other jobs).
part_b6() { locked b6_meerkat; locked b6_lora; locked b6_fo; }
b6() { run b6 masks "$1" fed.eval_every=1 model.num_threads=1 "${@:2}"; }
b6_meerkat() { for lr in 3e-4 1e-3; do b6 "meerkat-lr$lr" zo.lr=$lr; done; }
b6_lora() { for lr in 1e-3 3e-3 5e-3 1e-2 1e-1; do b6 "lora_zo-lr$lr" fed.algorithm=lora_zo zo.lr=$lr; done; }
b6_fo() { for lr in 1e-3 3e-3 1e-2 3e-2 1e-1; do b6 "first_order-lr$lr" fed.algorithm=first_order fed.fo_lr=$lr; done; }

# (c) T in {1, 5, 20} at 40 local steps per client, at the pretrain_grad learning rate that won (b).
part_c() { locked c_runs; }
c_runs() {
  local lr
  lr=$(best_lr pretrain_grad)
  echo "   (c) uses zo.lr=$lr, the best pretrain_grad learning rate of (b)"
  run c sync c-T1 fed.local_steps=1 fed.rounds=40 fed.eval_every=40 zo.lr="$lr"
  run c sync c-T5 fed.local_steps=5 fed.rounds=8 fed.eval_every=8 zo.lr="$lr"
  run c sync c-T20 fed.local_steps=20 fed.rounds=2 fed.eval_every=2 zo.lr="$lr"
}

# (c) again at lr 3e-4, (b)'s best pretrain_grad learning rate by test loss (1e-3 won (b) on accuracy
# after 15 steps per client but over 40 steps it makes every T worse than zero-shot in test loss)
part_c2() { locked c2_runs; }
c2_runs() {
  run c sync c-T1-lr3e-4 fed.local_steps=1 fed.rounds=40 fed.eval_every=40 zo.lr=3e-4
  run c sync c-T5-lr3e-4 fed.local_steps=5 fed.rounds=8 fed.eval_every=8 zo.lr=3e-4
  run c sync c-T20-lr3e-4 fed.local_steps=20 fed.rounds=2 fed.eval_every=2 zo.lr=3e-4
}

best_lr() {  # best_lr MASK: the learning rate of (b)'s best run of that mask (accuracy, then test loss)
  .venv/bin/python - "$1" <<'PY'
import json, sys, yaml
from pathlib import Path
best = None
for s in Path("runs/findings/b").glob("*/summary.json"):
    cfg = yaml.safe_load((s.parent / "config.yaml").read_text())
    if cfg["mask"]["kind"] != sys.argv[1]:
        continue
    r = json.loads(s.read_text())
    key = (r["final_accuracy"], -r["final_test_loss"])
    if best is None or key > best[0]:
        best = (key, cfg["zo"]["lr"])
print(best[1] if best else 3e-4)
PY
}

# (d) Meerkat-vp vs Meerkat vs random early stopping on a mixed partition; seed 0, then seed 1.
part_d() { locked d_seed 0; }
part_d2() { locked d_seed 1; }
d_seed() {
  run d vp "d-vp-s$1" seed="$1"
  run d vp "d-meerkat-s$1" seed="$1" vp.enabled=false
  run d vp "d-random-s$1" seed="$1" vp.policy=random
}

# (e) VPCS flagging on the embedded default over 5 seeds (each seed another partition and draw);
# the decision is made at the end of round 1 (first_round calibration), so round 1 is all it needs.
part_e() { for s in 0 1 2 3 4; do locked run_default e "e-default-s$s" seed="$s" fed.rounds=1 fed.eval_every=1; done; }
# (e2) a setting the defaults were not chosen on: 3-class tweets, 8 clients, 2 of them single-label.
part_e2() {
  for s in 0 1 2; do
    locked run_default e "e-tweets3-s$s" seed="$s" data.task=tweets data.num_clients=8 \
      data.extreme_fraction=0.25 fed.rounds=1 fed.eval_every=1
  done
}
# (f) the paper's claim (4) on the embedded default, at equal steps per client: Meerkat-vp, random
# early stopping (as many clients), and Meerkat with the same 30-step first round (VPCS off).
part_f() { for s in 0 1 2; do locked f_seed "$s"; done; }
f_seed() {
  run_default f "f-vp-s$1" seed="$1"
  run_default f "f-random-s$1" seed="$1" vp.policy=random
  run_default f "f-meerkat-s$1" seed="$1" vp.enabled=false fed.first_round_steps=30
}

# (h) 100-step calibration trajectories (round 1 only) for the held-out protocol of (h): the
# development seeds first, then the held-out settings H1-H3. One run at a time.
kept_run() {  # kept_run PART NAME [key=value ...]: run_default, then keep the files the tables and
  # figures read in analysis/findings/data/PART/NAME/ (committed); a kept run is skipped, since runs/
  # does not outlive a checkout
  local part=$1 name=$2 keep=analysis/findings/data/$1/$2
  if [[ -f $keep/summary.json ]]; then echo "skip $part/$name (kept in $keep)"; return; fi
  run_default "$@"
  mkdir -p "$keep"
  cp runs/findings/$part/$name/{path.parquet,clients.json,config.yaml,summary.json,metrics.jsonl} "$keep/"
}
h_run() { kept_run h "$@" fed.rounds=1 fed.eval_every=1 vp.calib_steps=100; }
part_h_dev() { for s in 0 1; do locked h_run "h-default-s$s" seed="$s"; done; }
part_h_held() {
  for s in 2 3 4 5 6 7 8 9; do locked h_run "h-default-s$s" seed="$s"; done
  for s in 0 1 2 3 4; do
    locked h_run "h-tweets3-s$s" seed="$s" data.task=tweets data.num_clients=8 data.extreme_fraction=0.25
  done
  for s in 0 1 2 3 4; do
    locked h_run "h-a03-s$s" seed="$s" data.num_clients=10 data.alpha=0.3 data.extreme_fraction=0.3
  done
}
# (h) claim (4) where the stop can matter: 16 rounds after the decision, 3 seeds, one trial at a
# time; `--resume` continues an interrupted sweep (the first command starts it).
part_h4() {
  for sweep in claim4 claim4_meerkat; do
    local folder=sweeps/$sweep
    if [[ -f $folder/results.parquet ]]; then echo "skip $sweep (done)"; continue; fi
    if [[ -d $folder ]]; then locked .venv/bin/meerkat-ray tune "$CFG/$sweep.yaml" --resume
    else locked .venv/bin/meerkat-ray tune "$CFG/$sweep.yaml"; fi
  done
}
# (i) DP-ZO on the embedded default: sigma in {0, 0.5, 1, 2} at C = 10 (about the 80th percentile of
# |scalar| in the development runs of (h): 25/50/75/90% = 0.9 / 2.9 / 7.5 / 14), 2 seeds, against the
# non-private default of the same seeds. The noise on a step's scalar has s.d. sigma C / B = 1.25 sigma.
i_run() { kept_run i "$@"; }
part_dp() {
  for s in 0 1; do
    for sigma in 0 0.5 1 2; do
      locked i_run "i-dp-sigma$sigma-s$s" seed="$s" privacy.enabled=true data.sampler=poisson \
        privacy.clip=10 privacy.noise_multiplier="$sigma"
    done
    locked i_run "i-nonprivate-s$s" seed="$s"
  done
}
# (i) the estimators at equal forward passes per round (16 per client): central P=1 and forward P=1
# at T = 8, central P=2 and forward P=3 at T = 4 (VPCS off, so every client runs every step).
part_est() {
  for s in 0 1; do
    locked i_run "i-central-p1-s$s" seed="$s" vp.enabled=false
    locked i_run "i-forward-p1-s$s" seed="$s" vp.enabled=false zo.estimator=forward
    locked i_run "i-central-p2-s$s" seed="$s" vp.enabled=false zo.num_perturbations=2 fed.local_steps=4
    locked i_run "i-forward-p3-s$s" seed="$s" vp.enabled=false zo.estimator=forward \
      zo.num_perturbations=3 fed.local_steps=4
  done
}

# Figures and the tables the findings page quotes.
part_figures() { .venv/bin/python analysis/findings/figures.py; }

main() {
  local parts=("$@")
  [[ ${#parts[@]} -gt 0 ]] || parts=(a b b5 b6 c c2 e e2 f figures)
  for part in "${parts[@]}"; do
    declare -F "part_$part" >/dev/null || { echo "error: unknown part '$part'" >&2; exit 2; }
    "part_$part"
  done
}

main "$@"
