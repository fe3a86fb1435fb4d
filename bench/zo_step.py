"""One sparse ZO step against its physical limit: two plain forward passes on the same batch.

    ratio_to_two_forwards = median time of zo.zo_step_  /  median time of 2 x scoring.label_logits
on one fixed batch of the embedded tweet task (the same forward the step runs: verbalizer logits at
the last position, logits_to_keep=1). Everything a step adds to its two forwards (drawing z,
writing theta +- eps z into the model, the update) shows up as the ratio's excess over 1. A second
row per mask times a client worker's whole local round (`ClientWorker.run`: batch assembly, T
steps, the final restore) against two forwards on each of the same T batches. The estimator rows
(`zo.multi_step_`: P = 2 central, forward with P = 1 and 2) give the time per step over two plain
forwards and over the forwards the step itself runs (2P central, P + 1 forward): the last ratio is
what the step adds to its own forwards.

Run (each configuration a few minutes at most on 2 CPU cores; take the lock on shared machines):
    flock /tmp/meerkat-cpu.lock .venv/bin/python bench/zo_step.py --model tiny-llama
    flock /tmp/meerkat-cpu.lock .venv/bin/python bench/zo_step.py --model smollm2-135m --masks pretrain_grad,full
    python bench/zo_step.py --model random-llama-1b --device cuda --masks random,full   # GPU machine
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Timer, emit, fail, median, require_positive, table  # noqa: E402

MODELS = ("tiny-llama", "tiny-qwen2", "smollm2-135m", "random-llama-1b")
MASKS = ("pretrain_grad", "weight_magnitude", "random", "full")
# Llama-3.2-1B's shape (1.24B parameters, tied embeddings), randomly initialised: the timing of a
# forward does not depend on the weights' values, and no hub access is needed.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048, rope_theta=500000.0,
                tie_word_embeddings=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama", help=f"one of {', '.join(MODELS)}")
    p.add_argument("--masks", default="pretrain_grad,full", help=f"comma list of {', '.join(MASKS)}")
    p.add_argument("--density", type=float, default=1e-3, help="mask density u (not used by full)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=48, help="prompt tokens (the batch is padded to its longest)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (a client actor here uses 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--repeats", type=int, default=0, help="timed repeats per measurement (0 = by model size)")
    p.add_argument("--local-steps", type=int, default=10, help="T of the worker row")
    args = p.parse_args(argv)
    if args.model not in MODELS:
        fail(f"--model: unknown model {args.model!r} (choose from {', '.join(MODELS)})")
    masks = [m for m in args.masks.split(",") if m]
    bad = [m for m in masks if m not in MASKS]
    if bad or not masks:
        fail(f"--masks: unknown mask kind {bad[0] if bad else '(empty)'!r} (choose from {', '.join(MASKS)})")
    args.masks = masks
    if not 0 < args.density <= 1:
        fail("--density: must be in (0, 1]")
    require_positive(args, "batch_size", "max_length", "threads", "local_steps")
    if args.repeats < 0:
        fail("--repeats: must be >= 0")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            fail(f"--device: {args.device} requested but no CUDA device is available")
    return args


def load(args):
    """(LoadedModel, tokenised training prompts, labels, label token ids)."""
    import torch

    from meerkat_ray.config import ModelConfig
    from meerkat_ray.experiment import label_token_ids, tokenize
    from meerkat_ray.models import LoadedModel, cache_root, embedded_tokenizer, load_model
    from meerkat_ray.tasks import load_task

    torch.set_num_threads(args.threads)
    if args.model == "random-llama-1b":
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = ModelConfig(name="tiny-llama", device=args.device, dtype=args.dtype)
        tokenizer = embedded_tokenizer(cache_root(cfg))
        tokenizer.padding_side = "left"
        config = AutoConfig.for_model("llama", pad_token_id=tokenizer.pad_token_id, **LLAMA_1B)
        torch.manual_seed(0)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
        model.requires_grad_(False)
        lm = LoadedModel(model, tokenizer, torch.device(args.device), "random-llama-1b-seed0", cache_root(cfg))
    else:
        lm = load_model(ModelConfig(name=args.model, device=args.device, dtype=args.dtype, num_threads=args.threads))
    task = load_task("tweets2", seed=0, num_train=2000, num_test=2)
    tokens = tokenize(lm.tokenizer, task.train_texts, args.max_length)
    return lm, tokens, task.train_labels, label_token_ids(lm.tokenizer, task.spec.label_words)


def get_view(lm, kind: str, density: float):
    from meerkat_ray.config import MaskConfig
    from meerkat_ray.mask import get_mask
    from meerkat_ray.masked_view import MaskedView

    # pretrain_grad with g_pre is what a Meerkat-vp run caches; a full mask is never worth caching
    cfg = MaskConfig(kind=kind, density=density, cache=kind != "full")
    mask = get_mask(lm, cfg, seed=0, need_g_pre=kind == "pretrain_grad", progress=False)
    return mask, MaskedView(lm.model, mask)


def time_step(lm, view, batch, label_ids, repeats: int, cuda: bool) -> dict:
    """Medians (seconds) of: 2 forwards, one zo_step_, and the step's parts on their own."""
    from meerkat_ray.scoring import label_logits
    from meerkat_ray.zo import perturbation, zo_step_

    theta = view.gather()
    two_fwd, step, draw, write = [], [], [], []
    for r in range(repeats + 2):  # interleaved, so both sides see the same machine state; 2 warm-ups
        with Timer(cuda) as t_fwd:
            label_logits(lm.model, batch, label_ids)
            label_logits(lm.model, batch, label_ids)
        with Timer(cuda) as t_step:
            zo_step_(view, theta, 1000 + r, batch, label_ids, eps=1e-3, lr=0.0)
        with Timer(cuda) as t_draw:
            z = perturbation(2000 + r, view.n)
        with Timer(cuda) as t_write:
            view.write_(theta)
        if r >= 2:
            two_fwd.append(t_fwd.s), step.append(t_step.s), draw.append(t_draw.s), write.append(t_write.s)
    del z
    return {"two_forwards_s": median(two_fwd), "step_s": median(step), "draw_z_s": median(draw),
            "write_s": median(write), "ratio_to_two_forwards": median(step) / median(two_fwd),
            "ratio_of_medians_per_repeat": median([s / f for s, f in zip(step, two_fwd)])}


