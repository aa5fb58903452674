"""lowbit's own checkpoint: a Hugging Face-style directory holding a quantized model exactly as
lowbit computes with it, for any format and method (GGUF holds only llama.cpp's types).  This
module reads it; :mod:`lowbit.io.checkpoint` writes it.

    out/config.json                       the model's config, with a ``quantization_config`` whose
                                          ``quant_method`` is ``lowbit``
    out/generation_config.json, tokenizer files
    out/model.safetensors                 kept tensors as they are stored (FP16 / FP32); for each
                                          quantized linear layer its parts ``<module>.q_<part>``,
                                          for each other quantized parameter (a quantized
                                          embedding) ``<param>.q_<part>``; and in place of every
                                          quantized weight an empty placeholder under its usual
                                          name (``<module>.weight``), so that a loader that does
                                          not know lowbit stops at the size mismatch instead of
                                          initializing the weight at random
    out/lowbit.json                       format version, scheme, method, and per quantized module
                                          its format, shape and, for rotated (QuIP) layers, the seeds
                                          of their rotations; for layers that quantize their
                                          inputs (W8A8, LLM.int8() ...), the activation settings;
                                          per quantized parameter its format and shape

:func:`load_checkpoint` rebuilds the model from these files (no pickles, no code from the
directory) and ``lowbit eval`` / ``lowbit compare`` accept such a directory wherever they take a
model.  Version 1 checkpoints (no placeholders, no quantized parameters) still load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import ModelLoadError
from lowbit.formats import QTensor, get_format
from lowbit.model import actquant, rotated  # noqa: F401  (their quantized-layer kinds register on import)
from lowbit.model.layers import set_module
from lowbit.model.quantize import QUANTIZED_PARAMS, quant_kind, run_tied_head, stamp
from lowbit.model.safetensors_check import check_safetensors

MANIFEST = "lowbit.json"
VERSION = 2
#: checkpoint versions :func:`load_checkpoint` reads
READS = (1, 2)
#: ``quantization_config.quant_method`` of a lowbit checkpoint's config.json
QUANT_METHOD = "lowbit"


def compact(t: torch.Tensor) -> torch.Tensor:
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
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path / MANIFEST}: unreadable lowbit manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("modules", {}), dict):
        raise ModelLoadError(f"{path / MANIFEST}: not a lowbit manifest (no object of modules)")
    if manifest.get("lowbit_checkpoint") not in READS:
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
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):  # lowbit's own marker for other loaders; the model below is float
        del config.quantization_config
    # parameters on the meta device: every one is replaced below by what the file holds (a quantized
    # module, or a tensor assigned by load_state_dict), so the float model is never allocated;
    # buffers (rotary frequencies) are computed as usual, on the CPU even where the caller builds on
    # the meta device (transformers' from_pretrained: see hf_quantizer)
    with torch.device("cpu"), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = manifest.get("params", {}) or {}
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
            set_module(model, mname, quant_kind(str(entry.get("kind", "linear"))).from_manifest(qt, bias, entry))
        quantized = tuple(m + "." for m in manifest.get("modules", {})) + tuple(p + ".q_" for p in params)
        state = {n: f.get_tensor(n) for n in names if not n.startswith(quantized) and n not in params}
        codes: dict[str, QTensor] = {}
        for pname, entry in params.items():  # quantized embeddings: their codes, dequantized here
            fmt = get_format(entry["format"])
            prefix = f"{pname}.q_"
            parts = {n[len(prefix):]: f.get_tensor(n) for n in names if n.startswith(prefix)}
            if not parts:
                raise ModelLoadError(f"{st_file}: no stored parts for quantized parameter {pname}")
            shape = tuple(entry["shape"])
            rows = shape[0] if len(shape) > 1 else 1
            qt = codes[pname] = QTensor(fmt.name, (rows, int(torch.Size(shape).numel()) // rows), parts)
            state[pname] = fmt.dequantize(qt).reshape(shape)
    state = {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}  # FP16 on disk where lossless
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        # tied here, not by model.tie_weights(): transformers' from_pretrained turns that off while it builds
        if model.get_output_embeddings() is not None:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        missing = [m for m in missing if m != "lm_head.weight"]
    buffers = {n for n, _ in model.named_buffers()}
    missing = [m for m in missing if m not in buffers]  # quantized modules' parts were set above
    if missing or unexpected:
        raise ModelLoadError(f"{path}: checkpoint does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:  # never a model with weights the file did not give
        raise ModelLoadError(f"{path}: checkpoint gives no values for {empty[:3]}")
    model.eval()
    # what lowbit knows of a model it quantized, so that saving it again stores the same
    stamp(model, str(manifest.get("scheme", "mix")), str(manifest.get("method", "unknown")))
    if codes:
        setattr(model, QUANTIZED_PARAMS, codes)
    run_tied_head(model)
    return model, manifest
