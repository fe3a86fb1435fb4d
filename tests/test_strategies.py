"""Aggregation rules and client-selection policies on numbers worked out by hand here (never by the
code under test), the per-round client draw against an independent recomputation of its documented
derivation, the server's round under sampling, and the registries as the only list of variant names."""

import hashlib
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch

from meerkat_ray.cli import main
from meerkat_ray.config import CHOICES, Config, load_config
from meerkat_ray.errors import ConfigError
from meerkat_ray.gradip import VPCSStats
from meerkat_ray.messages import ClientResult
from meerkat_ray.server import Server
from meerkat_ray.strategies.aggregation import AGGREGATIONS, ClientPath, make_rule
from meerkat_ray.strategies.policies import ClientSampling, GradIPPolicy, RandomPolicy, RoundView

README = Path(__file__).resolve().parents[1] / "README.md"

LR = 0.1


def terms(rule, paths, sharing="round", **params):
    return [(t.seed, t.lr, t.coef) for t in make_rule(rule, **params).terms(paths, sharing)]


# ----------------------------------------------------------------------------- aggregation rules
# Four clients share seeds 7, 8; client 3 was early-stopped (it ran step 0 only). Weights are
# powers of two, scalars small integers: every sum below is exact in binary.
ROBUST = [ClientPath(3, 0.25, [7], [100.0], LR), ClientPath(0, 0.25, [7, 8], [5.0, 2.0], LR),
          ClientPath(1, 0.25, [7, 8], [-1.0, 8.0], LR), ClientPath(2, 0.25, [7, 8], [3.0, -7.0], LR)]


def test_mean_is_fedavg_under_both_sharing_modes():
    paths = [ClientPath(1, 0.25, [7, 8], [2.0, -4.0], LR), ClientPath(0, 0.75, [7, 8], [1.0, 4.0], LR)]
    # step 0: 0.75*1 + 0.25*2 = 1.25; step 1: 0.75*4 + 0.25*(-4) = 2
    assert terms("mean", paths) == [(7, LR, 1.25), (8, LR, 2.0)]
    paths = [ClientPath(1, 0.25, [3, 4], [2.0, -4.0], LR), ClientPath(0, 0.75, [1, 2], [1.0, 4.0], LR)]
    # client sharing: one term per (client, step), clients in id order, coef = p_k * scalar
    assert terms("mean", paths, "client") == [(1, LR, 0.75), (2, LR, 3.0), (3, LR, 0.5), (4, LR, -1.0)]


def test_median_votes_once_per_client_and_keeps_the_weight_of_those_who_ran():
    # step 0: sorted (-1, 3, 5, 100) -> (3 + 5) / 2 = 4, W = 1; step 1: (-7, 2, 8) -> 2, W = 0.75
    assert terms("median", ROBUST) == [(7, LR, 4.0), (8, LR, 1.5)]


def test_trimmed_mean_drops_floor_beta_m_from_each_end():
    # beta 0.25: step 0 drops floor(1.0) = 1 each end of (-1, 3, 5, 100) -> mean(3, 5) = 4, W = 1;
    # step 1 drops floor(0.75) = 0 of (-7, 2, 8) -> mean 1, W = 0.75
    assert terms("trimmed_mean", ROBUST, trim_fraction=0.25) == [(7, LR, 4.0), (8, LR, 0.75)]
    # beta 0.34 of three values drops floor(1.02) = 1 from each end: (3) and (2), W = 0.75
    assert terms("trimmed_mean", ROBUST[1:], trim_fraction=0.34) == [(7, LR, 0.75 * 3.0), (8, LR, 0.75 * 2.0)]


@pytest.mark.parametrize("rule", [name for name, cls in AGGREGATIONS.items() if cls.round_sharing_only])
def test_robust_rules_refuse_client_sharing_in_code_and_in_config(rule):
    with pytest.raises(ValueError):
        terms(rule, ROBUST, "client")
    with pytest.raises(ConfigError, match=f"^fed.aggregation: {rule} needs fed.seed_sharing=round"):
        load_config(None, [f"fed.aggregation={rule}", "fed.seed_sharing=client"])


# ----------------------------------------------------------------------------- early-stop policies

