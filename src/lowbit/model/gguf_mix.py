"""llama.cpp's file types (Q4_K_M, Q3_K_S, IQ4_XS, ...) and the tensor types each one picks.

A GGUF "file type" is a mix: a default tensor type plus rules that give some tensors more bits
(llama.cpp's ``llama_tensor_get_type`` in src/llama-quant.cpp).  :func:`plan` reproduces those
rules for dense llama-family models, including their state (counters of ``attn_v`` and
``ffn_down`` tensors seen so far, in llama.cpp's tensor order: by layer, then by name), the
fallbacks for rows that are not a multiple of the block size, and the tied-embedding rule.

Names are GGUF tensor names (``blk.3.attn_v.weight``); Hugging Face names are mapped with
:func:`gguf_name`.  Besides llama.cpp's file types, a plain K- or I-quant type name (``q4_k``) asks
for that type everywhere it fits, as ``llama-quantize --pure`` does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from gguf import LlamaFileType

from lowbit.errors import FormatError
from lowbit.formats import exact_formats, get_format, registry_version


@dataclass(frozen=True)
class FileType:
    name: str  # llama.cpp's name in lower case
    ftype: int  # llama_ftype (llama.h), written as general.file_type
    default: str  # lowbit format of the default tensor type
    pure: bool = False
    description: str = ""
    #: tensor types this file type refuses to make without an importance matrix (Q2_K_S: its Q2_K)
    imatrix_types: tuple[str, ...] = ()

    @property
    def quantized(self) -> bool:
        return self.default not in UNQUANTIZED


#: the file types whose default type keeps floats
UNQUANTIZED = ("f32", "fp16", "bf16")


def llama_ftype(name: str) -> int:
    """llama.cpp's ``llama_ftype`` id of file type ``name`` (``q4_k_m`` -> 15), read from gguf-py."""
    key = {"f32": "ALL_F32", "fp16": "MOSTLY_F16"}.get(name, "MOSTLY_" + name.upper())
    return int(LlamaFileType[key])


def _ft(name: str, default: str, description: str, **kw: object) -> FileType:
    return FileType(name, llama_ftype(name), default, description=description, **kw)  # type: ignore[arg-type]


