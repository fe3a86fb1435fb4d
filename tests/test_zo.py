"""Sparse SPSA on the tiny model: the perturbation stream, exact restore, mask-only updates,
bit-exact replay of a client's virtual path, and the estimator's direction."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import meerkat_ray.scoring as scoring
import meerkat_ray.zo as zo
from meerkat_ray.client import ClientData, ClientWorker
from meerkat_ray.mask import Mask, eligible_parameters, top_k_mask
from meerkat_ray.messages import ClientPlan
from meerkat_ray.seeds import derive_seed, step_seeds
from meerkat_ray.terms import replay_client_
from meerkat_ray.masked_view import MaskedView
from meerkat_ray.zo import perturbation, zo_step_

EPS, LR = 1e-3, 1e-2


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def expected_state(before: dict, mask: Mask, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """`before` with the masked coordinates replaced by theta cast to each tensor's dtype."""
    out = {k: v.clone() for k, v in before.items()}
    start = 0
    for name, idx in mask.indices.items():
        flat = out[name].view(-1)
        flat[idx] = theta[start: start + idx.numel()].to(flat.dtype)
        start += idx.numel()
    return out


def assert_state_equal(actual: dict, expected: dict, mask: Mask | None = None) -> None:
    """Every tensor bit-identical; with `mask`, the masked coordinates only to float rounding."""
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        if mask is None or key not in mask.indices:
            assert torch.equal(actual[key], expected[key]), key
            continue
        a, e = actual[key].view(-1), expected[key].view(-1)
        outside = torch.ones_like(a, dtype=torch.bool)
        outside[mask.indices[key]] = False
        assert torch.equal(a[outside], e[outside]), key
        assert torch.allclose(a.float(), e.float(), rtol=1e-2 if a.dtype == torch.bfloat16 else 1e-6, atol=1e-8), key


def as_dtype(lm, dtype):
    lm.model.to(dtype)
    return lm


# ----------------------------------------------------------------------------- the z stream

@pytest.mark.parametrize("seed", [0, 1, 12345, 2**63 - 1, derive_seed(0, "z", 1, 0)])
@pytest.mark.parametrize("n", [1, 74, 1000])
def test_perturbation_is_the_contract_stream(seed, n):
    z = perturbation(seed, n)
    expected = torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    assert z.dtype == torch.float32 and z.device.type == "cpu" and z.shape == (n,)
    assert torch.equal(z, expected)
    assert torch.equal(perturbation(seed, n), z)  # no hidden state between draws


def test_step_seeds_are_pure_63_bit_and_shared_per_round_only_when_asked():
    a = step_seeds(7, 3, client=0, steps=5, sharing="round")
    assert a == step_seeds(7, 3, client=4, steps=5, sharing="round")  # one list for every client
    assert len(set(a)) == 5 and all(0 <= s < 2**63 for s in a)
    assert a != step_seeds(7, 4, 0, 5, "round") and a != step_seeds(8, 3, 0, 5, "round")
    c0, c1 = step_seeds(7, 3, 0, 5, "client"), step_seeds(7, 3, 1, 5, "client")
    assert c0 != c1 and not set(c0) & set(a)
    assert step_seeds(7, 3, 0, 2, "round") == a[:2]  # an early-stopped client takes a prefix


