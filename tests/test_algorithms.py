"""Client algorithms (`fed.algorithm`): the first-order step against an independent autograd
computation, its FedAvg, byte accounting, refusal to replay, resume; sweeps over the algorithm."""

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN, assert_same_run

from meerkat_ray.client import ClientData, ClientWorker
from meerkat_ray.config import load_config
from meerkat_ray.errors import ConfigError, MeerkatError
from meerkat_ray.algorithms.first_order import ValuesResult
from meerkat_ray.messages import LOSS_BYTES, WORD, ClientPlan
from meerkat_ray.replay import replay_path, replay_run
from meerkat_ray.runlog import load_theta, read_metrics, read_path
from meerkat_ray.runner import run_experiment
from meerkat_ray.server import Server
from meerkat_ray.masked_view import MaskedView

VALUE_BYTES = 4  # a masked value sent as float32 (algorithms/first_order.py's byte contract)

LR = 0.05
ROOT = Path(__file__).resolve().parent.parent
FO_RUN = TINY_RUN + ["data.num_train=96", "data.num_clients=3", "data.partition=iid", "fed.rounds=3",
                     "fed.local_steps=2", "fed.eval_every=3", "vp.enabled=false", "executor=local",
                     "fed.algorithm=first_order", "fed.fo_lr=0.05"]


def fo_worker(lm, mask, tokens, labels, label_ids) -> ClientWorker:
    halves = [np.arange(0, len(tokens), 2), np.arange(1, len(tokens), 2)]
    data = ClientData(tokens, labels, halves, seed=0, pad_id=lm.tokenizer.pad_token_id)
    theta = MaskedView(lm.model, mask).gather()
    return ClientWorker(lm.model, mask, theta, data, label_ids, eps=1e-3, batch_size=4, device=lm.device,
                        algorithm="first_order")


def test_first_order_steps_are_autograd_on_the_full_model_restricted_to_the_mask(
        fresh_lm, tiny_lm, tiny_mask, tiny_tokens, tiny_label_ids):
    """Two local steps of client 1: each equals SGD with the full model's autograd gradient read at
    the masked coordinates, on the batches a ZO client would read; GradIP = <g_pre, g>; nothing
    outside the mask moves, and the worker's model is back on the global values afterwards."""
    worker = fo_worker(fresh_lm, tiny_mask, *tiny_tokens, tiny_label_ids)
    worker.g_pre = torch.randn(tiny_mask.n, generator=torch.Generator().manual_seed(5))
    before = {k: v.clone() for k, v in fresh_lm.model.state_dict().items()}
    result = worker.run(ClientPlan(round=1, client=1, seeds=[], steps=2, lr=LR, cursor=4))

    reference = copy.deepcopy(tiny_lm.model)  # independent: every parameter requires a gradient
    for p in reference.parameters():
        p.requires_grad_(True)
    params = dict(reference.named_parameters())
    theta = MaskedView(reference, tiny_mask).gather()
    losses, grad_ips = [], []
    for t in range(2):
        batch = worker.data.batch(1, 4 + 4 * t, 4)
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
        logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                           logits_to_keep=1, use_cache=False).logits[:, -1, :].index_select(-1, tiny_label_ids)
        loss = F.cross_entropy(logits.float(), batch.labels)
        grads = torch.autograd.grad(loss, list(params.values()))
        full = dict(zip(params, grads))
        g = torch.cat([full[name].reshape(-1)[idx] for name, idx in tiny_mask.indices.items()])
        theta = theta - LR * g
        MaskedView(reference, tiny_mask).write_(theta)
        losses.append(float(loss.detach()))
        grad_ips.append(float(worker.g_pre.double() @ g.double()))
    assert torch.allclose(result.values, theta, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(result.values, worker.theta_global)
    assert result.losses == pytest.approx(losses, rel=1e-5) and result.scalars == []
    assert result.grad_ips == pytest.approx(grad_ips, rel=1e-4)
    # the local point only differs from the start at masked coordinates
    MaskedView(fresh_lm.model, tiny_mask).write_(result.values)
    for name, value in fresh_lm.model.state_dict().items():
        moved = (value != before[name]).reshape(-1)
        if name in tiny_mask.indices:
            outside = torch.ones_like(moved)
            outside[tiny_mask.indices[name]] = False
            assert not moved[outside].any(), name
        else:
            assert not moved.any(), name
    assert all(p.requires_grad for p in fresh_lm.model.parameters()) == all(
        p.requires_grad for p in tiny_lm.model.parameters())  # the flags are left as they were


def test_the_server_averages_the_clients_values_with_their_weights():
    cfg = load_config(None, [*TINY_RUN, "data.num_clients=2", "vp.enabled=false", "fed.algorithm=first_order",
                             "fed.local_steps=1"])
    server = Server(cfg, torch.zeros(3), None, client_sizes=[10, 30])
    plans = server.plan_round(1)
    assert [p.seeds for p in plans] == [[], []] and plans[0].lr == cfg.zo.lr  # fo_lr 0 = zo.lr
    values = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, -2.0, 0.0])]
    results = [ValuesResult(1, k, [], [0.5], values=values[k]) for k in range(2)]
    outcome = server.finish_round(1, plans, results)
    expected = (0.25 * values[0].double() + 0.75 * values[1].double()).float()
    assert torch.equal(server.theta, expected) and torch.equal(outcome.sync.values, expected)
    assert list(outcome.path_rows["seed"]) == [-1, -1] and outcome.path_rows["scalar"].isna().all()
    assert outcome.metrics["uplink_bytes"] == 2 * (2 * WORD + LOSS_BYTES + 3 * VALUE_BYTES)
    # a wrong-sized or non-finite upload is rejected and leaves the values alone
    bad = [ValuesResult(2, 0, [], [0.5], values=torch.ones(2)),
           ValuesResult(2, 1, [], [0.5], values=torch.tensor([1.0, float("nan"), 0.0]))]
    outcome = server.finish_round(2, server.plan_round(2), bad)
    assert sorted(outcome.metrics["rejected_clients"]) == [0, 1] and torch.equal(server.theta, expected)