def time_estimator(lm, view, batch, label_ids, repeats: int, cuda: bool, P: int, estimator: str) -> dict:
    """Medians (seconds) of 2 forwards and of one `multi_step_` with P directions and `estimator`."""
    from meerkat_ray.scoring import label_logits
    from meerkat_ray.zo import multi_step_, perturbation

    theta = view.gather()
    two_fwd, step = [], []
    for r in range(repeats + 2):
        zs = [perturbation(3000 + r * P + p, view.n) for p in range(P)]  # drawn outside the timing
        with Timer(cuda) as t_fwd:
            label_logits(lm.model, batch, label_ids)
            label_logits(lm.model, batch, label_ids)
        with Timer(cuda) as t_step:
            multi_step_(view, theta, zs, batch, label_ids, eps=1e-3, lr=0.0, estimator=estimator)
        if r >= 2:
            two_fwd.append(t_fwd.s), step.append(t_step.s)
    forwards = 2 * P if estimator == "central" else P + 1
    ratio = median(step) / median(two_fwd)
    return {"P": P, "estimator": estimator, "forwards": forwards, "two_forwards_s": median(two_fwd),
            "step_s": median(step), "ratio_to_two_forwards": ratio, "ratio_to_own_forwards": ratio * 2 / forwards}


ESTIMATOR_ROWS = ((2, "central"), (1, "forward"), (2, "forward"))


