"""The server's round: GradIP, aggregation under both seed-sharing modes, client weights, byte
accounting, VPCS (statistics, policies, early stopping) and rejected client results."""

import math

import numpy as np
import pytest
import torch

from meerkat_ray.client import ClientData, ClientWorker
from meerkat_ray.config import Config, VPConfig, load_config
from meerkat_ray.gradip import flag_quality, vpcs_statistics
from meerkat_ray.messages import ClientResult, SyncMessage
from meerkat_ray.strategies.strategy import VPState
from meerkat_ray.terms import replay_client_
from meerkat_ray.server import Server
from meerkat_ray.strategies.policies import GradIPPolicy, RandomPolicy, RoundView
from meerkat_ray.masked_view import MaskedView
from meerkat_ray.zo import perturbation

SIZES = [10, 30, 60]


def select(policy, stats, cfg, rng=None) -> list[int]:
    """An early-stop policy's decision on the VPCS statistics `stats` (vp config `cfg`)."""
    stats = {k: vars(s) if not isinstance(s, dict) else s for k, s in stats.items()}  # the rule reads dicts
    return policy(Config(vp=cfg), rng).early_stop(RoundView(1, stats=stats))


def config(*overrides):
    return load_config(None, ["fed.local_steps=4", "data.batch_size=4", "vp.enabled=false", *overrides])


def synthetic_server(*overrides, n=50, sizes=SIZES, with_g_pre=True):
    gen = torch.Generator().manual_seed(0)
    theta0 = torch.randn(n, generator=gen)
    g_pre = torch.randn(n, generator=gen) if with_g_pre else None
    return Server(config(*overrides), theta0, g_pre, list(sizes)), theta0, g_pre


def answer(plans, seed=0):
    """Well-formed results with random scalars for every plan."""
    rng = np.random.default_rng(seed)
    return [ClientResult(round=p.round, client=p.client, scalars=[float(g) for g in rng.standard_normal(p.steps)],
                         losses=[0.7] * p.steps) for p in plans]


def weights(sizes, accepted):
    total = sum(sizes[k] for k in accepted)
    return {k: sizes[k] / total for k in accepted}


# ----------------------------------------------------------------------------- the round loop's calls

def test_the_loop_finishes_the_servers_own_plans_once_and_in_order():
    """`finish_planned` uses the plans the server made: results of a round it did not plan, or of a
    round already finished, are an error, and the outcome equals `finish_round` on the same plans."""
    server, _, _ = synthetic_server()
    twin, _, _ = synthetic_server()
    with pytest.raises(RuntimeError, match="round 1 finished without being planned"):
        server.finish_planned(1, [])
    plans = server.plan_round(1)
    with pytest.raises(RuntimeError, match="round 2 finished without being planned"):
        server.finish_planned(2, answer(plans))
    outcome = server.finish_planned(1, answer(plans))
    expected = twin.finish_round(1, twin.plan_round(1), answer(plans))
    assert outcome.metrics == expected.metrics and outcome.path_rows.equals(expected.path_rows)
    assert outcome.sync == expected.sync and torch.equal(server.theta, twin.theta)
    with pytest.raises(RuntimeError, match="round 1 finished without being planned"):
        server.finish_planned(1, answer(plans))  # each round is finished exactly once


# ----------------------------------------------------------------------------- GradIP and aggregation

@pytest.mark.parametrize("sharing", ["round", "client"])
def test_path_rows_carry_grad_ip_seeds_and_weights(sharing):
    server, _, g_pre = synthetic_server(f"fed.seed_sharing={sharing}")
    plans = server.plan_round(1)
    results = answer(plans)
    rows = server.finish_round(1, plans, results).path_rows
    assert list(rows.columns) == ["round", "client", "step", "seed", "scalar", "lr", "weight", "grad_ip"]
    assert len(rows) == 3 * 4
    p = weights(SIZES, [0, 1, 2])
    for row in rows.itertuples():
        plan, result = plans[row.client], results[row.client]
        assert row.round == 1 and row.seed == plan.seeds[row.step] and row.scalar == result.scalars[row.step]
        assert row.lr == plan.lr and row.weight == pytest.approx(p[row.client], rel=1e-15)
        z = perturbation(row.seed, g_pre.numel()).double()
        assert row.grad_ip == pytest.approx(row.scalar * float(torch.dot(g_pre.double(), z)), rel=1e-12)
    assert rows.groupby("client")["weight"].first().sum() == pytest.approx(1.0)