def vp_stats() -> dict[int, dict]:
    """Against the defaults rho = 1, min_quiet_fraction = 0.5 (both strict): clients 0 and 3 pass."""
    return {0: vars(VPCSStats(3.0, 0.8, 3.0, 1.0)), 1: vars(VPCSStats(0.9, 0.9, 0.9, 1.0)),
            2: vars(VPCSStats(5.0, 0.5, 5.0, 1.0)), 3: vars(VPCSStats(1.5, 0.6, 1.5, 1.0))}


def test_gradip_policy_flags_decay_and_quiet_only_when_the_statistics_arrive():
    policy = GradIPPolicy(Config(), np.random.default_rng(0))
    assert policy.early_stop(RoundView(1, stats=vp_stats())) == [0, 3]
    assert policy.early_stop(RoundView(2, losses={0: [0.1]}, grad_ips={0: [9.0]})) is None  # no decision: no change


def test_random_policy_stops_as_many_uniformly_and_only_from_its_stream():
    """As many clients as VPCS flags (two of four here), each pair of clients equally likely over
    streams (chi-square over 3000 fixed streams, 5 degrees of freedom, below the 0.1% critical value
    20.52), and the same stream state gives the same pair (resume and Ray vs local depend on it)."""
    counts = {}
    for i in range(3000):
        flagged = RandomPolicy(Config(), np.random.default_rng(i)).early_stop(RoundView(1, stats=vp_stats()))
        assert len(flagged) == 2 and set(flagged) <= {0, 1, 2, 3} and flagged == sorted(flagged)
        counts[tuple(flagged)] = counts.get(tuple(flagged), 0) + 1
    assert len(counts) == 6
    chi2 = sum((c - 500) ** 2 / 500 for c in counts.values())
    assert chi2 < 20.52, counts
    first, second = (RandomPolicy(Config(), np.random.default_rng(11)) for _ in range(2))
    assert first.early_stop(RoundView(1, stats=vp_stats())) == second.early_stop(RoundView(1, stats=vp_stats()))
    assert RandomPolicy(Config(), np.random.default_rng(5)).early_stop(RoundView(2)) is None  # no decision yet


# ----------------------------------------------------------------------------- per-round client sampling

def documented_draw(seed: int, round_: int, num_clients: int, m: int) -> list[int]:
    """The draw as ClientSampling's docstring states it, written from that text alone."""
    digest = hashlib.blake2b(f"{seed}/clients/{round_}".encode(), digest_size=8).digest()
    g = np.random.default_rng(int.from_bytes(digest, "little") & (2**63 - 1))
    return sorted(int(i) for i in g.choice(num_clients, size=m, replace=False))


def sampler(seed=3, m=3, clients=6):
    cfg = load_config(None, [f"seed={seed}", f"data.num_clients={clients}", f"fed.clients_per_round={m}"])
    rng = np.random.default_rng(0)
    return ClientSampling(cfg, rng), rng


def test_the_draw_is_reproducible_differs_per_round_and_follows_its_derivation():
    policy, rng = sampler()
    before = rng.bit_generator.state
    draws = [policy.participants(r, list(range(6))) for r in range(1, 11)]
    assert draws == [documented_draw(3, r, 6, 3) for r in range(1, 11)]
    assert all(len(d) == 3 == len(set(d)) and d == sorted(d) and set(d) <= set(range(6)) for d in draws)
    assert len({tuple(d) for d in draws}) > 3                      # a new draw every round
    assert draws == [sampler()[0].participants(r, list(range(6))) for r in range(1, 11)]  # a fresh object agrees
    assert draws != [sampler(seed=4)[0].participants(r, list(range(6))) for r in range(1, 11)]
    assert rng.bit_generator.state == before                       # Meerkat-vp's stream is untouched
    assert policy.participants(1, [1, 4, 5]) == [1, 4, 5]           # never more than it is offered
    assert not ClientSampling.active(Config()) and ClientSampling.active(policy.cfg)


