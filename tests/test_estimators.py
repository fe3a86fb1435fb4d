"""The ZO estimator options (`zo.num_perturbations` P, `zo.estimator`) recomputed from their
documented formulas (README config table): one step by hand on the tiny model, the seeds of the
P directions, and a run that replays bit for bit from its folder with P rows per step."""
import hashlib
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN, run_folder
from safetensors.torch import load_file

from meerkat_ray.masked_view import MaskedView
from meerkat_ray.replay import replay_run
from meerkat_ray.runlog import read_metrics
from meerkat_ray.zo import multi_step_, perturbation

EPS, LR = 1e-3, 1e-2


def own_loss(model, batch, label_ids) -> float:
    """Cross-entropy over the verbalizer logits at the last position (the README's objective)."""
    with torch.no_grad():
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                    logits_to_keep=1, use_cache=False)
        return float(F.cross_entropy(out.logits[:, -1, :].index_select(-1, label_ids).float(), batch.labels))


def seed_of(*parts) -> int:
    """MEERKAT.md's named seed: blake2b-64 of the parts joined by "/", little-endian, top bit cleared."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def at(view, theta, z=None, eps=0.0):
    view.write_(theta, z, eps) if z is not None else view.write_(theta)
    return view.model


@pytest.mark.parametrize("estimator, P", [("central", 2), ("forward", 1), ("forward", 3)])
def test_one_step_is_the_documented_formula(fresh_lm, tiny_mask, tiny_batch, tiny_label_ids, estimator, P):
    """g_p = [f(θ + εz_p) − f(θ − εz_p)] / 2ε (central) or [f(θ + εz_p) − f(θ)] / ε (forward), all at
    the same θ; then θ ← θ − lr (g_p / P) z_p for p = 1..P in turn. The loss reported is f(θ)
    (forward) or the mean of the perturbed losses (central)."""
    view = MaskedView(fresh_lm.model, tiny_mask)
    theta = view.gather()
    start = theta.clone()
    zs = [perturbation(seed_of(5, "test", p), tiny_mask.n) for p in range(P)]
    base = own_loss(at(view, start), tiny_batch, tiny_label_ids)
    expected, means = [], []
    for z in zs:
        plus = own_loss(at(view, start, z, EPS), tiny_batch, tiny_label_ids)
        if estimator == "forward":
            expected.append((plus - base) / EPS)
        else:
            minus = own_loss(at(view, start, z, -EPS), tiny_batch, tiny_label_ids)
            expected.append((plus - minus) / (2 * EPS))
            means.append((plus + minus) / 2)
    view.write_(start)
    scalars, loss = multi_step_(view, theta, zs, tiny_batch, tiny_label_ids, EPS, LR, estimator=estimator)
    assert scalars == pytest.approx(expected, rel=1e-5, abs=4e-7 / EPS)  # fp32 losses: a few ulps over eps
    assert loss == pytest.approx(base if estimator == "forward" else sum(means) / P, rel=1e-6)
    moved = start.clone()
    for z, g in zip(zs, scalars):
        moved.add_(z, alpha=-(LR * (g / P)))
    assert torch.equal(theta, moved) and not torch.equal(theta, start)
    assert torch.equal(view.gather(), theta)  # the model holds the new values


PERTURBED = [*TINY_RUN, "data.num_train=96", "data.num_clients=3", "data.partition=iid", "fed.rounds=2",
             "fed.local_steps=3", "fed.eval_every=2", "vp.calib_steps=3", "executor=local"]


@pytest.fixture(scope="module")
def two_directions(tmp_path_factory):
    """P = 2 runs, one per estimator (the replay, resume and analyze tests share them)."""
    out = tmp_path_factory.mktemp("p2")
    return {e: run_folder(PERTURBED, out, e, "zo.num_perturbations=2", f"zo.estimator={e}") for e in ("central", "forward")}


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["central", "forward"])
def test_a_run_with_two_directions_per_step_replays_bit_for_bit(two_directions, estimator):
    """P = 2: path.parquet has 2 rows per step (perturbation 0, 1) whose seeds are the documented
    ones (direction 0 = the one-direction seed, direction 1 appends ("p", 1)) and whose scalar is
    g / P; an independent replay from those rows rebuilds sparse_final bit for bit, and so does
    replay_run; each row's GradIP is scalar x <g_pre, z>; the uplink counts 8 B per scalar."""
    run = two_directions[estimator]
    path = pd.read_parquet(run / "path.parquet")
    assert sorted(path["perturbation"].unique()) == [0, 1]
    assert (path.groupby(["round", "client", "step"]).size() == 2).all()
    for row in path.itertuples():
        parts = (0, "z", row.round, row.step) + (("p", row.perturbation) if row.perturbation else ())
        assert row.seed == seed_of(*parts)
    theta = load_file(str(run / "sparse_init.safetensors"))["theta"].clone()
    for _, rows in path.groupby("round", sort=True):
        coefs, lrs = {}, {}
        for r in rows.sort_values(["step", "perturbation", "client"]).itertuples():
            coefs[r.seed] = coefs.get(r.seed, 0.0) + r.weight * r.scalar
            lrs[r.seed] = r.lr
        for seed, coef in coefs.items():
            theta.add_(perturbation(seed, theta.numel()), alpha=-(lrs[seed] * coef))
    final = load_file(str(run / "sparse_final.safetensors"))["theta"]
    assert torch.equal(theta, final) and torch.equal(replay_run(run), final)
    g_pre = load_file(str(run / "mask.safetensors"))["pretrain_grad"].double()
    for row in path.sample(6, random_state=0).itertuples():
        dot = float(g_pre @ perturbation(row.seed, g_pre.numel()).double())
        assert row.grad_ip == pytest.approx(row.scalar * dot, rel=1e-6, abs=1e-12)
    first = read_metrics(run)[1]
    steps = first["local_steps"]  # 3 clients x 3 steps
    assert first["uplink_bytes"] == 3 * (16 + 8 * 2 * 3 + 4 * 3) and steps == 9
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["vpcs"]) == {"0", "1", "2"}


