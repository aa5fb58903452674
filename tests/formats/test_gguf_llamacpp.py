"""GGUF files written by lowbit: byte-identical with llama.cpp's own quantizer, loadable, and scored
the same by lowbit's PyTorch path and by llama.cpp."""

from __future__ import annotations

import copy
import ctypes
from pathlib import Path

import numpy as np
import pytest

from lowbit.io.gguf_out import FILE_TYPES, write_gguf


@pytest.fixture(scope="module")
def outdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


def _llama_cpp_quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.allow_requantize = True
    p.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "fp16", "tq1_0", "tq2_0", "mxfp4_moe"])
def test_file_tensors_identical_to_llama_quantize(fmt, smol_path, outdir):
    import gguf

    ours = outdir / f"lowbit-{fmt}.gguf"
    ref = outdir / f"llama-{fmt}.gguf"
    report = write_gguf(smol_path, ours, fmt, progress=False)
    _llama_cpp_quantize(smol_path, ref, FILE_TYPES[fmt].ftype)
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys() and len(ta) == 272
    for name, t in tb.items():
        assert ta[name].tensor_type == t.tensor_type, name
        assert np.array_equal(ta[name].data, t.data), name
    # the same metadata, bar lowbit's signature
    assert set(a.fields) - {"general.quantized_by", "lowbit.output"} == set(b.fields)
    assert int(a.fields["general.file_type"].contents()) == FILE_TYPES[fmt].ftype
    size_bits = sum(int(t.n_bytes) for t in a.tensors) * 8
    assert report.total_bits == size_bits


def test_llama_cpp_generates_coherent_text_from_lowbit_file(smol_path, outdir):
    from llama_cpp import Llama

    path = outdir / "gen-q8_0.gguf"
    write_gguf(smol_path, path, "q8_0", progress=False)
    llm = Llama(str(path), n_ctx=256, n_threads=2, verbose=False)
    text = llm("The capital of France is", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert "Paris" in text
    llm.close()


def test_failed_write_leaves_no_file(smol_path, tmp_path, monkeypatch):
    from lowbit.formats import gguf_legacy

    calls = {"n": 0}
    real = gguf_legacy.LegacyGGUF.quantize

    def flaky(self, w, name="tensor", imatrix=None):
        calls["n"] += 1
        if calls["n"] == 40:
            raise RuntimeError("disk on fire")
        return real(self, w, name, imatrix)

    monkeypatch.setattr(gguf_legacy.LegacyGGUF, "quantize", flaky)
    out = tmp_path / "out.gguf"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_gguf(smol_path, out, "q4_0", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_format_is_refused_before_any_output(smol_path, tmp_path):
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="format nf4 has no GGUF type"):
        write_gguf(smol_path, tmp_path / "x.gguf", "nf4")
    assert list(tmp_path.iterdir()) == []


# Relative PPL difference allowed between lowbit's PyTorch path and llama.cpp on the same GGUF:
# llama.cpp quantizes activations to 8-bit blocks (Q8_0/Q8_1) for its quantized dot products and keeps the
# KV cache in F16; lowbit's reference path multiplies the exactly dequantized weights in FP32.  Measured
# on these 4 chunks: 0.3% for Q8_0, 0.1% for Q4_0; 1% leaves room for other CPUs' SIMD paths.
PPL_TOLERANCE = 0.01


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_perplexity_agrees_with_llama_cpp(fmt, smol, smol_path, outdir):
    from lowbit.eval.data import eval_text
    from lowbit.eval.llamacpp import LlamaCppModel
    from lowbit.eval.runner import Evaluation, torch_logits_fn
    from lowbit.model import quantize_model

    path = outdir / f"ppl-{fmt}.gguf"
    write_gguf(smol_path, path, fmt, progress=False)
    ev = Evaluation(smol, eval_text(), n_ctx=512, max_chunks=4, progress=False)
    ev.run(torch_logits_fn(smol.model, 512), "original", as_reference=True)
    model = copy.deepcopy(smol.model)
    quantize_model(model, fmt, progress=False)
    ours = ev.run(torch_logits_fn(model, 512), fmt)
    llm = LlamaCppModel(path, n_ctx=512)
    theirs = ev.run(llm.logits_fn(), fmt)
    llm.close()
    ev.close()
    assert abs(ours["ppl"] / theirs["ppl"] - 1) < PPL_TOLERANCE, (ours["ppl"], theirs["ppl"])
    # both see the same damage from the format, to within llama.cpp's own activation rounding
    assert abs(ours["kld_mean"] - theirs["kld_mean"]) < 0.01 + 0.05 * ours["kld_mean"]


def test_q1_0_on_rows_its_blocks_do_not_fit_is_refused_as_llama_quantize_refuses(smol_path, tmp_path):
    """SmolLM2's rows of 576 are not a multiple of Q1_0's 128, and llama.cpp defines no fallback type
    for Q1_0: llama-quantize fails, and lowbit refuses before writing anything."""
    import llama_cpp

    from lowbit.errors import FormatError

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FILE_TYPES["q1_0"].ftype
    p.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(smol_path).encode(), str(tmp_path / "ref.gguf").encode(),
                                          ctypes.byref(p)) != 0
    with pytest.raises(FormatError, match="no fallback type for Q1_0"):
        write_gguf(smol_path, tmp_path / "x.gguf", "q1_0", progress=False)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_llama_cpp_runs_what_it_has_no_file_type_for(fmt, smol, smol_path, outdir, llamacpp_vs_torch):
    """NVFP4 (no llama-quantize file type) and MXFP4 on every tensor: llama.cpp loads the file and
    computes what lowbit's model of the same tensors computes.  (The ternary types are checked by
    their files' identity with llama-quantize's: a ternary SmolLM2 is too damaged for its logits to
    agree under llama.cpp's 8-bit activations.)"""
    import gguf

    from lowbit.eval.data import eval_text
    from lowbit.model import quantize_model
    from lowbit.model.imatrix import imatrix_chunks

    path = outdir / f"run-{fmt}.gguf"
    write_gguf(smol_path, path, fmt, progress=False)
    kinds = {t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors if len(t.shape) > 1}
    assert kinds == {FILE_TYPES[fmt].default}, kinds
    model = copy.deepcopy(smol.model)
    quantize_model(model, fmt, progress=False)
    chunk = imatrix_chunks(smol, eval_text(), n_ctx=256, max_chunks=1)[0]
    kld, theirs, mine = llamacpp_vs_torch(path, model, chunk)
    assert kld < 0.02, kld  # llama.cpp's CPU path rounds activations to 8 bits; nothing else differs
    assert float((theirs.argmax(-1) == mine.argmax(-1)).double().mean()) > 0.85
