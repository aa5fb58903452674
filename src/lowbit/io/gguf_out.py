"""Write a GGUF file that llama.cpp loads, re-quantizing every tensor of a source GGUF.

The source's metadata (architecture, hyper-parameters, tokenizer, chat template) is copied as it
is; each tensor is dequantized to float32, given a format by :mod:`lowbit.model.policy` (llama.cpp's
rules) and quantized by lowbit's own formats.  The output is written to a temporary file beside the
target and renamed only once complete, so an interrupted run never leaves a file that looks whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lowbit.errors import FormatError, LowbitError
from lowbit.formats import get_format
from lowbit.model.load import check_gguf_file
from lowbit.model.policy import choose
from lowbit.model.quantize import QuantReport, TensorRecord

# llama_ftype values (llama.h) for the file types lowbit writes.
FILE_TYPES = {"f32": 0, "fp16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32}
_SKIP_KEYS = {"general.architecture", "general.file_type", "general.quantization_version"}


def atomic_target(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f".{out.name}.part-{os.getpid()}")


def _as_array(fmt_name: str, parts: dict[str, torch.Tensor]) -> np.ndarray:
    if "blocks" in parts:
        return parts["blocks"].numpy()
    values = parts["values"]
    if values.dtype == torch.bfloat16:
        return values.view(torch.uint8).numpy()
    return values.numpy()


def write_gguf(src: Path, out: Path, fmt_name: str, progress: bool = True) -> QuantReport:
    """Quantize the GGUF file ``src`` to ``fmt_name`` and write ``out``; metadata copied as it is."""
    import gguf

    reader = check_gguf_file(src)
    arch = str(reader.fields["general.architecture"].contents())

    def metadata(writer: gguf.GGUFWriter) -> None:
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in _SKIP_KEYS:
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub_type=sub)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for t in reader.tensors:
            yield t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)

    names = [t.name for t in reader.tensors]
    return write_tensors(out, arch, metadata, tensors(), len(names), fmt_name, "output.weight" not in names,
                         str(src), progress)


def write_tensors(out: Path, arch: str, metadata: Callable[[Any], None], tensors: Iterable[tuple[str, np.ndarray]],
                  n_tensors: int, fmt_name: str, tied: bool, source: str, progress: bool = True) -> QuantReport:
    """Write a GGUF file: ``metadata(writer)`` adds the key-value pairs, then every (GGUF name, float32
    array) of ``tensors`` is stored in the format :mod:`lowbit.model.policy` chooses for it."""
    import gguf

    fmt = get_format(fmt_name)
    if fmt.name not in FILE_TYPES:
        writable = ", ".join(FILE_TYPES)
        raise LowbitError(f"format {fmt.name} has no GGUF type; GGUF output takes {writable}")
    tmp = atomic_target(out)
    report = QuantReport(fmt.name)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        metadata(writer)
        writer.add_file_type(FILE_TYPES[fmt.name])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_quantized_by("lowbit")
        bar = tqdm(tensors, total=n_tensors, desc=f"quantize {fmt.name} -> {out.name}", unit="tensor",
                   disable=not progress)
        for name, w in bar:
            if not np.isfinite(w).all():
                bad = int((~np.isfinite(w)).sum())
                raise FormatError(f"{source}: tensor {name} has {bad} NaN or Inf values; refusing to quantize")
            shape = tuple(int(s) for s in w.shape)
            choice = choose(name, shape, fmt.name, tied)
            if len(shape) != 2:
                writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32), raw_dtype=gguf.GGMLQuantizationType.F32)
                report.tensors.append(TensorRecord(name, shape, "f32", False, 32 * w.size, 0.0))
                continue
            tfmt = get_format(choice.format)
            wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
            qt = tfmt.quantize(wt, name=f"{source}:{name}")
            writer.add_tensor(name, _as_array(tfmt.name, qt.parts), raw_dtype=gguf.GGMLQuantizationType(tfmt.gguf_type))
            dq = tfmt.dequantize(qt)
            err = float(((dq.double() - wt.double()) ** 2).sum() / (wt.double() ** 2).sum().clamp_min(1e-30))
            report.tensors.append(TensorRecord(name, shape, tfmt.name, choice.quantized, tfmt.storage_bits(shape), err))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return report
