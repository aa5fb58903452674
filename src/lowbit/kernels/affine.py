"""A quantized tensor as affine integer groups: ``W[r, c] = scale[r, g] * u[r, c] + base[r, g]``
with integer codes ``u`` in ``[0, levels)`` and ``g = c // group``.

Every format whose grid has integer codes (integer formats, Q4_0..Q8_0, the K-quants' sub-blocks)
can be written this way where its scales are constant over aligned runs of ``group`` columns; the
integer kernels (CPU and GPU) take it.  A row may be cut into column segments of different group
sizes (576 columns of int4-g128: 512 in groups of 128 and 64 in one group of 64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import Format, QTensor
from lowbit.formats.base import FormatError, Grid


@dataclass
class AffineSegment:
    start: int
    end: int
    group: int
    codes: torch.Tensor  # uint8 [rows, end - start]
    scale: torch.Tensor  # float32 [rows, (end - start) // group]
    base: torch.Tensor  # float32 [rows, (end - start) // group]


@dataclass
class AffineGroups:
    rows: int
    cols: int
    levels: int
    segments: list[AffineSegment]


def _constant_over(t: torch.Tensor, group: int) -> bool:
    rows, cols = t.shape
    v = t.reshape(rows, cols // group, group)
    return bool((v == v[:, :, :1]).all())


def _split(u: torch.Tensor, s: torch.Tensor, b: torch.Tensor, start: int, groups: tuple[int, ...]
           ) -> list[AffineSegment] | None:
    cols = s.shape[1]
    for g in groups:
        main = cols - cols % g
        if main == 0 or not (_constant_over(s[:, :main], g) and _constant_over(b[:, :main], g)):
            continue
        seg = AffineSegment(start, start + main, g, u[:, :main].to(torch.uint8),
                            s[:, :main:g].contiguous(), b[:, :main:g].contiguous())
        if main == cols:
            return [seg]
        rest = _split(u[:, main:], s[:, main:], b[:, main:], start + main, tuple(x for x in groups if x < g))
        if rest is not None:
            return [seg, *rest]
    return None


def any_grid(fmt: Format, qt: QTensor) -> Grid | None:
    """The grid of a 2-D ``qt`` whose format has one (integer codes or a code book), or None."""
    if not getattr(fmt, "has_grid", False) or len(qt.shape) != 2:
        return None
    try:
        return fmt.grid(qt)
    except FormatError:
        return None


def integer_grid(fmt: Format, qt: QTensor) -> Grid | None:
    """The grid of a 2-D ``qt`` whose format has integer codes (no code book), or None."""
    grid = any_grid(fmt, qt)
    return None if grid is None or grid.levels is not None else grid


def _rows(grid: Grid, rows: int, r0: int, r1: int) -> Grid:
    """Rows ``r0:r1`` of a grid of ``rows`` rows (fields that broadcast over rows are kept whole)."""

    def cut(t: torch.Tensor | None) -> torch.Tensor | None:
        return t[r0:r1] if t is not None and t.dim() == 2 and t.shape[0] == rows else t

    scale = cut(grid.scale)
    assert scale is not None
    return Grid(scale, cut(grid.zero), cut(grid.offset), grid.qmin, grid.qmax, grid.levels)


def exact_codes(fmt: Format, qt: QTensor, grid: Grid, chunk: int = 1 << 21) -> torch.Tensor | None:
    """The codes (int16) of ``qt`` on ``grid``, or None unless they decode to exactly its
    dequantized weight.  Rows are rounded about ``chunk`` weights at a time, so that a large
    tensor (an output head) needs no full-size temporaries beyond its weight and codes."""
    w = fmt.dequantize(qt).reshape(qt.shape).to(torch.float32)
    rows, cols = w.shape
    step = max(1, chunk // max(cols, 1))
    out = torch.empty(rows, cols, dtype=torch.int16, device=w.device)
    for r0 in range(0, rows, step):
        g = _rows(grid, rows, r0, min(rows, r0 + step))
        codes = g.nearest(w[r0 : r0 + step])
        if not torch.equal(g.values(codes), w[r0 : r0 + step]):
            return None
        out[r0 : r0 + step] = codes
    return out


def affine_groups(fmt: Format, qt: QTensor, max_levels: int = 256,
                  groups: tuple[int, ...] = (256, 128, 64, 32), grid: Grid | None = None) -> AffineGroups | None:
    """``qt`` as affine integer groups of one of ``groups`` columns, or None where its format has no
    integer grid, more than ``max_levels`` codes, or scales that vary inside such groups.  The codes
    are checked to decode to exactly the format's dequantized weight."""
    grid = integer_grid(fmt, qt) if grid is None else grid
    if grid is None or grid.levels is not None or grid.qmax - grid.qmin + 1 > max_levels:
        return None
    levels = grid.qmax - grid.qmin + 1
    codes = exact_codes(fmt, qt, grid)
    if codes is None:
        return None
    scale = grid.scale.to(torch.float32)
    base = scale * (grid.qmin - (grid.zero if grid.zero is not None else 0.0))
    if grid.offset is not None:
        base = base + grid.offset
    base = torch.broadcast_to(base, scale.shape)
    segs = _split((codes - grid.qmin), scale, base, 0, groups)
    if segs is None:
        return None
    return AffineGroups(qt.shape[0], qt.shape[1], levels, segs)


