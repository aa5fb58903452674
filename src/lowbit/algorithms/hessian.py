"""Input statistics of a linear layer, gathered from calibration activations.

For inputs ``X`` (tokens x columns) a linear layer's output error for a weight change ``dW`` is
``||X dW^T||^2 = tr(dW H dW^T)`` with ``H = X^T X``: GPTQ, SpQR and QuIP minimise it, AWQ uses it
to score candidate scales, and its diagonal over the token count is llama.cpp's importance matrix.
:class:`InputStats` accumulates ``H`` (float64), the mean absolute activation per column (AWQ's
activation statistic) and the token count, one batch at a time, so activations are never kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class InputStats:
    """Running ``X^T X``, ``sum |X|`` and token count of one layer's inputs."""

    def __init__(self, cols: int, device: torch.device | str = "cpu", hessian: bool = True) -> None:
        self.cols = cols
        self.h: torch.Tensor | None = torch.zeros(cols, cols, dtype=torch.float64, device=device) if hessian else None
        self.abs_sum = torch.zeros(cols, dtype=torch.float64, device=device)
        self.sq_sum = torch.zeros(cols, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[-1] != self.cols:
            raise ValueError(f"input has {x.shape[-1]} columns, expected {self.cols}")
        xf = x.to(torch.float32)
        if self.h is not None:
            self.h += (xf.t() @ xf).to(torch.float64)  # products in float32, sums across batches in float64
        self.abs_sum += xf.abs().sum(0, dtype=torch.float64)
        self.sq_sum += (xf * xf).sum(0, dtype=torch.float64)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """``X^T X / tokens`` (float64)."""
        if self.h is None:
            raise ValueError("this collector does not keep the Hessian")
        return self.h / max(1, self.tokens)

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(1, self.tokens)).to(torch.float32)

    def mean_sq(self) -> torch.Tensor:
        """Mean squared activation per column: the importance matrix entry."""
        return (self.sq_sum / max(1, self.tokens)).to(torch.float32)


def relative_output_error(w: torch.Tensor, h: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """``dq -> tr(dW H dW^T) / tr(W H W^T)`` with ``dW = dq - w``: the output error per token that a
    quantized weight ``dq`` causes on inputs of Hessian ``h``, relative to the output's own size.
    Products in float32, sums in float64 (a diagnostic: for a 4096 x 11008 layer float64 products
    took longer than GPTQ itself)."""
    w32, h32 = w.to(torch.float32), h.to(torch.float32)
    den = float(((w32 @ h32) * w32).sum(dtype=torch.float64)) or 1.0

    def rel(dq: torch.Tensor) -> float:
        dw = dq.to(torch.float32) - w32
        return float(((dw @ h32) * dw).sum(dtype=torch.float64)) / den

    return rel
