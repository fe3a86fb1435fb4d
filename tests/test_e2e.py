"""End to end through the CLI on tiny-llama: the run folder of MEERKAT.md section 3, bit-exact
replay of `path.parquet` (by the package and by an independent auditor), early stopping, export."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from conftest import FLAG_ALL
from safetensors import safe_open
from safetensors.torch import load_file

from meerkat_ray.config import from_dict
from meerkat_ray.mask import check_mask, load_mask
from meerkat_ray.replay import replay_path
from meerkat_ray.runlog import read_metrics, read_path
from meerkat_ray.masked_view import MaskedView

pytestmark = pytest.mark.slow

T, ROUNDS, K = 4, 3, 4
COMMON = [
    "model.name=tiny-llama", "model.num_threads=1", "seed=0", "executor=local",
    "data.task=tweets2", "data.num_train=160", "data.num_test=32", f"data.num_clients={K}",
    "data.partition=mixed", "data.extreme_fraction=0.5", "data.batch_size=4", "data.max_length=32",
    "mask.density=0.01", "mask.calib_num_seqs=4", "mask.calib_seq_len=32", "mask.calib_batch_size=2",
    f"fed.rounds={ROUNDS}", f"fed.local_steps={T}", "fed.eval_every=2", "zo.lr=1e-2",
    "vp.enabled=true", f"vp.calib_steps={T}", *FLAG_ALL,  # VPCS flags every client after the first round
]
RUNS = {  # name -> extra overrides
    "round": ["fed.seed_sharing=round"],
    "client": ["fed.seed_sharing=client", "mask.kind=random"],
}
METRIC_FIELDS = {"round", "train_loss", "uplink_bytes", "downlink_bytes", "flagged_clients", "wall_s"}
PATH_COLUMNS = ["round", "client", "step", "seed", "scalar", "lr", "weight", "grad_ip"]


def cli(*args, cwd, log):
    """`python -m meerkat_ray ARGS` in the background, stdout and stderr into the file `log`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "meerkat_ray", *args], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def finish(proc, log) -> str:
    proc.wait(timeout=300)
    out = log.read_text()
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both runs at once (one torch thread each, two cores): name -> run folder."""
    root = tmp_path_factory.mktemp("e2e")
    procs = {name: cli("run", *COMMON, *extra, f"name={name}", f"output_dir={root}", "--quiet", cwd=root,
                       log=root / f"{name}.log")
             for name, extra in RUNS.items()}
    for name, proc in procs.items():
        finish(proc, root / f"{name}.log")
    return {name: root / name for name in RUNS}


@pytest.fixture(scope="module")
def original(tiny_lm):
    """The untouched tiny model the runs started from (same name, same seed)."""
    assert tiny_lm.fingerprint == "tiny-llama-seed0"
    return tiny_lm.model


def test_run_folder_has_every_contract_file(runs):
    for name, run_dir in runs.items():
        files = {p.name for p in run_dir.iterdir()}
        assert {"config.yaml", "metrics.jsonl", "path.parquet", "mask.safetensors", "sparse_init.safetensors",
                "sparse_final.safetensors", "summary.json"} <= files, files
        assert not [f for f in files if f.endswith(".tmp")]
        cfg = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))  # fully resolved, valid
        assert cfg.fed.seed_sharing == name and cfg.fed.local_steps == T and cfg.name == name
        assert cfg.zo.eps == 1e-3  # a default, written out too

        metrics = read_metrics(run_dir)
        assert [m["round"] for m in metrics] == list(range(ROUNDS + 1))
        for m in metrics:
            assert METRIC_FIELDS <= m.keys(), (m["round"], METRIC_FIELDS - m.keys())
        evaluated = [m["round"] for m in metrics if m.get("accuracy") is not None]
        assert evaluated == [0, 2, 3]  # zero-shot, every fed.eval_every = 2 rounds, and the last
        num_test = json.loads((run_dir / "summary.json").read_text())["num_test"]
        assert num_test == 32  # data.num_test; every accuracy is a count of those 32 examples
        assert all(float(m["accuracy"] * num_test).is_integer() for m in metrics if m["round"] in evaluated)
        assert all(m["train_loss"] > 0 and m["uplink_bytes"] > 0 and m["downlink_bytes"] > 0 for m in metrics[1:])

        path = read_path(run_dir)
        assert list(path.columns) == PATH_COLUMNS
        assert all(path[c].dtype == "int64" for c in ("round", "client", "step", "seed"))
        assert all(path[c].dtype == "float64" for c in ("scalar", "lr", "weight", "grad_ip"))
        assert path["grad_ip"].notna().all() and (path["lr"] == 1e-2).all()
        per_round = path.groupby(["round", "client"])["weight"].first().groupby("round").sum()
        assert per_round.tolist() == pytest.approx([1.0] * ROUNDS)

        mask = load_mask(run_dir / "mask.safetensors")
        with safe_open(str(run_dir / "mask.safetensors"), framework="pt") as f:
            assert f.get_tensor("pretrain_grad").dtype == torch.float32
            assert all(f.get_tensor(k).dtype == torch.int64 for k in mask.indices)
        assert mask.pretrain_grad.numel() == mask.n == round(0.01 * 73728)
        assert mask.meta["kind"] == ("pretrain_grad" if name == "round" else "random")
        for file in ("sparse_init.safetensors", "sparse_final.safetensors"):
            tensors = load_file(str(run_dir / file))
            assert list(tensors) == ["theta"] and tensors["theta"].dtype == torch.float32
            assert tensors["theta"].shape == (mask.n,)

        summary = json.loads((run_dir / "summary.json").read_text())
        for key in ("final_accuracy", "zero_shot_accuracy", "uplink_bytes", "downlink_bytes", "local_steps",
                    "flagged_clients", "extreme_clients"):
            assert key in summary, key
        assert summary["zero_shot_accuracy"] == metrics[0]["accuracy"]
        assert summary["final_accuracy"] == metrics[-1]["accuracy"]
        assert summary["uplink_bytes"] == sum(m["uplink_bytes"] for m in metrics)
        assert summary["downlink_bytes"] == sum(m["downlink_bytes"] for m in metrics)
        assert summary["local_steps"] == len(path) == sum(m.get("local_steps", 0) for m in metrics)
        assert summary["extreme_clients"]  # the mixed partition has single-label clients


def independent_evaluation(model, tokenizer, run_dir) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over the run's test set, one unpadded example at a time with
    plain torch: the verbalizer's first tokens' logits at the prompt's last position (README:
    prompts left-truncated to data.max_length tokens)."""
    from meerkat_ray.experiment import prepare_data

    cfg = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    task = prepare_data(cfg).task
    label_ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in task.spec.label_words]
    correct, losses = 0, []
    with torch.no_grad():
        for text, label in zip(task.test_texts, task.test_labels):
            ids = tokenizer(text, add_special_tokens=True)["input_ids"][-cfg.data.max_length:]
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1, label_ids].double()
            correct += int(int(logits.argmax()) == label)
            losses.append(float(torch.logsumexp(logits, 0) - logits[label]))
    return correct / len(losses), sum(losses) / len(losses)


