"""SmoothQuant's smoothing factors (Xiao et al., 2022).

Activations of LLMs have a few input channels with huge magnitudes, which make per-token (or
per-tensor) activation quantization coarse; weights are easy.  Dividing input channel ``j`` by
``s_j`` and multiplying the matching weight column by ``s_j`` leaves ``X W^T`` unchanged and moves
the difficulty from the activations into the weights:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

with ``alpha`` in [0, 1] (0.5 balances the two).  ``max|W_j|`` is taken over every linear layer
that reads the same input.  The division of the activations is folded into the operation that
produces them (a norm's weight, or the rows of a previous linear layer) by the model layer.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5,
                      eps: float = 1e-5) -> torch.Tensor:
    """Per input channel factors ``s`` (float32) for inputs whose per-channel absmax is ``act_absmax``
    feeding the linear layers with weights ``weights`` (each ``[out, in]``)."""
    if not 0.0 <= alpha <= 1.0:
        raise LowbitError(f"SmoothQuant alpha must lie in [0, 1], not {alpha}")
    a = act_absmax.to(torch.float32).clamp(min=eps)
    w = torch.stack([x.detach().abs().amax(dim=0).to(torch.float32) for x in weights]).amax(dim=0).clamp(min=eps)
    if a.shape != w.shape:
        raise LowbitError(f"SmoothQuant: {a.numel()} activation channels but weights with {w.numel()} input columns")
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    # channels never active (or all-zero weight columns) keep their scale
    s = torch.where((act_absmax <= eps) | (w <= eps), torch.ones_like(s), s)
    return s.clamp(min=eps)
