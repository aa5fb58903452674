"""Which format each tensor of a model gets.

Rules work on *roles* (embedding, output, attention and FFN projections, norms) so that the same
decisions apply to Hugging Face module names and to GGUF tensor names.

* llama.cpp file types (``q4_0`` ... ``q8_0``, ``q4_k_m``, ``q3_k_s``, ``iq4_xs``, ``fp16`` ...):
  llama.cpp's own per-tensor rules (llama_tensor_get_type, see :mod:`lowbit.model.gguf_mix`): 1-D
  tensors stay F32, the output matrix (or the tied token embedding) gets Q6_K or Q8_0, the mixes
  give chosen attn_v / ffn_down / attn_output tensors more bits, and rows that do not fit a type's
  block fall back to llama.cpp's replacement type.  :func:`plan_model` applies them.
* Every other format (``nf4``, ``int4-g128``, ``fp8-e4m3`` ...): the usual rule of GPTQ, AWQ and
  bitsandbytes: the linear layers inside the transformer blocks are quantized, the embedding, the
  output head and the norms stay in FP16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.errors import FormatError
from lowbit.formats import get_format
from lowbit.formats.base import ggml_type
from lowbit.model.gguf_mix import file_type, gguf_name, plan
from lowbit.model.schemes import unknown

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
QK_K = ggml_type("q4_k").block  # a K-quant super-block: 256 weights


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
    return file_type(fmt_name) is not None


def check_scheme(name: str) -> None:
    """Raise a FormatError unless ``name`` is a lowbit format or a llama.cpp file type."""
    if file_type(name) is None:
        try:
            get_format(name)
        except FormatError as exc:
            if not str(exc).startswith("unknown format"):
                raise

            raise unknown(name) from None


def plan_model(named_shapes: list[tuple[str, tuple[int, ...]]], scheme: str, info: object | None = None,
               tied: bool = False, has_imatrix: bool = False) -> dict[str, TensorChoice]:
    """The stored format of every weight of a Hugging Face model under ``scheme`` (a lowbit format
    or a llama.cpp file type; file types need ``info``, a :class:`~lowbit.model.gguf_mix.ModelInfo`)."""
    ft = file_type(scheme)
    if ft is None:
        return {n: choose(n, s, scheme, tied) for n, s in named_shapes}
    if info is None:
        raise FormatError(f"file type {scheme} needs the model's layer and head counts")
    g = {n: gguf_name(n) or n for n, _ in named_shapes}
    shapes = [(g[n], s) for n, s in named_shapes]
    if tied:
        shapes = [(n, s) for n, s in shapes if n != "output.weight"]
    types = plan(shapes, ft, info, has_imatrix)  # type: ignore[arg-type]
    out = {}
    for n, s in named_shapes:
        t = types.get(g[n])
        if t is None:
            out[n] = TensorChoice("f32" if len(s) == 1 else "fp16", False)
        else:
            out[n] = TensorChoice(t, t not in ("f32",))
    return out


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
