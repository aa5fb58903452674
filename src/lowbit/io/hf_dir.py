"""Write a Hugging Face model directory atomically: tensors, config.json and the tokenizer go into
a temporary directory beside the target, renamed into place only when everything is written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.formats.integer import IntFormat


def kept_tensors(model: torch.nn.Module, quantized: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter outside the ``quantized`` modules, in ``dtype``: tied weights once, and no
    ``lm_head.weight`` when the config ties it to the embedding."""
    prefixes = tuple(f"{n}." for n in quantized)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    seen: set[int] = set()
    out = {}
    for name, p in model.named_parameters():
        if name.startswith(prefixes) or id(p) in seen or (tied and name == "lm_head.weight"):
            continue
        seen.add(id(p))
        out[name] = p.detach().to(dtype).contiguous().cpu()
    return out


def hf_config(model: torch.nn.Module, dtype: str, quantization_config: dict) -> dict:
    """The model's config.json contents with its dtype and a ``quantization_config``."""
    config = model.config.to_dict()
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    config["quantization_config"] = quantization_config
    return config


def write_model_dir(out: Path, tensors: dict[str, torch.Tensor], config: dict, tokenizer: object | None,
                    extra_json: dict[str, dict] | None = None) -> Path:
    """``extra_json``: more JSON files (name -> contents) written beside config.json."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def int_linears(model: torch.nn.Module, what: str,
                accepts: str = "lowbit's integer formats (int4-asym-g128, int4-g128, int8-ch ...)",
                ) -> tuple[dict[str, torch.nn.Module], IntFormat]:
    """The model's plain :class:`QuantLinear` layers and their one integer format, for the exports
    (``what`` names the export, ``accepts`` the formats it takes, in error messages)."""
    from lowbit.model.quantize import QuantLinear

    qlins: dict[str, torch.nn.Module] = {}
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            if type(m) is not QuantLinear:
                raise LowbitError(f"{n}: {type(m).__name__} layers (rotations, activation quantization) have no "
                                  f"{what} form")
            qlins[n] = m
    if not qlins:
        raise LowbitError("no quantized linear layers to export: quantize the model first (e.g. int4-asym-g128)")
    fmts = {m.fmt.name for m in qlins.values()}  # type: ignore[attr-defined]
    if len(fmts) != 1:
        raise LowbitError(f"{what} export takes one format for every layer, found {', '.join(sorted(fmts))}")
    fmt = next(iter(qlins.values())).fmt  # type: ignore[attr-defined]
    if not isinstance(fmt, IntFormat):
        raise LowbitError(f"{fmt.name}: {what} export takes {accepts}")
    return qlins, fmt