# llama.cpp's mixes: the rules in _mix_rule below name them; a new tensor type needs no entry here
# (it gets a pure file type of its own from the registry: _build_file_types)
_FT = [
    _ft("f32", "f32", "F32 everywhere (no quantization)"),
    _ft("fp16", "fp16", "FP16 everywhere, norms F32"),
    _ft("bf16", "bf16", "BF16 everywhere, norms F32"),
    _ft("q4_0", "q4_0", "Q4_0 everywhere, output Q6_K (with an imatrix the first ffn_down Q4_1)"),
    _ft("q4_1", "q4_1", "Q4_1 everywhere, output Q6_K"),
    _ft("q8_0", "q8_0", "Q8_0 everywhere"),
    _ft("q5_0", "q5_0", "Q5_0 everywhere, output Q6_K (with an imatrix the first ffn_down Q5_1)"),
    _ft("q5_1", "q5_1", "Q5_1 everywhere, output Q6_K"),
    _ft("q2_k", "q2_k", "Q2_K mix: attn_v, ffn_down Q3_K/Q4_K, output Q6_K"),
    _ft("q2_k_s", "q2_k", "Q2_K_S mix (needs an importance matrix)", imatrix_types=("q2_k",)),
    _ft("q3_k_s", "q3_k", "Q3_K_S: Q3_K everywhere, output Q6_K"),
    _ft("q3_k_m", "q3_k", "Q3_K_M mix: attn_v Q5_K/Q4_K, ffn_down, attn_output Q4_K/Q5_K"),
    _ft("q3_k_l", "q3_k", "Q3_K_L mix: attn_v, ffn_down, attn_output Q5_K"),
    _ft("q4_k_s", "q4_k", "Q4_K_S mix: first attn_v/ffn_down in Q5_K"),
    _ft("q4_k_m", "q4_k", "Q4_K_M mix: half of attn_v and ffn_down in Q6_K"),
    _ft("q5_k_s", "q5_k", "Q5_K_S: Q5_K everywhere, output Q6_K"),
    _ft("q5_k_m", "q5_k", "Q5_K_M mix: half of attn_v and ffn_down in Q6_K"),
    _ft("q6_k", "q6_k", "Q6_K everywhere"),
    _ft("iq4_nl", "iq4_nl", "IQ4_NL everywhere, output Q6_K"),
    _ft("iq4_xs", "iq4_xs", "IQ4_XS mix"),
    _ft("iq1_s", "iq1_s", "IQ1_S mix (needs an imatrix): attn_output IQ2_XXS, attn_v Q2_K/Q4_K, output Q5_K"),
    _ft("iq1_m", "iq1_m", "IQ1_M mix (needs an imatrix): attn_output IQ2_XXS, attn_v Q2_K/Q4_K, output Q5_K"),
    _ft("iq2_xxs", "iq2_xxs", "IQ2_XXS mix (needs an imatrix): attn_v Q2_K/Q4_K, first ffn_down Q2_K, output Q5_K"),
    _ft("iq2_xs", "iq2_xs", "IQ2_XS mix (needs an imatrix): attn_v Q2_K/Q4_K, first ffn_down Q2_K, output Q5_K"),
    _ft("iq2_s", "iq2_xs", "IQ2_S mix (needs an imatrix): IQ2_XS, attn_v, attn_output, first ffn_down IQ3_S"),
    _ft("iq2_m", "iq2_s", "IQ2_M mix (needs an imatrix): IQ2_S, attn_v, attn_output, first ffn_down IQ3_S"),
    _ft("iq3_xxs", "iq3_xxs", "IQ3_XXS mix (needs an imatrix): attn_q/k IQ2_S, attn_output IQ3_S, output Q5_K"),
    _ft("iq3_xs", "iq3_s", "IQ3_XS mix: IQ3_S, attn_q/k and middle ffn_gate/up IQ3_XXS"),
    _ft("iq3_s", "iq3_s", "IQ3_S everywhere, output Q6_K"),
    _ft("iq3_m", "iq3_s", "IQ3_M mix: IQ3_S, attn_v, attn_output, first ffn_down Q4_K"),
    _ft("tq1_0", "tq1_0", "TQ1_0 (ternary) everywhere, token embedding Q4_K, output Q6_K"),
    _ft("tq2_0", "tq2_0", "TQ2_0 (ternary) everywhere, token embedding Q4_K, output Q6_K"),
    _ft("q1_0", "q1_0", "Q1_0 (sign bits) everywhere, output Q6_K (rows must be a multiple of 128)"),
    _ft("mxfp4_moe", "mxfp4", "MXFP4 for MoE experts, Q8_0 for the rest (a dense model: Q8_0 everywhere)"),
]  # fmt: skip
def _build_file_types() -> tuple[dict[str, FileType], dict[str, str]]:
    """The file types: llama.cpp's mixes, and one pure file type per quantized GGUF type in the
    format registry: the type's own name where no mix has it (``q4_k``), else ``<mix>-pure``
    (``q4_0-pure``).  A pure type's ``general.file_type`` is llama.cpp's id for the type where
    there is one, else that of the type's medium mix.  Also: each mix's pure form."""
    table = {f.name: f for f in _FT}
    pure_of: dict[str, str] = {}
    mixes_of: dict[str, list[FileType]] = {}
    for f in _FT:
        mixes_of.setdefault(f.default, []).append(f)
    for t in gguf_types():
        mixes = mixes_of.get(t, [])
        if t not in table:
            try:
                ftype = llama_ftype(t)
            except KeyError:
                medium = [m for m in mixes if m.name.endswith("_m")] or mixes
                ftype = medium[0].ftype if medium else int(LlamaFileType.GUESSED)
            table[t] = FileType(t, ftype, t, pure=True, description=f"{t.upper()} on every tensor that fits (--pure)")
            for m in mixes:
                pure_of[m.name] = t
        for m in mixes:
            if m.name not in pure_of:
                table[f"{m.name}-pure"] = FileType(
                    f"{m.name}-pure", m.ftype, t, pure=True,
                    description=f"{t.upper()} on every tensor that fits, output and embedding too (--pure)")
                pure_of[m.name] = f"{m.name}-pure"
    table["f16"] = table["fp16"]
    return table, pure_of