@pytest.mark.slow
def test_a_run_with_two_directions_per_step_resumes_to_the_same_bits(two_directions, tmp_path):
    """Interrupted after round 1's checkpoint and resumed: the same path.parquet (with its
    perturbation column) and sparse_final as the run straight through."""
    from conftest import assert_same_run

    from meerkat_ray.checkpoint import open_resume
    from meerkat_ray.config import load_config
    from meerkat_ray.runner import run_experiment

    extra = ["zo.num_perturbations=2", "zo.estimator=forward"]
    straight = two_directions["forward"]

    class Stop(Exception):
        pass

    def stop_after_round_1(round_, *args):
        if round_ == 1:
            raise Stop

    cfg = load_config(None, [*PERTURBED, *extra, "name=forward", f"output_dir={tmp_path}"])
    with pytest.raises(Stop):
        run_experiment(cfg, progress=False, on_round=stop_after_round_1)
    assert not (tmp_path / "forward" / "summary.json").exists()
    resumed_cfg, checkpoint = open_resume(tmp_path / "forward")
    run_experiment(resumed_cfg, progress=False, resume=checkpoint)
    assert "perturbation" in pd.read_parquet(tmp_path / "forward" / "path.parquet")
    assert_same_run(straight, tmp_path / "forward")


@pytest.mark.slow
def test_analyze_draws_one_point_per_step_with_two_directions(two_directions, tmp_path):
    """The GradIP figure of a P = 2 run has one point per local step, the sum of its two rows."""
    from analysis.report import analyze

    run = two_directions["central"]
    path = pd.read_parquet(run / "path.parquet")
    plot = analyze(run, tmp_path / "out").plots["gradip.png"]
    for series in plot.on("grad_ip"):
        rows = path[(path["client"] == series.meta["client"]) & (path["round"] == series.meta["round"])]
        assert series.y == pytest.approx(rows.groupby("step")["grad_ip"].sum().tolist(), rel=1e-12)


# ----------------------------------------------------------------------------- zo.weight_decay

def test_a_step_with_weight_decay_shrinks_the_values_before_its_update(fresh_lm, tiny_mask, tiny_batch,
                                                                       tiny_label_ids):
    """Decoupled: theta <- (1 - lr wd) theta, then - lr g z, with g measured at the undecayed theta."""
    view = MaskedView(fresh_lm.model, tiny_mask)
    theta = view.gather()
    start = theta.clone()
    z = perturbation(seed_of(6, "test"), tiny_mask.n)
    plus = own_loss(at(view, start, z, EPS), tiny_batch, tiny_label_ids)
    minus = own_loss(at(view, start, z, -EPS), tiny_batch, tiny_label_ids)
    view.write_(start)
    (g,), _ = multi_step_(view, theta, [z], tiny_batch, tiny_label_ids, EPS, LR, decay=LR * 0.5)
    assert g == pytest.approx((plus - minus) / (2 * EPS), rel=1e-5, abs=4e-7 / EPS)
    assert torch.equal(theta, start.clone().mul_(1 - LR * 0.5).add_(z, alpha=-(LR * g)))