# ----------------------------------------------------------------------------- perturb / restore

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zo_steps_touch_only_the_mask_and_each_forward_sees_theta_plus_minus_eps_z(
        fresh_lm, tiny_mask, tiny_batch, tiny_label_ids, dtype):
    lm = as_dtype(fresh_lm, dtype)
    mask = tiny_mask
    view = MaskedView(lm.model, mask)
    before = state(lm.model)
    theta = view.gather()
    assert theta.dtype == torch.float32 and theta.numel() == mask.n
    seen = []  # the whole state at every forward pass
    handle = lm.model.register_forward_pre_hook(lambda module, args: seen.append(state(module)))
    try:
        for t in range(3):
            seed = derive_seed(1, "test", t)
            theta_before = theta.clone()
            z = perturbation(seed, mask.n)
            scalar, loss = zo_step_(view, theta, seed, tiny_batch, tiny_label_ids, EPS, LR)
            assert math.isfinite(scalar) and math.isfinite(loss)
            plus, minus = seen[-2:]
            # (how theta +- eps z is rounded is the step's business: compared to float rounding)
            assert_state_equal(plus, expected_state(before, mask, theta_before + EPS * z), mask)
            assert_state_equal(minus, expected_state(before, mask, theta_before - EPS * z), mask)
            # theta is the fp32 master and moved by exactly -lr * g * z; the model holds it cast
            assert theta.dtype == torch.float32
            assert torch.equal(theta, theta_before.clone().add_(z, alpha=-(LR * scalar)))
            assert not torch.equal(theta, theta_before)
            assert_state_equal(state(lm.model), expected_state(before, mask, theta))
    finally:
        handle.remove()
    assert len(seen) == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_then_restore_is_bit_exact(fresh_lm, tiny_mask, tiny_batch, tiny_label_ids, dtype):
    lm = as_dtype(fresh_lm, dtype)
    mask = tiny_mask
    view = MaskedView(lm.model, mask)
    before = state(lm.model)
    theta0 = view.gather()
    theta = theta0.clone()
    for t in range(3):  # lr = 0: two perturbed forwards, then the restore
        zo_step_(view, theta, derive_seed(2, t), tiny_batch, tiny_label_ids, EPS, 0.0)
    assert torch.equal(theta, theta0)
    assert_state_equal(state(lm.model), before)
    view.write_(theta0 + 0.5)
    view.write_(theta0)
    assert_state_equal(state(lm.model), before)


def test_bfloat16_model_keeps_an_fp32_master(fresh_lm, tiny_mask, tiny_batch, tiny_label_ids):
    """Updates far below the bfloat16 resolution accumulate in theta, never re-read from the model."""
    lm = as_dtype(fresh_lm, torch.bfloat16)
    mask = tiny_mask
    view = MaskedView(lm.model, mask)
    before = state(lm.model)
    theta0 = view.gather()
    theta, seeds, scalars = theta0.clone(), [], []
    lr = 1e-5
    for t in range(4):
        seeds.append(derive_seed(3, t))
        scalars.append(zo_step_(view, theta, seeds[-1], tiny_batch, tiny_label_ids, EPS, lr)[0])
    assert theta.dtype == torch.float32
    assert torch.equal(theta, replay_client_(theta0.clone(), seeds, scalars, lr))
    # theta carries digits the model cannot hold ...
    assert not torch.equal(theta, theta.to(torch.bfloat16).float())
    # ... and the model holds exactly theta cast, the rest untouched
    assert_state_equal(state(lm.model), expected_state(before, mask, theta))
    view.write_(theta0)
    assert_state_equal(state(lm.model), before)


def test_non_finite_loss_leaves_theta_and_model_untouched(fresh_lm, tiny_mask, tiny_batch, tiny_label_ids,
                                                          monkeypatch):
    mask = tiny_mask
    view = MaskedView(fresh_lm.model, mask)
    before = state(fresh_lm.model)
    theta = view.gather()
    theta0 = theta.clone()
    monkeypatch.setattr(zo, "classification_loss", lambda model, batch, label_ids: float("nan"))
    scalar, loss = zo_step_(view, theta, 5, tiny_batch, tiny_label_ids, EPS, LR)
    assert math.isnan(scalar) and math.isnan(loss)
    assert torch.equal(theta, theta0)
    assert_state_equal(state(fresh_lm.model), before)


# ----------------------------------------------------------------------------- client replay