def test_grad_ip_is_nan_without_g_pre():
    server, _, _ = synthetic_server(with_g_pre=False)
    plans = server.plan_round(1)
    rows = server.finish_round(1, plans, answer(plans)).path_rows
    assert rows["grad_ip"].isna().all()


@pytest.mark.parametrize("sharing", ["round", "client"])
def test_aggregate_is_the_weighted_mean_of_the_replayed_client_finals(sharing):
    server, theta0, _ = synthetic_server(f"fed.seed_sharing={sharing}", "zo.lr=0.05")
    theta = theta0.clone()
    for r in (1, 2):
        plans = server.plan_round(r)
        results = answer(plans, seed=r)
        server.finish_round(r, plans, results)
        p = weights(SIZES, [0, 1, 2])
        finals = [replay_client_(theta.clone(), plan.seeds[: plan.steps], res.scalars, plan.lr)
                  for plan, res in zip(plans, results)]
        theta = sum(p[k] * finals[k] for k in range(3))
        assert torch.allclose(server.theta, theta, rtol=0, atol=1e-6)
        assert not torch.allclose(server.theta, theta0, atol=1e-3)


def test_sync_terms_fold_round_shared_steps_in_client_id_order():
    """Round sharing sends T coefficients sum_k p_k g_k^t; client sharing K*T (seed, p_k g_k^t)."""
    a, theta0, _ = synthetic_server("fed.seed_sharing=round")
    b, _, _ = synthetic_server("fed.seed_sharing=client")
    plans_a, plans_b = a.plan_round(1), b.plan_round(1)
    scalars = answer(plans_a)
    results_b = [ClientResult(1, r.client, r.scalars, r.losses) for r in scalars]
    out_a, out_b = a.finish_round(1, plans_a, scalars), b.finish_round(1, plans_b, results_b)
    assert len(out_a.sync.terms) == 4 and len(out_b.sync.terms) == 12
    p = weights(SIZES, [0, 1, 2])
    for t, term in enumerate(out_a.sync.terms):
        assert term.seed == plans_a[0].seeds[t]
        assert term.coef == sum(p[k] * scalars[k].scalars[t] for k in range(3))  # client-id order, exact
    terms_b = [(t.seed, t.coef) for t in out_b.sync.terms]
    assert terms_b == [(s, p[k] * g) for k in range(3) for s, g in zip(plans_b[k].seeds, results_b[k].scalars)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sharing", ["round", "client"])
def test_worker_sync_reproduces_the_server_exactly_with_real_clients(fresh_lm, tiny_mask, tiny_tokens, tiny_label_ids,
                                                                     sharing, dtype):
    lm, mask = fresh_lm, tiny_mask
    lm.model.to(dtype)  # bfloat16: the worker's fp32 master (not the model) is where each client starts
    tokens, labels = tiny_tokens
    split = [np.arange(0, 8), np.arange(8, 24), np.arange(24, 48)]  # sizes 8, 16, 24
    data = ClientData(tokens, labels, split, seed=0, pad_id=lm.tokenizer.pad_token_id)
    theta0 = MaskedView(lm.model, mask).gather()
    cfg = config(f"fed.seed_sharing={sharing}", "fed.local_steps=3", "zo.lr=0.05")
    server = Server(cfg, theta0, None, [8, 16, 24])
    worker = ClientWorker(lm.model, mask, theta0, data, tiny_label_ids, eps=1e-3, batch_size=4, device=lm.device)
    for r in (1, 2):
        start = server.theta.clone()
        plans = server.plan_round(r)
        results, finals = [], []
        for plan in plans:
            results.append(worker.run(plan))
            finals.append(worker.last_theta.clone())
            # what the server will replay is exactly what the client computed
            assert torch.equal(replay_client_(start.clone(), plan.seeds[: plan.steps], results[-1].scalars, plan.lr),
                               finals[-1])
        outcome = server.finish_round(r, plans, results)
        assert outcome.metrics["rejected_clients"] == []
        worker.sync(outcome.sync)
        assert torch.equal(worker.theta_global, server.theta)
        assert torch.equal(MaskedView(lm.model, mask).gather(), server.theta.to(dtype).float())
        expected = sum(w * f for w, f in zip(np.asarray([8, 16, 24]) / 48, finals))
        assert torch.allclose(server.theta, expected, rtol=0, atol=1e-6)
        assert not torch.equal(server.theta, start)
    with pytest.raises(RuntimeError, match="round"):
        worker.sync(SyncMessage(round=2, terms=[]))  # each round is applied exactly once, in order


def test_client_weights_are_proportional_to_client_sizes():
    server, _, _ = synthetic_server(sizes=[1, 2, 3, 4])
    plans = server.plan_round(1)
    rows = server.finish_round(1, plans, answer(plans)).path_rows
    got = rows.groupby("client")["weight"].first()
    assert got.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4], rel=1e-15)


