"""Export to the GPTQ checkpoint layout: what AutoGPTQ wrote and what GPTQModel, and transformers
with optimum through it, load (``quant_method`` ``gptq``, ``checkpoint_format`` ``gptq``).

A Hugging Face directory: ``config.json`` with a ``quantization_config`` (bits, group_size,
desc_act, sym, checkpoint_format ...), the same object in ``quantize_config.json``,
``model.safetensors`` and the tokenizer files.  For each quantized linear layer ``<m>``
(``in`` = input features, ``out`` = output features, ``G = ceil(in / group_size)``):

* ``<m>.qweight`` int32 ``[in*bits/32, out]``: the unsigned codes of the transposed weight, packed
  along the input dimension as one dense little-endian bit stream per output column (code ``i`` of
  a run of 32 at bit ``i*bits`` of the run's ``bits`` words; for 4 bits 8 codes a word, lowest bits
  first; the 3-bit layout is the same stream, a code may straddle two words);
* ``<m>.qzeros`` int32 ``[G, out*bits/32]``: the zero points packed the same way along the outputs,
  stored in GPTQ's "v1" convention, *minus one*: for 2, 4 and 8 bits as the packed word minus the
  word with a 1 in every field (GPTQModel adds that word back when it loads; a zero point of 0
  borrows from the field above, which the addition restores), for 3 bits field by field modulo 8;
* ``<m>.scales`` FP16 ``[G, out]``; ``<m>.g_idx`` int32 ``[in]``: the group of each input column;
* ``<m>.bias`` FP16 when the layer has one.

A weight decodes as ``W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])``.  lowbit's
integer formats store exactly that (symmetric ones with the zero point ``2^(bits-1)``), and their
scales are FP16 already, so nothing is re-quantized.  The layout could describe a shorter last group
(576 columns in groups of 128) through ``g_idx``, but GPTQModel's CPU int4 kernel fails on it at run
time ("expect K to be divisible by qGroupSize"), so the group must divide every layer's input
features.  GPTQ's act-order is stored in lowbit with static, contiguous groups in the original
column order, so ``g_idx`` is always ``i // group_size`` and ``desc_act`` is false: no loader has to
reorder anything.  Other tensors are written in FP16.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.formats import Format
from lowbit.formats.integer import IntFormat
from lowbit.io.export_ct import pack_int32
from lowbit.io.exports import Export, group_divides, register_export
from lowbit.io.hf_dir import hf_config, int_linears, kept_tensors, write_model_dir
from lowbit.model.quantize import as_module

GPTQ_BITS = (2, 3, 4, 8)


def field_ones(bits: int) -> int:
    """The 32-bit word with the value 1 in each of its ``32/bits`` fields (2, 4 or 8 bits)."""
    return sum(1 << (i * bits) for i in range(32 // bits))


def pack_unsigned(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values ``[rows, cols]`` packed densely along the columns into int32
    ``[rows, ceil(cols*bits/32)]`` (value ``i`` of a run of 32 at bit ``i*bits`` of the run)."""
    return pack_int32(u.to(torch.int64) - (1 << (bits - 1)), bits)


def gptq_zeros_v1(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points ``[groups, out]`` (unsigned) -> GPTQ v1 ``qzeros``: packed, minus one (see the module
    docstring for how)."""
    if bits == 3:
        return pack_unsigned((zeros.to(torch.int64) - 1) & 7, bits)
    words = pack_unsigned(zeros, bits).to(torch.int64) - field_ones(bits)
    words = words & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def gptq_tensors(name: str, fmt: IntFormat, qt, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """One layer's GPTQ tensors from its lowbit integer ``QTensor``."""
    rows, cols = qt.shape
    bits = fmt.bits
    step = fmt.group if fmt.group > 0 else cols
    grid = fmt.grid(qt)
    codes = fmt.codes(qt)  # [out, in]
    if fmt.symmetric:
        half = 1 << (bits - 1)
        codes = codes + half
        zeros = torch.full((rows, -(-cols // step)), half, dtype=torch.int64)
    else:
        assert grid.zero is not None
        zeros = grid.zero[:, ::step].to(torch.int64)
    return {
        f"{name}.qweight": pack_unsigned(codes, bits).t().contiguous(),
        f"{name}.qzeros": gptq_zeros_v1(zeros.t(), bits),
        f"{name}.scales": grid.scale[:, ::step].t().to(torch.float16).contiguous(),
        f"{name}.g_idx": (torch.arange(cols, dtype=torch.int32) // step).contiguous(),
        **({f"{name}.bias": bias.detach().to(torch.float16).contiguous()} if bias is not None else {}),
    }


def check(fmt: Format, layers: dict[str, tuple[int, int]]) -> None:
    """Whether ``fmt`` on the linear ``layers`` (name -> (rows, cols)) fits the GPTQ layout."""
    if not isinstance(fmt, IntFormat) or fmt.bits not in GPTQ_BITS or fmt.group == -1:
        raise LowbitError(f"{fmt.name}: the GPTQ layout takes 2-, 3-, 4- or 8-bit integer formats per group or per "
                          "channel (int4-asym-g128, int4-g128, int8-ch ...), not 5-7 bits or one scale per tensor")
    group_divides(fmt, layers, "GPTQ (its kernels)", fmt.group)


def export_gptq(loaded, out: Path, force: bool = False) -> Path:  # type: ignore[no-untyped-def]
    """Write ``loaded`` (quantized in memory with a 2-, 3-, 4- or 8-bit lowbit integer format, per group
    or per channel: RTN, GPTQ, AWQ ...) as a GPTQ checkpoint directory ``out``."""
    model = as_module(loaded)
    qlins, fmt = int_linears(model, "GPTQ")
    check(fmt, {n: tuple(m.qtensor.shape) for n, m in qlins.items()})  # type: ignore[attr-defined,misc]
    tensors: dict[str, torch.Tensor] = {}
    for n, m in qlins.items():
        tensors.update(gptq_tensors(n, fmt, m.qtensor, m.bias))  # type: ignore[arg-type]
    tensors.update(kept_tensors(model, list(qlins), torch.float16))
    qcfg = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": fmt.bits,
        "group_size": fmt.group if fmt.group > 0 else -1,
        "desc_act": False,
        "sym": bool(fmt.symmetric),
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": {"quantizer": [f"lowbit:{fmt.name}"]},
    }
    config = hf_config(model, "float16", qcfg)
    return write_model_dir(out, tensors, config, getattr(loaded, "tokenizer", None),
                           extra_json={"quantize_config.json": qcfg}, model=model, force=force, export="gptq")


register_export(Export("gptq", "the GPTQ checkpoint layout (GPTQModel; transformers + optimum): 2/3/4/8-bit integer "
                       "formats per channel or with groups that divide every row", check, export_gptq))
