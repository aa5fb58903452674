from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))
# without a GPU, lowbit's Triton kernels run (and are tested) on CPU tensors in Triton's interpreter;
# set before triton decorates them
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


@pytest.fixture(scope="module")
def small(smol):
    """SmolLM2 cut to its first 3 decoder layers (real weights, real architecture)."""
    import copy
    import dataclasses

    model = copy.deepcopy(smol.model)
    model.model.layers = model.model.layers[:3]
    model.config.num_hidden_layers = 3
    return dataclasses.replace(smol, model=model)


@pytest.fixture(scope="session")
def llamacpp_vs_torch():
    """``fn(gguf_path, model, chunk) -> (kld, theirs, mine)``: llama.cpp's logits for the scored half
    of ``chunk`` from the file against the torch model's, and the mean KL(llama.cpp || torch)."""
    from lowbit.eval.llamacpp import LlamaCppModel
    from lowbit.eval.runner import torch_logits_fn

    def fn(path, model, chunk):  # type: ignore[no-untyped-def]
        n_ctx = int(chunk.numel())
        llm = LlamaCppModel(path, n_ctx=n_ctx)
        try:
            theirs = llm.logits_fn()(chunk)
        finally:
            llm.close()
        mine = torch_logits_fn(model, n_ctx)(chunk)
        p_theirs, lp_mine = torch.softmax(theirs.double(), -1), torch.log_softmax(mine.double(), -1)
        return float((p_theirs * (torch.log(p_theirs) - lp_mine)).sum(-1).mean()), theirs, mine

    return fn


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

    def dequantize(self, gtype: int, blocks: np.ndarray, n: int) -> np.ndarray:
        """libggml's ``dequantize_row_*`` (the type's ``to_float``) of ``n`` values stored in ``blocks``."""
        class Traits(ctypes.Structure):
            _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                        ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                        ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]

        self.lib.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
        self.lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        traits = self.lib.ggml_get_type_traits(gtype).contents
        assert traits.to_float, f"libggml has no to_float for type {gtype}"
        to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(traits.to_float)
        src = np.ascontiguousarray(blocks, dtype=np.uint8)
        out = np.empty(n, dtype=np.float32)
        to_float(src.ctypes.data, out.ctypes.data, n)
        return out

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


@pytest.fixture(scope="session")
def smol_inputs(smol):
    """Real inputs of two SmolLM2 linear layers (layer 3's q_proj and down_proj) on calibration text,
    split into a part to calibrate on and a held-out part."""
    from lowbit.eval.data import calibration_text
    from lowbit.model.imatrix import imatrix_chunks

    chunks = imatrix_chunks(smol, calibration_text(), n_ctx=512, max_chunks=24)
    layer = smol.model.model.layers[3]
    got: dict[str, list[torch.Tensor]] = {"q": [], "down": []}
    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: got["q"].append(a[0][0].clone())),
             layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: got["down"].append(a[0][0].clone()))]
    with torch.inference_mode():
        for c in chunks:
            smol.model.model(input_ids=c[None], use_cache=False)
    for h in hooks:
        h.remove()
    weights = {"q": layer.self_attn.q_proj.weight.detach().clone(), "down": layer.mlp.down_proj.weight.detach().clone()}
    return {k: (weights[k], torch.cat(v[:20]), torch.cat(v[20:])) for k, v in got.items()}