def test_first_order_combinations_that_cannot_work_are_config_errors():
    for extra, key in [("fed.aggregation=median", "fed.aggregation"), ("zo.clip=1.0", "zo.clip"),
                       ("zo.num_perturbations=2", "zo.num_perturbations"), ("zo.estimator=forward", "zo.estimator"),
                       ("zo.weight_decay=0.1", "zo.weight_decay")]:
        with pytest.raises(ConfigError, match=f"^{key}:.*first_order"):
            load_config(None, ["fed.algorithm=first_order", extra])
    load_config(None, ["fed.algorithm=first_order"])  # Meerkat-vp runs on the clients' exact GradIPs
    with pytest.raises(ConfigError, match="^zo.weight_decay: zo.lr x weight_decay = 1 must be below 1"):
        load_config(None, ["zo.lr=0.5", "zo.weight_decay=2"])
    with pytest.raises(ConfigError, match="^lora.targets:"):
        load_config(None, ["fed.algorithm=lora_zo", "lora.targets= , "])


ON_RAY = ["executor=ray", "ray.num_actors=2", "ray.cpus_per_client=0.5"]


def finished_run(root: Path, base: list[str], name: str, *extra: str) -> Path:
    run_experiment(load_config(None, [*base, *extra, f"name={name}", f"output_dir={root}"]), progress=False)
    return root / name


@pytest.fixture(scope="module")
def fo_run(tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory.mktemp("fo"), FO_RUN, "fo")


@pytest.mark.slow
def test_a_first_order_run_counts_n_values_up_and_down_and_says_it_is_not_replayable(fo_run):
    n = load_theta(fo_run / "sparse_init.safetensors").numel()
    k, steps = 3, 2
    metrics = read_metrics(fo_run)[1:]
    up = k * (2 * WORD + steps * LOSS_BYTES + n * VALUE_BYTES)      # ids, losses, the n float32 values
    down = k * (5 * WORD + WORD + n * VALUE_BYTES)                   # the plan (no seeds), the new values
    assert [m["uplink_bytes"] for m in metrics] == [up] * 3 and [m["downlink_bytes"] for m in metrics] == [down] * 3
    summary = json.loads((fo_run / "summary.json").read_text())
    assert summary["algorithm"] == "first_order" and summary["replayable"] is False
    assert summary["uplink_bytes"] == 3 * up and summary["downlink_bytes"] == 3 * down
    final, init = (load_theta(fo_run / f) for f in ("sparse_final.safetensors", "sparse_init.safetensors"))
    assert not torch.equal(final, init)
    path = read_path(fo_run)
    assert len(path) == 3 * k * steps and (path["seed"] == -1).all() and path["scalar"].isna().all()
    with pytest.raises(MeerkatError, match="not seed-replayable") as err:
        replay_path(init, path)
    assert "\n" not in str(err.value)
    with pytest.raises(MeerkatError, match="fed.algorithm=first_order is not seed-replayable"):
        replay_run(fo_run)


