"""Export to AutoAWQ's GEMM checkpoint layout (``quant_method`` ``awq``, ``version`` ``gemm``): the
layout AutoAWQ writes and that its ``WQLinear_GEMM``, GPTQModel's AWQ kernels, transformers and
vLLM load.

A Hugging Face directory: ``config.json`` with a ``quantization_config`` (bits 4, group_size,
zero_point true, version gemm), ``model.safetensors`` and the tokenizer files.  For each quantized
linear layer ``<m>`` (``in`` input features, ``out`` output features, ``G = in / group_size``):

* ``<m>.qweight`` int32 ``[in, out/8]``: the transposed weight's unsigned 4-bit codes, eight output
  columns a word, *interleaved*: the word for columns ``8c .. 8c+7`` holds, from its lowest nibble
  up, the codes of columns ``8c + 0, 2, 4, 6, 1, 3, 5, 7``;
* ``<m>.qzeros`` int32 ``[G, out/8]``: the zero points, unsigned (no GPTQ-style minus one), packed
  and interleaved the same way;
* ``<m>.scales`` FP16 ``[G, out]``; ``<m>.bias`` FP16 when the layer has one.

A weight decodes as ``W[o, i] = (q[i, o] - zero[i // group_size, o]) * scales[i // group_size, o]``:
exactly lowbit's 4-bit zero-point formats (``int4-asym-g128`` ..., as AWQ calibration produces
them), whose scales are FP16 already.  The layout has no shorter last group and no per-channel or
symmetric variant: the group must divide every layer's input features, and the outputs must be a
multiple of 8.  Other tensors are written in FP16.
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

#: nibble k of a word holds output column ``AWQ_ORDER[k]`` of its eight
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_awq(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values ``[rows, cols]`` (cols a multiple of 8) -> int32 ``[rows, cols/8]`` in
    AWQ's interleaved nibble order."""
    rows, cols = u.shape
    v = u.to(torch.int64).reshape(rows, cols // 8, 8)[..., list(AWQ_ORDER)]
    words = (v << (torch.arange(8, dtype=torch.int64) * 4)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()


def check(fmt: Format, layers: dict[str, tuple[int, int]]) -> None:
    """Whether ``fmt`` on the linear ``layers`` (name -> (rows, cols)) fits AWQ's GEMM layout."""
    if not isinstance(fmt, IntFormat) or fmt.bits != 4 or fmt.symmetric or fmt.group <= 0:
        raise LowbitError(f"{fmt.name}: AWQ's GEMM layout takes 4-bit zero-point formats with groups "
                          "(int4-asym-g128, int4-asym-g64 ...), not symmetric, per-channel or other bit widths")
    group_divides(fmt, layers, "AWQ", fmt.group)
    for n, (rows, _cols) in layers.items():
        if rows % 8:
            raise LowbitError(f"{fmt.name}: {n} has {rows} output features, not a multiple of 8, which AWQ's packing needs")


def export_awq(loaded, out: Path, force: bool = False) -> Path:  # type: ignore[no-untyped-def]
    """Write ``loaded`` (quantized in memory with a 4-bit zero-point integer format with groups, e.g.
    ``--method awq --bits 4 --group-size 64`` or ``int4-asym-g64``) as an AWQ GEMM directory ``out``."""
    model = as_module(loaded)
    qlins, fmt = int_linears(model, "AWQ")
    check(fmt, {n: tuple(m.qtensor.shape) for n, m in qlins.items()})  # type: ignore[attr-defined,misc]
    group = fmt.group
    tensors: dict[str, torch.Tensor] = {}
    for n, m in qlins.items():
        qt = m.qtensor  # type: ignore[attr-defined]
        grid = fmt.grid(qt)
        assert grid.zero is not None
        tensors[f"{n}.qweight"] = pack_awq(fmt.codes(qt).t())
        tensors[f"{n}.qzeros"] = pack_awq(grid.zero[:, ::group].t())
        tensors[f"{n}.scales"] = grid.scale[:, ::group].t().to(torch.float16).contiguous()
        if m.bias is not None:
            tensors[f"{n}.bias"] = m.bias.detach().to(torch.float16).contiguous()  # type: ignore[union-attr]
    tensors.update(kept_tensors(model, list(qlins), torch.float16))
    config = hf_config(model, "float16", {
        "quant_method": "awq",
        "version": "gemm",
        "bits": 4,
        "group_size": group,
        "zero_point": True,
        "modules_to_not_convert": None,
    })
    return write_model_dir(out, tensors, config, getattr(loaded, "tokenizer", None), model=model, force=force,
                           export="awq")


register_export(Export("awq", "AutoAWQ's GEMM layout (GPTQModel, transformers, vLLM): 4-bit zero-point formats whose "
                       "groups divide every row", check, export_awq))
