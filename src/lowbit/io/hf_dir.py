"""Write a Hugging Face model directory atomically: tensors, config.json and the tokenizer go into
a temporary directory beside the target, renamed into place only when everything is written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch


def write_model_dir(out: Path, tensors: dict[str, torch.Tensor], config: dict, tokenizer: object | None) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
