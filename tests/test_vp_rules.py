"""Meerkat-vp's decision rules (`vp.rule`) recomputed from their documented formulas (README config
table, `strategies/vp_rules.py` docstring) with plain-Python implementations written here, and the
per-client calibration window that lets small clients be judged."""
import math
import statistics
from statistics import NormalDist

import numpy as np
import pytest

from meerkat_ray.config import Config, VPConfig, load_config
from meerkat_ray.errors import ConfigError
from meerkat_ray.experiment import check_calibration_data
from meerkat_ray.strategies.policies import GradIPPolicy, RandomPolicy, RoundView
from meerkat_ray.strategies.strategy import ServerStrategy
from meerkat_ray.strategies.vp_rules import VP_RULES, vp_rule


def trajectories(seed=0, clients=6, steps=60, extreme=(1, 4), decay=0.1):
    """GradIP_k^t = s_k^t * c_t: a common per-step factor c_t (one shared direction per step) times
    each client's scalar; the extreme clients' scalars decay exponentially, the others' do not."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(steps) * 10
    out = {}
    for k in range(clients):
        scale = np.exp(-decay * np.arange(steps)) if k in extreme else np.full(steps, rng.uniform(0.7, 1.5))
        out[k] = common * scale * rng.standard_normal(steps)
    return out


def phases(n, early_fraction=0.2, late_fraction=0.5):
    early = max(1, round(early_fraction * n))
    return early, max(1, min(n - early, round(late_fraction * n)))


def relative(trajs):
    """r_k^t = log|a_k^t| - median over the clients present at step t of log|a_j^t|."""
    logs = {k: [math.log(max(abs(float(v)), 1e-300)) for v in t] for k, t in trajs.items()}
    longest = max(len(t) for t in logs.values())
    med = [statistics.median([t[i] for t in logs.values() if len(t) > i]) for i in range(longest)]
    return {k: [v - med[i] for i, v in enumerate(t)] for k, t in logs.items()}


def mad_by_hand(values):
    centre = statistics.median(values)
    return 1.4826 * statistics.median(abs(v - centre) for v in values)


def stepwise_by_hand(trajs, z_cut=3.5):
    decay, se = {}, []
    for k, r in relative(trajs).items():
        early, late = phases(len(r))
        decay[k] = statistics.median(r[-late:]) - statistics.median(r[:early])
        se.append(math.sqrt(math.pi / 2) * math.sqrt(mad_by_hand(r[:early]) ** 2 / early
                                                     + mad_by_hand(r[-late:]) ** 2 / late))
    centre = statistics.median(decay.values())
    spread = max(mad_by_hand(list(decay.values())), statistics.median(se))
    z = {k: (v - centre) / spread for k, v in decay.items()}
    return decay, z, sorted(k for k, v in z.items() if v < -z_cut)


def mann_kendall_by_hand(values):
    n = len(values)
    s = sum((values[j] > values[i]) - (values[j] < values[i]) for i in range(n) for j in range(i + 1, n))
    var = n * (n - 1) * (2 * n + 5) / 18
    return (s - (s > 0) + (s < 0)) / math.sqrt(var)


def as_arrays(trajs):
    return {k: np.asarray(v, dtype=float) for k, v in trajs.items()}


def test_stepwise_is_its_formula_and_flags_the_decaying_clients():
    trajs = trajectories()
    rule = vp_rule(VPConfig(rule="stepwise"))
    stats = rule.statistics(as_arrays(trajs))
    decay, z, flagged = stepwise_by_hand(trajs)
    for k in trajs:
        assert stats[k]["decay"] == pytest.approx(decay[k], rel=1e-12)
        assert stats[k]["z"] == pytest.approx(z[k], rel=1e-12)
    assert rule.flags(stats) == flagged == [1, 4]


def test_stepwise_and_trend_do_not_see_the_common_factor_of_a_shared_step():
    """Multiplying every client's t-th GradIP by the same c_t (another <g_pre, z_t>) changes nothing."""
    trajs = as_arrays(trajectories(seed=3))
    factor = np.random.default_rng(9).uniform(0.01, 100, size=60)
    for name in ("stepwise", "trend"):
        rule = vp_rule(VPConfig(rule=name))
        a, b = rule.statistics(trajs), rule.statistics({k: v * factor for k, v in trajs.items()})
        for k in trajs:
            assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-9)
    paper = vp_rule(VPConfig(rule="paper"))
    assert paper.statistics(trajs) != paper.statistics({k: v * factor for k, v in trajs.items()})


def test_stepwise_flags_no_one_in_a_homogeneous_population():
    rule = vp_rule(VPConfig(rule="stepwise"))
    assert rule.flags(rule.statistics(as_arrays(trajectories(seed=5, extreme=())))) == []


