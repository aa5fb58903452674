"""Perplexity and distribution-shift metrics, as llama.cpp's ``llama-perplexity`` computes them.

Method (llama-perplexity, default settings):

* the whole text is tokenized once (with a BOS in front where the model wants one);
* it is cut into ``n_ctx``-token chunks (512), the leftover tail dropped;
* where the model wants a BOS, the first token of each chunk is replaced by BOS;
* each chunk is run from an empty context and only its second half is scored: the logits at
  positions ``n_ctx/2 .. n_ctx-2`` predict the tokens at ``n_ctx/2+1 .. n_ctx-1`` (255 tokens for
  ``n_ctx = 512``);
* PPL = exp(mean negative log-likelihood over all scored tokens).

Against a reference model, for the same scored positions: KL(P_ref || P_q) per token (mean and
99th percentile), the rate at which the top token is the same, and Δp, the change in the
probability of the correct token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from lowbit.eval.data import too_short
from lowbit.model.imatrix import token_windows


def make_chunks(tokens: list[int] | torch.Tensor, n_ctx: int, bos_id: int | None, max_chunks: int | None = None,
                source: str = "the evaluation text") -> torch.Tensor:
    """``[n_chunks, n_ctx]`` token windows; first token replaced by ``bos_id`` when given.  ``source``
    names the text in the error for one too short."""
    chunks = token_windows(tokens, n_ctx, max_chunks, bos_id)
    if len(chunks) < 1:
        raise too_short(source, torch.as_tensor(tokens).numel(), n_ctx)
    return chunks


def scored_slice(n_ctx: int) -> slice:
    """Positions whose logits are scored (each predicts the next token)."""
    return slice(n_ctx // 2, n_ctx - 1)


@dataclass
class Accumulator:
    """Running sums over scored tokens; ``add`` takes the log-probabilities of one chunk."""

    nll: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)
    dp: list[np.ndarray] = field(default_factory=list)

    def add(self, logp: torch.Tensor, targets: torch.Tensor, ref_logp: torch.Tensor | None = None) -> None:
        """``logp``: ``[n, vocab]`` log-softmax of the scored positions; ``targets``: ``[n]``."""
        logp = logp.double()
        nll = -logp.gather(1, targets[:, None]).squeeze(1)
        self.nll.append(nll.numpy())
        if ref_logp is not None:
            ref = ref_logp.double()
            p_ref = ref.exp()
            kld = (p_ref * (ref - logp)).sum(1).clamp_min(0.0)
            self.kld.append(kld.numpy())
            self.same_top.append((ref.argmax(1) == logp.argmax(1)).numpy())
            self.dp.append((logp.gather(1, targets[:, None]).exp() - ref.gather(1, targets[:, None]).exp()).squeeze(1).numpy())

    def result(self) -> dict[str, float]:
        nll = np.concatenate(self.nll)
        n = nll.size
        mean = float(nll.mean())
        out = {
            "tokens": float(n),
            "ppl": math.exp(mean),
            # llama-perplexity's uncertainty: delta method on the mean NLL
            "ppl_err": math.exp(mean) * float(nll.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan"),
            "nll": mean,
        }
        if self.kld:
            kld = np.concatenate(self.kld)
            top = np.concatenate(self.same_top)
            dp = np.concatenate(self.dp)
            out.update(
                kld_mean=float(kld.mean()),
                kld_p99=float(np.percentile(kld, 99)),
                kld_median=float(np.median(kld)),
                same_top=float(top.mean()),
                dp_mean=float(dp.mean()),
                dp_rms=float(np.sqrt((dp**2).mean())),
            )
        return out
