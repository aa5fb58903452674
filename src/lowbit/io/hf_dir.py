"""Write a Hugging Face model directory atomically: tensors, config.json, generation_config.json
and the tokenizer go into a temporary directory beside the target, renamed into place only when
everything is written (:func:`lowbit.io.outputs.writing_dir`, which also marks it as lowbit's).

Every directory lowbit writes carries the same complete config (:func:`config_dict`): the model's
own settings as ``save_pretrained`` writes them, ``architectures`` (the class engines such as vLLM
pick from it), no leftovers of where the model was loaded from, and the files readable under the
user's umask."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.formats.integer import IntFormat
from lowbit.io.outputs import writing_dir
from lowbit.model.quantize import QuantLinear

#: keys of a loaded config that describe where it came from, not the model
_LEFTOVERS = ("_name_or_path", "_model_name_or_path", "_commit_hash", "transformers_version_at_load")


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


def config_dict(model: torch.nn.Module, dtype: str | None = None) -> dict:
    """The contents of config.json for ``model``: what ``save_pretrained`` writes (settings that
    differ from the defaults, so no ``id2label`` LABEL_0/LABEL_1), with ``architectures`` set to the
    model's class and without the keys that only say where it was loaded from."""
    cfg = model.config
    config = cfg.to_diff_dict()
    for key in _LEFTOVERS:
        config.pop(key, None)
    if config.get("id2label") in ({0: "LABEL_0", 1: "LABEL_1"}, {"0": "LABEL_0", "1": "LABEL_1"}):
        config.pop("id2label", None)
        config.pop("label2id", None)
    config["architectures"] = [type(model).__name__]
    config.setdefault("model_type", getattr(cfg, "model_type", None))
    if dtype is not None:
        config["dtype"] = dtype
    config.pop("torch_dtype", None)
    return config


def hf_config(model: torch.nn.Module, dtype: str, quantization_config: dict) -> dict:
    """The model's config.json contents (:func:`config_dict`) with its dtype and a ``quantization_config``."""
    config = config_dict(model, dtype)
    config["quantization_config"] = quantization_config
    return config


def write_support_files(d: Path, model: torch.nn.Module, tokenizer: object | None) -> None:
    """generation_config.json and the tokenizer files of ``model``, into the directory ``d``."""
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(str(d))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(d))


def write_model_dir(out: Path, tensors: dict[str, torch.Tensor], config: dict, tokenizer: object | None,
                    extra_json: dict[str, dict] | None = None, model: torch.nn.Module | None = None,
                    force: bool = False, export: str = "") -> Path:
    """Write a model directory: ``tensors`` as model.safetensors, ``config`` as config.json,
    ``extra_json`` (name -> contents) beside it, the generation config of ``model`` and the
    tokenizer.  ``export`` names the layout in the directory's marker; an existing ``out`` is
    replaced only with ``force`` and only when lowbit wrote it."""
    from safetensors.torch import save_file

    with writing_dir(out, force, details={"format": export} if export else None) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")
        if model is not None:
            write_support_files(tmp, model, None)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
    return Path(out)


def int_linears(model: torch.nn.Module, what: str,
                accepts: str = "lowbit's integer formats (int4-asym-g128, int4-g128, int8-ch ...)",
                ) -> tuple[dict[str, torch.nn.Module], IntFormat]:
    """The model's plain :class:`QuantLinear` layers and their one integer format, for the exports
    (``what`` names the export, ``accepts`` the formats it takes, in error messages)."""
    qlins: dict[str, torch.nn.Module] = {}
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            if m.kind != QuantLinear.kind:  # rotated, activation-quantized ...
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
