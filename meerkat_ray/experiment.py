"""Everything one experiment derives from its config, in the order that fails fast.

`prepare_data` needs no model (task, split, partition): bad data input is refused before any model
or cluster starts. `prepare_model` loads the model and mask; `build_worker` assembles a client
worker. The local runner and every Ray actor build their pieces with these same functions.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .algorithms import make_algorithm
from .client import ClientData, ClientWorker, PrivateNoise
from .config import Config
from .errors import ConfigError, MeerkatError
from .gradip import calibration_windows, min_window
from .privacy import check_plan, noise_multiplier
from .mask import Mask, get_mask
from .models import TINY_CONFIGS, LoadedModel, _in_hub_cache, _smollm2_folder, load_model
from .partition import Partition, make_partition
from .tasks import TaskData, load_task
from .batches import Batch, collate
from .masked_view import MaskedView


@dataclass
class DataSetup:
    task: TaskData
    partition: Partition

    @property
    def client_sizes(self) -> list[int]:
        return self.partition.sizes()

    def client_table(self) -> list[dict]:
        hist = self.partition.histograms(self.task.train_labels, self.task.num_classes)
        return [{"client": k, "size": int(sum(h)), "label_histogram": h, "extreme": bool(e)}
                for k, (h, e) in enumerate(zip(hist, self.partition.extreme))]

    @property
    def extreme_clients(self) -> list[int]:
        return [k for k, e in enumerate(self.partition.extreme) if e]


def prepare_data(cfg: Config) -> DataSetup:
    d = cfg.data
    task = load_task(d.task, seed=cfg.seed, num_train=d.num_train, num_test=d.num_test,
                     source=d.source or None, min_confidence=d.min_confidence)
    labels = np.asarray(task.train_labels)
    partition = make_partition(labels, d.num_clients, d.partition, alpha=d.alpha,
                               extreme_fraction=d.extreme_fraction, seed=cfg.seed, num_classes=task.num_classes)
    setup = DataSetup(task=task, partition=partition)
    check_plan(cfg, setup.client_sizes)
    check_calibration_data(cfg, setup.client_sizes)
    return setup


MIN_JUDGED = 3  # VPCS compares each client with the population of judged clients


def check_calibration_data(cfg: Config, sizes: list[int]) -> None:
    """VPCS judges each client on its first pass over its data (`gradip.calibration_windows`); a
    client whose pass is under vp.min_window steps is left out of the decision (named at the
    decision). Refused only when fewer than MIN_JUDGED clients could be judged at all."""
    if not cfg.vp.enabled:
        return
    windows = calibration_windows(sizes, cfg.data.batch_size, cfg.vp.calib_steps)
    short = [k for k, w in enumerate(windows) if w < min_window(cfg.vp)]
    if len(sizes) - len(short) < MIN_JUDGED:
        why = ", ".join(f"client {k} holds {sizes[k]} examples ({windows[k]} steps)" for k in short)
        raise ConfigError(f"vp.min_window: VPCS needs {MIN_JUDGED} clients whose data fills vp.min_window="
                          f"{min_window(cfg.vp)} steps of data.batch_size {cfg.data.batch_size}, but {why}; "
                          "use fewer clients, a smaller data.batch_size or vp.min_window, or vp.enabled=false")


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per prompt, left-truncated to max_length (the end of a prompt carries the question)."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [row[-max_length:] for row in ids]


def label_token_ids(tokenizer, label_words) -> torch.Tensor:
    ids = [tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in label_words]
    if len(set(ids)) != len(ids):
        raise MeerkatError(f"data.task: label words {list(label_words)} share a first token under this tokenizer")
    return torch.tensor(ids, dtype=torch.long)


def test_batches(tokenizer, task: TaskData, cfg: Config) -> list[Batch]:
    """The held-out test set in batches, sorted by length so that little padding is computed."""
    tokens = tokenize(tokenizer, task.test_texts, cfg.data.max_length)
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    size = cfg.data.eval_batch_size
    return [collate([tokens[i] for i in chunk], [task.test_labels[i] for i in chunk], tokenizer.pad_token_id)
            for chunk in (order[j: j + size] for j in range(0, len(order), size))]


def check_model(cfg: Config) -> None:
    """Refuse a model that `load_model` could not find, without loading it (before any cluster starts)."""
    name = cfg.model.name
    if name == "smollm2-135m":
        _smollm2_folder()
    elif name in TINY_CONFIGS:
        return
    elif Path(name).expanduser().exists():
        if not (Path(name).expanduser() / "config.json").is_file():
            raise ConfigError(f"model.name: {name} is not a Hugging Face model folder (no config.json)")
    elif os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(name):
        raise ConfigError(f"model.name: {name!r} is not a built-in name, a local folder, or a hub model available offline")


def prepare_mask(cfg: Config, lm: LoadedModel, progress: bool = True) -> tuple[Mask, torch.Tensor]:
    """Mask (cached on disk) and the initial masked values theta_0 (fp32, mask order); the
    algorithm may train other coordinates (lora_zo: its adapters)."""
    mask = make_algorithm(cfg.fed.algorithm).make_mask(lm, cfg, progress)
    if mask is None:
        mask = get_mask(lm, cfg.mask, cfg.seed, need_g_pre=cfg.vp.enabled, progress=progress)
    return mask, MaskedView(lm.model, mask).gather()


def load_run_model(cfg: Config) -> LoadedModel:
    """The model every process of the run builds: the loaded one, as the algorithm adapts it."""
    return make_algorithm(cfg.fed.algorithm).adapt_model(load_model(cfg.model, cfg.seed), cfg)


def prepare_model(cfg: Config, progress: bool = True) -> tuple[LoadedModel, Mask, torch.Tensor]:
    """Model, mask and theta_0."""
    lm = load_run_model(cfg)
    return (lm, *prepare_mask(cfg, lm, progress))


def build_worker(cfg: Config, data: DataSetup, lm: LoadedModel, mask: Mask, theta: torch.Tensor,
                 name: str = "local") -> ClientWorker:
    tokens = tokenize(lm.tokenizer, data.task.train_texts, cfg.data.max_length)
    client_data = ClientData(tokens, data.task.train_labels, data.partition.client_indices, cfg.seed,
                             lm.tokenizer.pad_token_id)
    return ClientWorker(lm.model, mask, theta, client_data, label_token_ids(lm.tokenizer, data.task.spec.label_words),
                        eps=cfg.zo.eps, batch_size=cfg.data.batch_size, device=lm.device, name=name,
                        clip=cfg.zo.clip, algorithm=cfg.fed.algorithm,
                        grad_ip=cfg.vp.enabled, perturbations=cfg.zo.num_perturbations, estimator=cfg.zo.estimator,
                        weight_decay=cfg.zo.weight_decay,
                        privacy=PrivateNoise(cfg.privacy.clip, noise_multiplier(cfg, data.client_sizes))
                        if cfg.privacy.enabled else None)