def test_reported_accuracy_and_loss_are_the_models_own(runs, original, tiny_lm):
    """Zero-shot and final accuracy / test loss in metrics.jsonl equal an evaluation written here of
    the original model and of the original model with sparse_final at the mask."""
    import copy

    for name, run_dir in runs.items():
        metrics = read_metrics(run_dir)
        acc0, loss0 = independent_evaluation(original, tiny_lm.tokenizer, run_dir)
        assert metrics[0]["accuracy"] == acc0 and metrics[0]["test_loss"] == pytest.approx(loss0, rel=1e-4), name
        trained = copy.deepcopy(original)
        MaskedView(trained, load_mask(run_dir / "mask.safetensors")).write_(
            load_file(str(run_dir / "sparse_final.safetensors"))["theta"])
        acc, loss = independent_evaluation(trained, tiny_lm.tokenizer, run_dir)
        assert metrics[-1]["accuracy"] == acc and metrics[-1]["test_loss"] == pytest.approx(loss, rel=1e-4), name
        assert loss != pytest.approx(loss0, rel=1e-6)  # the evaluation saw the trained values


def test_sparse_init_is_the_model_at_the_mask(runs, original):
    for run_dir in runs.values():
        mask = load_mask(run_dir / "mask.safetensors")
        check_mask(mask, original)
        init = load_file(str(run_dir / "sparse_init.safetensors"))["theta"]
        assert torch.equal(init, MaskedView(original, mask).gather())


