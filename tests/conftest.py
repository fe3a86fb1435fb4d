"""Shared test set-up: an offline environment, the tiny model and small classification data.

Fixtures here are shared by several test files; add new ones below, never remove others'.
"""
import os
import sys

# Nothing in the tests may touch the network: without these a hub miss retries for ~23 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every test, subprocess and Ray worker of a session uses one temporary cache (converted models,
# the tokenizer, masks), never the user's ~/.cache/meerkat-ray: an entry written by older code
# there must not decide a test. Set before anything reads it; removed when the session ends.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

TEST_CACHE = tempfile.mkdtemp(prefix="meerkat-ray-test-cache-")
os.environ["MEERKAT_RAY_CACHE"] = TEST_CACHE
atexit.register(shutil.rmtree, TEST_CACHE, ignore_errors=True)

import copy  # noqa: E402
import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny-model forwards gain nothing from a second thread, and on a shared 2-core machine OpenMP's
# spin-waiting makes them ~20x slower under load (measured: 9 ms with 1 thread, 217 ms with 2).
torch.set_num_threads(1)

# A federation of a few seconds on the tiny model; tests add clients, rounds, steps and backend.
TINY_RUN = ["model.name=tiny-llama", "model.num_threads=1", "data.task=tweets2", "data.max_length=32",
            "data.num_test=32", "mask.calib_num_seqs=2", "mask.calib_seq_len=32", "mask.cache=false",
            "mask.density=0.01", "data.batch_size=4", "zo.lr=1e-2"]
# VPCS thresholds that flag every client at the decision: rho_later > 1e-6 always holds, every
# late step is "quiet" below 1e6 x the population reference, and any quiet fraction > 0 will do.
FLAG_ALL = ["vp.rho=1e-6", "vp.sigma=1e6", "vp.min_quiet_fraction=0"]

TINY_SEED = 0                          # seed of the tiny model every core test uses
TINY_LABEL_WORDS = (" terrible", " great")  # a 2-class verbalizer (distinct first tokens)


