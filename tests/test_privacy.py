"""DP-ZO (`privacy.*`): the noisy scalar's distribution, each client's epsilon recomputed with the
accountant library called directly, the bit-exact replay of a private run, its budget refusals."""
import json
import math
import statistics

import pandas as pd
import pytest
import torch
import yaml
from conftest import TINY_RUN, run_folder
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant
from safetensors.torch import load_file

from meerkat_ray.config import load_config
from meerkat_ray.replay import replay_run
from meerkat_ray.runlog import read_metrics
from meerkat_ray.zo import dp_scalar, perturbation

PRIVATE = [*TINY_RUN, "data.num_train=240", "data.num_clients=3", "data.partition=iid", "fed.rounds=2",
           "fed.local_steps=3", "fed.eval_every=2", "vp.calib_steps=3", "executor=local", "privacy.enabled=true",
           "data.sampler=poisson", "privacy.clip=0.5", "privacy.noise_multiplier=1.5", "privacy.delta=1e-4"]


def library_epsilon(sigma: float, rate: float, steps: int, delta: float) -> float:
    """The RDP accountant's analysis functions, called here directly over its default orders."""
    rdp = compute_rdp(q=rate, noise_multiplier=sigma, steps=steps, orders=RDPAccountant.DEFAULT_ALPHAS)
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def test_the_noisy_scalar_is_the_clipped_mean_plus_gaussian_noise_of_variance_sigma2_c2_over_b2():
    """(sum_i clip(d_i, -C, C) + N(0, sigma^2 C^2)) / B over 4000 draws: the mean is the clipped
    sum over B (not the raw one), the variance sigma^2 C^2 / B^2, each within 4 standard errors."""
    C, sigma, B, N = 0.5, 2.0, 8, 4000
    differences = [0.3, 5.0, -2.0, 0.1]   # clipped: 0.3 + 0.5 - 0.5 + 0.1 = 0.4
    g = torch.Generator().manual_seed(1)
    draws = [dp_scalar(differences, C, sigma, B, g) for _ in range(N)]
    variance = sigma ** 2 * C ** 2 / B ** 2
    assert abs(statistics.fmean(draws) - 0.4 / B) < 4 * math.sqrt(variance / N)
    assert abs(statistics.variance(draws) - variance) < 4 * variance * math.sqrt(2 / (N - 1))
    assert dp_scalar(differences, C, 0.0, B, g) == pytest.approx(0.4 / B, abs=1e-15)


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    return run_folder(PRIVATE, tmp_path_factory.mktemp("dp"), "dp")


@pytest.mark.slow
def test_each_clients_epsilon_is_the_accountants_for_the_steps_it_ran(private_run):
    clients = json.loads((private_run / "clients.json").read_text())
    path = pd.read_parquet(private_run / "path.parquet")
    summary = json.loads((private_run / "summary.json").read_text())
    privacy = summary["privacy"]
    for c in clients:
        k = c["client"]
        steps = int((path["client"] == k).sum())
        expected = library_epsilon(1.5, 4 / c["size"], steps, 1e-4)
        assert privacy["epsilon"][str(k)] == pytest.approx(expected, rel=1e-9)
        assert privacy["sampling_rates"][k] == 4 / c["size"]
    assert privacy["max_epsilon"] == max(privacy["epsilon"].values())
    for m in read_metrics(private_run)[1:]:  # every round: the epsilon so far
        steps = {str(k): int(((path["client"] == k) & (path["round"] <= m["round"])).sum()) for k in range(3)}
        for k, eps in m["privacy_epsilon"].items():
            size = clients[int(k)]["size"]
            assert eps == pytest.approx(library_epsilon(1.5, 4 / size, steps[k], 1e-4), rel=1e-9)
        assert m["train_loss"] is None  # no loss is uploaded: it would be an unprotected release
        ran = path[path["round"] == m["round"]].groupby("client").size()
        assert m["uplink_bytes"] == sum(16 + 8 * int(n) for n in ran)  # ids and scalars, no losses


@pytest.mark.slow
def test_a_private_run_replays_bit_for_bit_and_its_noise_is_not_the_run_seeds(private_run, tmp_path):
    final = load_file(str(private_run / "sparse_final.safetensors"))["theta"]
    assert torch.equal(replay_run(private_run), final)
    again = run_folder(PRIVATE, tmp_path, "dp")  # same config and seed: other samples, other noise
    assert not torch.equal(load_file(str(again / "sparse_final.safetensors"))["theta"], final)
    assert torch.equal(replay_run(again), load_file(str(again / "sparse_final.safetensors"))["theta"])
    g_pre = load_file(str(private_run / "mask.safetensors"))["pretrain_grad"].double()
    path = pd.read_parquet(private_run / "path.parquet")
    for row in path.sample(5, random_state=0).itertuples():  # VPCS reads the received (noisy) scalars
        dot = float(g_pre @ perturbation(row.seed, g_pre.numel()).double())
        assert row.grad_ip == pytest.approx(row.scalar * dot, rel=1e-6, abs=1e-12)