def test_replay_path_reproduces_sparse_final_bit_for_bit(runs):
    for name, run_dir in runs.items():
        init = load_file(str(run_dir / "sparse_init.safetensors"))["theta"]
        final = load_file(str(run_dir / "sparse_final.safetensors"))["theta"]
        replayed = replay_path(init, read_path(run_dir), name)
        assert torch.equal(replayed, final), name
        assert not torch.equal(final, init)


def audit_replay(init: torch.Tensor, path: pd.DataFrame, location=None) -> torch.Tensor:
    """sparse_final from sparse_init and path.parquet alone, written from the contract only
    (MEERKAT.md section 3 and the aggregation rules' docstrings), not from the package's code.

    z(seed) = torch.randn(n, generator=Generator("cpu").manual_seed(seed)); per round, in order:
      round sharing (every client's step t has the same seed): for each step t, one term with
          coef_t = sum over clients, in id order, of weight * scalar (FedAvg); a robust rule
          (`location`: a list of the scalars of the clients that ran step t, in id order -> one
          float) instead gives coef_t = W_t * location(scalars), W_t = the sum of their weights;
      client sharing: for each client (id order), each step: coef = weight * scalar;
    and theta <- theta - lr * coef * z, written `theta.add_(z, alpha=-(lr * coef))`: one fp32
    multiply-add (spelling it `theta - (lr * coef) * z` rounds twice and is only allclose).
    The sharing mode is read off the seeds, so config.yaml is not needed.
    """
    theta, n = init.clone(), init.numel()
    for _, rnd in sorted(path.groupby("round")):
        rnd = rnd.sort_values(["client", "step"])
        if (rnd.groupby("step")["seed"].nunique() == 1).all():  # round sharing
            terms = []
            for t in sorted(rnd["step"].unique()):
                rows = rnd[rnd["step"] == t]
                coef, weight = 0.0, 0.0
                for row in rows.itertuples():
                    coef += row.weight * row.scalar
                    weight += row.weight
                if location is not None:
                    coef = weight * location([float(v) for v in rows["scalar"]])
                terms.append((int(rows["seed"].iloc[0]), float(rows["lr"].iloc[0]), coef))
        else:
            assert location is None, "a robust rule needs round-shared seeds"
            terms = [(int(r.seed), r.lr, r.weight * r.scalar) for r in rnd.itertuples()]
        for seed, lr, coef in terms:
            z = torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
            theta.add_(z, alpha=-(lr * coef))
    return theta


def test_an_independent_audit_of_the_path_matches_sparse_final(runs):
    for name, run_dir in runs.items():
        init = load_file(str(run_dir / "sparse_init.safetensors"))["theta"]
        final = load_file(str(run_dir / "sparse_final.safetensors"))["theta"]
        assert torch.equal(audit_replay(init, pd.read_parquet(run_dir / "path.parquet")), final), name


def test_flagged_clients_run_one_step_per_round_after_the_decision(runs):
    for name, run_dir in runs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["vp_decided_round"] == 1 and summary["flagged_clients"] == list(range(K))
        metrics = read_metrics(run_dir)
        assert [m["flagged_clients"] for m in metrics] == [[]] + [list(range(K))] * ROUNDS
        steps = read_path(run_dir).groupby(["round", "client"]).size()
        for (rnd, client), count in steps.items():
            assert count == (T if rnd == 1 else 1), (name, rnd, client, count)
        assert len(steps) == ROUNDS * K  # every client trained every round
        assert summary["flagging"]["recall"] == 1.0


def test_export_writes_a_loadable_hugging_face_folder(runs, original, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, out = runs["round"], tmp_path / "exported"
    finish(cli("export", str(run_dir), str(out), cwd=tmp_path, log=tmp_path / "export.log"), tmp_path / "export.log")
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    mask = load_mask(run_dir / "mask.safetensors")
    final = load_file(str(run_dir / "sparse_final.safetensors"))["theta"]
    assert torch.equal(MaskedView(model, mask).gather(), final)
    expected = {k: v.clone() for k, v in original.state_dict().items()}  # the original ...
    start = 0
    for name, idx in mask.indices.items():  # ... with sparse_final at the mask
        expected[name].view(-1)[idx] = final[start: start + idx.numel()]
        start += idx.numel()
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key

    from meerkat_ray.cli import main  # refuses to overwrite a non-empty folder (in process: fast)

    assert main(["export", str(run_dir), str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {out}: exists and is not empty")
    assert torch.equal(MaskedView(AutoModelForCausalLM.from_pretrained(out), mask).gather(), final)
