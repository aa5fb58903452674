"""Compute a model's importance matrix from calibration text, as llama-imatrix does.

The text is tokenized once, cut into chunks of ``n_ctx`` tokens (the leftover tail is dropped), and
where the model wants a BOS token the first token of every chunk is replaced by it.  Every linear
layer inside the transformer blocks is hooked (the output head is not, as llama-imatrix's default);
entries are named by GGUF tensor names so the file works with llama-quantize and with lowbit.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.model.gguf_mix import gguf_name
from lowbit.model.imatrix_collect import Imatrix, ImatrixCollector, run_chunks
from lowbit.model.load import LoadedModel


def token_windows(tokens: list[int] | torch.Tensor, n_ctx: int, max_chunks: int | None = None,
                  bos_id: int | None = None) -> torch.Tensor:
    """``[n, n_ctx]`` consecutive windows of ``tokens`` (at most ``max_chunks``; ``n`` may be 0), the
    first token of each replaced by ``bos_id`` when given: the chunks that calibration and evaluation
    run the model on, as llama.cpp's tools cut them."""
    t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    n = t.numel() // n_ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    chunks = t[: max(n, 0) * n_ctx].reshape(max(n, 0), n_ctx).clone()
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks


def imatrix_chunks(loaded: LoadedModel, text: str, n_ctx: int = 512, max_chunks: int | None = None,
                   source: str = "the calibration text") -> torch.Tensor:
    """Calibration chunks of ``n_ctx`` tokens (at most ``max_chunks``) of ``text``; ``source`` names
    the text in the error for one too short."""
    if n_ctx < 2:
        raise LowbitError(f"calibration chunks of {n_ctx} tokens: give at least 2")
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    if loaded.add_bos and loaded.bos_id is not None:
        ids = [loaded.bos_id, *ids]
    if max_chunks is not None and max_chunks < 1:
        raise LowbitError(f"{max_chunks} calibration chunks: give at least 1")
    chunks = token_windows(ids, n_ctx, max_chunks, loaded.bos_id if loaded.add_bos else None)
    if len(chunks) < 1:
        raise LowbitError(f"{source}: {len(ids)} tokens, fewer than one calibration chunk of {n_ctx} tokens "
                          "(give a longer text or a smaller context)")
    return chunks


def compute_imatrix(loaded: LoadedModel, text: str, n_ctx: int = 512, max_chunks: int | None = None,
                    dataset: str = "calibration", progress: bool = True, source: str = "the calibration text") -> Imatrix:
    """The importance matrix of ``loaded`` over ``text``, keyed by GGUF tensor names."""
    chunks = imatrix_chunks(loaded, text, n_ctx, max_chunks, source)

    def rename(module: str) -> str | None:
        return gguf_name(f"{module}.weight")

    with ImatrixCollector(loaded.model, lambda n: rename(n) is not None and n != "lm_head") as col:
        run_chunks(loaded.model, chunks, len(chunks), progress)
    return col.to_imatrix(rename, chunk_size=n_ctx, chunk_count=len(chunks), datasets=[dataset])
