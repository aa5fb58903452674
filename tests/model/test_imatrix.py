"""Importance matrices: lowbit's statistics are the mean squared inputs of each linear layer, its
files are llama.cpp's (GGUF and legacy .dat), files made by llama.cpp's own llama-imatrix read back
with the same numbers, and llama.cpp's own llama-quantize given lowbit's file writes the same bytes
as lowbit."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.io.imatrix import read_imatrix, write_imatrix
from lowbit.model.imatrix_collect import Imatrix, ImatrixEntry


def llama_tool(name: str) -> Path:
    """A llama.cpp tool built by scripts/build_llamacpp.sh (part of the install, so never missing)."""
    import llama_cpp

    p = Path(llama_cpp.__file__).parent / "lib" / name
    if not p.is_file():
        pytest.fail(f"{p} is missing: run scripts/install.sh (it builds llama.cpp's tools)")
    return p


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    from lowbit.eval.data import calibration_text

    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(calibration_text()[:40000], encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def ours(smol, calib_file):
    from lowbit.model.imatrix import compute_imatrix

    return compute_imatrix(smol, calib_file.read_text(encoding="utf-8"), n_ctx=512, max_chunks=4,
                           dataset="calib.txt", progress=False)


def test_values_are_mean_squared_inputs(smol, ours, calib_file):
    """blk.0's attention projections see input_layernorm(embeddings): check against that directly."""
    from lowbit.model.imatrix import imatrix_chunks

    chunks = imatrix_chunks(smol, calib_file.read_text(encoding="utf-8"), 512, 4)
    m = smol.model.model
    with torch.inference_mode():
        x = m.layers[0].input_layernorm(m.embed_tokens(chunks)).double()
    ref = (x * x).reshape(-1, x.shape[-1]).mean(0).numpy()
    v = ours.values()
    for t in ("attn_q", "attn_k", "attn_v"):
        got = v[f"blk.0.{t}.weight"]
        assert np.allclose(got, ref, rtol=1e-5, atol=1e-9), t
    assert ours.chunk_count == 4 and ours.chunk_size == 512
    assert int(ours.entries["blk.0.attn_q.weight"].counts[0]) == 4 * 512
    # every linear layer of every block, and nothing else (no output head by default)
    assert len(v) == 30 * 7 and all(k.startswith("blk.") for k in v)
    assert v["blk.3.ffn_down.weight"].shape == (1536,) and (v["blk.3.ffn_down.weight"] > 0).all()


def test_gguf_file_round_trip_and_layout(ours, tmp_path):
    import gguf

    path = tmp_path / "im.gguf"
    write_imatrix(ours, path)
    r = gguf.GGUFReader(path)
    assert r.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in r.fields
    assert r.fields["imatrix.chunk_size"].contents() == 512 and r.fields["imatrix.chunk_count"].contents() == 4
    assert r.fields["imatrix.datasets"].contents() == ["calib.txt"]
    names = [t.name for t in r.tensors]
    assert names[:3] == ["blk.0.attn_k.weight.in_sum2", "blk.0.attn_k.weight.counts", "blk.0.attn_k.weight.in_sum"]
    back = read_imatrix(path)
    assert back.entries.keys() == ours.entries.keys()
    for k, e in ours.entries.items():
        assert np.array_equal(back.entries[k].sum2, e.sum2) and np.array_equal(back.entries[k].counts, e.counts)
        assert np.array_equal(back.entries[k].sums, e.sums)
    assert all(np.array_equal(back.values()[k], v) for k, v in ours.values().items())


def test_legacy_dat_round_trip(ours, tmp_path):
    path = tmp_path / "im.dat"
    write_imatrix(ours, path)
    back = read_imatrix(path)
    assert back.chunk_count == 4 and back.datasets == ["calib.txt"]
    for k, v in ours.values().items():  # stored as mean * ncall, read back / ncall: float rounding only
        assert np.allclose(back.values()[k], v, rtol=1e-6, atol=0), k
    # written again unchanged
    write_imatrix(back, tmp_path / "again.dat")
    assert (tmp_path / "again.dat").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_reads_llama_imatrix_files(fmt, smol_path, calib_file, ours, tmp_path):
    """llama.cpp's llama-imatrix on the same model and text: lowbit reads its file, and the statistics
    agree with lowbit's own to within llama.cpp's arithmetic (its CPU matmuls round activations to
    8 bits, which perturbs the inputs of later layers slightly)."""
    out = tmp_path / f"llama.{fmt}"
    cmd = [str(llama_tool("llama-imatrix")), "-m", str(smol_path), "-f", str(calib_file), "-o", str(out),
           "-c", "512", "--chunks", "4", "-t", "2", "--no-ppl", "--output-format", fmt]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and out.is_file(), r.stderr[-2000:]
    theirs = read_imatrix(out)
    assert theirs.entries.keys() == ours.entries.keys()
    if fmt == "gguf":
        assert theirs.chunk_size == 512 and theirs.chunk_count == 4
        assert all(int(e.counts[0]) == 4 * 512 for e in theirs.entries.values())
    tv, ov = theirs.values(), ours.values()
    rel = {k: float(np.abs(tv[k] - ov[k]).sum() / np.abs(ov[k]).sum()) for k in ov}
    worst = max(rel, key=rel.get)  # type: ignore[arg-type]
    assert rel[worst] < 0.03, (worst, rel[worst])
    assert np.median(list(rel.values())) < 0.01
    # layer 0's inputs do not depend on any quantized matmul: there the two agree closely
    assert rel["blk.0.attn_q.weight"] < 1e-3


def test_llama_quantize_reads_lowbit_file(smol_path, ours, tmp_path):
    """llama-quantize --imatrix with lowbit's GGUF imatrix writes the same tensors as lowbit given it."""
    import gguf

    from lowbit.io.gguf_out import write_gguf

    im = tmp_path / "lowbit.imatrix.gguf"
    write_imatrix(ours, im)
    ref = tmp_path / "llama.gguf"
    cmd = [str(llama_tool("llama-quantize")), "--allow-requantize", "--imatrix", str(im), str(smol_path), str(ref),
           "Q4_K_M", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    mine = tmp_path / "lowbit.gguf"
    write_gguf(smol_path, mine, "q4_k_m", progress=False, imatrix=read_imatrix(im).values())
    a = {t.name: t for t in gguf.GGUFReader(mine).tensors}
    b = {t.name: t for t in gguf.GGUFReader(ref).tensors}
    assert a.keys() == b.keys()
    for n in b:
        assert a[n].tensor_type == b[n].tensor_type and np.array_equal(a[n].data, b[n].data), n


def test_bad_imatrix_files_are_refused(tmp_path):
    with pytest.raises(LowbitError, match="not found"):
        read_imatrix(tmp_path / "nope.gguf")
    # one entry "abcde" with 4 values of which only 2 are there
    (tmp_path / "short.dat").write_bytes(struct.pack("<ii5sii2f", 1, 5, b"abcde", 1, 4, 1.0, 2.0))
    with pytest.raises(LowbitError, match="short.dat: not a valid importance matrix file: truncated"):
        read_imatrix(tmp_path / "short.dat")
    bad = Imatrix({"blk.0.attn_q.weight": ImatrixEntry(np.array([[1.0, np.nan]], np.float32), np.array([3], np.float32))})
    write_imatrix(bad, tmp_path / "nan.gguf")
    with pytest.raises(LowbitError, match="NaN, Inf or negative"):
        read_imatrix(tmp_path / "nan.gguf")
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(LowbitError, match="model.gguf: not a valid importance matrix file"):
        read_imatrix(tmp_path / "model.gguf")
