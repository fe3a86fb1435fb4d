"""Loading models: the embedded SmolLM2-135M (GGUF -> fp32 conversion into the cache, checked
against the GGUF file's own dequantised tensors, then reused), and a model from a local folder."""

import os

import numpy as np
import pytest
import torch

from meerkat_ray.config import ModelConfig
from meerkat_ray.models import SMOLLM2_GGUF, _smollm2_folder, cache_root, load_model

# HF parameter -> GGUF tensor; q and k are stored permuted for llama.cpp's rotary layout, so the
# comparison uses tensors stored as they are
GGUF_NAMES = {"model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
              "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
              "model.layers.29.mlp.up_proj.weight": "blk.29.ffn_up.weight",
              "model.norm.weight": "output_norm.weight",
              "model.embed_tokens.weight": "token_embd.weight"}


def gguf_tensors(names) -> dict[str, torch.Tensor]:
    """Tensors of the embedded GGUF file, dequantised by the gguf library itself (not transformers)."""
    import gguf

    reader = gguf.GGUFReader(str(_smollm2_folder() / SMOLLM2_GGUF))  # parsing the file is the slow part: once
    out = {}
    for tensor in reader.tensors:
        if tensor.name in names:
            values = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            out[tensor.name] = torch.from_numpy(values).reshape(tuple(int(d) for d in reversed(tensor.shape)))
    return out


@pytest.mark.slow
def test_the_embedded_model_is_converted_once_to_the_gguf_values_and_then_reused(capfd, tmp_path, monkeypatch):
    """In an empty cache of its own: the first load converts (and says so), the fp32 folder holds
    exactly the GGUF file's dequantised values, the model knows a fact, the second load converts nothing."""
    monkeypatch.setenv("MEERKAT_RAY_CACHE", str(tmp_path / "cache"))
    folder = cache_root(ModelConfig()) / "models" / "smollm2-135m-fp32"
    assert folder.is_relative_to(tmp_path) and not folder.exists()
    lm = load_model(ModelConfig(name="smollm2-135m", device="cpu"))
    assert "converting the embedded SmolLM2-135M" in capfd.readouterr().out
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    assert not [p for p in folder.parent.iterdir() if ".tmp" in p.name]  # the temp folder was renamed

    params = dict(lm.model.named_parameters())
    assert 134e6 < sum(p.numel() for p in params.values()) < 135e6  # SmolLM2-135M, tied head
    assert all(p.dtype == torch.float32 for p in params.values())
    expected = gguf_tensors(set(GGUF_NAMES.values()))
    for hf_name, gguf_name in GGUF_NAMES.items():
        assert torch.equal(params[hf_name].detach(), expected[gguf_name]), hf_name

    ids = lm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_id = int(lm.model(input_ids=ids).logits[0, -1].argmax())
    assert lm.tokenizer.decode([next_id]).strip() == "Paris"

    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = load_model(ModelConfig(name="smollm2-135m", device="cpu"))
    assert "converting" not in capfd.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
    assert torch.equal(dict(again.model.named_parameters())["model.layers.0.mlp.down_proj.weight"],
                       params["model.layers.0.mlp.down_proj.weight"])


def test_a_model_loads_from_a_local_hugging_face_folder(tiny_lm, tmp_path):
    """Any Hugging Face folder (here: the tiny model saved by save_pretrained) by its path: the
    same weights, the same tokenizer, left padding, a fingerprint naming the folder."""
    folder = tmp_path / "my-model"
    tiny_lm.model.save_pretrained(folder, safe_serialization=True)
    tiny_lm.tokenizer.save_pretrained(folder)
    lm = load_model(ModelConfig(name=str(folder), device="cpu", dtype="bfloat16"))
    assert lm.fingerprint == str(folder.resolve()) and lm.tokenizer.padding_side == "left"
    loaded, original = dict(lm.model.named_parameters()), dict(tiny_lm.model.named_parameters())
    assert loaded.keys() == original.keys()
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in loaded.values())
    for name, p in original.items():
        assert torch.equal(loaded[name], p.detach().to(torch.bfloat16)), name
    text = "Review 1: the film was a joy. It was"
    assert lm.tokenizer(text)["input_ids"] == tiny_lm.tokenizer(text)["input_ids"]
    assert os.path.samefile(folder, lm.fingerprint)