@pytest.mark.slow
def test_sigma_from_a_target_meets_it_and_a_plan_above_the_target_is_refused(tmp_path):
    """noise_from_target: the run's sigma keeps every client within the target (checked with the
    library), it is the summary's, and the config stays as written (a resumed run or a retried
    trial compares its config with the checkpoint's); a plan above the target is refused."""
    from meerkat_ray.checkpoint import open_resume
    from meerkat_ray.errors import ConfigError
    from meerkat_ray.experiment import prepare_data
    from meerkat_ray.privacy import noise_multiplier

    cfg = load_config(None, [*PRIVATE, "privacy.target_epsilon=3", "privacy.noise_from_target=true"])
    data = prepare_data(cfg)
    assert cfg.privacy.noise_multiplier == 1.5  # as written: never overwritten
    steps = 6  # 2 rounds of 3
    sigma = noise_multiplier(cfg, data.client_sizes)
    worst = max(4 / n for n in data.client_sizes)
    assert library_epsilon(sigma, worst, steps, 1e-4) <= 3 < library_epsilon(0.9 * sigma, worst, steps, 1e-4)
    with pytest.raises(ConfigError, match="^privacy.target_epsilon: the plan gives client"):
        prepare_data(load_config(None, [*PRIVATE, "privacy.target_epsilon=0.01"]))
    with pytest.raises(ConfigError, match="^privacy.target_epsilon: 0.001 at delta"):  # out of the accountant's reach
        prepare_data(load_config(None, [*PRIVATE, "privacy.target_epsilon=0.001", "privacy.noise_from_target=true"]))
    run = run_folder(PRIVATE, tmp_path, "target", "privacy.target_epsilon=3", "privacy.noise_from_target=true")
    assert json.loads((run / "summary.json").read_text())["privacy"]["noise_multiplier"] == pytest.approx(sigma)
    assert yaml.safe_load((run / "config.yaml").read_text())["privacy"]["noise_multiplier"] == 1.5
    expect = load_config(None, [*PRIVATE, "privacy.target_epsilon=3", "privacy.noise_from_target=true",
                                f"output_dir={tmp_path}", "name=target"])
    open_resume(run, expect=expect)  # the trial's own config still matches its checkpoint


@pytest.mark.parametrize("override, key", [
    ("privacy.clip=0", "privacy.clip"),
    ("privacy.noise_multiplier=-0.1", "privacy.noise_multiplier"),
    ("privacy.delta=0", "privacy.delta"),
    ("privacy.delta=1", "privacy.delta"),
    ("data.sampler=stream", "privacy.enabled"),                 # not the accountant's sampling
    ("data.batch_size=200", "data.batch_size"),                 # a full batch: no amplification
    ("zo.num_perturbations=2", "zo.num_perturbations"),
    ("privacy.target_epsilon=0.01", "privacy.target_epsilon"),  # the plan spends more
    ("privacy.enabled=false data.sampler=stream privacy.target_epsilon=1", "privacy.target_epsilon"),
])
def test_a_private_run_that_cannot_keep_its_promise_is_refused_in_one_line(tmp_path, capfd, override, key):
    from meerkat_ray.cli import main

    code = main(["run", *PRIVATE, f"output_dir={tmp_path}", "name=bad", *override.split(), "--quiet"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {key}:"), err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_analyze_reports_each_private_runs_epsilon(private_run, tmp_path):
    from analysis import analyze

    analyze(private_run, tmp_path / "out")
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    summary = json.loads((private_run / "summary.json").read_text())
    assert runs["privacy_epsilon"][0] == pytest.approx(summary["privacy"]["max_epsilon"])
    assert runs["privacy_delta"][0] == 1e-4
    assert "privacy_epsilon" in (tmp_path / "out" / "report.html").read_text()


def test_the_progress_bar_counts_a_private_results_steps_by_its_scalars():
    from meerkat_ray.messages import ClientResult
    from meerkat_ray.runner import steps_reported

    assert steps_reported(ClientResult(1, 0, [0.1, -0.2, 0.3], [])) == 3  # no losses are uploaded
    assert steps_reported(ClientResult(1, 0, [0.1, -0.2], [0.5, 0.6])) == 2


@pytest.mark.slow
def test_without_noise_a_private_run_says_it_has_no_bound(tmp_path, capsys):
    """sigma = 0: clipping and Poisson sampling but no guarantee; epsilon is null, the summary says so."""
    from meerkat_ray.cli import main

    assert main(["run", *PRIVATE, "privacy.noise_multiplier=0", f"output_dir={tmp_path}", "name=open"]) == 0
    assert "no (epsilon, delta) bound: noise multiplier 0" in capsys.readouterr().out
    privacy = json.loads((tmp_path / "open" / "summary.json").read_text())["privacy"]
    assert privacy["max_epsilon"] is None and set(privacy["epsilon"].values()) == {None}
