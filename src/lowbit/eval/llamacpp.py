"""Evaluate a GGUF file with llama.cpp (through llama-cpp-python) on the same chunks.

The token ids are lowbit's (from the model's own tokenizer), fed to llama.cpp unchanged, so a
difference in the scores comes from the arithmetic and not from tokenization.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.eval.runner import LogitsFn
from lowbit.model.gguf_mix import file_type


class LlamaCppModel:
    def __init__(self, path: Path, n_ctx: int = 512, n_threads: int | None = None) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise LowbitError("llama.cpp evaluation needs llama-cpp-python (see the README's install step)") from None
        self.n_ctx = n_ctx
        try:
            self.llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                             n_threads=n_threads or os.cpu_count() or 1, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise LowbitError(f"{path}: llama.cpp could not load this file ({str(exc).strip() or type(exc).__name__})") from None

    def logits_fn(self) -> LogitsFn:
        keep = self.n_ctx - self.n_ctx // 2

        def fn(chunk: torch.Tensor) -> torch.Tensor:
            self.llm.reset()  # eval() then drops the whole KV cache: every chunk starts from an empty context
            self.llm.eval(chunk.tolist())
            scores = np.asarray(self.llm.scores[: self.n_ctx])
            return torch.from_numpy(scores[self.n_ctx - keep : self.n_ctx - 1].copy()).float()

        return fn

    def close(self) -> None:
        self.llm.close()


def llama_quantize(src: Path, dst: Path, ft_name: str, imatrix: dict[str, np.ndarray] | None = None,
                   threads: int | None = None) -> None:
    """Quantize ``src`` to ``dst`` with llama.cpp's own quantizer (llama_model_quantize, the code behind
    llama-quantize), requantizing quantized sources as ``--allow-requantize`` does: the reference that
    lowbit's GGUF output is checked against, byte for byte."""
    import ctypes

    import llama_cpp

    ft = file_type(ft_name)
    if ft is None:
        raise LowbitError(f"{ft_name} is not a llama.cpp file type")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.allow_requantize, p.pure = ft.ftype, True, ft.pure
    p.nthread = threads or os.cpu_count() or 1
    keep = []  # the arrays must outlive the call
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(sorted(imatrix.items())):
            v = np.ascontiguousarray(v, dtype=np.float32)
            keep.append(v)
            arr[i].name, arr[i].size = name.encode(), v.size
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[len(imatrix)].name = None
        p.imatrix = arr
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) != 0:
        raise LowbitError(f"{src}: llama.cpp's quantizer failed for {ft_name}")