def gguf_types() -> list[str]:
    """Every quantized type of the format registry that a GGUF file holds (blocks, a GGML type)."""
    return [f.name for f in exact_formats() if f.gguf_type is not None and f.block_size and f.name not in UNQUANTIZED]


class _FileTypes(Mapping[str, FileType]):
    """The file types by name, rebuilt whenever a format registers, so that a new GGUF type (one
    file in lowbit/formats) is a file type, a search candidate and a listing row without an edit here."""

    def __init__(self) -> None:
        self._built_for = -1
        self._table: dict[str, FileType] = {}
        self._pure_of: dict[str, str] = {}

    def _current(self) -> dict[str, FileType]:
        if self._built_for != registry_version():
            self._table, self._pure_of = _build_file_types()
            self._built_for = registry_version()
        return self._table

    def __getitem__(self, key: str) -> FileType:
        return self._current()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())

    def pure_of(self, name: str) -> str:
        self._current()
        return self._pure_of[name]


FILE_TYPES = _FileTypes()


def pure_file_type(name: str) -> str:
    """The name of file type ``name``'s pure form (``llama-quantize --pure``: one type for every tensor)."""
    key = name.strip().lower()
    ft = FILE_TYPES.get(key)
    if ft is None:
        raise FormatError(f"--pure takes a llama.cpp file type (q4_k_m, q4_0 ...), not '{name}'")
    if ft.pure or not ft.quantized:
        return ft.name
    return FILE_TYPES.pure_of(ft.name)


def file_type(name: str) -> FileType | None:
    return FILE_TYPES.get(name.strip().lower())


@dataclass(frozen=True)
class ModelInfo:
    """The hyper-parameters llama.cpp's rules look at."""

    arch: str
    n_layer: int
    n_head: int = 1
    n_head_kv: int = 1
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // max(1, self.n_head_kv)

    @property
    def is_70b(self) -> bool:
        return self.arch in ("llama", "qwen2") and self.n_layer == 80 and self.n_head != self.n_head_kv


def info_from_config(cfg: object) -> ModelInfo:
    """ModelInfo from a transformers config."""
    arch = {"mistral": "llama", "llama": "llama", "qwen2": "qwen2"}.get(str(getattr(cfg, "model_type", "")),
                                                                      str(getattr(cfg, "model_type", "")))
    n_head = int(getattr(cfg, "num_attention_heads", 1))
    return ModelInfo(arch, int(getattr(cfg, "num_hidden_layers", 0)), n_head,
                     int(getattr(cfg, "num_key_value_heads", None) or n_head),
                     int(getattr(cfg, "num_local_experts", 0) or 0))


def info_from_gguf(fields: dict[str, object], arch: str) -> ModelInfo:
    """ModelInfo from a GGUF file's metadata (``{arch}.block_count`` ...); values already decoded."""
    n_head = int(fields.get(f"{arch}.attention.head_count", 1))  # type: ignore[call-overload]
    return ModelInfo(arch, int(fields.get(f"{arch}.block_count", 0)), n_head,  # type: ignore[call-overload]
                     int(fields.get(f"{arch}.attention.head_count_kv", n_head)),  # type: ignore[call-overload]
                     int(fields.get(f"{arch}.expert_count", 0)))  # type: ignore[call-overload]