@pytest.mark.slow
def test_a_killed_first_order_run_resumes_bit_for_bit(fo_run, tmp_path):
    """SIGKILL in the middle of round 2 (client 1's second step), then `run --resume`: the run ends
    exactly where the uninterrupted one did (tests/killpoints.py)."""
    from meerkat_ray.cli import main

    marker = tmp_path / "mid.marker"
    jobs = [{"point": "mid-round", "round": 2, "marker": str(marker),
             "argv": ["run", *FO_RUN, "name=killed", f"output_dir={tmp_path}", "--quiet"]}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "KILLPOINT_EVAL_EVERY": "3"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "killpoints.py"), str(tmp_path / "jobs.json")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "jobs.status.json").read_text()) == {str(marker): -signal.SIGKILL}
    assert marker.read_text().startswith("mid-round round 2")
    assert main(["run", "--resume", str(tmp_path / "killed"), "--quiet"]) == 0
    assert_same_run(fo_run, tmp_path / "killed")


@pytest.mark.ray
@pytest.mark.slow
def test_a_first_order_run_on_ray_ends_bit_for_bit_where_the_local_one_does(ray_cluster, fo_run, tmp_path):
    """The n-sized values travel through the object store (results up, one sync message down)."""
    assert_same_run(fo_run, finished_run(tmp_path, FO_RUN, "ray", *ON_RAY))


def test_a_sweep_over_the_algorithm_validates(tmp_path):
    from meerkat_ray.sweep_file import load_sweep

    import yaml

    from meerkat_ray.config import parse_override, set_dotted

    base: dict = {}
    for item in TINY_RUN + ["vp.enabled=false"]:
        set_dotted(base, *parse_override(item))
    spec = {"base": base, "grid": {"fed.algorithm": ["sparse_zo", "first_order"]}}
    (tmp_path / "algos.yaml").write_text(yaml.safe_dump(spec))
    sweep = load_sweep(tmp_path / "algos.yaml")
    assert [c.fed.algorithm for c in sweep.configs] == ["sparse_zo", "first_order"]


def test_analysis_names_the_algorithm():
    from analysis.methods import method_label

    assert method_label({"fed": {"algorithm": "sparse_zo"}, "vp": {"enabled": True}}) == "Meerkat-vp"
    assert method_label({"fed": {"algorithm": "first_order"}}) == "First-order FedAvg"
    assert method_label({"fed": {"algorithm": "first_order"}, "mask": {"kind": "random"},
                         "vp": {"enabled": True}}) == "First-order FedAvg, Random mask + VPCS"


# ----------------------------------------------------------------------------- lora_zo (LoRA-FedZO)

LORA_RUN = TINY_RUN + ["data.num_train=96", "data.num_clients=3", "data.partition=iid", "fed.rounds=2",
                       "fed.local_steps=2", "fed.eval_every=2", "vp.enabled=false", "executor=local",
                       "fed.algorithm=lora_zo"]


