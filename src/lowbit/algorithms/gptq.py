"""GPTQ (Frantar et al., 2022): quantize a weight matrix column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
inputs, so that the layer's *output* error ``tr(dW H dW^T)`` stays small.

Works with any lowbit format that exposes its grid (:meth:`lowbit.formats.Format.grid`): integer
formats with groups, llama.cpp's legacy, K- and IQ4 types, NF4/FP4.  The format decides the scales
(from the current, error-updated weights of each group when the group is reached, or once from the
original weights with ``static_groups``); GPTQ decides the codes.

* ``act_order``: columns in order of decreasing Hessian diagonal (the most sensitive first); the
  groups stay the contiguous groups of the format (static groups), so the result is stored like any
  other tensor of that format.
* Lazy batch updates: columns are processed in blocks (128); inside a block the update is applied
  column by column, to the rest of the matrix once per block.
* Vector formats (the E8 lattice code book ``e8p``): ``dim`` columns are quantized at once and
  their error pushed on by the block form of the same update (block LDLQ, as QuIP# does).
* Damping: ``damp * mean(diag H)`` is added to the diagonal; if the Cholesky factorization still
  fails, the damping is doubled and the factorization retried.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.algorithms.hessian import relative_output_error
from lowbit.errors import FormatError, LowbitError
from lowbit.formats.base import Format, Grid, QTensor


@dataclass
class GPTQConfig:
    block_size: int = 128
    damp: float = 0.01
    #: on by default: on SmolLM2 at 3 and 4 bits GPTQ without it gains far less over round-to-nearest
    act_order: bool = True
    static_groups: bool = False
    #: pass the Hessian diagonal to formats whose scale search takes an importance matrix
    use_imatrix: bool = True
    max_damp: float = 10.0


@dataclass
class GPTQResult:
    qtensor: QTensor
    damp: float  # the damping that let the factorization succeed
    error: float  # tr(dW H dW^T) / tr(W H W^T): relative output error
    rtn_error: float  # the same for round-to-nearest with the same format


def _take(g: Grid, idx: torch.Tensor) -> Grid:
    def t(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[:, idx]

    return Grid(g.scale[:, idx], t(g.zero), t(g.offset), g.qmin, g.qmax, g.levels)


def inverse_hessian_factor(h: torch.Tensor, damp: float, max_damp: float = 10.0) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp*mean(diag H)*I)^-1`` (float64), doubling ``damp`` until
    the factorization succeeds.  Returns the factor and the damping used."""
    h = h.to(torch.float64)
    mean_diag = float(torch.diagonal(h).mean())
    if not mean_diag > 0:
        mean_diag = 1.0
    d = damp
    while True:
        # at most three n x n float64 matrices alive at once (h, and two of hd/chol/hinv/u)
        hd = h.clone()
        hd.diagonal().add_(d * mean_diag)
        chol, info = torch.linalg.cholesky_ex(hd)
        del hd
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            del chol
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                return u, d
        else:
            del chol
        if d >= max_damp:
            raise LowbitError(f"the Hessian stays singular even with damping {d:g}; the calibration data "
                              "may be too small for this layer")
        d = d * 2 if d > 0 else 1e-4


