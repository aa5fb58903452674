"""Synthetic llama checkpoints (random weights) for tests and benchmarks of the streaming path.

:func:`write_synthetic_llama` writes a Hugging Face directory (config.json, safetensors shards
with an index, a tokenizer copied from a given directory) one shard at a time, so that a
7B-shaped model is written without ever being held in memory.  The weights are seeded: the same
arguments give the same bytes.  The directory is built under a temporary name and renamed when
complete; an existing complete one is reused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.model.load import resolve_model_path


def importance_like(cols: int, seed: int) -> np.ndarray:
    """An importance vector that looks like llama-imatrix's mean squared activations: positive and
    heavy-tailed, with a few zero columns (seeded; float32 ``[cols]``)."""
    rng = np.random.default_rng(seed + 1000)
    im = (rng.standard_normal(cols) ** 2 * rng.lognormal(0, 1.5, cols)).astype(np.float32)
    im[rng.integers(0, cols, 3)] = 0.0
    return im


#: the shapes of Llama-2-7B
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 32000, "max_position_embeddings": 4096}


def _layer_shapes(i: int, c: dict) -> dict[str, tuple[int, ...]]:
    h, f = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    p = f"model.layers.{i}."
    return {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f)}


def _random(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, norm: bool) -> torch.Tensor:
    if norm:
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def write_synthetic_llama(out: Path, n_layers: int, tokenizer_dir: Path, dtype: torch.dtype = torch.float16,
                          seed: int = 0, layers_per_shard: int = 1, tied: bool = False, **config: int) -> Path:
    """Write a llama checkpoint of ``n_layers`` layers with random weights to ``out`` (the shapes of
    :data:`LLAMA_7B`, overridden by ``config``); the tokenizer files are copied from ``tokenizer_dir``."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out = Path(out)
    if (out / "model.safetensors.index.json").is_file():
        return out
    c = {**LLAMA_7B, **config}
    if c["hidden_size"] % c["num_attention_heads"] or c["num_attention_heads"] % c["num_key_value_heads"]:
        raise LowbitError(f"{out}: {c['num_attention_heads']} heads do not divide the hidden size or the kv heads")
    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        cfg = LlamaConfig(num_hidden_layers=n_layers, tie_word_embeddings=tied, rms_norm_eps=1e-5, **c)
        cfg.architectures = ["LlamaForCausalLM"]
        cfg.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        shards: list[dict[str, tuple[int, ...]]] = []
        top = {"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]), "model.norm.weight": (c["hidden_size"],)}
        if not tied:
            top["lm_head.weight"] = (c["vocab_size"], c["hidden_size"])
        shards.append(top)
        for first in range(0, n_layers, layers_per_shard):
            shard: dict[str, tuple[int, ...]] = {}
            for i in range(first, min(n_layers, first + layers_per_shard)):
                shard.update(_layer_shapes(i, c))
            shards.append(shard)
        weight_map: dict[str, str] = {}
        total = 0
        gen = torch.Generator().manual_seed(seed)
        for j, shard in enumerate(shards):
            fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {k: _random(s, gen, dtype, norm=k.endswith("norm.weight")) for k, s in shard.items()}
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
            weight_map.update(dict.fromkeys(shard, fname))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def bundled_tokenizer_dir(out: Path, model: str = "smollm2") -> Path:
    """The tokenizer of a bundled model saved as Hugging Face files under ``out`` (reused when there)."""
    from transformers import AutoTokenizer

    out = Path(out)
    if (out / "tokenizer.json").is_file():
        return out
    src = resolve_model_path(model)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