# ----------------------------------------------------------------------------- bytes

@pytest.mark.parametrize("sharing, down_per_client", [
    # plan: 8 * (5 + T) = 72; sync (round): 8 + 8 * T = 40           -> 112 per client
    ("round", 112),
    # plan: 72; sync (client): 8 + 16 * K * T = 8 + 16 * 12 = 200     -> 272 per client
    ("client", 272),
])
def test_byte_accounting_matches_the_formula_and_is_dimension_free(sharing, down_per_client):
    up_per_client = 8 * (2 + 4) + 4 * 4  # round, client + T float64 scalars + T float32 losses = 64
    for n in (10, 100_000):
        server, _, _ = synthetic_server(f"fed.seed_sharing={sharing}", n=n)
        for r in (1, 2):
            plans = server.plan_round(r)
            metrics = server.finish_round(r, plans, answer(plans, seed=r)).metrics
            assert metrics["downlink_bytes"] == 3 * down_per_client, n
            assert metrics["uplink_bytes"] == 3 * up_per_client, n
        assert server.downlink_bytes == 2 * 3 * down_per_client
        assert server.uplink_bytes == 2 * 3 * up_per_client
        assert server.local_steps == 2 * 3 * 4


# ----------------------------------------------------------------------------- VPCS statistics

def decaying(t, rng):
    return np.exp(-t / 10) * (0.5 + rng.random(t.size))


def oscillating(t, rng, phase=0.0):
    return np.sin(0.9 * t + phase) * (0.5 + rng.random(t.size))  # constant amplitude, changing sign


def test_vpcs_flags_a_decaying_trajectory_and_not_oscillating_ones():
    rng, t = np.random.default_rng(0), np.arange(50)
    trajectories = {0: oscillating(t, rng), 1: decaying(t, rng), 2: oscillating(t, rng, 1.0),
                    3: oscillating(t, rng, 2.0), 4: decaying(t, rng) * -1, 5: oscillating(t, rng, 3.0)}
    cfg = VPConfig()  # the defaults
    stats = vpcs_statistics(trajectories, cfg)
    assert select(GradIPPolicy, stats, cfg, np.random.default_rng(0)) == [1, 4]
    assert stats[1].rho_later > 10 and stats[1].quiet_fraction == 1.0
    assert stats[0].rho_later < 2 and stats[0].quiet_fraction < 0.6
    # sigma is relative to the population: rescaling every trajectory changes nothing
    scaled = vpcs_statistics({k: 1e-6 * v for k, v in trajectories.items()}, cfg)
    assert select(GradIPPolicy, scaled, cfg, np.random.default_rng(0)) == [1, 4]
    # an all-oscillating population flags no one
    calm = vpcs_statistics({k: oscillating(t, rng, k) for k in range(5)}, cfg)
    assert select(GradIPPolicy, calm, cfg, np.random.default_rng(0)) == []


def test_vpcs_statistics_on_hand_computed_trajectories():
    """early = 2 steps, late = 5 steps; ref = median of early means = 2; quiet below 0.5 * 2 = 1."""
    a = [4, 4, 1, 1, 1, 1, 1, 1, 1, 1]            # falls to the population's level: rho 4, not quiet
    b = [2, 2, 2, 2, 2, 2, 2, 2, 2, 2]            # flat: rho 1
    c = [1, -1, 0.2, 0.1, -0.1, 0.1, 0.1, 0.1, 0.1, 0.1]  # decays to quiet: rho 10, quiet 1.0
    cfg = VPConfig(statistic="mean")
    stats = vpcs_statistics({0: a, 1: b, 2: c}, cfg)
    assert [(s.early, s.late) for s in stats.values()] == [(4, 1), (2, 2), (1, pytest.approx(0.1))]
    assert [s.rho_later for s in stats.values()] == [4, 1, pytest.approx(10)]
    assert [s.quiet_fraction for s in stats.values()] == [0.0, 0.0, 1.0]
    # a is not quiet: "quiet" is relative to the population, not to a client's own early phase
    assert select(GradIPPolicy, stats, cfg, None) == [2]


