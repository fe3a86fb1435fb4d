"""Masks on the tiny models: the pretrain_grad top-k against a brute-force gradient, sizes and
order for every kind, eligibility, the file format and the on-disk cache."""

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import meerkat_ray.mask as mask_module
from meerkat_ray.config import MaskConfig, ModelConfig
from meerkat_ray.errors import MeerkatError
from meerkat_ray.mask import (MASK_SCORES, PRETRAIN_GRAD_KEY, Mask, calibration_batches, check_mask,
                              compute_mask, eligible_parameters, get_mask, load_mask, mask_size, save_mask)
from meerkat_ray.models import load_model

# small calibration so that pretrain_grad costs a few tiny backward passes
CALIB = dict(calib_num_seqs=6, calib_seq_len=32, calib_batch_size=2)
BLOCK_MATRICES = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]


def mask_cfg(kind="pretrain_grad", density=0.01, **kw) -> MaskConfig:
    return MaskConfig(kind=kind, density=density, **{**CALIB, **kw})


def brute_force_calibration(lm, cfg: MaskConfig):
    """Per eligible parameter: mean over calibration batches of grad^2 and of grad (float64)."""
    params = eligible_parameters(lm.model)
    batches = calibration_batches(lm, cfg)
    sq = {name: torch.zeros(p.numel(), dtype=torch.float64) for name, p in params}
    mean = {name: torch.zeros(p.numel(), dtype=torch.float64) for name, p in params}
    for _, p in params:
        p.requires_grad_(True)
    try:
        for batch in batches:
            loss = lm.model(input_ids=batch, labels=batch).loss
            grads = torch.autograd.grad(loss, [p for _, p in params])
            for (name, _), g in zip(params, grads):
                g = g.reshape(-1).double()
                sq[name] += g * g
                mean[name] += g
    finally:
        for _, p in params:
            p.requires_grad_(False)
    return ({k: v / len(batches) for k, v in sq.items()}, {k: v / len(batches) for k, v in mean.items()},
            len(batches))


def flat_selection(indices: dict[str, torch.Tensor], names_sizes: list[tuple[str, int]]) -> torch.Tensor:
    """Mask indices as positions in the concatenation of all eligible parameters."""
    out, start = [], 0
    for name, size in names_sizes:
        if name in indices:
            out.append(indices[name] + start)
        start += size
    return torch.cat(out)


# ----------------------------------------------------------------------------- eligibility

def test_default_eligible_is_the_block_matrices_only(tiny_lm):
    names = [n for n, _ in eligible_parameters(tiny_lm.model)]
    assert names == [f"model.layers.{i}.{m}" for i in range(2) for m in BLOCK_MATRICES]


