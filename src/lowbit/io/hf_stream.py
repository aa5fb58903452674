"""Quantize a Hugging Face safetensors directory to GGUF without loading the model.

:func:`write_gguf_streaming` reads the config and tokenizer, then each tensor on its own from the
``*.safetensors`` files (sharded or not; each file opened, memory-mapped, for one tensor and closed
again, so that no mapped pages pile up), converts it to float32, reorders Q/K rows for llama.cpp
and quantizes it with llama.cpp's per-tensor rules (:func:`lowbit.io.gguf_out.write_tensors`).
Memory holds the largest tensor and its quantizer's temporaries, whatever the number of layers.
The bytes are those of the in-memory path (:func:`lowbit.io.hf_gguf.write_gguf_from_hf` on the
model loaded in float32), and the write is resumable: an interrupted run, rerun with the same
arguments, goes on from its last finished tensor (:class:`lowbit.io.gguf_out.Journal`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.io.gguf_out import array_digest, fingerprint, write_tensors
from lowbit.io.hf_gguf import GGUF_ARCH, HFLayout
from lowbit.model.quantize import QuantReport

#: files besides the weights whose content goes into the output (their changes restart a resumed run)
_META_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "model.safetensors.index.json")


def safetensors_header(f: Path) -> dict[str, dict]:
    """The tensor entries (dtype, shape, data_offsets) of a safetensors file, read from its header."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > size - 8 or n > 100_000_000:
            raise LowbitError(f"{f}: not a safetensors file (header length {n}, file of {size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LowbitError(f"{f}: safetensors header is not valid JSON") from None
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
    if 8 + n + end > size:
        raise LowbitError(f"{f}: truncated: its tensors need {8 + n + end} bytes, the file has {size}")
    return entries


def weight_files(path: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Hugging Face tensor name -> (safetensors file, shape) for a model directory, from the shard
    index when there is one (only the files it names are read), else from every ``*.safetensors``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LowbitError(f"{index}: not a safetensors index (no weight_map)") from None
        files = sorted({path / str(v) for v in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LowbitError(f"{path}: no *.safetensors files")
    out: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        if not f.is_file():
            raise LowbitError(f"{index}: names {f.name}, which is missing")
        for k, v in safetensors_header(f).items():
            if k in out:
                raise LowbitError(f"{path}: tensor {k} is in both {out[k][0].name} and {f.name}")
            out[k] = (f, tuple(int(x) for x in v["shape"]))
    return out


def can_stream(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face safetensors directory of an architecture GGUF output takes
    (lowbit checkpoints, ``*.bin`` weights and other architectures go through the in-memory path)."""
    cfg = path / "config.json"
    if not path.is_dir() or not cfg.is_file() or (path / "lowbit.json").exists():
        return False
    if not any(path.glob("*.safetensors")):
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") in GGUF_ARCH
    except (json.JSONDecodeError, OSError):
        return False


def write_gguf_streaming(path: Path, out: Path, fmt_name: str, progress: bool = True,
                         imatrix: dict[str, np.ndarray] | None = None, device: str | torch.device = "cpu",
                         resume: bool = True, notes: list[str] | None = None,
                         device_map: dict[str, str] | None = None) -> QuantReport:
    """Quantize the Hugging Face directory ``path`` to the GGUF file ``out`` of file type ``fmt_name``
    (``q4_k_m`` ...), one tensor in memory at a time; see the module's docstring.  The quantizers
    run on ``device``, or with a ``device_map`` (:func:`lowbit.model.devices.plan_devices`) each
    tensor on its module's device."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    try:
        cfg = AutoConfig.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise LowbitError(f"{path}: could not read the config or tokenizer ({type(exc).__name__}: {exc})") from None
    layout = HFLayout(path, str(cfg.model_type), cfg)
    files = weight_files(path)
    hf_of = layout.names(files)
    entries = [(g, files[k][1]) for g, k in hf_of.items()]
    bos = getattr(tok, "bos_token_id", None)
    add_bos = bool(getattr(tok, "add_bos_token", False)) and bos is not None
    notes = [] if notes is None else notes

    def load(name: str) -> np.ndarray:
        k = hf_of[name]
        f = files[k][0]
        try:
            with safe_open(str(f), framework="pt") as fh:
                t = fh.get_tensor(k)
        except Exception as exc:
            raise LowbitError(f"{f}: could not read tensor {k} ({type(exc).__name__}: {exc})") from None
        a = t.to(torch.float32).numpy()
        del t
        return layout.rows(name, a)

    fp = None
    if resume:
        inputs = sorted({f for f, _ in files.values()} | {path / m for m in _META_FILES if (path / m).is_file()})
        fp = fingerprint(inputs, format=fmt_name, imatrix=array_digest(imatrix))
    from lowbit.model.devices import device_for

    def where(name: str) -> str | torch.device:
        return device if device_map is None else device_for(hf_of[name], device_map)

    return write_tensors(out, layout.arch, layout.metadata(tok, add_bos, notes), entries, load, fmt_name,
                         layout.info(), str(path), progress, imatrix, device=where, fingerprint=fp)