def test_median_statistic_ignores_a_single_heavy_tailed_step():
    """early = 2 steps, late = 5. One 60-sized GradIP in client 1's late phase makes its mean 12.8
    (rho 0.08); the median ignores it (rho 1). With 2 early steps median and mean agree (client 0)."""
    a = [61, 1, 1, 1, 1, 1, 1, 1, 1, 1]            # an IID-like client with one outlier step
    b = [1, 1, 1, 1, 1, 60, 1, 1, 1, 1]            # an outlier in the late phase
    c = [2, 2, 2, 2, 2, 0.1, 0.1, 0.1, 0.1, 0.2]   # a real decay to quiet
    mean = vpcs_statistics({0: a, 1: b, 2: c}, VPConfig(statistic="mean"))
    median = vpcs_statistics({0: a, 1: b, 2: c}, VPConfig(statistic="median"))
    assert mean[0].early == 31 and mean[0].rho_later == 31
    assert mean[1].late == pytest.approx(64 / 5) and mean[1].rho_later == pytest.approx(5 / 64)
    # median of [61, 1] is 31 (two early steps), of the late phases 1, 1 and 0.1
    assert [median[k].late for k in (0, 1, 2)] == [1, 1, pytest.approx(0.1)]
    assert median[1].rho_later == 1 and median[2].rho_later == pytest.approx(20)
    # the population reference (default vp.reference=late) is the median of the late statistics
    # (1, 1, 0.1 -> 1): a late step is quiet below vp.sigma (0.55) * 1
    assert [median[k].quiet_fraction for k in (0, 1, 2)] == [0.0, 0.0, 1.0]


def test_vp_state_decides_once_after_calibration_without_waiting_for_a_rejected_client():
    rng, t = np.random.default_rng(1), np.arange(60)
    series = {0: oscillating(t, rng), 1: decaying(t, rng), 2: oscillating(t, rng, 2.0)}
    state = VPState(VPConfig(calib_steps=50), num_clients=3, seed=0)
    for r, lo in enumerate(range(0, 60, 10), start=1):  # rounds of T = 10 steps
        for k in (0, 1, 2):
            if not (k == 2 and r == 5):  # client 2's round-5 result was rejected: 40 steps only
                state.record(k, list(series[k][lo: lo + 10]))
        decided = state.maybe_decide(r, planned_steps=10 * r)
        assert decided == (r == 5) and state.decided == (r >= 5)
    assert select(GradIPPolicy, state.stats, state.cfg) == [1] and state.decided_round == 5
    assert sorted(state.stats) == [0, 1]  # a client short of calib_steps is judged by no one, and not flagged
    state.record(0, [1.0])
    assert len(state.trajectories[0]) == 50  # nothing is recorded after the decision
    disabled = VPState(VPConfig(enabled=False), 1, 0)
    disabled.record(0, [1.0] * 100)
    assert not disabled.maybe_decide(1, 100) and disabled.flagged == []


def test_random_policy_stops_as_many_clients_as_gradip_would():
    rng, t = np.random.default_rng(2), np.arange(50)
    trajectories = {k: (decaying(t, rng) if k in (2, 5, 7) else oscillating(t, rng, k)) for k in range(10)}
    cfg = VPConfig()
    stats = vpcs_statistics(trajectories, cfg)
    assert select(GradIPPolicy, stats, cfg, None) == [2, 5, 7]
    picks = [select(RandomPolicy, stats, cfg, np.random.default_rng(s)) for s in range(20)]
    assert all(len(p) == 3 == len(set(p)) and p == sorted(p) and set(p) <= set(range(10)) for p in picks)
    assert len({tuple(p) for p in picks}) > 5  # random, not the GradIP choice in disguise
    assert select(RandomPolicy, stats, cfg, np.random.default_rng(3)) == picks[3]  # seeded
    # through VPState: same count, reproducible from the run seed
    states = []
    for _ in range(2):
        s = VPState(VPConfig(policy="random"), 10, seed=5)
        for k, v in trajectories.items():
            s.record(k, list(v))
        assert s.maybe_decide(1, 50)
        states.append(select(RandomPolicy, s.stats, s.cfg, s.rng))
    assert len(states[0]) == 3 and states[0] == states[1]