@dataclass
class TableWeight:
    """``W[r, c] = scale[r, g] * table[u[r, c]] + base[r, g]`` with ``g = c // group`` (one group size
    for the whole tensor, a multiple of 16), the form lowbit's compiled CPU kernel takes: 4-bit codes
    (a table of 16 values: the identity for integer grids, or a code book) or 8-bit codes (integer
    grids, the identity table)."""

    rows: int
    cols: int
    group: int
    bits: int
    codes: torch.Tensor  # int64 [rows, cols] in [0, 2**bits)
    table: torch.Tensor  # float32 [2**bits]
    scale: torch.Tensor  # float32 [rows, cols // group]
    base: torch.Tensor  # float32 [rows, cols // group]
    #: the number of integer codes of an integer grid (None: a code book)
    levels: int | None = None


def _one_group(segs: list[AffineSegment]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The segments' scales and bases repeated to the smallest of their group sizes."""
    g0 = min(s.group for s in segs)
    scale = torch.cat([s.scale.repeat_interleave(s.group // g0, dim=1) for s in segs], dim=1)
    base = torch.cat([s.base.repeat_interleave(s.group // g0, dim=1) for s in segs], dim=1)
    return g0, scale.contiguous(), base.contiguous()


def table_weight(fmt: Format, qt: QTensor) -> TableWeight | None:
    """``qt`` as a :class:`TableWeight`, or None where its format has no grid, more than 256 integer
    codes or a code book of more than 16 values, or scales that vary inside runs of 16 columns.  The
    codes are checked to decode to exactly the format's dequantized weight."""
    grid = any_grid(fmt, qt)
    if grid is None:
        return None
    groups = (256, 128, 64, 32, 16)
    if grid.levels is None:
        levels = grid.qmax - grid.qmin + 1
        if levels > 256:
            return None
        ag = affine_groups(fmt, qt, groups=groups, grid=grid)
        if ag is None:
            return None
        g0, scale, base = _one_group(ag.segments)
        u = torch.cat([s.codes for s in ag.segments], dim=1).to(torch.int64)
        if levels <= 16:
            return TableWeight(ag.rows, ag.cols, g0, 4, u, torch.arange(16, dtype=torch.float32, device=u.device), scale,
                               base, levels)
        return TableWeight(ag.rows, ag.cols, g0, 8, u, torch.arange(256, dtype=torch.float32, device=u.device), scale,
                           base, levels)
    book = grid.levels.to(torch.float32).flatten()
    if book.numel() > 16:
        return None
    codes = exact_codes(fmt, qt, grid)
    if codes is None:
        return None
    offset = grid.offset if grid.offset is not None else torch.zeros((), device=book.device)
    base = torch.broadcast_to(offset.to(torch.float32), grid.scale.shape)
    segs = _split(codes, grid.scale.to(torch.float32), base, 0, groups)
    if segs is None:
        return None
    g0, scale, base = _one_group(segs)
    table = torch.cat([book, torch.zeros(16 - book.numel(), device=book.device)])
    return TableWeight(qt.shape[0], qt.shape[1], g0, 4, codes, table, scale, base)
