"""Write a GGUF file that llama.cpp loads, re-quantizing every tensor of a source GGUF.

The source's metadata (architecture, hyper-parameters, tokenizer, chat template) is copied as it
is; each tensor is dequantized to float32, given a format by :mod:`lowbit.model.policy` (llama.cpp's
rules) and quantized by lowbit's own formats.  The output is written to a temporary file beside the
target and renamed only once complete, so an interrupted run never leaves a file that looks whole.
"""

from __future__ import annotations

import os
from pathlib import Path

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
    """Quantize the GGUF file ``src`` to ``fmt_name`` and write ``out``."""
    import gguf

    fmt = get_format(fmt_name)
    if fmt.name not in FILE_TYPES:
        writable = ", ".join(FILE_TYPES)
        raise LowbitError(f"format {fmt.name} has no GGUF type; GGUF output takes {writable}")
    reader = check_gguf_file(src)
    arch = str(reader.fields["general.architecture"].contents())
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    tmp = atomic_target(out)
    report = QuantReport(fmt.name)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in _SKIP_KEYS:
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
        writer.add_file_type(FILE_TYPES[fmt.name])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_quantized_by("lowbit")
        bar = tqdm(reader.tensors, desc=f"quantize {fmt.name} -> {out.name}", unit="tensor", disable=not progress)
        for t in bar:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            if not np.isfinite(w).all():
                bad = int((~np.isfinite(w)).sum())
                raise FormatError(f"{src}: tensor {t.name} has {bad} NaN or Inf values; refusing to quantize")
            shape = tuple(int(s) for s in w.shape)
            choice = choose(t.name, shape, fmt.name, tied)
            tfmt = get_format(choice.format)
            if len(shape) != 2:
                data = w
                raw_type = gguf.GGMLQuantizationType.F32
                bits = 32 * w.size
                err = 0.0
            else:
                wt = torch.from_numpy(np.ascontiguousarray(w))
                qt = tfmt.quantize(wt, name=f"{src.name}:{t.name}")
                data = _as_array(tfmt.name, qt.parts)
                raw_type = gguf.GGMLQuantizationType(tfmt.gguf_type)
                bits = tfmt.storage_bits(shape)
                dq = tfmt.dequantize(qt)
                err = float(((dq.double() - wt.double()) ** 2).sum() / (wt.double() ** 2).sum().clamp_min(1e-30))
            writer.add_tensor(t.name, data, raw_dtype=raw_type)
            report.tensors.append(TensorRecord(t.name, shape, tfmt.name if len(shape) == 2 else "f32",
                                               choice.quantized, bits, err))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return report