def test_flag_quality_counts_hits():
    assert flag_quality([1, 2], [2, 3]) == {"true_positives": 1, "false_positives": 1, "false_negatives": 1,
                                            "precision": 0.5, "recall": 0.5}
    assert flag_quality([], [])["precision"] is None


# ----------------------------------------------------------------------------- early stopping

def targeted_results(server, plans, targets):
    """Results whose GradIP_t equals targets[client][t] exactly (scalar = target / <g_pre, z_t>)."""
    out = []
    for p in plans:
        dots = [float(torch.dot(server.g_pre, perturbation(s, server.g_pre.numel()).double())) for s in p.seeds]
        out.append(ClientResult(p.round, p.client, [targets[p.client](i) / dots[i] for i in range(p.steps)],
                                [0.5] * p.steps))
    return out


@pytest.mark.parametrize("sharing", ["round", "client"])
def test_flagged_clients_run_one_step_per_round_and_keep_their_data_cursor(sharing):
    server, _, _ = synthetic_server(f"fed.seed_sharing={sharing}", "vp.enabled=true", "vp.calib_steps=8",
                                    "vp.calibration=rounds", sizes=[40, 40, 40, 40])
    step = {k: 0 for k in range(4)}  # each client's global step count, for its GradIP target

    def target(k):
        def f(i):
            t = step[k] + i
            return math.exp(-t) if k == 0 else (1.0 + 0.5 * math.sin(t + k)) * (-1) ** t
        return f

    cursors = {k: 0 for k in range(4)}
    for r in (1, 2, 3, 4):
        plans = server.plan_round(r)
        for p in plans:
            assert p.cursor == cursors[p.client]
            flagged_now = r >= 3 and p.client == 0
            assert p.steps == (1 if flagged_now else 4)
            assert len(p.seeds) == (4 if sharing == "round" else p.steps)
        results = targeted_results(server, plans, {k: target(k) for k in range(4)})
        metrics = server.finish_round(r, plans, results).metrics
        for p in plans:
            step[p.client] += p.steps
            cursors[p.client] += p.steps * 4  # batch_size examples per local step
        assert metrics["vp_decided"] == (r == 2)
        assert metrics["flagged_clients"] == ([0] if r >= 2 else [])
        assert metrics["local_steps"] == (16 if r <= 2 else 13)
    assert server.vp.stats[0]["rho_later"] > 2 and server.vp.stats[1]["rho_later"] < 2


def decaying_target(k):
    """Client 0's |GradIP| decays as exp(-i/2); the others oscillate at a constant amplitude."""
    return (lambda i: math.exp(-i / 2)) if k == 0 else (lambda i: (1.0 + 0.5 * math.sin(i + k)) * (-1) ** i)


@pytest.mark.parametrize("calibration", ["first_round", "probe"])
def test_first_round_calibration_decides_after_round_1_from_an_uninterrupted_trajectory(calibration):
    """Round 1 runs vp.calib_steps = 12 steps (not T = 4) for every client, VPCS decides at its end;
    under `probe` round 1 moves nothing (weight 0, no sync terms), under `first_round` it is aggregated."""
    server, theta0, _ = synthetic_server("vp.enabled=true", "vp.calib_steps=12", "fed.local_steps=4",
                                         f"vp.calibration={calibration}", sizes=[40, 40, 40, 40])
    plans = server.plan_round(1)
    assert [p.steps for p in plans] == [12] * 4 and all(len(p.seeds) == 12 for p in plans)
    outcome = server.finish_round(1, plans, targeted_results(server, plans, {k: decaying_target(k) for k in range(4)}))
    m = outcome.metrics
    assert m["vp_decided"] and m["calibration"] and m["flagged_clients"] == [0] and m["local_steps"] == 48
    assert sorted(m["vpcs"]) == ["0", "1", "2", "3"] and m["vpcs"]["0"]["rho_later"] > 2
    assert len(outcome.path_rows) == 48
    if calibration == "probe":
        assert outcome.sync.terms == [] and torch.equal(server.theta, theta0)
        assert (outcome.path_rows["weight"] == 0).all()
    else:
        assert len(outcome.sync.terms) == 12 and not torch.equal(server.theta, theta0)
        assert outcome.path_rows.groupby("client")["weight"].first().tolist() == [0.25] * 4
    assert m["uplink_bytes"] == 4 * (8 * (2 + 12) + 4 * 12)  # round, client, 12 scalars, 12 fp32 losses: like any round
    plans2 = server.plan_round(2)
    assert [p.steps for p in plans2] == [1, 4, 4, 4]
    assert all(p.cursor == 12 * 4 for p in plans2)  # the calibration consumed data like any step
    m2 = server.finish_round(2, plans2, answer(plans2)).metrics
    assert not m2["vp_decided"] and not m2["calibration"] and m2["flagged_clients"] == [0]