def make_worker(lm, mask, tokens, labels, label_ids, batch_size=4) -> ClientWorker:
    halves = [np.arange(0, len(tokens), 2), np.arange(1, len(tokens), 2)]  # two clients
    data = ClientData(tokens, labels, halves, seed=0, pad_id=lm.tokenizer.pad_token_id)
    theta = MaskedView(lm.model, mask).gather()
    return ClientWorker(lm.model, mask, theta, data, label_ids, eps=EPS, batch_size=batch_size, device=lm.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sharing", ["round", "client"])
def test_replaying_a_client_path_reproduces_its_final_values_bit_for_bit(
        fresh_lm, tiny_mask, tiny_tokens, tiny_label_ids, dtype, sharing):
    lm = as_dtype(fresh_lm, dtype)
    mask = tiny_mask
    before = state(lm.model)
    worker = make_worker(lm, mask, *tiny_tokens, tiny_label_ids)
    theta0 = worker.theta_global.clone()
    for client, steps in [(0, 5), (1, 2)]:
        seeds = step_seeds(11, 1, client, 5 if sharing == "round" else steps, sharing)
        plan = ClientPlan(round=1, client=client, seeds=seeds, steps=steps, lr=LR, cursor=8 * client)
        result = worker.run(plan)
        assert len(result.scalars) == steps
        replayed = replay_client_(theta0.clone(), seeds[:steps], result.scalars, LR)
        assert torch.equal(worker.last_theta, replayed)
        assert not torch.equal(replayed, theta0)
        # the worker is back on the global values after the client ran
        assert torch.equal(worker.theta_global, theta0)
        assert_state_equal(state(lm.model), before)


# ----------------------------------------------------------------------------- the estimator

def differentiable_label_logits(model, batch, label_ids):
    """scoring.label_logits without its no_grad (same forward, same positions, logits_to_keep=1)."""
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=position_ids, logits_to_keep=1, use_cache=False)
    return out.logits[:, -1, :].index_select(-1, label_ids).float()


def test_mean_zo_estimate_points_along_the_masked_backprop_gradient(fresh_lm, tiny_batch, tiny_label_ids):
    """E_z[(grad . z) z] = grad for z ~ N(0, I_n), so the mean of many SPSA estimates on one batch
    must line up with the true gradient on the mask.

    Bound. With a = the masked gradient and N seeds, the mean estimate is a + e, where e has
    covariance (|a|^2 I + a a^T) / N (fourth moments of a Gaussian). So |e|^2 ~ (n + 1)|a|^2 / N and
        cos(a, mean) ~ 1 / sqrt(1 + (n + 1) / N),   projection (mean . a) / |a|^2 ~ 1 +- sqrt(2 / N).
    Here n = 48, N = 192: cos ~ 0.89 (spread ~0.03), projection 1 +- 0.10. A direction unrelated to
    the gradient has cos ~ N(0, 1/n), sd 0.14, and P(cos > 0.7) ~ (1 - 0.7^2)^((n-1)/2) ~ 1e-7.
    The thresholds (cos > 0.7, projection in [0.6, 1.4]) sit ~4 sd from the expected values and
    ~5 sd above chance; the projection also catches a wrong scale (e.g. a missing factor 2 in 2 eps).
    The mask is the top-n coordinates by |gradient| (a task-gradient mask) so that |a| is far above
    the fp32 rounding in the loss difference; the estimator's maths does not depend on the choice.
    """
    model, n, num_seeds, eps = fresh_lm.model, 48, 192, 1e-3
    with torch.no_grad():  # the differentiable copy computes exactly what the ZO step measures
        assert torch.equal(differentiable_label_logits(model, tiny_batch, tiny_label_ids),
                           scoring.label_logits(model, tiny_batch, tiny_label_ids))
    params = eligible_parameters(model)
    for _, p in params:
        p.requires_grad_(True)
    loss = F.cross_entropy(differentiable_label_logits(model, tiny_batch, tiny_label_ids), tiny_batch.labels)
    loss.backward()
    grads = {name: p.grad.reshape(-1).clone() for name, p in params}
    for _, p in params:
        p.requires_grad_(False)
        p.grad = None
    mask = Mask(indices=top_k_mask({k: g * g for k, g in grads.items()}, n))
    a = torch.cat([grads[name][idx] for name, idx in mask.indices.items()]).double()

    view = MaskedView(model, mask)
    theta = view.gather()
    mean = torch.zeros(n, dtype=torch.float64)
    for i in range(num_seeds):
        seed = derive_seed("estimator", i)
        scalar, _ = zo_step_(view, theta, seed, tiny_batch, tiny_label_ids, eps, lr=0.0)
        mean += scalar * perturbation(seed, n).double()
    mean /= num_seeds
    cos = float(mean @ a / (mean.norm() * a.norm()))
    projection = float(mean @ a / (a @ a))
    assert cos > 0.7, (cos, projection)
    assert 0.6 < projection < 1.4, (cos, projection)


