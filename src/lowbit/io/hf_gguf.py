"""Write a Hugging Face model (llama, mistral, qwen2) as a GGUF file that llama.cpp loads.

What a GGUF needs beyond the weights is written from the model's config and tokenizer:

* hyper-parameters under the GGUF architecture's keys (``llama.block_count`` ...);
* the tokenizer, for byte-level BPE tokenizers (Llama-3, SmolLM2, Qwen2 and most recent models):
  the token strings by id, their types (normal, control for special tokens, user-defined for other
  added tokens), the merges, the special token ids, whether to add BOS, the chat template, and the
  name of the pre-tokenizer llama.cpp should apply (``tokenizer.ggml.pre``);
* tensor names in GGUF's scheme (``blk.N.attn_q.weight``...).  For the ``llama`` architecture the
  rows of the Q and K projections are reordered per head: Hugging Face keeps the two halves of each
  head's rotary dimensions apart, llama.cpp's rotary embedding wants them interleaved.

SentencePiece tokenizers (Llama-2) and scaled rotary embeddings are refused with a clear error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.formats import QTensor, get_format
from lowbit.io.gguf_out import write_tensors
from lowbit.model.gguf_mix import ModelInfo, gguf_name, info_from_config
from lowbit.model.load import LoadedModel
from lowbit.model.quantize import QuantLinear, QuantReport
from lowbit.model.rotated import RotatedQuantLinear

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

def interleave_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Per head, reorder rows from [x_0..x_{d/2-1}, y_0..y_{d/2-1}] to [x_0, y_0, x_1, y_1, ...]."""
    rows = w.shape[0]
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pre_tokenizer_name(arch: str, tok: object, vocab_size: int) -> str:
    """The llama.cpp pre-tokenizer for this tokenizer family (which regex splits text before BPE)."""
    if arch == "qwen2":
        return "qwen2"
    vocab = tok.get_vocab()  # type: ignore[attr-defined]
    if vocab_size == 128256 or "<|begin_of_text|>" in vocab:
        return "llama-bpe"
    if vocab_size == 49152 and "<|im_start|>" in vocab:
        return "smollm"
    return "default"


def _tokenizer_metadata(writer: object, tok: object, path: Path, add_bos: bool, arch: str,
                        vocab_size: int) -> list[str]:
    """Add the tokenizer keys; returns notes for the user."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError(f"{path}: GGUF output needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise LowbitError(f"{path}: only byte-level BPE tokenizers can be written to GGUF by lowbit so far")
    import gguf

    id_to_tok: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in id_to_tok}
    for added in spec.get("added_tokens", []):
        id_to_tok[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    n = max(vocab_size, max(id_to_tok) + 1)
    tokens = [id_to_tok.get(i, f"[PAD{i}]") for i in range(n)]
    ttypes = [types.get(i, gguf.TokenType.UNUSED) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = _pre_tokenizer_name(arch, tok, vocab_size)
    w = writer
    w.add_tokenizer_model("gpt2")  # type: ignore[attr-defined]
    w.add_tokenizer_pre(pre)  # type: ignore[attr-defined]
    w.add_token_list(tokens)  # type: ignore[attr-defined]
    w.add_token_types(ttypes)  # type: ignore[attr-defined]
    w.add_token_merges(merges)  # type: ignore[attr-defined]
    for attr, adder in (("bos_token_id", "add_bos_token_id"), ("eos_token_id", "add_eos_token_id"),
                        ("unk_token_id", "add_unk_token_id"), ("pad_token_id", "add_pad_token_id")):
        v = getattr(tok, attr, None)
        if v is not None:
            getattr(w, adder)(int(v))
    w.add_add_bos_token(bool(add_bos))  # type: ignore[attr-defined]
    tmpl = getattr(tok, "chat_template", None)
    if isinstance(tmpl, str):
        w.add_chat_template(tmpl)  # type: ignore[attr-defined]
    return [] if pre != "default" else ["unknown tokenizer family: llama.cpp will use its default pre-tokenizer"]


class HFLayout:
    """What turns a Hugging Face llama-family model into GGUF, from its config alone: the GGUF
    architecture, the hyper-parameter keys, the tensor names and the row order of Q and K.
    Shared by the in-memory writer below and the streaming one (:mod:`lowbit.io.hf_stream`)."""

    def __init__(self, path: Path, model_type: str, cfg: object) -> None:
        arch = GGUF_ARCH.get(model_type)
        if arch is None:
            raise LowbitError(f"{path}: GGUF output supports {', '.join(GGUF_ARCH)}, not {model_type}")
        rope = getattr(cfg, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
        if rope_type != "default":
            raise LowbitError(f"{path}: rotary scaling '{rope_type}' is not written to GGUF by lowbit yet")
        self.path, self.arch, self.cfg = path, arch, cfg
        self.theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        self.n_head, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads  # type: ignore[attr-defined]
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_head  # type: ignore[attr-defined]
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))

    def metadata(self, tok: object, add_bos: bool, notes: list[str]) -> Callable[[Any], None]:
        """A function adding the hyper-parameters and the tokenizer to a gguf-py writer."""
        cfg, n_head = self.cfg, self.n_head

        def add(w: Any) -> None:
            w.add_name(self.path.name)
            w.add_block_count(cfg.num_hidden_layers)
            w.add_context_length(cfg.max_position_embeddings)
            w.add_embedding_length(cfg.hidden_size)
            w.add_feed_forward_length(cfg.intermediate_size)
            w.add_head_count(n_head)
            w.add_head_count_kv(self.n_kv)
            w.add_rope_freq_base(self.theta)
            w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
            w.add_rope_dimension_count(self.head_dim)
            if self.head_dim != cfg.hidden_size // n_head:
                w.add_key_length(self.head_dim)
                w.add_value_length(self.head_dim)
            w.add_vocab_size(cfg.vocab_size)
            notes.extend(_tokenizer_metadata(w, tok, self.path, add_bos, self.arch, cfg.vocab_size))

        return add

    def names(self, hf_names: Iterable[str]) -> dict[str, str]:
        """GGUF name -> Hugging Face name for the tensors GGUF stores (a tied lm_head is dropped)."""
        names = [k for k in hf_names if not (self.tied and k == "lm_head.weight")]
        unknown = [k for k in names if gguf_name(k) is None]
        if unknown:
            raise LowbitError(f"{self.path}: tensors with no GGUF name: {', '.join(unknown[:5])}")
        return {gguf_name(k): k for k in names}  # type: ignore[misc]

    def rows(self, name: str, a: np.ndarray) -> np.ndarray:
        """``a`` (GGUF tensor ``name``) with its rows in llama.cpp's order."""
        if self.arch == "llama" and name.endswith("attn_q.weight"):
            return interleave_rotary_rows(a, self.n_head)
        if self.arch == "llama" and name.endswith("attn_k.weight"):
            return interleave_rotary_rows(a, self.n_kv)
        return a

    def quantized_rows(self, name: str, qt: QTensor) -> QTensor:
        """A quantized GGUF tensor ``name`` (blocks of whole rows, on any device) with its rows in
        llama.cpp's order, on the CPU."""
        blocks = self.rows(name, qt.parts["blocks"].reshape(qt.shape[0], -1).cpu().numpy())
        return QTensor(qt.format, qt.shape, {"blocks": torch.from_numpy(np.ascontiguousarray(blocks))})

    def info(self) -> ModelInfo:
        info = info_from_config(self.cfg)
        return ModelInfo(self.arch, info.n_layer, info.n_head, info.n_head_kv, info.n_expert)