def test_trend_is_the_mann_kendall_test_with_bonferroni():
    trajs = trajectories(seed=1)
    rule = vp_rule(VPConfig(rule="trend", trend_alpha=0.05))
    stats = rule.statistics(as_arrays(trajs))
    rel = relative(trajs)
    z_crit = NormalDist().inv_cdf(0.05 / len(trajs))
    flagged = []
    for k, r in rel.items():
        _, late = phases(len(r))
        level = statistics.median(r[-late:])
        z = mann_kendall_by_hand(r)
        assert stats[k]["trend_z"] == pytest.approx(z, rel=1e-12)
        assert stats[k]["level"] == pytest.approx(level, rel=1e-12)
        assert stats[k]["z_crit"] == pytest.approx(z_crit)
        if z < z_crit and level < 0:
            flagged.append(k)
    assert rule.flags(stats) == sorted(flagged) == [1, 4]


def test_mann_kendall_of_a_monotone_sequence():
    n = 20
    from meerkat_ray.strategies.vp_rules import mann_kendall_z
    expected = (-(n * (n - 1) / 2) + 1) / math.sqrt(n * (n - 1) * (2 * n + 5) / 18)
    assert mann_kendall_z(np.arange(n, 0, -1, dtype=float)) == pytest.approx(expected)
    assert mann_kendall_z(np.arange(n, dtype=float)) == pytest.approx(-expected)


def test_the_policies_stop_what_the_chosen_rule_flags():
    trajs = as_arrays(trajectories())
    for name in VP_RULES:
        cfg = Config(vp=VPConfig(rule=name, rho=1.0, sigma=0.55))
        rule = vp_rule(cfg.vp)
        stats = rule.statistics(trajs)
        view = RoundView(1, stats=stats)
        assert GradIPPolicy(cfg, np.random.default_rng(0)).early_stop(view) == rule.flags(stats)
        stopped = RandomPolicy(cfg, np.random.default_rng(0)).early_stop(view)
        assert len(stopped) == len(rule.flags(stats))


# ----------------------------------------------------------------------------- small clients

def test_a_small_client_is_judged_on_its_first_pass_only():
    """Window W_k = min(calib_steps, n_k // batch): what a client does after its first pass over its
    data is not read; a client under vp.min_window steps is left out, with the reason."""
    cfg = load_config(None, ["vp.calib_steps=40", "vp.min_window=10", "data.batch_size=8", "data.num_clients=5",
                             "vp.rule=stepwise"])
    sizes = [1000, 1000, 1000, 200, 40]  # windows 40, 40, 40, 25, 5
    trajs = trajectories(seed=2, clients=5, steps=40, extreme=(1,))
    later = {k: v.copy() for k, v in trajs.items()}
    later[3][25:] *= 1e-6  # after client 3's first pass: must not matter
    later[4][:] *= 1e-6    # client 4 is never judged
    decisions = []
    for t in (trajs, later):
        strategy = ServerStrategy(cfg, 5, sizes)
        strategy.end_round(1, list(range(5)), {}, {k: list(v) for k, v in t.items()})
        decisions.append((strategy.vp.stats, strategy.flagged, strategy.vp.left_out))
    assert decisions[0] == decisions[1]
    stats, flagged, left_out = decisions[0]
    assert sorted(stats) == [0, 1, 2, 3] and list(left_out) == [4] and "5 steps" in left_out[4]
    windowed = {k: trajs[k][:w] for k, w in zip(range(4), (40, 40, 40, 25))}
    decay, z, by_hand = stepwise_by_hand(windowed)
    assert {k: s["decay"] for k, s in stats.items()} == pytest.approx(decay)
    assert flagged == by_hand


def test_the_paper_rule_measures_each_window_with_its_own_phases():
    cfg = VPConfig(rule="paper", statistic="median", reference="late", sigma=0.55)
    trajs = {0: np.arange(1, 41, dtype=float), 1: np.arange(1, 21, dtype=float)[::-1], 2: np.full(30, 3.0)}
    stats = vp_rule(cfg).statistics(trajs)
    late = {}
    for k, t in trajs.items():
        e, l_ = phases(len(t))
        late[k] = statistics.median(t[-l_:])
        assert stats[k]["early"] == statistics.median(t[:e]) and stats[k]["late"] == late[k]
    ref = statistics.median(late.values())
    for k, t in trajs.items():
        _, l_ = phases(len(t))
        assert stats[k]["quiet_fraction"] == sum(v < 0.55 * ref for v in t[-l_:]) / l_


def test_a_run_with_too_few_judgeable_clients_is_refused_naming_them():
    cfg = load_config(None, ["vp.calib_steps=30", "vp.min_window=10", "data.batch_size=8", "data.num_clients=4"])
    check_calibration_data(cfg, [800, 800, 800, 3])  # one small client: left out, the run goes on
    with pytest.raises(ConfigError) as err:
        check_calibration_data(cfg, [800, 800, 40, 3])
    message = str(err.value)
    assert message.startswith("vp.min_window:") and "client 2 holds 40 examples (5 steps)" in message
    assert "client 3 holds 3 examples (0 steps)" in message and "\n" not in message