# ----------------------------------------------------------------------------- draw-ahead and dense masks

def z_draw_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("z-draw") and t.is_alive()]


@pytest.mark.parametrize("n", [10, zo.DRAW_AHEAD_MIN_N + 5])
def test_drawing_ahead_yields_exactly_the_contract_stream(n):
    """Below DRAW_AHEAD_MIN_N no thread is started; from there on one thread draws the next z, and
    a consumer that stops early (an error mid-round) ends it by closing the generator."""
    threaded = n >= zo.DRAW_AHEAD_MIN_N
    assert z_draw_threads() == []
    seeds = [derive_seed(9, t) for t in range(4)]
    drawn = list(zo.perturbations(seeds, n))
    assert len(drawn) == 4 and all(torch.equal(z, perturbation(s, n)) for s, z in zip(seeds, drawn))
    assert list(zo.perturbations([], n)) == []
    assert z_draw_threads() == []  # an exhausted generator leaves no thread behind
    early = zo.perturbations(seeds, n)
    assert torch.equal(next(early), perturbation(seeds[0], n))
    assert len(z_draw_threads()) == (1 if threaded else 0)  # the thread is drawing seeds[1] now
    early.close()
    assert z_draw_threads() == []  # closed: the pool was shut down and its thread joined


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_dense_mask_steps_and_replays_like_a_sparse_one(fresh_lm, tiny_tokens, tiny_label_ids, dtype):
    """mask.kind=full: whole parameters are written without indices (fp32: the perturbed sum straight
    into the parameter) and, with n above DRAW_AHEAD_MIN_N, z is drawn ahead in a thread; the
    forwards still see theta +- eps z, the path replays bit for bit and the model is restored exactly."""
    from meerkat_ray.config import MaskConfig
    from meerkat_ray.mask import compute_mask

    lm = as_dtype(fresh_lm, dtype)
    mask = compute_mask(lm, MaskConfig(kind="full"), seed=0, need_g_pre=False, progress=False)
    assert mask.n > zo.DRAW_AHEAD_MIN_N
    view = MaskedView(lm.model, mask)
    assert all(idx is None for _, idx, _, _ in view.slots)
    before = state(lm.model)
    worker = make_worker(lm, mask, *tiny_tokens, tiny_label_ids)
    theta0 = worker.theta_global.clone()
    seeds = step_seeds(12, 1, 0, 3, "round")
    seen = []
    handle = lm.model.register_forward_pre_hook(lambda module, args: seen.append(state(module)))
    try:
        result = worker.run(ClientPlan(round=1, client=0, seeds=seeds, steps=3, lr=LR, cursor=0))
    finally:
        handle.remove()
    assert len(seen) == 6
    assert_state_equal(seen[0], expected_state(before, mask, theta0 + EPS * perturbation(seeds[0], mask.n)), mask)
    assert_state_equal(seen[1], expected_state(before, mask, theta0 - EPS * perturbation(seeds[0], mask.n)), mask)
    assert torch.equal(worker.last_theta, replay_client_(theta0.clone(), seeds, result.scalars, LR))
    assert_state_equal(state(lm.model), before)
