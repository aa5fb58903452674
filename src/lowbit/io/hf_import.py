"""Import a GGUF file into a Hugging Face model directory (config.json, model.safetensors, tokenizer),
the float model that lowbit (and transformers) read from it: quantized types are dequantized.
Written under a temporary name and renamed when complete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from lowbit.errors import LowbitError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def import_gguf(src: str | os.PathLike[str], out: Path, dtype: str = "float16", progress: bool = True) -> Path:
    from lowbit.model.load import load_model, resolve_model_path

    if dtype not in DTYPES:
        raise LowbitError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    path = resolve_model_path(src)
    if not path.is_file():
        raise LowbitError(f"{path}: import reads a GGUF file")
    out = Path(out)
    if out.exists():
        raise LowbitError(f"{out}: already exists")
    loaded = load_model(path, dtype=DTYPES[dtype], progress=progress)
    tok = loaded.tokenizer
    if loaded.add_bos and hasattr(tok, "add_bos_token"):
        try:
            tok.add_bos_token = True  # the GGUF's tokenizer.ggml.add_bos_token, kept for the directory's readers
        except (AttributeError, ValueError):
            pass
    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        loaded.model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))  # type: ignore[attr-defined]
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
