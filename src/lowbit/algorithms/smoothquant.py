"""SmoothQuant's smoothing factors (Xiao et al., 2022).

Activations of LLMs have a few input channels with huge magnitudes, which make per-token (or
per-tensor) activation quantization coarse; weights are easy.  Dividing input channel ``j`` by
``s_j`` and multiplying the matching weight column by ``s_j`` leaves ``X W^T`` unchanged and moves
the difficulty from the activations into the weights:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

with ``alpha`` in [0, 1] (0.5 balances the two).  :func:`search_alpha` picks alpha per group of
layers instead, by the error of the quantized outputs on a sample of calibration inputs.  ``max|W_j|`` is taken over every linear layer
that reads the same input.  The division of the activations is folded into the operation that
produces them (a norm's weight, or the rows of a previous linear layer) by the model layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.errors import LowbitError


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5,
                      eps: float = 1e-5, tie: torch.Tensor | None = None) -> torch.Tensor:
    """Per input channel factors ``s`` (float32) for inputs whose per-channel absmax is ``act_absmax``
    feeding the linear layers with weights ``weights`` (each ``[out, in]``).

    ``tie`` (int64, one entry per input channel) makes channels with the same entry share one
    factor, computed from their joint maxima: the attention output under grouped-query attention,
    whose channels of the query heads that share a value head can only be scaled together."""
    if not 0.0 <= alpha <= 1.0:
        raise LowbitError(f"SmoothQuant alpha must lie in [0, 1], not {alpha}")
    a = act_absmax.to(torch.float32).clamp(min=eps)
    w = torch.stack([x.detach().abs().amax(dim=0).to(torch.float32) for x in weights]).amax(dim=0).clamp(min=eps)
    if a.shape != w.shape:
        raise LowbitError(f"SmoothQuant: {a.numel()} activation channels but weights with {w.numel()} input columns")
    if tie is not None:
        n = int(tie.max()) + 1
        a = torch.zeros(n, dtype=a.dtype).scatter_reduce(0, tie, a, "amax", include_self=False)
        w = torch.zeros(n, dtype=w.dtype).scatter_reduce(0, tie, w, "amax", include_self=False)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    # channels never active (or all-zero weight columns) keep their scale
    s = torch.where((a <= eps) | (w <= eps), torch.ones_like(s), s).clamp(min=eps)
    return s if tie is None else s[tie]


def search_alpha(x: torch.Tensor, act_absmax: torch.Tensor, weights: list[torch.Tensor],
                 act_fq: Callable[[torch.Tensor], torch.Tensor], w_fq: Callable[[torch.Tensor], torch.Tensor],
                 grid: int = 20, tie: torch.Tensor | None = None) -> tuple[torch.Tensor, float | None, float, float]:
    """The migration strength that minimises the error of the group's quantized outputs.

    ``x`` is a sample of the group's inputs (``[tokens, in]``), ``act_fq``/``w_fq`` fake-quantize
    activations and weights as the quantized layers will.  For each alpha in ``0, 1/grid, ..., 1``
    (and for no smoothing at all) the loss is ``sum_w ||fq(x / s) fq(w s)^T - x w^T||^2``.
    Returns (factors, best alpha or None when no smoothing wins, its loss, the loss without smoothing)."""
    x = x.to(torch.float32)
    ws = [w.detach().to(torch.float32) for w in weights]
    refs = [x @ w.t() for w in ws]

    def loss(s: torch.Tensor | None) -> float:
        xq = act_fq(x if s is None else x / s)
        total = 0.0
        for w, ref in zip(ws, refs, strict=True):
            wq = w_fq(w if s is None else w * s)
            total += float(((xq @ wq.t() - ref) ** 2).sum())
        return total

    base = loss(None)
    best, best_s, best_a = base, torch.ones(x.shape[1], dtype=torch.float32), None
    for i in range(grid + 1):
        a = i / grid
        s = smoothing_factors(act_absmax, ws, a, tie=tie)
        cur = loss(s)
        if cur < best:
            best, best_s, best_a = cur, s, a
    return best_s, best_a, best, base
