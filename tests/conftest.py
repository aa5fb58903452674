from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smol_path() -> Path:
    from lowbit.model.load import resolve_model_path

    return resolve_model_path("smollm2")


@pytest.fixture(scope="session")
def smol_weights(smol_path: Path) -> dict[str, torch.Tensor]:
    """A few real SmolLM2 tensors, dequantized from the bundled GGUF (rows = output features)."""
    import gguf

    reader = gguf.GGUFReader(smol_path)
    want = {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.7.ffn_down.weight", "blk.29.ffn_up.weight", "token_embd.weight"}
    out = {}
    for t in reader.tensors:
        if t.name in want:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            if t.name == "token_embd.weight":
                w = w[:2048]
            out[t.name] = torch.from_numpy(np.ascontiguousarray(w))
    assert len(out) == len(want)
    return out


@pytest.fixture(scope="session")
def smol(smol_path: Path):
    from lowbit.model.load import load_model

    return load_model(smol_path)


class GGML:
    """libggml from llama-cpp-python, called through ctypes: the byte-level reference."""

    def __init__(self) -> None:
        import llama_cpp

        libdir = Path(llama_cpp.__file__).parent / "lib"
        self.lib = ctypes.CDLL(str(libdir / "libggml-base.so"))
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

    def quantize(self, gtype: int, w: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        w = np.ascontiguousarray(w, dtype=np.float32)
        rows, cols = w.shape
        row_bytes = self.lib.ggml_row_size(gtype, cols)
        out = np.zeros((rows, row_bytes), dtype=np.uint8)
        im = None
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
            assert imatrix.shape == (cols,)
            im = imatrix.ctypes.data
        n = self.lib.ggml_quantize_chunk(gtype, w.ctypes.data, out.ctypes.data, 0, rows, cols, im)
        assert n == out.nbytes
        return out


@pytest.fixture(scope="session")
def ggml() -> GGML:
    return GGML()
