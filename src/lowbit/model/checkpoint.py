"""lowbit's own checkpoint: a Hugging Face-style directory holding a quantized model exactly as
lowbit computes with it, for any format and method (GGUF holds only llama.cpp's types).

    out/config.json, tokenizer files      the model's own (transformers writes them)
    out/model.safetensors                 kept tensors as they are stored (FP16 / FP32), and for
                                          each quantized linear layer its parts: ``<module>.q_<part>``
    out/lowbit.json                       format version, scheme, method, and per quantized module
                                          its format, shape and, for rotated (QuIP) layers, the seeds
                                          of their rotations; for layers that quantize their
                                          inputs (W8A8, LLM.int8() ...), the activation settings

:func:`load_checkpoint` rebuilds the model from these files (no pickles, no code from the
directory) and ``lowbit eval`` / ``lowbit compare`` accept such a directory wherever they take a
model.  The directory is written to a temporary name beside the target and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import ModelLoadError
from lowbit.formats import QTensor, get_format

MANIFEST = "lowbit.json"
VERSION = 1


def save_checkpoint(loaded, out: Path, scheme: str, method: str, extra: dict | None = None) -> Path:  # type: ignore[no-untyped-def]
    """Write ``loaded`` (a model quantized in memory by lowbit) to the directory ``out``."""
    from safetensors.torch import save_file

    from lowbit.model.actquant import ActQuantLinear
    from lowbit.model.quantize import QuantLinear
    from lowbit.model.rotated import RotatedQuantLinear

    out = Path(out)
    if out.exists():
        raise FileExistsError(out)
    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model = loaded.model
        modules: dict[str, dict] = {}
        tensors: dict[str, torch.Tensor] = {}
        quantized_prefixes = []
        for name, mod in model.named_modules():
            if isinstance(mod, (QuantLinear, RotatedQuantLinear)):
                qt = mod.qtensor
                entry: dict[str, object] = {"format": qt.format, "shape": list(qt.shape),
                                            "bias": mod.bias is not None}
                if isinstance(mod, RotatedQuantLinear):
                    entry["kind"] = "rotated"
                    entry["rotation_seeds"] = [mod.r_in.seed, mod.r_out.seed]
                elif isinstance(mod, ActQuantLinear):
                    entry["kind"] = "act"
                    entry["act"] = mod.act_config()
                else:
                    entry["kind"] = "linear"
                modules[name] = entry
                for k, v in qt.parts.items():
                    tensors[f"{name}.q_{k}"] = v.detach().contiguous().cpu()
                if mod.bias is not None:
                    tensors[f"{name}.bias"] = mod.bias.detach().contiguous().cpu()
                quantized_prefixes.append(name + ".")
        seen: set[int] = set()
        for name, p in model.named_parameters():
            if any(name.startswith(q) for q in quantized_prefixes) or id(p) in seen:
                continue  # quantized layers' biases are stored above; tied weights once
            seen.add(id(p))
            tensors[name] = _compact(p.detach().contiguous().cpu())
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "lowbit": str(VERSION)})
        model.config.to_json_file(str(tmp / "config.json"))
        tok = getattr(loaded, "tokenizer", None)
        if tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(str(tmp))
        manifest = {"lowbit_checkpoint": VERSION, "scheme": scheme, "method": method, "modules": modules,
                    "add_bos": bool(loaded.add_bos), **(extra or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` in FP16 where that loses nothing (the tensors lowbit keeps in FP16 were rounded to it
    already), as it is otherwise: the file holds what the bit counts say."""
    if t.dtype in (torch.float32, torch.float64) and t.numel():
        h = t.to(torch.float16)
        if torch.equal(h.to(t.dtype), t):
            return h
    return t


def is_checkpoint(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def load_checkpoint(path: Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict]:
    """The quantized model of a lowbit checkpoint directory, and its manifest."""
    from lowbit.io.safetensors_check import check_safetensors

    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path / MANIFEST}: unreadable lowbit manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("modules", {}), dict):
        raise ModelLoadError(f"{path / MANIFEST}: not a lowbit manifest (no object of modules)")
    if manifest.get("lowbit_checkpoint") != VERSION:
        raise ModelLoadError(f"{path / MANIFEST}: unsupported lowbit checkpoint version {manifest.get('lowbit_checkpoint')}")
    st_file = path / "model.safetensors"
    if not st_file.is_file():
        raise ModelLoadError(f"{path}: no model.safetensors")
    check_safetensors(st_file)  # before anything else reads it
    try:
        return _build(path, st_file, manifest, dtype)
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{path}: checkpoint is inconsistent ({type(exc).__name__}: {exc})") from None


def _build(path: Path, st_file: Path, manifest: dict, dtype: torch.dtype) -> tuple[nn.Module, dict]:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.model.quantize import QuantLinear
    from lowbit.model.rotated import RotatedQuantLinear

    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with safe_open(str(st_file), framework="pt") as f:
        names = set(f.keys())
        for mname, entry in manifest.get("modules", {}).items():
            fmt = get_format(entry["format"])
            prefix = f"{mname}.q_"
            parts = {n[len(prefix):]: f.get_tensor(n) for n in names if n.startswith(prefix)}
            if not parts:
                raise ModelLoadError(f"{st_file}: no stored parts for quantized module {mname}")
            qt = QTensor(fmt.name, tuple(entry["shape"]), parts)
            bias = nn.Parameter(f.get_tensor(f"{mname}.bias"), requires_grad=False) if entry.get("bias") else None
            if entry.get("kind") == "rotated":
                s_in, s_out = entry["rotation_seeds"]
                new: nn.Module = RotatedQuantLinear(qt, bias, int(s_in), int(s_out))
            elif entry.get("kind") == "act":
                from lowbit.model.actquant import act_linear

                new = act_linear(qt, bias, dict(entry.get("act") or {}))
            else:
                new = QuantLinear(qt, bias)
            parent, _, child = mname.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
        state = {n: f.get_tensor(n) for n in names if not any(n.startswith(m + ".") for m in manifest.get("modules", {}))}
    state = {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}  # FP16 on disk where lossless
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    buffers = {n for n, _ in model.named_buffers()}
    missing = [m for m in missing if m not in buffers]  # quantized modules' parts were set above
    if missing or unexpected:
        raise ModelLoadError(f"{path}: checkpoint does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return model, manifest