def time_worker(lm, mask, view, tokens, labels, label_ids, args, repeats: int, cuda: bool) -> dict:
    """A client's local round (T steps from its data stream) vs 2 forwards on each of its T batches."""
    import numpy as np

    from meerkat_ray.client import ClientData, ClientWorker
    from meerkat_ray.messages import ClientPlan
    from meerkat_ray.scoring import label_logits

    theta = view.gather()
    data = ClientData(tokens, labels, [np.arange(len(tokens))], seed=0, pad_id=lm.tokenizer.pad_token_id)
    worker = ClientWorker(lm.model, mask, theta, data, label_ids, eps=1e-3, batch_size=args.batch_size,
                          device=lm.device)
    T = args.local_steps
    rounds, fwds = [], []
    for r in range(repeats + 1):
        cursor = r * T * args.batch_size
        plan = ClientPlan(round=1, client=0, seeds=list(range(5000 + r * T, 5000 + (r + 1) * T)), steps=T,
                          lr=0.0, cursor=cursor)
        batches = [data.batch(0, cursor + t * args.batch_size, args.batch_size).to(lm.device) for t in range(T)]
        with Timer(cuda) as t_fwd:
            for b in batches:
                label_logits(lm.model, b, label_ids)
                label_logits(lm.model, b, label_ids)
        with Timer(cuda) as t_round:
            worker.run(plan)
        if r >= 1:
            rounds.append(t_round.s / T), fwds.append(t_fwd.s / T)
    return {"two_forwards_s": median(fwds), "step_s": median(rounds), "ratio_to_two_forwards": median(rounds) / median(fwds)}


def main(argv=None) -> None:
    args = parse_args(argv)
    from meerkat_ray.batches import collate

    lm, tokens, labels, label_ids = load(args)
    label_ids = label_ids.to(lm.device)
    cuda = lm.device.type == "cuda"
    batch = collate(tokens[: args.batch_size], labels[: args.batch_size], lm.tokenizer.pad_token_id).to(lm.device)
    params = sum(p.numel() for p in lm.model.parameters())
    repeats = args.repeats or (40 if params < 5e7 else 10)
    rows, results = [], []
    for kind in args.masks:
        mask, view = get_view(lm, kind, args.density)
        step = time_step(lm, view, batch, label_ids, repeats, cuda)
        worker = time_worker(lm, mask, view, tokens, labels, label_ids, args, max(3, repeats // 4), cuda)
        view.write_(view.gather())  # (the model is left as loaded: lr was 0 throughout)
        estimators = [time_estimator(lm, view, batch, label_ids, max(3, repeats // 2), cuda, P, est)
                      for P, est in ESTIMATOR_ROWS]
        results.append({"mask": kind, "n": mask.n, "step": step, "worker": worker, "estimators": estimators})
        rows.append([kind, mask.n, "zo_step_", step["two_forwards_s"] * 1e3, step["step_s"] * 1e3,
                     step["draw_z_s"] * 1e3, step["write_s"] * 1e3, step["ratio_to_two_forwards"]])
        rows.append([kind, mask.n, f"worker T={args.local_steps}", worker["two_forwards_s"] * 1e3,
                     worker["step_s"] * 1e3, "", "", worker["ratio_to_two_forwards"]])
        for e in estimators:
            rows.append([kind, mask.n, f"{e['estimator']} P={e['P']} ({e['forwards']} fwd; own {e['ratio_to_own_forwards']:.3f})",
                         e["two_forwards_s"] * 1e3, e["step_s"] * 1e3, "", "", e["ratio_to_two_forwards"]])
        del view, mask
    print(f"{args.model} ({params / 1e6:.1f}M params, {args.dtype}) on {lm.device}, {args.threads} thread(s), "
          f"batch {args.batch_size} x {batch.input_ids.shape[1]} tokens, medians of {repeats} repeats")
    print(table(["mask", "n", "what", "2 fwd ms", "step ms", "draw z ms", "write ms", "ratio"], rows))
    print("target: ratio_to_two_forwards <= 1.05 (sparse masks; the dense `full` row is for comparison)")
    emit("zo_step", {"model": args.model, "params": params, "dtype": args.dtype, "device": str(lm.device),
                     "threads": args.threads, "batch": list(batch.input_ids.shape), "repeats": repeats,
                     "density": args.density, "results": results})


if __name__ == "__main__":
    main()
