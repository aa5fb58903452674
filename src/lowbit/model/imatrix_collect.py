"""Importance matrices: per weight matrix and input column, the mean squared activation.

:class:`ImatrixCollector` hooks the linear layers of a PyTorch model and accumulates, for each, the
sum of squared inputs per column (and the plain sums and token counts), the statistics llama.cpp's
``llama-imatrix`` gathers.  Like that tool it scores calibration text in chunks of ``n_ctx`` tokens
(each starting with BOS where the model wants one), counts tokens, and skips calls of fewer than
16 tokens.  The sums are accumulated in float64 and stored as float32.

What the quantizers use is ``sum2 / count``: errors on columns that see large activations cost
more.  Files are read and written by :mod:`lowbit.io.imatrix`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class ImatrixEntry:
    """Statistics of one weight matrix (``n_mat`` > 1 only for stacked MoE experts)."""

    sum2: np.ndarray  # [n_mat, cols] float32: sums of squared activations
    counts: np.ndarray  # [n_mat] float32: tokens seen
    sums: np.ndarray | None = None  # [n_mat, cols] float32: sums of activations (GGUF only)

    def mean(self) -> np.ndarray:
        """Mean squared activation per column, flattened over matrices, as llama-quantize computes it
        (a matrix that saw no token gets 1 everywhere)."""
        c = self.counts.astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            m = np.where(c > 0, self.sum2.astype(np.float32) / np.where(c > 0, c, np.float32(1)), np.float32(1))
        return m.astype(np.float32).reshape(-1)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    #: legacy .dat files store means times ncall; kept here so they are written back unchanged
    legacy_ncall: dict[str, int] = field(default_factory=dict)

    def values(self) -> dict[str, np.ndarray]:
        """Tensor name -> importance per input column (what quantizers take)."""
        out = {}
        for name, e in self.entries.items():
            if name in self.legacy_ncall:
                n = self.legacy_ncall[name]
                v = e.sum2.reshape(-1).astype(np.float32)
                out[name] = v / np.float32(n) if n > 0 else v.copy()
            else:
                out[name] = e.mean()
        return out


#: llama-imatrix ignores matrix products over fewer tokens than this
MIN_TOKENS = 16


class ImatrixCollector:
    """Accumulate input statistics of the linear layers whose names ``select`` accepts."""

    def __init__(self, model: nn.Module, select: Callable[[str], bool] | None = None) -> None:
        self.sum2: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._hooks = []
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and (select is None or select(name)):
                self._hooks.append(mod.register_forward_pre_hook(self._hook(name)))
        if not self._hooks:
            raise ValueError("no linear layer matched: nothing to collect")

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def fn(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if x.shape[0] < MIN_TOKENS:
                return
            x64 = x.to(torch.float64)
            s2 = (x64 * x64).sum(0)
            s = x64.sum(0)
            if name in self.sum2:
                self.sum2[name] += s2
                self.sums[name] += s
                self.counts[name] += x.shape[0]
            else:
                self.sum2[name], self.sums[name], self.counts[name] = s2, s, x.shape[0]

        return fn

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> ImatrixCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def means(self) -> dict[str, np.ndarray]:
        """Module name -> mean squared activation per input column (float32)."""
        return {n: (self.sum2[n] / self.counts[n]).to(torch.float32).cpu().numpy() for n in self.sum2}

    def to_imatrix(self, rename: Callable[[str], str | None] = lambda n: n, chunk_size: int = 0,
                   chunk_count: int = 0, datasets: list[str] | None = None) -> Imatrix:
        """The statistics as an :class:`Imatrix`, module names mapped by ``rename`` (None drops one)."""
        im = Imatrix(datasets=list(datasets or []), chunk_count=chunk_count, chunk_size=chunk_size)
        for n in self.sum2:
            key = rename(n)
            if key is None:
                continue
            im.entries[key] = ImatrixEntry(self.sum2[n].to(torch.float32).cpu().numpy()[None],
                                           np.array([self.counts[n]], np.float32),
                                           self.sums[n].to(torch.float32).cpu().numpy()[None])
        return im


def run_chunks(model: nn.Module, chunks: Iterable[torch.Tensor], n_chunks: int | None = None,
               progress: bool = True) -> int:
    """Forward every chunk of token ids through ``model`` (no logits kept); returns chunks run."""
    n = 0
    dev = next(model.parameters()).device
    bar = tqdm(chunks, total=n_chunks, desc="imatrix", unit="chunk", disable=not progress, leave=False)
    with torch.inference_mode():
        for chunk in bar:
            body = getattr(model, "model", None)
            if body is not None:  # skip the output head: llama-imatrix does not collect it by default
                body(input_ids=chunk[None].to(dev), use_cache=False)
            else:
                model(input_ids=chunk[None].to(dev), use_cache=False)
            n += 1
    return n
