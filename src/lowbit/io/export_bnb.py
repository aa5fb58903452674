"""Export NF4 / FP4 models in bitsandbytes' 4-bit serialization: the Hugging Face directory that
``transformers`` with ``bitsandbytes`` writes for ``load_in_4bit`` models and loads back.

lowbit's ``nf4``/``fp4`` (and ``-dq``) formats are bitsandbytes' own: blocks of 64 consecutive
weights of the row-major tensor, an FP32 absmax per block (or, double-quantized, 8-bit codes of the
absmax minus its mean in blocks of 256 with the signed dynamic map and an FP32 scale each), so the
export only re-lays the bytes out.  For each quantized linear layer ``<m>``:

* ``<m>.weight``: uint8 ``[n/2, 1]``, two codes per byte, the first of each pair in the high nibble;
* ``<m>.weight.absmax`` (FP32, or uint8 codes when double-quantized), ``<m>.weight.quant_map`` (the
  16 levels), and when double-quantized ``<m>.weight.nested_absmax`` / ``nested_quant_map``;
* ``<m>.weight.quant_state.bitsandbytes__<nf4|fp4>``: the remaining fields (block sizes, dtype,
  shape, offset) as UTF-8 JSON in a uint8 tensor.

``config.json`` carries bitsandbytes' ``quantization_config``.  Written under a temporary name and
renamed when complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.formats import Format
from lowbit.formats.base import unpack_nibbles_lohi
from lowbit.formats.nf4 import BLOCK, DQ_BLOCK, DYNAMIC_MAP, FourBitFormat
from lowbit.io.exports import Export, register_export
from lowbit.io.hf_dir import hf_config, kept_tensors, write_model_dir
from lowbit.model.quantize import QuantLinear, as_module


def _state(name: str, fmt: FourBitFormat, qt) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    codes = unpack_nibbles_lohi(qt.parts["codes"]).reshape(-1).to(torch.uint8)
    packed = ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1).contiguous()
    rows, cols = qt.shape
    meta: dict[str, object] = {"quant_type": fmt.kind, "blocksize": BLOCK, "dtype": "float32", "shape": [rows, cols]}
    out = {f"{name}.weight": packed, f"{name}.weight.quant_map": fmt.levels.to(torch.float32).clone()}
    if fmt.double_quant:
        out[f"{name}.weight.absmax"] = qt.parts["absmax_codes"].to(torch.uint8).contiguous()
        out[f"{name}.weight.nested_absmax"] = qt.parts["absmax_scale"].to(torch.float32).contiguous()
        out[f"{name}.weight.nested_quant_map"] = DYNAMIC_MAP.clone()
        meta.update(nested_blocksize=DQ_BLOCK, nested_dtype="float32",
                    nested_offset=float(qt.parts["absmax_offset"].reshape(-1)[0]))
    else:
        out[f"{name}.weight.absmax"] = qt.parts["absmax"].to(torch.float32).contiguous()
    blob = json.dumps(meta).encode("utf-8")
    out[f"{name}.weight.quant_state.bitsandbytes__{fmt.kind}"] = torch.tensor(list(blob), dtype=torch.uint8)
    return out


ACCEPTS = "nf4, nf4-dq, fp4 or fp4-dq"


def check(fmt: Format, layers: dict[str, tuple[int, int]]) -> None:
    """Whether ``fmt`` on the linear ``layers`` (name -> (rows, cols)) fits bitsandbytes' 4-bit layout."""
    if not isinstance(fmt, FourBitFormat):
        raise LowbitError(f"{fmt.name}: bitsandbytes export takes {ACCEPTS}")
    for n, (rows, cols) in layers.items():
        if (rows * cols) % BLOCK:
            raise LowbitError(f"{fmt.name}: {n} has {rows * cols} weights, not a multiple of bitsandbytes' block of {BLOCK}")


def export_bitsandbytes(loaded, out: Path, force: bool = False) -> Path:  # type: ignore[no-untyped-def]
    """Write ``loaded`` (quantized in memory with ``nf4``, ``nf4-dq``, ``fp4`` or ``fp4-dq``) as a
    bitsandbytes 4-bit Hugging Face checkpoint directory ``out``."""
    model = as_module(loaded)
    qlins = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not qlins:
        raise LowbitError("no quantized linear layers to export: quantize the model with nf4 or nf4-dq first")
    fmts = {m.fmt.name for m in qlins.values()}
    bad = [n for n, m in qlins.items() if m.kind != QuantLinear.kind or not isinstance(m.fmt, FourBitFormat)]
    if bad or len(fmts) != 1:
        raise LowbitError(f"bitsandbytes export takes one of nf4, nf4-dq, fp4, fp4-dq for every quantized layer "
                          f"(found {', '.join(sorted(fmts))})")
    fmt: FourBitFormat = next(iter(qlins.values())).fmt  # type: ignore[assignment]
    tensors: dict[str, torch.Tensor] = {}
    for n, m in qlins.items():
        tensors.update(_state(n, fmt, m.qtensor))
        if m.bias is not None:
            tensors[f"{n}.bias"] = m.bias.detach().to(torch.float32).contiguous()
    tensors.update(kept_tensors(model, list(qlins), torch.float32))
    config = hf_config(model, "float32", {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": fmt.kind, "bnb_4bit_use_double_quant": fmt.double_quant,
        "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": ["lm_head"], "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False,
    })
    return write_model_dir(out, tensors, config, getattr(loaded, "tokenizer", None), model=model, force=force,
                           export="bitsandbytes")


register_export(Export("bitsandbytes", "bitsandbytes' 4-bit serialization (transformers + bitsandbytes): nf4, nf4-dq, "
                       "fp4, fp4-dq", check, export_bitsandbytes))
