"""Which format each tensor of a model gets.

Rules work on *roles* (embedding, output, attention and FFN projections, norms) so that the same
decisions apply to Hugging Face module names and to GGUF tensor names.

* GGUF types (``q4_0`` ... ``q8_0``, ``fp16``, ``bf16``): llama.cpp's rules for these file types
  (llama_tensor_get_type): 1-D tensors stay F32; the output matrix (or the token embedding when
  the output is tied to it) becomes Q8_0 when its rows are not a multiple of 256 (Q6_K otherwise);
  every other 2-D weight gets the requested type.  For F16/BF16 files every 2-D weight gets that
  type and no special rule applies.
* Every other format (``nf4``, ``int4-g128``, ``fp8-e4m3`` ...): the usual rule of GPTQ, AWQ and
  bitsandbytes: the linear layers inside the transformer blocks are quantized, the embedding, the
  output head and the norms stay in FP16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.errors import FormatError
from lowbit.formats import get_format

_HF_ROLES = [
    (re.compile(r"(^|\.)embed_tokens\.weight$"), "embed"),
    (re.compile(r"(^|\.)lm_head\.weight$"), "output"),
    (re.compile(r"\.self_attn\.q_proj\.weight$"), "attn_q"),
    (re.compile(r"\.self_attn\.k_proj\.weight$"), "attn_k"),
    (re.compile(r"\.self_attn\.v_proj\.weight$"), "attn_v"),
    (re.compile(r"\.self_attn\.o_proj\.weight$"), "attn_output"),
    (re.compile(r"\.mlp\.gate_proj\.weight$"), "ffn_gate"),
    (re.compile(r"\.mlp\.up_proj\.weight$"), "ffn_up"),
    (re.compile(r"\.mlp\.down_proj\.weight$"), "ffn_down"),
]
_GGUF_ROLES = [
    (re.compile(r"^token_embd\.weight$"), "embed"),
    (re.compile(r"^output\.weight$"), "output"),
    (re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$"), None),
]
LINEAR_ROLES = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
QK_K = 256


def role_of(name: str) -> str:
    """Role of a tensor from its Hugging Face or GGUF name; 'other' if unknown."""
    for pat, role in _HF_ROLES:
        if pat.search(name):
            return role
    for pat, role in _GGUF_ROLES:
        m = pat.search(name)
        if m:
            return role or m.group(1)
    return "other"


@dataclass(frozen=True)
class TensorChoice:
    format: str  # the format name the tensor is stored in
    quantized: bool  # False where the tensor is kept at its storage precision


def is_gguf_family(fmt_name: str) -> bool:
    return get_format(fmt_name).gguf_type is not None


def choose(name: str, shape: tuple[int, ...], fmt_name: str, tied_output: bool) -> TensorChoice:
    """The format for one weight tensor under the rules above."""
    fmt = get_format(fmt_name)
    role = role_of(name)
    if len(shape) != 2:
        return TensorChoice("f32" if fmt.gguf_type is not None else "fp16", False)
    cols = shape[-1]
    if fmt.gguf_type is not None:
        if fmt.name in ("f32", "fp16", "bf16"):
            return TensorChoice(fmt.name, fmt.name != "f32")
        if role == "output" or (role == "embed" and tied_output):
            if fmt.name == "q8_0" or cols % QK_K != 0:
                return TensorChoice("q8_0", True)
            raise FormatError(
                f"{name}: llama.cpp stores this output matrix as Q6_K, which lowbit does not write yet"
            )
        if fmt.block_size and cols % fmt.block_size:
            raise FormatError(f"{name}: {cols} columns are not a multiple of {fmt.block_size} for {fmt.name}")
        return TensorChoice(fmt.name, True)
    if role in LINEAR_ROLES:
        if fmt.block_size and cols % fmt.block_size:
            raise FormatError(f"{name}: {cols} columns are not a multiple of the block size {fmt.block_size} of {fmt.name}")
        return TensorChoice(fmt.name, True)
    return TensorChoice("fp16", False)