def tiny_texts(count: int) -> tuple[list[str], list[int]]:
    """`count` short labelled prompts, alternating labels, all distinct."""
    good = ["a joy", "lovely", "great fun", "a delight", "moving"]
    bad = ["a bore", "awful", "a mess", "tedious", "dull"]
    texts, labels = [], []
    for i in range(count):
        label = i % 2
        word = (good if label else bad)[(i // 2) % 5]
        texts.append(f"Review {i}: the film was {word}. It was")
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="session")
def tiny_lm():
    """The tiny Llama (fp32, CPU, eval). Shared: tests that change weights use `fresh_lm`."""
    from meerkat_ray.config import ModelConfig
    from meerkat_ray.models import load_model

    return load_model(ModelConfig(name="tiny-llama", device="cpu"), TINY_SEED)


@pytest.fixture
def fresh_lm(tiny_lm):
    """A private copy of the tiny model that a test may modify (tied weights stay tied)."""
    return dataclasses.replace(tiny_lm, model=copy.deepcopy(tiny_lm.model))


@pytest.fixture(scope="session")
def tiny_label_ids(tiny_lm) -> torch.Tensor:
    from meerkat_ray.experiment import label_token_ids

    return label_token_ids(tiny_lm.tokenizer, TINY_LABEL_WORDS)


@pytest.fixture(scope="session")
def tiny_tokens(tiny_lm) -> tuple[list[list[int]], list[int]]:
    """48 tokenised prompts and their labels (training examples for ClientData)."""
    from meerkat_ray.experiment import tokenize

    texts, labels = tiny_texts(48)
    return tokenize(tiny_lm.tokenizer, texts, max_length=32), labels


@pytest.fixture(scope="session")
def tiny_batch(tiny_lm, tiny_tokens):
    """One left-padded batch of 4 examples, built with batches.collate."""
    from meerkat_ray.batches import collate

    tokens, labels = tiny_tokens
    return collate(tokens[:4], labels[:4], tiny_lm.tokenizer.pad_token_id)


@pytest.fixture(scope="session")
def tiny_mask(tiny_lm):
    """A seeded random mask (u = 0.02, n = 1475) spread over every eligible matrix of the tiny model."""
    from meerkat_ray.config import MaskConfig
    from meerkat_ray.mask import compute_mask

    return compute_mask(tiny_lm, MaskConfig(kind="random", density=0.02), seed=3, need_g_pre=False, progress=False)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session (ray.init costs 5-15 s): 2 CPUs and 2
    logical GPUs, so fractional-GPU placement is exercised on a CPU machine. Code under test that
    calls `distributed.cluster.connect` finds it initialised and uses it instead of starting another.
    address="local": always a fresh instance, never a cluster someone started on this machine."""
    import logging

    import ray

    # Ray's driver log handler keeps the sys.stderr of the moment ray was first imported: when
    # that was inside a test's capsys / capfd, the stream is closed by now, and every later Ray log
    # line becomes a "--- Logging error ---" on the stderr the current test reads. Point it at the
    # process's own stderr (fd 2, which pytest still captures at the file-descriptor level).
    from ray._private.log import PlainRayHandler

    for handler in logging.getLogger("ray").handlers:
        if isinstance(handler, PlainRayHandler):
            handler.stream = sys.__stderr__
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


class ModelLoaded(BaseException):
    """Raised by `no_model_or_cluster` when code enters a model loader or starts Ray: a
    BaseException, so that no `except Exception` on the way can turn it into an error line."""


@pytest.fixture
def no_model_or_cluster(monkeypatch):
    """Any entry into a model loader (ours or transformers') or `ray.init` fails the test: proves
    "refused before any model is loaded or cluster started" whatever the cache holds."""
    import ray
    import transformers

    import meerkat_ray.experiment
    import meerkat_ray.models

    def entered(what):
        def fail(*args, **kwargs):
            raise ModelLoaded(f"{what} was entered")
        return fail

    for module in (meerkat_ray.models, meerkat_ray.experiment):
        monkeypatch.setattr(module, "load_model", entered("load_model"))
    for name in ("_tiny_model", "smollm2_folder"):
        monkeypatch.setattr(meerkat_ray.models, name, entered(name))
    for name in ("from_pretrained", "from_config"):
        monkeypatch.setattr(transformers.AutoModelForCausalLM, name, entered(f"AutoModelForCausalLM.{name}"))
    monkeypatch.setattr(ray, "init", entered("ray.init"))
    # as in a fresh process, even after an earlier test started the session cluster: code that
    # would use Ray reaches `ray.init` (and fails here) instead of placing actors on that cluster
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    yield


# ----------------------------------------------------------------------------- comparing run folders

def timeless(run_dir) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (`*_s`): what two equal runs share exactly."""
    from meerkat_ray.runlog import read_metrics

    return [{k: v for k, v in m.items() if not k.endswith("_s")} for m in read_metrics(run_dir)]


def assert_same_run(a, b, ignore=()) -> None:
    """Two run folders ended bit for bit alike: sparse_final, path.parquet and every metric (but
    times and the keys in `ignore`)."""
    from meerkat_ray.runlog import load_theta, read_path

    a, b = Path(a), Path(b)
    assert torch.equal(load_theta(a / "sparse_final.safetensors"), load_theta(b / "sparse_final.safetensors"))
    assert read_path(a).equals(read_path(b))
    drop = lambda rows: [{k: v for k, v in m.items() if k not in ignore} for m in rows]  # noqa: E731
    assert drop(timeless(a)) == drop(timeless(b))


def run_folder(base: list[str], output_dir, name: str, *extra: str) -> Path:
    """Run the federation of `base` + `extra` (in process) into output_dir/name; its run folder."""
    from meerkat_ray.config import load_config
    from meerkat_ray.runner import run_experiment

    cfg = load_config(None, [*base, *extra, f"name={name}", f"output_dir={output_dir}"])
    run_experiment(cfg, progress=False)
    return Path(output_dir) / name


def free_port() -> int:
    """A TCP port nothing on this machine listens on now (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
