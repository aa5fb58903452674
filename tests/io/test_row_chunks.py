"""GGUF writing quantizes each tensor in chunks of whole rows (bounded memory); the bytes must be those
of the whole tensor quantized at once, for every GGUF type in the registry, with and without an
importance matrix, and for a real file read from disk chunk by chunk."""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import pytest

from lowbit.formats import get_format
from lowbit.io.gguf_out import HALF_FIELDS, dequantize_raw, finite_rows, write_gguf, write_tensors
from lowbit.model.gguf_file import GGUFFile
from lowbit.model.gguf_mix import ModelInfo, gguf_types
from lowbit.model.load import resolve_model_path
from lowbit.testing.synthetic import importance_like

NAME = "blk.0.ffn_down.weight"
ROWS, COLS = 37, 512  # chunks of 8 rows: four full chunks and a short last one


def _write(tmp_path, tag: str, fmt: str, w: np.ndarray, imatrix: dict | None, chunk_values: int) -> bytes:
    out = tmp_path / f"{tag}.gguf"
    rep = write_tensors(out, "llama", None, [(NAME, w.shape)], lambda n: w, "q8_0", ModelInfo("llama", 1), "test",
                        progress=False, imatrix=imatrix, types={NAME: fmt}, measure_error=True,
                        chunk_values=chunk_values)
    assert rep.tensors[0].rel_error is not None and np.isfinite(rep.tensors[0].rel_error)
    return bytes(GGUFFile(out).raw(NAME).reshape(-1)), rep.tensors[0].rel_error


@pytest.mark.parametrize("fmt", gguf_types())
def test_row_chunks_give_the_bytes_of_the_whole_tensor(tmp_path, fmt):
    rng = np.random.default_rng(zlib.crc32(fmt.encode()))
    w = (rng.standard_normal((ROWS, COLS)) * 0.05).astype(np.float32)
    w[3, :256] = 0.0  # an all-zero block inside a chunk
    w[20, 7] = 3.0  # an outlier
    f = get_format(fmt)
    im = {NAME: importance_like(COLS, seed=1)} if f.uses_imatrix else None
    whole, err_whole = _write(tmp_path, "whole", fmt, w, im, ROWS * COLS)
    chunked, err_chunked = _write(tmp_path, "chunked", fmt, w, im, 8 * COLS)
    assert chunked == whole
    assert err_chunked == pytest.approx(err_whole, rel=1e-9)
    if f.uses_imatrix and not f.requires_imatrix:
        assert _write(tmp_path, "plain-c", fmt, w, None, 8 * COLS)[0] == _write(tmp_path, "plain-w", fmt, w, None,
                                                                                 ROWS * COLS)[0]


def test_a_file_read_in_row_chunks_is_the_file_read_whole(tmp_path):
    """write_gguf reads each source tensor chunk by chunk from the memory-mapped file; a small chunk
    (every tensor split, token_embd into thousands of uneven pieces) writes the file one chunk per
    tensor writes."""
    src = resolve_model_path("smollm2")
    digests = []
    for values in (1 << 30, 3 * 576 + 5):
        out = tmp_path / f"q4_k_m-{values}.gguf"
        write_gguf(src, out, "q4_k_m", progress=False, chunk_values=values)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


@pytest.mark.parametrize("tname", sorted(HALF_FIELDS))
def test_finite_rows_from_the_scales_agree_with_dequantization(tname):
    """Random bytes (about 1 in 32 float16 fields is then Inf or NaN): a row is finite by its
    scales exactly when all its dequantized values are."""
    import gguf

    qtype = gguf.GGMLQuantizationType[tname]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(zlib.crc32(tname.encode()))
    data = rng.integers(0, 256, size=(400, 2 * size), dtype=np.uint8)  # 400 rows of two blocks
    ok = finite_rows(int(qtype), data)
    values = dequantize_raw(int(qtype), data).reshape(400, 2 * block)
    assert ok is not None and 10 < int((~ok).sum()) < 390
    np.testing.assert_array_equal(ok, np.isfinite(values).all(axis=1))


def test_a_copied_tensor_with_a_nan_scale_is_refused(tmp_path):
    import gguf

    from lowbit.errors import FormatError

    src = resolve_model_path("smollm2")
    gf = GGUFFile(src)
    name = next(n for n, t in gf.tensors.items() if gguf.GGMLQuantizationType(t.type).name == "Q4_1")
    bad = tmp_path / "bad.gguf"
    data = bytearray(src.read_bytes())
    off = gf.tensors[name].offset + 5 * 20  # the 6th block's scale
    data[off : off + 2] = np.array([np.nan], np.float16).tobytes()
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=f"{name} has NaN or Inf values in 1 rows"):
        write_gguf(bad, tmp_path / "out.gguf", "q4_1", progress=False)
    assert not (tmp_path / "out.gguf").exists()