@pytest.mark.slow
def test_a_run_with_weight_decay_replays_from_its_folder_by_the_documented_aggregate(tmp_path):
    """Round r: w <- (sum_k p_k a^T_k) w - lr sum over each step t and client k of
    p_k a^(T_k - 1 - t) g_k^t z_t, a = 1 - lr wd (FedAvg of the clients' decayed paths), recomputed
    here from path.parquet; replay_run agrees; and wd = 0.5 moves the bits of the run without it."""
    wd = 0.5
    run = run_folder(PERTURBED, tmp_path, "wd", f"zo.weight_decay={wd}")
    plain = run_folder(PERTURBED, tmp_path, "plain")
    path = pd.read_parquet(run / "path.parquet")
    theta = load_file(str(run / "sparse_init.safetensors"))["theta"].clone()
    for _, rows in path.groupby("round", sort=True):
        scale, coefs, lrs = 0.0, {}, {}
        for client, own in sorted(rows.groupby("client")):
            steps, lr = len(own), float(own["lr"].iloc[0])
            a = 1.0 - lr * wd
            scale += float(own["weight"].iloc[0]) * a ** steps
        for r in rows.sort_values(["step", "client"]).itertuples():
            steps = int((rows["client"] == r.client).sum())
            a = 1.0 - r.lr * wd
            coefs[r.seed] = coefs.get(r.seed, 0.0) + r.weight * (a ** (steps - 1 - r.step) * r.scalar)
            lrs[r.seed] = r.lr
        theta.mul_(scale)
        for seed, coef in coefs.items():
            theta.add_(perturbation(seed, theta.numel()), alpha=-(lrs[seed] * coef))
    final = load_file(str(run / "sparse_final.safetensors"))["theta"]
    assert torch.equal(theta, final) and torch.equal(replay_run(run), final)
    assert not torch.equal(final, load_file(str(plain / "sparse_final.safetensors"))["theta"])
    first = read_metrics(run)[1]
    assert first["downlink_bytes"] == read_metrics(plain)[1]["downlink_bytes"] + 3 * 8  # the scale, to each client


# ----------------------------------------------------------------------------- fed.seed_pool

@pytest.mark.slow
def test_a_seed_pool_draws_every_direction_from_k_candidates_and_merges_the_downlink(tmp_path):
    """K = 2: each step's seed is candidate (its usual seed mod K), candidate j = blake2b seed of
    (run seed, "pool", j); the round's FedAvg terms merge per candidate, so each client's sync is
    8 + 8 x (candidates used) B; the run replays bit for bit."""
    K, T, clients = 2, 3, 3
    run = run_folder(PERTURBED, tmp_path, "pool", f"fed.seed_pool={K}", "vp.enabled=false")
    path = pd.read_parquet(run / "path.parquet")
    pool = [seed_of(0, "pool", j) for j in range(K)]
    for row in path.itertuples():
        assert row.seed == pool[seed_of(0, "z", row.round, row.step) % K]
    final = load_file(str(run / "sparse_final.safetensors"))["theta"]
    assert torch.equal(replay_run(run), final)
    metrics = read_metrics(run)
    for r in (1, 2):
        used = path[path["round"] == r]["seed"].nunique()
        assert used <= K
        sync = 8 + 8 * used
        plan = 8 * (5 + T)
        assert metrics[r]["downlink_bytes"] == clients * (plan + sync), (r, used)



@pytest.mark.slow
def test_weight_decay_with_a_probe_round_replays_bit_for_bit(tmp_path):
    """A probe round's weights are 0 and nothing is applied: its decay scale must not zero theta."""
    run = run_folder(PERTURBED, tmp_path, "probe", "zo.weight_decay=0.5", "vp.calibration=probe", "fed.rounds=2")
    final = load_file(str(run / "sparse_final.safetensors"))["theta"]
    assert torch.equal(replay_run(run), final)


@pytest.mark.slow
def test_a_seed_pool_with_client_sharing_replays_with_the_runs_own_sharing(tmp_path):
    """One client a round (fed.clients_per_round=1): the seeds alone cannot tell the two sharing
    modes apart, and with a pool of 2 they merge differently; the replay reads the run's mode."""
    run = run_folder(PERTURBED, tmp_path, "pool", "fed.seed_pool=2", "fed.seed_sharing=client",
                     "fed.clients_per_round=1", "vp.enabled=false", "fed.rounds=3")
    assert torch.equal(replay_run(run), load_file(str(run / "sparse_final.safetensors"))["theta"])


@pytest.mark.slow
def test_a_checkpoint_made_before_a_key_existed_still_resumes(tmp_path):
    """A checkpoint's config written before the privacy.* keys and zo.weight_decay existed reads
    them as their defaults, so the run resumes instead of being refused for a difference."""
    from meerkat_ray.checkpoint import RunCheckpoint, open_resume
    from meerkat_ray.config import load_config
    from meerkat_ray.runner import run_experiment

    class Stop(Exception):
        pass

    def stop(round_, *args):
        if round_ == 1:
            raise Stop

    cfg = load_config(None, [*PERTURBED, "name=old", f"output_dir={tmp_path}"])
    with pytest.raises(Stop):
        run_experiment(cfg, progress=False, on_round=stop)
    ckpt = RunCheckpoint.load(tmp_path / "old")
    del ckpt.config["privacy"], ckpt.config["zo"]["weight_decay"], ckpt.config["data"]["sampler"]
    resumed, _ = open_resume(tmp_path / "old", ckpt=ckpt)
    assert resumed.privacy.enabled is False