def write_gguf_from_hf(loaded: LoadedModel, out: Path, fmt_name: str, progress: bool = True,
                       imatrix: dict[str, np.ndarray] | None = None,
                       types: dict[str, str | None] | None = None, force: bool = False) -> QuantReport:
    """Write ``loaded`` (a Hugging Face model, possibly quantized in memory by lowbit) as a GGUF file
    of file type ``fmt_name``, or with the per-tensor ``types`` of a chosen mix (GGUF names; tensors
    not named there stay F32)."""
    layout = HFLayout(loaded.path, loaded.arch, loaded.model.config)

    if any(isinstance(m, RotatedQuantLinear) for m in loaded.model.modules()):
        raise LowbitError(f"{loaded.path}: QuIP's rotated layers cannot go into a GGUF file (llama.cpp does not "
                          "rotate their inputs); write a lowbit checkpoint directory instead")
    quantized = {f"{n}.weight": m for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    state = {k: v for k, v in loaded.model.state_dict().items()
             if not any(k.startswith(q[: -len("weight")] + "q_") for q in quantized)}
    for k, m in quantized.items():
        if get_format(m.fmt.name).gguf_type is None:
            raise LowbitError(f"{loaded.path}: {k} is stored as {m.fmt.name}, which GGUF cannot hold")
        state[k] = torch.empty(0)  # placeholder: written from the quantized blocks below

    hf_of = layout.names(state)
    shape_of = {k: (tuple(quantized[k].shape) if k in quantized else tuple(int(x) for x in state[k].shape))
                for k in hf_of.values()}
    entries = [(g, shape_of[k]) for g, k in hf_of.items()]

    prequantized = {g: layout.quantized_rows(g, quantized[k].qtensor) for g, k in hf_of.items() if k in quantized}

    def load(name: str) -> np.ndarray:
        return layout.rows(name, state[hf_of[name]].detach().to(torch.float32).numpy())

    if types is not None:
        types = {g: types.get(g) for g, _ in entries}
    return write_tensors(out, layout.arch, layout.metadata(loaded.tokenizer, loaded.add_bos, loaded.notes), entries,
                         load, fmt_name, layout.info(), str(loaded.path), progress, imatrix,
                         prequantized=prequantized, types=types, force=force)
