"""Run a model over evaluation chunks and score it, optionally against a reference model.

The reference (original) model's log-probabilities at the scored positions are computed once and
kept in a memory-mapped float32 file (about 50 MB per 512-token chunk for a 49k vocabulary), so
any number of quantized variants can be compared with it one after another.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval.metrics import Accumulator, make_chunks, scored_slice
from lowbit.model.load import LoadedModel

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def tokenize(loaded: LoadedModel, text: str) -> list[int]:
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    if loaded.add_bos and loaded.bos_id is not None:
        ids = [loaded.bos_id, *ids]
    return list(ids)


def torch_logits_fn(model: torch.nn.Module, n_ctx: int) -> LogitsFn:
    """Logits of the scored positions of one chunk from a transformers model."""
    keep = n_ctx - n_ctx // 2  # the last n_ctx/2 positions; the very last one is dropped below
    dev = next(model.parameters()).device

    @torch.inference_mode()
    def fn(chunk: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=chunk[None].to(dev), use_cache=False, logits_to_keep=keep).logits[0]
        return out[:-1].float().cpu()

    return fn


class Evaluation:
    """Chunks of a text for one tokenizer, and the reference log-probabilities once computed."""

    def __init__(self, loaded: LoadedModel, text: str, n_ctx: int = 512, max_chunks: int | None = None,
                 progress: bool = True, workdir: Path | None = None, source: str = "the evaluation text") -> None:
        if n_ctx < 4:
            raise LowbitError(f"evaluation contexts of {n_ctx} tokens: give at least 4")
        if max_chunks is not None and max_chunks < 1:
            raise LowbitError(f"{max_chunks} evaluation chunks: give at least 1")
        self.n_ctx = n_ctx
        self.progress = progress
        bos = loaded.bos_id if loaded.add_bos else None
        self.chunks = make_chunks(tokenize(loaded, text), n_ctx, bos, max_chunks, source)
        self._tmp = tempfile.TemporaryDirectory(prefix="lowbit-ref-", dir=workdir)
        self.ref: np.ndarray | None = None

    @property
    def n_scored(self) -> int:
        sl = scored_slice(self.n_ctx)
        return len(range(*sl.indices(self.n_ctx)))

    def targets(self, i: int) -> torch.Tensor:
        sl = scored_slice(self.n_ctx)
        return self.chunks[i, sl.start + 1 : sl.stop + 1]

    def run(self, logits_fn: LogitsFn, label: str, as_reference: bool = False) -> dict[str, float]:
        """Score ``logits_fn`` on every chunk; with ``as_reference`` keep its log-probs for later runs."""
        acc = Accumulator()
        t0 = time.perf_counter()
        bar = tqdm(range(len(self.chunks)), desc=f"eval {label}", unit="chunk", disable=not self.progress, leave=False)
        for i in bar:
            logp = torch.log_softmax(logits_fn(self.chunks[i]).double(), dim=-1)
            if not torch.isfinite(logp).all():
                raise FloatingPointError(f"{label}: non-finite logits in chunk {i}")
            if as_reference:
                if self.ref is None:
                    shape = (len(self.chunks), self.n_scored, logp.shape[-1])
                    self.ref = np.lib.format.open_memmap(Path(self._tmp.name) / "ref.npy", mode="w+", dtype=np.float32, shape=shape)
                self.ref[i] = logp.float().numpy()
                acc.add(logp, self.targets(i))
            else:
                ref = None if self.ref is None else torch.from_numpy(np.asarray(self.ref[i]))
                acc.add(logp, self.targets(i), ref)
            if len(acc.nll) and i % 4 == 3:
                bar.set_postfix(ppl=f"{np.exp(np.concatenate(acc.nll).mean()):.3f}")
        res = acc.result()
        res["eval_seconds"] = time.perf_counter() - t0
        res["chunks"] = float(len(self.chunks))
        return res

    def close(self) -> None:
        self.ref = None
        self._tmp.cleanup()