def test_lora_adapters_start_at_the_pretrained_model_and_a_zo_step_moves_only_them(
        fresh_lm, tiny_lm, tiny_batch, tiny_label_ids):
    from meerkat_ray.algorithms import make_algorithm
    from meerkat_ray.scoring import label_logits
    from meerkat_ray.zo import zo_step_

    cfg = load_config(None, [*LORA_RUN, "vp.enabled=true"])
    algorithm = make_algorithm("lora_zo")
    lm = algorithm.adapt_model(fresh_lm, cfg)
    assert torch.equal(label_logits(lm.model, tiny_batch, tiny_label_ids),
                       label_logits(tiny_lm.model, tiny_batch, tiny_label_ids))  # B = 0: the pre-trained model
    mask = algorithm.make_mask(lm, cfg, progress=False)
    shapes = {n: p.shape for n, p in lm.model.named_parameters()}
    assert mask.indices and all(".lora_A." in n or ".lora_B." in n for n in mask.indices)
    assert mask.n == sum(shapes[n].numel() for n in mask.indices) and mask.meta["kind"] == "lora"
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in mask.indices} == {"q_proj", "v_proj"}
    g_pre = mask.pretrain_grad  # Meerkat-vp's g_pre on the adapters: zero on A while B = 0
    offsets = np.cumsum([0] + [idx.numel() for idx in mask.indices.values()])
    on_a = torch.cat([torch.full((int(e - s),), ".lora_A." in n) for n, s, e in zip(mask.indices, offsets, offsets[1:])])
    assert torch.isfinite(g_pre).all() and not g_pre[on_a].any() and g_pre[~on_a].any()

    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    view = MaskedView(lm.model, mask)
    theta = view.gather()
    scalar, _ = zo_step_(view, theta, 7, tiny_batch, tiny_label_ids, eps=1e-3, lr=1e-2)
    after = lm.model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(".lora_" in k for k in changed) and isinstance(scalar, float)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory.mktemp("lora"), LORA_RUN, "lora")


@pytest.mark.ray
@pytest.mark.slow
def test_a_lora_zo_run_on_ray_ends_bit_for_bit_where_the_local_one_does(ray_cluster, lora_run, tmp_path):
    """Every client actor attaches the same adapters (A from the run seed), so the seeds and scalars
    of the local run are the Ray run's too."""
    assert_same_run(lora_run, finished_run(tmp_path, LORA_RUN, "ray", *ON_RAY))


@pytest.mark.slow
def test_a_lora_zo_run_sends_scalars_replays_and_exports_merged(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from meerkat_ray.experiment import load_run_model
    from meerkat_ray.mask import load_mask
    from meerkat_ray.models import load_model
    from meerkat_ray.export import export_model
    from meerkat_ray.batches import collate
    from meerkat_ray.scoring import label_logits

    k, steps = 3, 2
    metrics = read_metrics(lora_run)[1:]
    assert [m["uplink_bytes"] for m in metrics] == [k * (2 * WORD + steps * (WORD + LOSS_BYTES))] * 2  # scalars only
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["algorithm"] == "lora_zo" and summary["replayable"] is True
    final, init = (load_theta(lora_run / f) for f in ("sparse_final.safetensors", "sparse_init.safetensors"))
    assert not torch.equal(final, init) and torch.equal(replay_run(lora_run), final)

    cfg = load_config(None, [*LORA_RUN, "name=lora", f"output_dir={lora_run.parent}"])
    adapted = load_run_model(cfg)
    MaskedView(adapted.model, load_mask(lora_run / "mask.safetensors")).write_(final)
    export_model(lora_run, tmp_path / "exported")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert not any("lora_" in name for name in merged.state_dict())
    ids = [adapted.tokenizer(f"Review {i}: it was")["input_ids"] for i in range(4)]
    batch = collate(ids, [0, 1, 0, 1], adapted.tokenizer.pad_token_id)
    label_ids = torch.tensor([5, 9])
    assert torch.allclose(label_logits(merged, batch, label_ids), label_logits(adapted.model, batch, label_ids),
                          atol=1e-5, rtol=1e-5)
    pretrained = load_model(cfg.model, cfg.seed).model  # the adapters did change the outputs
    assert not torch.allclose(label_logits(pretrained, batch, label_ids), label_logits(merged, batch, label_ids),
                              atol=1e-5, rtol=1e-5)


def test_analysis_ignores_the_keys_an_algorithm_does_not_read():
    from analysis.methods import inert

    assert inert("fed.fo_lr", {"fed.algorithm": "sparse_zo"}) and not inert("fed.fo_lr", {"fed.algorithm": "first_order"})
    assert inert("lora.rank", {}) and not inert("lora.rank", {"fed.algorithm": "lora_zo"})
    assert inert("mask.density", {"fed.algorithm": "lora_zo"}) and not inert("mask.density", {})
    assert inert("zo.lr", {"fed.algorithm": "first_order", "fed.fo_lr": 0.1})
    assert not inert("zo.lr", {"fed.algorithm": "first_order", "fed.fo_lr": 0.0})
