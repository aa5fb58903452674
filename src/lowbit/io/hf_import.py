"""Import a GGUF file into a Hugging Face model directory (config.json, model.safetensors, tokenizer),
the float model that lowbit (and transformers) read from it: quantized types are dequantized.
Written under a temporary name and renamed when complete."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.io.hf_dir import config_dict
from lowbit.io.outputs import MODEL_DIR, check_output, writing_dir
from lowbit.model.load import load_model, quiet_libraries, resolve_model_path

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def import_gguf(src: str | os.PathLike[str], out: Path, dtype: str = "float16", progress: bool = True,
                force: bool = False) -> Path:
    """Write the float model of the GGUF file ``src`` as a Hugging Face directory ``out`` (weights in
    ``dtype``); an existing ``out`` is replaced only with ``force`` and only when lowbit wrote it."""
    if dtype not in DTYPES:
        raise LowbitError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    path = resolve_model_path(src)
    if not path.is_file():
        raise LowbitError(f"{path}: import reads a GGUF file")
    out = Path(out)
    check_output(out, MODEL_DIR, force, option="")
    loaded = load_model(path, dtype=DTYPES[dtype], progress=progress)
    tok = loaded.tokenizer
    if loaded.add_bos and hasattr(tok, "add_bos_token"):
        try:
            tok.add_bos_token = True  # the GGUF's tokenizer.ggml.add_bos_token, kept for the directory's readers
        except (AttributeError, ValueError):
            pass
    with writing_dir(out, force, details={"format": "hugging face (imported)"}) as tmp:
        with quiet_libraries():  # transformers' own bar while it writes the shards
            loaded.model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "config.json").write_text(json.dumps(config_dict(loaded.model, dtype), indent=2, default=str) + "\n")
        tok.save_pretrained(str(tmp))  # type: ignore[attr-defined]
    return out