# ---- names --------------------------------------------------------------------------------
_HF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}  # fmt: skip
_HF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str | None:
    """The GGUF tensor name of a Hugging Face llama-family parameter, or None."""
    if hf_name in _HF_TOP:
        return _HF_TOP[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m and m.group(2) in _HF_LAYER:
        return f"blk.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    return None


def llama_order(names: Iterable[str]) -> list[str]:
    """llama.cpp's tensor order (weight_name_comparer): by layer (-1 for non-layer), then by name."""

    def key(n: str) -> tuple[int, str]:
        m = re.match(r"blk\.(\d+)\.", n)
        return (int(m.group(1)) if m else -1, n)

    return sorted(names, key=key)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def allows_quantization(name: str, ndim: int) -> bool:
    """llama.cpp's tensor_allows_quantization for the tensors of dense llama-family models."""
    if ndim < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    return not any(s in name for s in ("ffn_gate_inp.weight", "position_embd", "token_types", "ssm_conv1d"))


def _fallback(t: str, cols: int) -> str:
    """llama.cpp's type for a tensor of type ``t`` whose rows do not fit ``t``'s blocks: the format's
    own ``gguf_fallback``, else FP16."""
    fmt = get_format(t)
    if cols % fmt.block_size == 0:
        return t
    if fmt.gguf_fallback is None and fmt.block_size > 32:
        raise FormatError(f"rows of {cols} values do not fit {t.upper()}'s blocks of {fmt.block_size}, and llama.cpp "
                          f"defines no fallback type for {t.upper()}")
    r = fmt.gguf_fallback or t
    if cols % get_format(r).block_size:
        r = "fp16"
    return r


def plan(tensors: Iterable[tuple[str, tuple[int, ...]]], ft: FileType, info: ModelInfo,
         has_imatrix: bool = False) -> dict[str, str | None]:
    """Tensor type (a lowbit format name) for every GGUF tensor of a model under file type ``ft``;
    None keeps a tensor as it is (1-D tensors, norms: F32)."""
    shapes = dict(tensors)
    order = llama_order(shapes)
    tied = "output.weight" not in shapes
    n_attn_v = sum(1 for n in order if _category(n) in ("attn_v", "attn_qkv", "attn_kv_b"))
    st = {"attn_v": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}
    out: dict[str, str | None] = {}
    quantized_default = ft.quantized
    for name in order:
        shape = shapes[name]
        if not allows_quantization(name, len(shape)):
            out[name] = None
            continue
        new = ft.default
        if quantized_default:
            if not ft.pure:
                new = _mix_rule(name, shape, ft, info, tied, has_imatrix, n_attn_v, st)
            try:
                new = _fallback(new, shape[-1])
            except FormatError as exc:
                raise FormatError(f"{name}: {exc}") from None
            needs = new in ft.imatrix_types or get_format(new).llama_needs_imatrix
            if needs and name not in ("token_embd.weight", "output.weight") and not has_imatrix:
                raise FormatError(f"{name}: file type {ft.name.upper()} needs an importance matrix (--imatrix)")
        out[name] = new
    return out


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


#: the file types llama.cpp gives its 1-2-bit rules (attn_v, the first ffn_down in more bits)
_IQ_LOW = ("iq2_xxs", "iq2_xs", "iq1_s", "iq2_s", "iq2_m", "iq1_m")


def _mix_rule(name: str, shape: tuple[int, ...], ft: FileType, info: ModelInfo, tied: bool, has_imatrix: bool,
              n_attn_v: int, st: dict[str, int]) -> str:
    """llama_tensor_get_type_impl for the file types lowbit writes (dense models)."""
    f = ft.name
    cat = _category(name)
    new = ft.default
    falcon = info.arch == "falcon"
    n_layer = info.n_layer
    if cat == "output" or (tied and cat == "token_embd"):
        cols = shape[-1]
        if f == "mxfp4_moe" or falcon or cols % get_format(new).block_size:
            return "q8_0"
        if f in _IQ_LOW or f == "iq3_xxs":
            return "q5_k"
        return "q6_k" if new != "q8_0" else new
    if f == "mxfp4_moe":  # experts (3-D tensors) take MXFP4; a dense model has none
        return "q8_0"
    if cat == "token_embd":
        if f in ("iq2_xxs", "iq2_xs", "iq1_s", "iq1_m"):
            return "q2_k"
        if f in ("iq2_s", "iq2_m", "iq3_xxs"):
            return "iq3_s"
        return "q4_k" if f in ("tq1_0", "tq2_0") else new
    if f in _IQ_LOW:
        iq2sm = f in ("iq2_s", "iq2_m")
        if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            new = "q4_k" if info.n_gqa >= 4 or info.n_expert >= 4 else ("iq3_s" if iq2sm else "q2_k")
            st["attn_v"] += 1
        elif info.n_expert == 8 and cat == "attn_k":
            new = "q4_k"
        elif cat == "ffn_down":
            if st["ffn_down"] < n_layer // 8:
                new = "iq3_s" if iq2sm else "q2_k"
            st["ffn_down"] += 1
        elif cat == "attn_output":
            if info.n_expert == 8:
                new = "q5_k"
            elif f in ("iq1_s", "iq1_m"):
                new = "iq2_xxs"
            elif iq2sm:
                new = "iq3_s"
        return new
    if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
        i = st["attn_v"]
        if f == "q2_k":
            new = "q4_k" if info.n_gqa >= 4 else "q3_k"
        elif f == "q2_k_s" and info.n_gqa >= 4:
            new = "q4_k"
        elif f == "iq3_xxs":
            new = "q4_k" if info.n_gqa >= 4 else ("iq3_s" if not has_imatrix else "iq3_xxs")
        elif f in ("iq3_xs", "iq3_s") and info.n_gqa >= 4:
            new = "q4_k"
        elif f == "iq3_m":
            new = "q4_k"
        elif f == "q3_k_m":
            new = "q5_k" if i < 2 else "q4_k"
        elif f == "q3_k_l":
            new = "q5_k"
        elif f in ("iq4_nl", "iq4_xs") and info.n_gqa >= 4:
            new = "q5_k"
        elif f in ("q4_k_m", "q5_k_m") and _more_bits(i, n_attn_v):
            new = "q6_k"
        elif f == "q4_k_s" and i < 4:
            new = "q5_k"
        if info.is_70b and new in ("q3_k", "q4_k"):
            new = "q5_k"
        if info.n_expert == 8:
            new = "q8_0"
        st["attn_v"] = i + 1
        return new
    if cat == "attn_k":
        if info.n_expert == 8:
            return "q8_0"
        return {"iq3_xs": "iq3_xxs", "iq3_xxs": "iq2_s"}.get(f, new)
    if cat == "attn_q":
        return {"iq3_xs": "iq3_xxs", "iq3_xxs": "iq2_s"}.get(f, new)
    if cat == "ffn_down":
        i = st["ffn_down"]
        if info.n_expert > 1:
            m = re.match(r"blk\.(\d+)\.", name)
            i = int(m.group(1)) if m else i
        n = n_layer
        if f == "q2_k":
            new = "q3_k"
        elif f == "q2_k_s":
            if i < n // 8:
                new = "q4_k"
        elif f == "iq3_xxs" and not has_imatrix:
            new = "q4_k" if i < n // 8 else "q3_k"
        elif f == "q3_k_m":
            new = "q5_k" if i < n // 16 else ("q4_k" if (not falcon or _more_bits(i, n)) else "q3_k")
        elif f == "iq3_m" and (i < n // 8 or (info.n_expert == 8 and _more_bits(i, n))):
            new = "q4_k"
        elif f == "q3_k_l":
            new = "q4_k" if falcon else "q5_k"
        elif f == "q4_k_m":
            if falcon:
                new = "q6_k" if i < n // 16 else ("q5_k" if _more_bits(i, n) else "q4_k")
            elif _more_bits(i, n):
                new = "q6_k"
        elif i < n // 8 and f in ("iq4_nl", "iq4_xs") and not has_imatrix:
            new = "q5_k"
        elif f == "q5_k_m" and _more_bits(i, n):
            new = "q6_k"
        elif f == "q4_k_s" and not falcon and i < n // 8:
            new = "q5_k"
        elif f in ("q4_0", "q5_0") and has_imatrix and i < n // 8:
            new = "q4_1" if f == "q4_0" else "q5_1"
        st["ffn_down"] += 1
        return new
    if cat == "attn_output":
        if not falcon:
            if info.n_expert == 8:
                if f in ("q2_k", "iq3_xs", "iq3_xxs", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq3_s",
                         "iq3_m", "iq4_xs"):
                    new = "q5_k"
            elif f == "q2_k":
                new = "q3_k"
            elif f == "iq3_xxs":
                new = "iq3_s"
            elif f in ("q3_k_m", "iq3_m"):
                new = "q4_k"
            elif f == "q3_k_l":
                new = "q5_k"
        elif f == "q3_k_l":
            new = "q4_k"
        return new
    if cat in ("ffn_gate", "ffn_up"):
        i = st[cat]
        if info.n_expert > 1:
            m = re.match(r"blk\.(\d+)\.", name)
            i = int(m.group(1)) if m else i
        if f == "iq3_xs" and n_layer // 8 <= i < 7 * n_layer // 8:
            new = "iq3_xxs"
        st[cat] += 1
        return new
    return new