def test_grad_ip_targets_arrive_in_the_path_rows():
    server, _, _ = synthetic_server("vp.enabled=true")
    plans = server.plan_round(1)
    targets = {k: (lambda i, k=k: (k + 1) * 0.1 * (i + 1)) for k in range(3)}
    rows = server.finish_round(1, plans, targeted_results(server, plans, targets)).path_rows
    for row in rows.itertuples():
        assert row.grad_ip == pytest.approx((row.client + 1) * 0.1 * (row.step + 1), rel=1e-9)


# ----------------------------------------------------------------------------- rejected results

def test_rejected_results_are_excluded_reported_and_the_run_continues():
    server, theta0, _ = synthetic_server("zo.lr=0.05", sizes=[10, 20, 30, 40, 50, 60])
    plans = server.plan_round(1)
    results = answer(plans)
    results[0].scalars[2] = float("nan")                                       # non-finite scalar
    results[1].scalars = results[1].scalars[:3]                                # wrong count
    results[2] = ClientResult(7, 2, results[2].scalars, results[2].losses)     # wrong round id
    results[3] = None                                                          # no answer
    results[4].losses[0] = float("inf")                                        # non-finite loss
    outcome = server.finish_round(1, plans, results)
    m = outcome.metrics
    assert m["rejected_clients"] == [0, 1, 2, 3, 4]
    assert set(m["rejected_reasons"]) == {"0", "1", "2", "3", "4"}
    assert "round 7" in m["rejected_reasons"]["2"] and "3 scalars" in m["rejected_reasons"]["1"]
    assert outcome.path_rows["client"].unique().tolist() == [5]
    assert outcome.path_rows["weight"].tolist() == [1.0] * 4  # the weights renormalise over the accepted
    assert m["local_steps"] == 4 and m["train_loss"] == pytest.approx(0.7)
    expected = replay_client_(theta0.clone(), plans[5].seeds, results[5].scalars, plans[5].lr)
    assert torch.allclose(server.theta, expected, rtol=0, atol=1e-6)
    assert server.cursors.tolist() == [16] * 6  # data handed out is consumed, accepted or not

    plans = server.plan_round(2)  # the run goes on with every client
    outcome = server.finish_round(2, plans, answer(plans, seed=2))
    assert outcome.metrics["rejected_clients"] == [] and len(outcome.path_rows) == 24


def test_a_round_with_every_result_rejected_leaves_the_global_values_alone():
    server, theta0, _ = synthetic_server()
    plans = server.plan_round(1)
    outcome = server.finish_round(1, plans, [None, None, None])
    assert outcome.metrics["rejected_clients"] == [0, 1, 2] and outcome.metrics["train_loss"] is None
    assert torch.equal(server.theta, theta0) and outcome.sync.terms == [] and len(outcome.path_rows) == 0


# ----------------------------------------------------------------------------- client data stream

def test_client_data_stream_is_persistent_and_each_epoch_is_a_permutation(tiny_tokens):
    tokens, labels = tiny_tokens
    mine = np.arange(5, 17)  # 12 examples
    data = ClientData(tokens, labels, [np.arange(5), mine], seed=3, pad_id=0)
    whole = data.batch(1, 0, 36)  # three epochs in one go
    rows = [tuple(r[m.bool()].tolist()) for r, m in zip(whole.input_ids, whole.attention_mask)]
    by_tokens = {tuple(tokens[i]): i for i in mine}
    order = [by_tokens[r] for r in rows]
    for e in range(3):
        assert sorted(order[12 * e: 12 * (e + 1)]) == mine.tolist()
    assert order[:12] != order[12:24]  # a fresh permutation per epoch
    assert whole.labels.tolist() == [labels[i] for i in order]
    # cursor c, batch size b: the examples at stream positions c .. c + b - 1, whatever the chunking
    for cursor in (0, 4, 10, 22):
        part = data.batch(1, cursor, 4)
        assert [by_tokens[tuple(r[m.bool()].tolist())] for r, m in zip(part.input_ids, part.attention_mask)] \
            == order[cursor: cursor + 4]
