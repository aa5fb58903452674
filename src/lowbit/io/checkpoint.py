"""Write lowbit's own checkpoint (the layout is described in :mod:`lowbit.model.checkpoint`, which
reads it), and :func:`save`, the public way to keep a model lowbit quantized in memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.io.hf_dir import config_dict, write_support_files
from lowbit.io.outputs import writing_dir
from lowbit.model.checkpoint import MANIFEST, QUANT_METHOD, VERSION, compact
from lowbit.model.quantize import QuantLinear, as_module, quantized_params, recipe_of


def _quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _entry(mod: QuantLinear) -> dict[str, object]:
    qt = mod.qtensor
    return {"format": qt.format, "shape": list(qt.shape), "bias": mod.bias is not None, "kind": mod.kind,
            **mod.manifest_extra()}


def checkpoint_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, dict]]:
    """What a checkpoint of ``model`` stores: the tensors of model.safetensors, and the manifest's
    entries of quantized modules and of quantized parameters (embeddings whose codes lowbit kept and
    that still equal their dequantized values; any other parameter is stored as it is, in FP16 where
    that is exact)."""
    modules: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in _quantized_modules(model).items():
        modules[name] = _entry(mod)
        for k, v in mod.qtensor.parts.items():  # type: ignore[attr-defined]
            tensors[f"{name}.q_{k}"] = v.detach().contiguous().cpu()
        if mod.bias is not None:
            tensors[f"{name}.bias"] = mod.bias.detach().contiguous().cpu()  # type: ignore[union-attr]
        tensors[f"{name}.weight"] = torch.empty(0, dtype=torch.float16)  # placeholder (see lowbit.model.checkpoint)
    prefixes = tuple(n + "." for n in modules)
    codes = quantized_params(model)
    params: dict[str, dict] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if name.startswith(prefixes) or id(p) in seen:
            continue  # quantized layers' biases are stored above; tied weights once
        seen.add(id(p))
        qt = codes.get(name)
        if qt is not None:
            fmt = get_format(qt.format)
            dq = fmt.dequantize(qt.to(p.device)).reshape(p.shape).to(p.dtype)
            if torch.equal(dq, p.detach()):
                params[name] = {"format": fmt.name, "shape": list(p.shape)}
                for k, v in qt.parts.items():
                    tensors[f"{name}.q_{k}"] = v.detach().contiguous().cpu()
                tensors[name] = torch.empty(0, dtype=torch.float16)  # placeholder
                continue
        tensors[name] = compact(p.detach().contiguous().cpu())
    return tensors, modules, params


def save_checkpoint(loaded, out: str | os.PathLike[str], scheme: str, method: str, extra: dict | None = None,  # type: ignore[no-untyped-def]
                    force: bool = False) -> Path:
    """Write ``loaded`` (what :func:`lowbit.load_model` returns, quantized in memory by lowbit) to the
    directory ``out`` as a lowbit checkpoint; an existing ``out`` is replaced only with ``force`` and
    only when it is lowbit's own earlier output (:mod:`lowbit.io.outputs`)."""
    from safetensors.torch import save_file

    model = as_module(loaded)
    tensors, modules, params = checkpoint_tensors(model)
    config = config_dict(model)
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "checkpoint_version": VERSION, "scheme": scheme,
                                     "method": method, "load_with": "lowbit.load_model(path)"}
    manifest = {"lowbit_checkpoint": VERSION, "scheme": scheme, "method": method, "modules": modules,
                "params": params, "add_bos": bool(getattr(loaded, "add_bos", False)), **(extra or {})}
    with writing_dir(out, force, details={"format": "lowbit checkpoint"}) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "lowbit": str(VERSION)})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        write_support_files(tmp, model, getattr(loaded, "tokenizer", None))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return Path(out)


def _describe(model: nn.Module) -> str:
    fmts = sorted({m.qtensor.format for m in _quantized_modules(model).values()})  # type: ignore[attr-defined]
    return fmts[0] if len(fmts) == 1 else ("mix" if fmts else "none")


def save(model, path: str | os.PathLike[str], tokenizer: object | None = None, force: bool = False,  # type: ignore[no-untyped-def]
         add_bos: bool | None = None) -> Path:
    """Save a model lowbit quantized in memory (what :func:`lowbit.load_model` returns, or its
    module, with ``tokenizer``) as a lowbit checkpoint directory that :func:`lowbit.load_model`
    reads back to the same logits.  (``save_pretrained`` would not: transformers does not store
    lowbit's layers.)"""
    from types import SimpleNamespace

    module = as_module(model)
    if not _quantized_modules(module):
        raise LowbitError("save: the model has no layers lowbit quantized (quantize it first, e.g. "
                          "lowbit.quantize_model(m, 'int4-g128'))")
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None or not hasattr(tok, "save_pretrained"):
        raise LowbitError("save: give the tokenizer (tokenizer=...), or save what lowbit.load_model returned: "
                          "lowbit.load_model reads a checkpoint back with its tokenizer")
    if add_bos is None:
        add_bos = bool(getattr(model, "add_bos", getattr(tok, "add_bos_token", False)))
    src = SimpleNamespace(model=module, tokenizer=tok, add_bos=add_bos)
    scheme, method = recipe_of(module) or (_describe(module), "unknown")
    return save_checkpoint(src, path, scheme, method, force=force)
