"""Hugging Face directory -> GGUF: the same bytes as from the GGUF source, and llama.cpp computes the
same logits as transformers on a second architecture (qwen2, with biases and an untied head)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.io.gguf_out import write_gguf
from lowbit.io.hf_gguf import interleave_rotary_rows, write_gguf_from_hf
from lowbit.model import load_model


def test_rotary_interleave_is_the_expected_permutation():
    w = np.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of dimension 8
    out = interleave_rotary_rows(w, 2)
    assert [r[0] // 3 for r in out] == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_llama_directory_gives_the_same_gguf_as_the_source(smol, smol_path, tmp_path):
    import gguf

    d = tmp_path / "smol-hf"
    smol.model.save_pretrained(d)
    smol.tokenizer.save_pretrained(d)
    loaded = load_model(d, progress=False)
    write_gguf_from_hf(loaded, tmp_path / "from-hf.gguf", "q8_0", progress=False)
    write_gguf(smol_path, tmp_path / "from-gguf.gguf", "q8_0", progress=False)
    a, b = gguf.GGUFReader(tmp_path / "from-hf.gguf"), gguf.GGUFReader(tmp_path / "from-gguf.gguf")
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys()
    for name in tb:
        assert ta[name].tensor_type == tb[name].tensor_type and np.array_equal(ta[name].data, tb[name].data), name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.pre",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
                "llama.block_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.feed_forward_length", "tokenizer.chat_template"):
        assert a.fields[key].contents() == b.fields[key].contents(), key


@pytest.fixture(scope="module")
def qwen2_dir(smol, tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # non-zero biases, so that a lost bias would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    d = tmp_path_factory.mktemp("qwen2-hf")
    model.save_pretrained(d)
    smol.tokenizer.save_pretrained(d)
    return d


def test_qwen2_gguf_runs_in_llama_cpp_like_transformers(qwen2_dir, tmp_path):
    from llama_cpp import Llama

    loaded = load_model(qwen2_dir, progress=False)
    out = tmp_path / "qwen2-f32.gguf"
    report = write_gguf_from_hf(loaded, out, "f32", progress=False)
    assert report.counts() == {"f32": 2 * 12 + 3}
    ids = torch.randint(0, 49152, (48,))
    with torch.inference_mode():
        ref = loaded.model(input_ids=ids[None]).logits[0].double()
    llm = Llama(str(out), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False)
    llm.eval(ids.tolist())
    got = torch.from_numpy(np.asarray(llm.scores[:48])).double()
    llm.close()
    assert float((got - ref).abs().max()) < 2e-3 * float(ref.abs().max())
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
