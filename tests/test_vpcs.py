"""Meerkat-vp end to end on a setting whose answer is known.

The task's prompts carry no information about the label (labels are coin flips), so an IID client
can never lower its loss below log 2 and its ZO scalars keep oscillating, while a single-label
client drives its loss towards 0 and its GradIP decays: VPCS must flag exactly the single-label
clients, from the run's own calibration trajectories (thresholds set for the setting, not forced
to flag everyone), after round 1. The checks recompute what they can from the contracts
(MEERKAT.md section 3), not with the package's own functions.
"""
import json
import os
import random
import statistics
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from meerkat_ray.config import load_config
from meerkat_ray.runlog import read_metrics, read_path
from meerkat_ray.runner import run_experiment

pytestmark = pytest.mark.slow

K, T, ROUNDS, CALIB, BATCH = 4, 4, 3, 40, 4


def coin_flip_task(folder, num_train=1200, num_test=16, seed=0):
    """SST-2-shaped rows whose sentences say nothing about their (random) labels."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    subjects = ["the film", "this movie", "the plot", "the cast"]
    for split, count in (("train", num_train), ("validation", num_test)):
        rows = [{"idx": i, "sentence": f"{subjects[i % 4]} no. {i} ", "label": rng.randrange(2)} for i in range(count)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return coin_flip_task(tmp_path_factory.mktemp("coin-flip"))


def known(task_dir, out, name, *extra):
    return [
        "model.name=tiny-llama", "model.num_threads=1", "seed=0", "executor=local",
        "data.task=sst2", f"data.source={task_dir}", "data.num_test=16", f"data.num_clients={K}",
        "data.partition=mixed", "data.extreme_fraction=0.5", f"data.batch_size={BATCH}", "data.max_length=16",
        "mask.density=0.1", "mask.calib_num_seqs=4", "mask.calib_seq_len=32", "mask.calib_batch_size=2",
        "zo.lr=0.5", f"fed.rounds={ROUNDS}", f"fed.local_steps={T}", f"fed.eval_every={ROUNDS}",
        # thresholds for this setting (its IID clients' |GradIP| is small throughout, so the yardstick
        # for "quiet" is the population's early level): they flag on the run's own statistics
        f"vp.calib_steps={CALIB}", "vp.statistic=median", "vp.reference=early", "vp.sigma=0.5", "vp.rho=3",
        "vp.min_quiet_fraction=0.3",
        f"output_dir={out}", f"name={name}", *extra,
    ]


def independent_replay(run_dir) -> torch.Tensor:
    """sparse_final from sparse_init + path.parquet by the contract: per round, per seed (first use
    order), coef = sum over clients in id order of weight * scalar; theta += -(lr * coef) * z(seed)."""
    theta = load_file(str(run_dir / "sparse_init.safetensors"))["theta"].clone()
    path = pd.read_parquet(run_dir / "path.parquet")
    for _, rows in path.groupby("round", sort=True):
        coefs, lrs = {}, {}
        for row in rows.sort_values(["step", "client"]).itertuples():
            coefs[row.seed] = coefs.get(row.seed, 0.0) + row.weight * row.scalar
            lrs[row.seed] = row.lr
        for seed, coef in coefs.items():
            z = torch.randn(theta.numel(), generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)
            theta.add_(z, alpha=-(lrs[seed] * coef))
    return theta


@pytest.fixture(scope="module")
def first_round(task_dir, tmp_path_factory):
    """The default calibration (vp.calibration=first_round), run through the CLI as a user would."""
    out = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "meerkat_ray", "run", *known(task_dir, out, "vp")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "vp", proc.stdout + proc.stderr


def test_vpcs_flags_exactly_the_single_label_clients_after_round_1(first_round):
    run_dir, output = first_round
    clients = json.loads((run_dir / "clients.json").read_text())
    single_label = [c["client"] for c in clients if sum(h > 0 for h in c["label_histogram"]) == 1]
    assert len(single_label) == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["flagged_clients"] == single_label == summary["extreme_clients"]
    assert summary["vp_decided_round"] == 1 and summary["vp_calibration"] == "first_round"
    assert summary["flagging"]["precision"] == 1.0 and summary["flagging"]["recall"] == 1.0
    metrics = read_metrics(run_dir)
    decision = metrics[1]
    assert decision["vp_decided"] and decision["calibration"] and decision["flagged_clients"] == single_label
    assert decision["flagging"]["precision"] == 1.0 == decision["flagging"]["recall"]
    assert sorted(decision["vpcs"]) == [str(k) for k in range(K)]
    assert not any(m.get("vp_decided") or m.get("calibration") for m in metrics[2:])
    assert f"VPCS decided after round 1: flagged {single_label}" in output
    assert "precision 1.000, recall 1.000" in output


def median(values: list[float]) -> float:
    ordered, n = sorted(values), len(values)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def test_the_flags_follow_from_round_1_grad_ip_by_the_documented_formulas(first_round):
    """README (Meerkat-vp, config table): over each client's round-1 trajectory of |GradIP| (N steps),
    early = the first round(0.2 N) steps, late = the last round(0.5 N); S = median (vp.statistic);
    reference = median over clients of S(early) (vp.reference=early); rho_later = S(early) / S(late);
    quiet = share of late steps with |GradIP| < sigma * reference; flagged when rho_later > rho and
    quiet > min_quiet_fraction. GradIP itself is scalar * <g_pre, z(seed)> (MEERKAT.md section 2)."""
    run_dir, _ = first_round
    g_pre = load_file(str(run_dir / "mask.safetensors"))["pretrain_grad"].double()
    path = pd.read_parquet(run_dir / "path.parquet")
    calibration = path[path["round"] == 1].sort_values(["client", "step"])
    for row in calibration.sample(12, random_state=0).itertuples():  # the column holds GradIP
        z = torch.randn(g_pre.numel(), generator=torch.Generator("cpu").manual_seed(int(row.seed)), dtype=torch.float32)
        assert row.grad_ip == pytest.approx(row.scalar * float(g_pre @ z.double()), rel=1e-4, abs=1e-9)
    trajectories = {k: [abs(v) for v in rows["grad_ip"]] for k, rows in calibration.groupby("client")}
    assert {len(t) for t in trajectories.values()} == {CALIB}
    n_early, n_late = round(0.2 * CALIB), round(0.5 * CALIB)
    early = {k: median(t[:n_early]) for k, t in trajectories.items()}
    late = {k: median(t[-n_late:]) for k, t in trajectories.items()}
    reference = median(list(early.values()))
    sigma, rho, min_quiet = 0.5, 3, 0.3  # the thresholds of known()
    quiet = {k: sum(a < sigma * reference for a in t[-n_late:]) / n_late for k, t in trajectories.items()}
    expected = sorted(k for k in trajectories if early[k] / late[k] > rho and quiet[k] > min_quiet)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["flagged_clients"] == expected
    recorded = read_metrics(run_dir)[1]["vpcs"]  # and the statistics the round reports are these
    for k in trajectories:
        assert recorded[str(k)]["rho_later"] == pytest.approx(early[k] / late[k], rel=1e-9)
        assert recorded[str(k)]["quiet_fraction"] == pytest.approx(quiet[k], abs=1e-12)


def test_calibration_is_one_uninterrupted_round_and_is_counted_like_any_other(first_round):
    run_dir, _ = first_round
    path = read_path(run_dir)
    steps = path.groupby(["round", "client"]).size()
    summary = json.loads((run_dir / "summary.json").read_text())
    flagged = summary["flagged_clients"]
    for k in range(K):
        assert steps[(1, k)] == CALIB
        assert all(steps[(r, k)] == (1 if k in flagged else T) for r in range(2, ROUNDS + 1))
    assert summary["calibration_local_steps"] == K * CALIB
    assert summary["local_steps"] == len(path) == K * CALIB + (ROUNDS - 1) * (len(flagged) + (K - len(flagged)) * T)
    # uplink per client and round: round, client ids + one 8-byte scalar and one 4-byte loss per step
    metrics = read_metrics(run_dir)
    for m in metrics[1:]:
        rows = steps.loc[m["round"]]
        assert m["uplink_bytes"] == sum(8 * (2 + n) + 4 * n for n in rows)
    assert summary["uplink_bytes"] == sum(m["uplink_bytes"] for m in metrics)


def test_the_calibration_steps_replay_to_sparse_final_bit_for_bit(first_round):
    run_dir, _ = first_round
    final = load_file(str(run_dir / "sparse_final.safetensors"))["theta"]
    assert torch.equal(independent_replay(run_dir), final)


def test_tensorboard_shows_the_decision(first_round):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = first_round
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"vpcs/precision", "vpcs/recall", "vpcs/decided_round"} <= tags
    assert {f"vpcs/rho_later/client_{k}" for k in range(K)} <= tags
    assert [(e.step, e.value) for e in acc.Scalars("vpcs/precision")] == [(1, 1.0)]


def test_probe_calibration_flags_the_same_clients_and_discards_its_update(task_dir, tmp_path, first_round):
    """Round 1 under `probe` is the same trajectory from the same initial model (same flags, same
    statistics), but aggregated with weight 0: the global model after round 1 is the initial one."""
    run_dir, _ = first_round
    run_experiment(load_config(None, known(task_dir, tmp_path, "probe", "vp.calibration=probe")), progress=False)
    probe = tmp_path / "probe"
    first, second = read_metrics(run_dir)[1], read_metrics(probe)[1]
    assert second["vpcs"] == first["vpcs"] and second["flagged_clients"] == first["flagged_clients"]
    path = read_path(probe)
    assert (path[path["round"] == 1]["weight"] == 0).all() and (path[path["round"] > 1]["weight"] > 0).all()
    assert torch.equal(independent_replay(probe), load_file(str(probe / "sparse_final.safetensors"))["theta"])
    # the probe's scalars are exactly the first_round run's (same trajectory); later rounds differ
    a, b = read_path(run_dir), path
    assert a[a["round"] == 1]["scalar"].tolist() == b[b["round"] == 1]["scalar"].tolist()


def test_rounds_calibration_keeps_the_old_behaviour(task_dir, tmp_path):
    """vp.calibration=rounds: calib_steps spread over T-step rounds, decided when they are done."""
    cfg = load_config(None, known(task_dir, tmp_path, "rounds", "vp.calibration=rounds", f"vp.calib_steps={2 * T}"))
    summary = run_experiment(cfg, progress=False)
    steps = read_path(tmp_path / "rounds").groupby(["round", "client"]).size()
    assert summary["vp_decided_round"] == 2 and all(steps[(1, k)] == T for k in range(K))
    assert [m["calibration"] for m in read_metrics(tmp_path / "rounds")[1:]] == [True, True, False]


@pytest.mark.ray
def test_ray_backend_matches_local_through_the_calibration(ray_cluster, task_dir, tmp_path, first_round):
    run_dir, _ = first_round
    cfg = load_config(None, known(task_dir, tmp_path, "ray", "executor=ray", "ray.num_actors=2",
                                  "ray.cpus_per_client=0.5"))
    run_experiment(cfg, progress=False)
    for name in ("sparse_final.safetensors",):
        assert torch.equal(load_file(str(tmp_path / "ray" / name))["theta"], load_file(str(run_dir / name))["theta"])
    assert read_path(tmp_path / "ray").equals(read_path(run_dir))


@pytest.mark.parametrize("override, key", [
    ("vp.calib_steps=1200 vp.min_window=1200", "vp.min_window"),    # 4,800 examples per judged client: none has
    ("vp.rule=oracle", "vp.rule"),
    ("vp.rule=stepwise fed.seed_sharing=client", "vp.rule"),        # no shared direction to compare on
    ("vp.calibration=sometimes", "vp.calibration"),
    ("vp.statistic=mode", "vp.statistic"),
    ("vp.reference=middle", "vp.reference"),
    ("vp.calibration=rounds fed.rounds=2", "vp.calib_steps"),       # 40 steps over rounds of 4 need 10 rounds
    ("vp.calibration=probe fed.rounds=1", "fed.rounds"),            # nothing left to train after the probe
    ("fed.first_round_steps=10", "fed.first_round_steps"),          # shorter than the 40 calibration steps
])
def test_a_calibration_that_cannot_work_is_refused(task_dir, tmp_path, capfd, no_model_or_cluster, override, key):
    from meerkat_ray.cli import main

    code = main(["run", *known(task_dir, tmp_path, "bad"), *override.split(), "--quiet"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {key}:"), err
    assert not (tmp_path / "bad").exists()



def test_a_shorter_calibration_is_the_prefix_of_a_longer_one_and_trend_flags_by_its_formula(task_dir, tmp_path, first_round):
    """The step seeds and the data stream depend on the step index and the data cursor only, so a
    20-step calibration is the first 20 steps of the 40-step one: same seeds, scalars and GradIP.
    Its `trend` decision (vp.rule) follows from path.parquet by the formula of tests/test_vp_rules."""
    from test_vp_rules import mann_kendall_by_hand, relative

    run_dir, _ = first_round
    run_experiment(load_config(None, known(task_dir, tmp_path, "short", "vp.calib_steps=20", "fed.rounds=1",
                                           "fed.eval_every=1", "vp.rule=trend")), progress=False)
    long, short = read_path(run_dir), read_path(tmp_path / "short")
    prefix = long[(long["round"] == 1) & (long["step"] < 20)].reset_index(drop=True)
    columns = ["client", "step", "seed", "scalar", "grad_ip"]
    assert short.sort_values(["client", "step"])[columns].reset_index(drop=True).equals(
        prefix.sort_values(["client", "step"])[columns].reset_index(drop=True))
    trajectories = {k: rows.sort_values("step")["grad_ip"].tolist() for k, rows in short.groupby("client")}
    rel = relative(trajectories)
    z_crit = statistics.NormalDist().inv_cdf(0.05 / K)
    flagged = sorted(k for k, r in rel.items()
                     if mann_kendall_by_hand(r) < z_crit and statistics.median(r[-10:]) < 0)
    decision = read_metrics(tmp_path / "short")[1]
    assert decision["flagged_clients"] == flagged
    for k, r in rel.items():
        assert decision["vpcs"][str(k)]["trend_z"] == pytest.approx(mann_kendall_by_hand(r), rel=1e-9)