def test_more_clients_per_round_than_clients_is_one_error_line(capsys, no_model_or_cluster):
    assert main(["run", "data.num_clients=4", "fed.clients_per_round=5", "--quiet"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: fed.clients_per_round: 5 is more than the data.num_clients=4 clients there are"]


def test_a_sampled_round_plans_the_draw_renormalises_weights_and_counts_bytes():
    sizes = [10, 30, 60, 100]
    cfg = load_config(None, ["data.num_clients=4", "fed.clients_per_round=2", "fed.local_steps=2", "seed=1",
                             "vp.enabled=false"])
    server = Server(cfg, torch.zeros(8), None, sizes)
    plans = server.plan_round(1)
    a, b = documented_draw(1, 1, 4, 2)
    assert [p.client for p in plans] == [a, b]
    results = [ClientResult(1, p.client, [1.0, 2.0], [0.5, 0.5]) for p in plans]
    out = server.finish_round(1, plans, results)
    # p_k = n_k / (n_a + n_b), over the round's participants only
    assert dict(zip(out.path_rows["client"], out.path_rows["weight"])) == {
        a: sizes[a] / (sizes[a] + sizes[b]), b: sizes[b] / (sizes[a] + sizes[b])}
    # downlink: the two plans (8 B x (5 + 2 seeds)) + the round's sync (8 + 2 x 8 B) to all 4 clients
    assert out.metrics["downlink_bytes"] == 2 * 8 * 7 + 4 * (8 + 2 * 8)
    assert out.metrics["uplink_bytes"] == 2 * (8 * 4 + 4 * 2) and out.metrics["participants"] == [a, b]
    # a rejected participant drops out of the sum: the other one carries weight 1
    plans = server.plan_round(2)
    results = [ClientResult(2, plans[0].client, [1.0, 2.0], [0.5, 0.5]), None]
    assert list(server.finish_round(2, plans, results).path_rows["weight"]) == [1.0, 1.0]


def test_sampling_composes_with_meerkat_vp():
    """Round 1 calibrates (2 steps) the sampled clients; every one of them is flagged (thresholds
    that flag all), and from round 2 a flagged client runs 1 step whenever it is sampled."""
    cfg = load_config(None, ["data.num_clients=4", "fed.clients_per_round=2", "fed.local_steps=2", "seed=2",
                             "vp.calib_steps=2", "vp.rho=1e-6", "vp.sigma=1e6", "vp.min_quiet_fraction=0"])
    server = Server(cfg, torch.zeros(16), torch.ones(16), [16, 16, 16, 16])  # 2 calibration steps of batch 8 each
    calibrated, sampled_flagged = documented_draw(2, 1, 4, 2), 0
    for r in range(1, 7):
        plans = server.plan_round(r)
        assert [p.client for p in plans] == documented_draw(2, r, 4, 2)
        flagged = calibrated if r > 1 else []
        assert [p.steps for p in plans] == [1 if p.client in flagged else 2 for p in plans]
        sampled_flagged += sum(p.client in flagged for p in plans)
        rng = np.random.default_rng(r)
        server.finish_round(r, plans, [ClientResult(r, p.client, list(rng.standard_normal(p.steps)), [0.5] * p.steps)
                                       for p in plans])
        assert server.vp.flagged == calibrated  # decided after round 1, on the clients it calibrated
    assert 0 < sampled_flagged < 2 * 5  # flagged clients were sampled again, and so were others


# ----------------------------------------------------------------------------- one name, one place

def test_every_choice_is_documented_in_the_readme_row_of_its_key():
    import re

    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z_.]+)` \|.*$", README.read_text(), re.M)}
    for key, names in CHOICES.items():
        missing = [n for n in names if not re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", rows[key])]
        assert not missing, (key, missing)


def test_every_named_algorithm_has_its_class():
    from meerkat_ray import choices
    from meerkat_ray.algorithms import ALGORITHMS

    assert set(ALGORITHMS) == set(choices.ALGORITHMS)
    assert all(ALGORITHMS[n].name == n for n in choices.ALGORITHMS)


@pytest.mark.parametrize("module", ["meerkat_ray.messages", "meerkat_ray.config", "meerkat_ray.strategies.policies",
                                    "meerkat_ray.strategies.aggregation", "meerkat_ray.mask_kinds"])
def test_light_modules_import_neither_torch_nor_pandas(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'pandas', 'safetensors') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", (module, out)
