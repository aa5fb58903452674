"""AWQ (Lin et al., 2023): activation-aware scaling.

Input channels that see large activations matter more.  AWQ multiplies those weight columns by
``s`` before quantization (so they get relatively finer steps) and divides the layer's inputs by
``s`` (folded into the preceding norm or linear layer, so it costs nothing at run time):
``W x = (W diag(s)) (x / s)``.  The scales are ``s = mean|x|^a / mean|w|^(1-a)`` (normalised),
with ``a`` searched on a grid; then each group's clipping range is searched.

Both searches score a candidate by the output error it causes on the calibration inputs,
``tr(dW H dW^T)`` with ``H = X^T X / n`` (:mod:`lowbit.algorithms.hessian`): exactly the squared
error of the layer's outputs over the calibration tokens, without keeping the tokens.  (AutoAWQ
scores the output of the whole attention or MLP block instead; for the linear layers themselves
the two agree.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.base import Format
from lowbit.formats.integer import IntFormat


@dataclass
class AWQConfig:
    n_grid: int = 20
    #: also divide by the weights' mean magnitude (AutoAWQ's duo scaling)
    duo_scaling: bool = True
    clip: bool = True
    max_shrink: float = 0.5
    n_clip_grid: int = 20


def _err(dw: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return ((dw @ h) * dw).sum()


def _w_mean(ws: list[torch.Tensor], group: int) -> torch.Tensor:
    """Per input column, the mean over output rows of |w| relative to its group's max (AutoAWQ)."""
    w = torch.cat(ws, 0).abs()
    rows, cols = w.shape
    g = group if 0 < group and cols % group == 0 else cols
    wg = w.reshape(rows, cols // g, g)
    wg = wg / wg.amax(dim=2, keepdim=True).clamp_min(1e-12)
    return wg.reshape(rows, cols).mean(0)


def search_scales(ws: list[torch.Tensor], fmts: list[Format], x_mean_abs: torch.Tensor, h: torch.Tensor,
                  cfg: AWQConfig | None = None) -> tuple[torch.Tensor, float, float, float]:
    """Scales ``s`` [cols] for the linear layers ``ws`` that share the inputs described by their mean
    absolute value per column and Hessian ``h``.  Returns (s, best alpha, loss with s, loss without)."""
    cfg = cfg or AWQConfig()
    h = h.to(torch.float32)
    x_mean = x_mean_abs.to(torch.float32).clamp_min(1e-8)
    w_mean = _w_mean(ws, max(f.scale_group for f in fmts)).clamp_min(1e-8)
    imatrix = torch.diagonal(h).clamp_min(0)

    def loss(s: torch.Tensor | None) -> float:
        total = 0.0
        for w, f in zip(ws, fmts, strict=True):
            if s is None:
                dq = f.dequantize(f.quantize(w, imatrix=imatrix))
            else:
                dq = f.dequantize(f.quantize(w * s, imatrix=imatrix / (s * s))) / s
            total += float(_err(dq - w, h))
        return total

    base = loss(None)
    best, best_s, best_a = base, torch.ones_like(x_mean), 0.0
    for i in range(cfg.n_grid):
        a = i / cfg.n_grid
        s = x_mean.pow(a) / w_mean.pow(1 - a) if cfg.duo_scaling else x_mean.pow(a)
        s = s.clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        cur = loss(s)
        if cur < best:
            best, best_s, best_a = cur, s, a
    return best_s, best_a, best, base


def search_clip(w: torch.Tensor, fmt: IntFormat, h: torch.Tensor, cfg: AWQConfig | None = None) -> torch.Tensor:
    """Per group, the shrink ratio of the range (``[rows, groups]``) that minimises the group's share of
    the output error ``dW_g H_gg dW_g^T`` (the diagonal block of H for the group's columns)."""
    cfg = cfg or AWQConfig()
    h = h.to(torch.float32)
    rows, cols = w.shape
    segs = fmt.segments(cols)
    ngr = fmt.groups_per_row(cols)
    best = torch.full((rows, ngr), float("inf"), device=w.device)
    ratio = torch.ones(rows, ngr, device=w.device)
    steps = int(cfg.max_shrink * cfg.n_clip_grid)
    for i in range(steps):
        r = 1.0 - i / cfg.n_clip_grid
        dq = fmt.dequantize(fmt.quantize_clipped(w, torch.full((rows, ngr), r, device=w.device)))
        dw = dq - w
        errs = []
        for a, b, gs in segs:
            n = (b - a) // gs
            d = dw[:, a:b].reshape(rows, n, gs)
            hb = torch.stack([h[a + k * gs : a + (k + 1) * gs, a + k * gs : a + (k + 1) * gs] for k in range(n)])
            errs.append(torch.einsum("rgi,gij,rgj->rg", d, hb, d))
        e = torch.cat(errs, 1)
        take = e < best
        best = torch.where(take, e, best)
        ratio = torch.where(take, torch.full_like(ratio, r), ratio)
    return ratio
