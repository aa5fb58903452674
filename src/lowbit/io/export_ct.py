"""Export to compressed-tensors' ``pack-quantized`` format: the checkpoint layout that
llm-compressor writes and that transformers (with the ``compressed-tensors`` package) and vLLM load.

A Hugging Face directory: ``config.json`` with a ``quantization_config`` (quant_method
``compressed-tensors``, format ``pack-quantized``, one config group targeting the quantized
``Linear`` layers, ``lm_head`` ignored), ``model.safetensors`` and the tokenizer files.  For each
quantized linear layer:

* ``weight_packed`` (int32): the integer codes, signed (``[-2^(b-1), 2^(b-1)-1]``), offset by
  ``2^(b-1)`` and packed densely, 32 codes into ``b`` words, code ``i`` of a run of 32 at bit
  ``i*b`` of the run (for 4 and 8 bits: 8 or 4 codes per word, lowest bits first);
* ``weight_scale`` (FP16, ``[rows, groups]``; ``[rows, 1]`` per channel);
* ``weight_zero_point`` for zero-point formats: signed zero points packed the same way along the
  rows (int32, ``[ceil(rows*b/32), groups]``);
* ``weight_shape`` (int64 ``[rows, cols]``).

A weight decodes as ``(q - zero) * scale``, which is exactly what lowbit's integer formats store,
so lowbit's ``int4-g64``, ``int4-asym-g128``, ``int8`` ... models export without re-quantizing.
Groups must divide the rows (compressed-tensors has no shorter last group).  Other tensors are
written in FP16.  The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.formats import Format
from lowbit.formats.integer import IntFormat
from lowbit.io.exports import Export, group_divides, register_export
from lowbit.io.hf_dir import hf_config, int_linears, kept_tensors, write_model_dir
from lowbit.model.quantize import as_module


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed ``bits``-bit codes (any integer dtype, 2-D) packed densely into int32 along ``dim``."""
    if not 1 <= bits <= 8:
        raise LowbitError(f"cannot pack {bits}-bit codes")
    v = codes.t() if dim == 0 else codes
    u = (v.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    rows, cols = u.shape
    pad = -cols % 32
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    groups = u.shape[1] // 32
    u = u.reshape(rows, groups, 32)
    start = torch.arange(32, dtype=torch.int64) * bits
    word, off = start // 32, start % 32
    out = torch.zeros(rows, groups, bits, dtype=torch.int64)
    out.scatter_add_(2, word.expand(rows, groups, 32), (u << off) & 0xFFFFFFFF)
    spill = off + bits > 32
    if bool(spill.any()):
        out.scatter_add_(2, (word[spill] + 1).expand(rows, groups, int(spill.sum())), u[..., spill] >> (32 - off[spill]))
    out = out.reshape(rows, groups * bits)[:, : -(-cols * bits // 32)]
    out = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)
    return (out.t() if dim == 0 else out).contiguous()


ACCEPTS = "4- or 8-bit integer formats per channel or per group (int4-g128, int4-asym-g64, int8 ...)"


def check(fmt: Format, layers: dict[str, tuple[int, int]]) -> None:
    """Whether ``fmt`` on the linear ``layers`` (name -> (rows, cols)) fits the pack-quantized layout."""
    if not isinstance(fmt, IntFormat) or fmt.bits not in (4, 8) or fmt.group == -1:
        raise LowbitError(f"{fmt.name}: compressed-tensors pack-quantized export takes {ACCEPTS}")
    group_divides(fmt, layers, "compressed-tensors", fmt.group)


def export_compressed_tensors(loaded, out: Path, force: bool = False) -> Path:  # type: ignore[no-untyped-def]
    """Write ``loaded`` (quantized in memory with one of lowbit's 4- or 8-bit integer formats) as a
    compressed-tensors ``pack-quantized`` checkpoint directory ``out``."""
    model = as_module(loaded)
    qlins, fmt = int_linears(model, "compressed-tensors pack-quantized", ACCEPTS)
    check(fmt, {n: tuple(m.qtensor.shape) for n, m in qlins.items()})  # type: ignore[attr-defined,misc]
    bits, group = fmt.bits, fmt.group
    half = 1 << (bits - 1)
    tensors: dict[str, torch.Tensor] = {}
    for n, m in qlins.items():
        qt = m.qtensor  # type: ignore[attr-defined]
        grid = fmt.grid(qt)
        step = group if group > 0 else qt.shape[1]
        signed = fmt.codes(qt) - (0 if fmt.symmetric else half)
        tensors[f"{n}.weight_packed"] = pack_int32(signed, bits)
        tensors[f"{n}.weight_scale"] = grid.scale[:, ::step].to(torch.float16).contiguous()
        if not fmt.symmetric:
            assert grid.zero is not None
            zp = grid.zero[:, ::step].to(torch.int64) - half
            tensors[f"{n}.weight_zero_point"] = pack_int32(zp, bits, dim=0)
        tensors[f"{n}.weight_shape"] = torch.tensor(list(qt.shape), dtype=torch.int64)
        if m.bias is not None:  # type: ignore[attr-defined]
            tensors[f"{n}.bias"] = m.bias.detach().to(torch.float16).contiguous()  # type: ignore[attr-defined]
    tensors.update(kept_tensors(model, list(qlins), torch.float16))
    weights: dict[str, object] = {"num_bits": bits, "type": "int", "symmetric": bool(fmt.symmetric),
                                  "strategy": "group" if group > 0 else "channel", "dynamic": False}
    if group > 0:
        weights["group_size"] = group
    config = hf_config(model, "float16", {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    })
    return write_model_dir(out, tensors, config, getattr(loaded, "tokenizer", None), model=model, force=force,
                           export="compressed-tensors")


register_export(Export("compressed-tensors", "compressed-tensors' pack-quantized layout (transformers, vLLM, "
                       "llm-compressor): 4/8-bit integer formats whose groups divide every row", check,
                       export_compressed_tensors))