def test_eligible_excludes_biases_and_an_untied_lm_head():
    tiny_qwen2 = load_model(ModelConfig(name="tiny-qwen2", device="cpu"), 0).model
    assert any(n.endswith("q_proj.bias") for n, _ in tiny_qwen2.named_parameters())
    names = [n for n, _ in eligible_parameters(tiny_qwen2)]
    assert names == [f"model.layers.{i}.{m}" for i in range(2) for m in BLOCK_MATRICES]

    config = AutoConfig.for_model("llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    untied = AutoModelForCausalLM.from_config(config)
    assert "lm_head.weight" in dict(untied.named_parameters())
    assert [n for n, _ in eligible_parameters(untied)] == [f"model.layers.0.{m}" for m in BLOCK_MATRICES]


def test_eligible_regex_selects_by_name(tiny_lm):
    names = [n for n, _ in eligible_parameters(tiny_lm.model, r"\.mlp\.")]
    assert names == [f"model.layers.{i}.mlp.{m}_proj.weight" for i in range(2) for m in ("gate", "up", "down")]
    with pytest.raises(MeerkatError, match="mask.eligible"):
        compute_mask(tiny_lm, mask_cfg("random", eligible="no_such_parameter"), 0, need_g_pre=False, progress=False)


# ----------------------------------------------------------------------------- pretrain_grad

@pytest.fixture(scope="module")
def pretrain_mask(tiny_lm):
    cfg = mask_cfg("pretrain_grad", density=0.01)
    return cfg, compute_mask(tiny_lm, cfg, seed=0, need_g_pre=True, progress=False)


def test_pretrain_grad_mask_is_the_global_top_k_of_the_brute_force_squared_gradient(tiny_lm, pretrain_mask):
    cfg, mask = pretrain_mask
    sq, _, num_batches = brute_force_calibration(tiny_lm, cfg)
    assert num_batches == 3  # 6 sequences in batches of 2: the mean is over 3 batch gradients
    names_sizes = [(n, p.numel()) for n, p in eligible_parameters(tiny_lm.model)]
    scores = torch.cat([sq[n] for n, _ in names_sizes])
    k = round(cfg.density * scores.numel())
    selected = flat_selection(mask.indices, names_sizes)
    assert selected.numel() == mask.n == k
    expected = torch.topk(scores, k).indices
    kth = scores[expected].min()
    differ = set(selected.tolist()) ^ set(expected.tolist())
    # identical sets, except (in principle) exact ties at the boundary up to fp32 accumulation error
    assert all(abs(float(scores[i] - kth)) <= 1e-5 * float(kth) for i in differ), len(differ)
    assert len(differ) <= 2
    # the selection is spread over several matrices (a global, not per-matrix, top-k)
    assert len(mask.indices) > 1


def test_g_pre_is_the_mean_gradient_on_the_mask_in_mask_order(tiny_lm, pretrain_mask):
    cfg, mask = pretrain_mask
    _, mean, _ = brute_force_calibration(tiny_lm, cfg)
    expected = torch.cat([mean[name][idx] for name, idx in mask.indices.items()])
    g_pre = mask.pretrain_grad
    assert g_pre.dtype == torch.float32 and g_pre.shape == (mask.n,)
    assert torch.allclose(g_pre.double(), expected, rtol=1e-4, atol=1e-7 * float(expected.abs().max()))
    assert float(g_pre.abs().max()) > 0


def test_weight_magnitude_mask_keeps_the_largest_weights(tiny_lm):
    cfg = mask_cfg("weight_magnitude", density=0.01)
    mask = compute_mask(tiny_lm, cfg, 0, need_g_pre=False, progress=False)
    params = dict(tiny_lm.model.named_parameters())
    inside = torch.cat([params[n].detach().reshape(-1)[idx].abs() for n, idx in mask.indices.items()])
    outside = []
    for name, p in eligible_parameters(tiny_lm.model):
        keep = torch.ones(p.numel(), dtype=torch.bool)
        keep[mask.indices.get(name, torch.empty(0, dtype=torch.long))] = False
        outside.append(p.detach().reshape(-1)[keep].abs())
    assert float(inside.min()) >= float(torch.cat(outside).max())


def test_random_mask_is_a_pure_function_of_the_seed(tiny_lm):
    cfg = mask_cfg("random", density=0.01)
    a, b, c = (compute_mask(tiny_lm, cfg, seed, need_g_pre=False, progress=False) for seed in (1, 1, 2))
    assert all(torch.equal(a.indices[n], b.indices[n]) for n in a.indices) and a.indices.keys() == b.indices.keys()
    assert flat_selection(a.indices, _sizes(tiny_lm)).tolist() != flat_selection(c.indices, _sizes(tiny_lm)).tolist()


def _sizes(lm):
    return [(n, p.numel()) for n, p in eligible_parameters(lm.model)]


# ----------------------------------------------------------------------------- every kind

@pytest.mark.parametrize("kind", sorted(MASK_SCORES))
def test_every_kind_has_the_right_size_and_mask_order(tiny_lm, kind):
    cfg = mask_cfg(kind, density=0.003)
    mask = compute_mask(tiny_lm, cfg, seed=0, need_g_pre=(kind == "pretrain_grad"), progress=False)
    eligible = sum(p.numel() for _, p in eligible_parameters(tiny_lm.model))
    assert mask.meta["eligible_count"] == eligible == 73728
    assert mask.n == (eligible if kind == "full" else round(0.003 * eligible)), mask.n
    # mask order: named_parameters order, each with sorted unique in-range int64 flat indices
    model_order = [n for n, _ in tiny_lm.model.named_parameters()]
    assert list(mask.indices) == [n for n in model_order if n in mask.indices]
    params = dict(tiny_lm.model.named_parameters())
    for name, idx in mask.indices.items():
        assert idx.dtype == torch.int64 and idx.ndim == 1
        assert bool((idx[1:] > idx[:-1]).all()) and int(idx[0]) >= 0 and int(idx[-1]) < params[name].numel()
    check_mask(mask, tiny_lm.model)
    assert mask.meta["kind"] == kind
    if kind == "full":
        assert all(torch.equal(idx, torch.arange(params[n].numel())) for n, idx in mask.indices.items())


@pytest.mark.parametrize("density, eligible, expected", [(1e-3, 73728, 74), (0.5, 3, 2), (1.0, 10, 10),
                                                          (1e-9, 1000, 1)])
def test_mask_size_rounds_and_keeps_at_least_one(density, eligible, expected):
    assert mask_size(density, eligible) == expected


# ----------------------------------------------------------------------------- files

def test_save_load_round_trip_and_file_format(tiny_lm, pretrain_mask, tmp_path):
    _, mask = pretrain_mask
    path = tmp_path / "mask.safetensors"
    save_mask(mask, path)
    back = load_mask(path)
    assert list(back.indices) == list(mask.indices)
    assert all(torch.equal(back.indices[n], mask.indices[n]) for n in mask.indices)
    assert torch.equal(back.pretrain_grad, mask.pretrain_grad)
    assert back.meta == mask.meta
    with safe_open(str(path), framework="pt") as f:  # the contract's layout
        assert set(f.keys()) == set(mask.indices) | {PRETRAIN_GRAD_KEY}
        assert all(f.get_tensor(n).dtype == torch.int64 for n in mask.indices)
        assert f.get_tensor(PRETRAIN_GRAD_KEY).dtype == torch.float32
    check_mask(back, tiny_lm.model, path)


def test_mask_without_g_pre_round_trips(tiny_lm, tmp_path):
    mask = compute_mask(tiny_lm, mask_cfg("random"), 0, need_g_pre=False, progress=False)
    assert mask.pretrain_grad is None
    save_mask(mask, tmp_path / "m.safetensors")
    assert load_mask(tmp_path / "m.safetensors").pretrain_grad is None


def test_load_mask_rejects_truncated_garbage_and_missing_files(pretrain_mask, tmp_path):
    _, mask = pretrain_mask
    path = tmp_path / "mask.safetensors"
    save_mask(mask, path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 3, 20):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(MeerkatError, match="cut.safetensors"):
            load_mask(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_text("not a mask")
    with pytest.raises(MeerkatError):
        load_mask(tmp_path / "junk.safetensors")
    with pytest.raises(MeerkatError):
        load_mask(tmp_path / "missing.safetensors")


def test_check_mask_rejects_a_mask_of_a_different_model(tiny_lm):
    config = AutoConfig.for_model("llama", vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2)
    wider = AutoModelForCausalLM.from_config(config)
    other = dataclasses.replace(tiny_lm, model=wider, fingerprint="wider")
    for eligible in ("", r"layers\.0\."):  # extra layers; same names but larger matrices
        mask = compute_mask(other, mask_cfg("random", density=0.5, eligible=eligible), 0, need_g_pre=False,
                            progress=False)
        check_mask(mask, wider)
        with pytest.raises(MeerkatError, match="mask"):
            check_mask(mask, tiny_lm.model)


def _corrupt(mask: Mask, how: str) -> Mask:
    indices = {n: i.clone() for n, i in mask.indices.items()}
    g_pre = mask.pretrain_grad
    first = next(iter(indices))
    if how == "unknown name":
        indices["model.layers.7.mlp.up_proj.weight"] = torch.tensor([0])
    elif how == "out of range":
        indices[first][-1] = 10**9
    elif how == "unsorted":
        indices[first] = indices[first].flip(0)
    elif how == "wrong dtype":
        indices[first] = indices[first].int()
    elif how == "order":
        indices = dict(reversed(list(indices.items())))
    elif how == "g_pre length":
        g_pre = torch.zeros(mask.n + 1)
    return Mask(indices=indices, pretrain_grad=g_pre, meta=mask.meta)


@pytest.mark.parametrize("how", ["unknown name", "out of range", "unsorted", "wrong dtype", "order", "g_pre length"])
def test_check_mask_rejects_damaged_masks(tiny_lm, pretrain_mask, how):
    _, mask = pretrain_mask
    with pytest.raises(MeerkatError):
        check_mask(_corrupt(mask, how), tiny_lm.model)


# ----------------------------------------------------------------------------- the cache

def test_get_mask_reuses_the_disk_cache_and_recomputes_a_damaged_entry(tiny_lm, tmp_path, monkeypatch):
    lm = dataclasses.replace(tiny_lm, cache=tmp_path)
    cfg = mask_cfg("pretrain_grad", density=0.005)
    first = get_mask(lm, cfg, 0, need_g_pre=True, progress=False)
    files = list((tmp_path / "masks").glob("*.safetensors"))
    assert len(files) == 1

    def no_compute(*args, **kwargs):
        raise AssertionError("the cached mask should have been reused")

    monkeypatch.setattr(mask_module, "compute_mask", no_compute)
    second = get_mask(lm, cfg, 0, need_g_pre=True, progress=False)
    assert all(torch.equal(first.indices[n], second.indices[n]) for n in first.indices)
    assert torch.equal(first.pretrain_grad, second.pretrain_grad)
    with pytest.raises(AssertionError, match="reused"):  # another density is another cache entry
        get_mask(lm, mask_cfg("pretrain_grad", density=0.01), 0, need_g_pre=True, progress=False)

    calls = []
    monkeypatch.setattr(mask_module, "compute_mask", lambda *a, **k: calls.append(1) or first)
    files[0].write_bytes(files[0].read_bytes()[:100])  # a damaged entry is recomputed, never trusted
    get_mask(lm, cfg, 0, need_g_pre=True, progress=False)
    assert calls == [1]
    assert load_mask(files[0]).n == first.n  # ... and rewritten


def test_get_mask_without_cache_neither_reads_nor_writes(tiny_lm, tmp_path):
    lm = dataclasses.replace(tiny_lm, cache=tmp_path)
    get_mask(lm, mask_cfg("random", cache=False), 0, need_g_pre=False, progress=False)
    assert not (tmp_path / "masks").exists()


@pytest.mark.parametrize("attr, older", [("MASK_VERSION", mask_module.MASK_VERSION - 1),
                                         ("ALGORITHM_DIGEST", "digest-of-older-code")])
def test_a_mask_cached_by_other_mask_code_is_never_reused(tiny_lm, tmp_path, monkeypatch, attr, older):
    """A cache entry that older code wrote (another MASK_VERSION, or other source of the mask
    functions), holding another selection: the code that wrote it reuses it, today's code does not."""
    lm = dataclasses.replace(tiny_lm, cache=tmp_path)
    cfg = mask_cfg("weight_magnitude", density=0.01)
    fresh = compute_mask(lm, cfg, 0, need_g_pre=False, progress=False)
    with monkeypatch.context() as old_code:
        old_code.setattr(mask_module, attr, older)
        stale = compute_mask(lm, cfg, 0, need_g_pre=False, progress=False)
        first = next(iter(stale.indices))
        stale.indices[first] = torch.arange(stale.indices[first].numel())  # what the old algorithm chose
        assert not torch.equal(stale.indices[first], fresh.indices[first])
        (tmp_path / "masks").mkdir()
        save_mask(stale, tmp_path / "masks" / f"{stale.meta['fingerprint']}.safetensors")
        reused = get_mask(lm, cfg, 0, need_g_pre=False, progress=False)
        assert torch.equal(reused.indices[first], stale.indices[first])  # the cache does serve old code
    assert fresh.meta["fingerprint"] != stale.meta["fingerprint"]
    got = get_mask(lm, cfg, 0, need_g_pre=False, progress=False)
    assert list(got.indices) == list(fresh.indices)
    assert all(torch.equal(got.indices[k], fresh.indices[k]) for k in fresh.indices)
    assert got.meta["version"] == mask_module.MASK_VERSION


@pytest.mark.parametrize("name", ["top_k_mask", "calibration_gradients", "calibration_batches", "mask_size"])
def test_editing_a_mask_function_changes_the_digest(monkeypatch, name):
    def edited(*args, **kwargs):  # any other source
        return None

    assert mask_module.ALGORITHM_DIGEST == mask_module.algorithm_digest()
    monkeypatch.setattr(mask_module, name, edited)
    assert mask_module.algorithm_digest() != mask_module.ALGORITHM_DIGEST
    monkeypatch.undo()
    monkeypatch.setitem(mask_module.MASK_SCORES, "random", edited)  # a kind's score function counts too
    assert mask_module.algorithm_digest() != mask_module.ALGORITHM_DIGEST


def test_the_suite_computes_and_caches_in_a_temporary_folder(tiny_lm):
    from conftest import TEST_CACHE

    from meerkat_ray.models import cache_root

    assert cache_root(ModelConfig()) == Path(TEST_CACHE) == tiny_lm.cache
    assert Path(os.environ["MEERKAT_RAY_CACHE"]) == Path(TEST_CACHE)  # inherited by subprocesses and Ray workers
    assert not Path(TEST_CACHE).resolve().is_relative_to((Path.home() / ".cache").resolve())