def run_columns(W: torch.Tensor, hinv: torch.Tensor, block: int, group: int,
                start_group: Callable[[int, torch.Tensor], None] | None,
                quantize_column: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
    """GPTQ's column loop, in place on ``W`` [rows, cols] with ``hinv`` the upper Cholesky factor of
    the inverse Hessian.  Columns go in order, in blocks of ``block`` (a multiple of ``group``): each
    column's value is ``quantize_column(col, w[:, col:col+1])``, its error, scaled by the factor's
    diagonal, is subtracted from the block's later columns at once and from the columns after the
    block once per block (lazy batch updates).  Where ``group`` > 0, ``start_group(col, w)`` sees the
    current (error-updated) columns of each group before the first of them is quantized."""
    run_vector_columns(W, hinv, block, 1, quantize_column, start_group, group)


def run_vector_columns(W: torch.Tensor, hinv: torch.Tensor, block: int, dim: int,
                       quantize_vectors: Callable[[int, torch.Tensor], torch.Tensor],
                       start_group: Callable[[int, torch.Tensor], None] | None = None, group: int = 0) -> None:
    """Block LDLQ (QuIP#), GPTQ's loop generalised to vector formats: in place on ``W``, ``dim``
    columns at a time, each run of ``dim`` weights of a row quantized jointly by
    ``quantize_vectors(col, x)`` (``x`` = ``W[:, col:col+dim]``, error-updated).  The slice's error
    ``e`` is pushed onto the later columns as ``e U_bb^-1 U_b,rest`` with ``U`` the upper Cholesky
    factor of the inverse Hessian (the optimal update of the not yet quantized weights given the
    slice's error); lazily, once per ``block`` columns, for the columns after the block.  ``dim`` = 1
    is GPTQ (:func:`run_columns`)."""
    cols = W.shape[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        for j in range(0, i2 - i1, dim):
            col = i1 + j
            if start_group is not None and col % group == 0:
                start_group(col, W1[:, j : j + min(group, cols - col)])
            x = W1[:, j : j + dim]
            diff = x - quantize_vectors(col, x)
            if dim == 1:
                err = diff / Hinv1[j, j]
                W1[:, j:] -= err * Hinv1[j : j + 1, j:]
            else:
                err = torch.linalg.solve_triangular(Hinv1[j : j + dim, j : j + dim], diff, upper=True, left=False)
                W1[:, j:] -= err @ Hinv1[j : j + dim, j:]
            Err1[:, j : j + dim] = err
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]


def _gptq_vectors(w0: torch.Tensor, h: torch.Tensor, W: torch.Tensor, fmt: Format, cfg: GPTQConfig,
                  dead: torch.Tensor, name: str) -> GPTQResult:
    """GPTQ for a vector format: scales from plain rounding of the whole weight, codes by block
    LDLQ in the natural column order (a vector's columns must stay together, so no act-order)."""
    rows, cols = W.shape
    dim = fmt.vector_dim
    template = fmt.quantize(W, name=name)
    grid = fmt.vector_grid(template)
    u, damp = inverse_hessian_factor(h, cfg.damp, cfg.max_damp)
    hinv = u.to(torch.float32)
    del u
    codes = torch.empty(rows, cols // dim, grid.scale.shape[1], dtype=torch.int64, device=W.device)

    def quantize_vectors(col: int, x: torch.Tensor) -> torch.Tensor:
        c = grid.nearest(x)
        codes[:, col // dim : col // dim + c.shape[1]] = c
        return grid.values(c)

    block = dim * max(1, -(-cfg.block_size // dim))
    run_vector_columns(W, hinv, block, dim, quantize_vectors)
    qt = fmt.with_codes(template, codes)
    qt.meta["gptq_damp"] = damp
    rel = relative_output_error(w0, h)
    rtn_q = template if not bool(dead.any()) else fmt.quantize(w0, name=name)
    return GPTQResult(qt, damp, rel(fmt.dequantize(qt)), rel(fmt.dequantize(rtn_q)))


def _group_layout(fmt: Format, cols: int, static: bool) -> int:
    """Columns per scale group (0: scales fixed for the whole row before the first column)."""
    g = fmt.scale_group
    if static or g <= 0 or g >= cols:
        return 0
    return g


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, fmt: Format, cfg: GPTQConfig | None = None,
                  name: str = "tensor") -> GPTQResult:
    """GPTQ for one weight ``w`` [rows, cols] with input Hessian ``h`` [cols, cols] (``X^T X / n``)."""
    cfg = cfg or GPTQConfig()
    if not fmt.calibratable:
        raise FormatError(f"{name}: GPTQ needs a format that exposes its grid; {fmt.name} does not")
    w0 = fmt.check(w, name)
    rows, cols = w0.shape
    if h.shape != (cols, cols):
        raise ValueError(f"{name}: Hessian of shape {tuple(h.shape)} for a weight with {cols} columns")
    dev = w0.device
    h = h.to(dev, torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    W = w0.clone()
    W[:, dead] = 0.0
    if fmt.vector_dim:
        return _gptq_vectors(w0, h, W, fmt, cfg, dead, name)
    imatrix = torch.diagonal(h).to(torch.float32).clamp_min(0) if (cfg.use_imatrix and fmt.uses_imatrix) else None

    def rtn(x: torch.Tensor, cols_sl: slice) -> QTensor:
        return fmt.quantize(x, name=name, imatrix=None if imatrix is None else imatrix[cols_sl])

    static = cfg.static_groups or cfg.act_order
    group = _group_layout(fmt, cols, static)
    if group and not fmt.joinable:
        group = 0  # this format cannot be assembled from column slices: scales from the original weights
    template = rtn(W, slice(None)) if not group else None
    rtn_full = template  # plain rounding of the whole weight, when it was needed for the grid
    full_grid = fmt.grid(template) if template is not None else None

    perm = torch.argsort(torch.diagonal(h), descending=True) if cfg.act_order else None
    if perm is not None:
        W = W[:, perm]
        h = h[perm][:, perm]
        assert full_grid is not None
        full_grid = _take(full_grid, perm)
    u, damp = inverse_hessian_factor(h, cfg.damp, cfg.max_damp)
    hinv = u.to(torch.float32)
    del u

    block = cfg.block_size
    if group:
        block = group * max(1, -(-cfg.block_size // group))  # a whole number of groups per block
    codes = torch.empty(rows, cols, dtype=torch.int64, device=dev)
    pieces: list[QTensor] = []
    state: dict[str, object] = {"grid": full_grid, "g0": 0}

    def start_group(col: int, cur: torch.Tensor) -> None:
        piece = rtn(cur, slice(col, col + cur.shape[1]))
        pieces.append(piece)
        state["grid"], state["g0"] = fmt.grid(piece), col

    def quantize_column(col: int, x: torch.Tensor) -> torch.Tensor:
        gcol = state["grid"][col - state["g0"]]  # type: ignore[index,operator]
        q = gcol.nearest(x)
        codes[:, col] = q[:, 0]
        return gcol.values(q)

    run_columns(W, hinv, block, group, start_group if group else None, quantize_column)

    if perm is not None:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(cols, device=dev)
        codes = codes[:, inv]
    if template is None:
        template = fmt.join_columns(pieces)
    qt = fmt.with_codes(template, codes)
    qt.meta["gptq_damp"] = damp
    # relative output error of GPTQ and of plain rounding, on the undamped Hessian (original order)
    hh = h.to(torch.float32)
    del h
    if perm is not None:
        hh = hh[inv][:, inv]
    rel = relative_output_error(w0, hh)
    # plain rounding of the original weights: the template already is that when no column was dead
    rtn_q = rtn_full if (rtn_full is not None and not bool(dead.any())) else rtn(w0, slice(None))
    rtn_err = rel(fmt.dequantize(rtn_q))
    return GPTQResult(qt, damp, rel(fmt.dequantize(qt)), rtn_err)
