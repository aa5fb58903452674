"""The grids of llama.cpp's 1-3-bit i-quants and the nearest-point search ggml's quantizers do on them.

An i-quant stores a run of 8 (IQ1/IQ2) or 4 (IQ3) magnitudes as one index into a fixed set of
points (a "grid": 256 to 2048 of the points with small integer coordinates), plus signs and scales.
ggml's quantizers (``quantize_row_iq2_xxs_impl`` and its siblings in ggml-quants.c) work in grid
units ``2l + 1`` (``l`` the coordinate's level), round each run to the nearest lattice point and,
where that point is not in the grid, pick among its *neighbours*: the grid points within the
``nwant`` smallest distinct squared distances of it, in (distance, index) order, the first with the
least weighted error.  ggml builds those lists once per process (``iq2xs_init_impl`` /
``iq3xs_init_impl``); so does :func:`lattice` (cached), as one flat table, so that the search is
a gather and a segmented ``argmin`` over all runs at once.

The grid points themselves come from gguf-py (each type's ``grid_map`` and ``grid``), in ggml's order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from lowbit.formats.base import ggml_quant_class


@dataclass
class Lattice:
    """One i-quant grid, in the quantizer's units, with its neighbour lists."""

    dim: int  # coordinates per point (8 or 4)
    bits: int  # bits per coordinate in a lattice index (2 or 3)
    pos: torch.Tensor  # [N, dim] float32: each grid point's coordinates 2l+1
    levels: torch.Tensor  # [N, dim] int64: the coordinates' levels l
    values: torch.Tensor  # [N, dim] float32: the decoded values (gguf-py's grid)
    kmap: torch.Tensor  # [2**(bits*dim)] int64: lattice index -> grid index, or -1
    row: torch.Tensor  # [2**(bits*dim)] int64: lattice index -> its neighbour list p (-1 if on the grid)
    flat: torch.Tensor  # every off-grid point's neighbours in order, one list after another (int64)
    start: torch.Tensor  # [P]: where point p's list starts in ``flat``
    count: torch.Tensor  # [P]: its length

    @property
    def nlev(self) -> int:
        """Levels per coordinate among the grid's points."""
        return int(self.levels.max()) + 1

    @functools.cached_property
    def term_offset(self) -> torch.Tensor:
        """[N, dim]: coordinate i's level of each point as ``i * nlev + l`` (into a run's error terms)."""
        return (self.levels + self.nlev * torch.arange(self.dim)[None, :]).to(torch.int16)

    def index(self, L: torch.Tensor) -> torch.Tensor:
        """Levels ``L`` [dim, ...] (int64) -> their lattice index [...]: level k at bits ``bits*k``."""
        u = torch.zeros_like(L[0])
        for k in range(self.dim):
            u |= L[k] << (self.bits * k)
        return u


def _grid_levels(qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """gguf-py's grid for ``qtype``: (levels [N, dim] int, values [N, dim] float32)."""
    cls = ggml_quant_class(qtype)
    cls.init_grid()
    values = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    gmap = np.asarray(cls.grid_map, dtype=np.float32)
    levels = np.searchsorted(gmap, values)
    assert np.array_equal(gmap[levels], values), f"{qtype}: grid values outside its grid_map"
    return levels.astype(np.int64), values


@functools.cache
def lattice(qtype: str, bits: int, nwant: int, max_level: int) -> Lattice:
    """The grid of GGML type ``qtype`` with ``bits`` per coordinate and the neighbour lists of every
    lattice point whose levels are at most ``max_level`` (the quantizers clamp to that) and that is
    not in the grid: its grid points within the ``nwant`` smallest distinct distances, sorted by
    (distance, index).  Built once per process."""
    levels, values = _grid_levels(qtype)
    n, dim = levels.shape
    pos = 2 * levels + 1
    size = 1 << (bits * dim)
    shifts = bits * np.arange(dim, dtype=np.int64)
    kmap = np.full(size, -1, dtype=np.int64)
    kmap[(levels << shifts).sum(axis=1)] = np.arange(n)
    # every lattice point the quantizer can reach, by its levels
    grid_l = np.stack(np.meshgrid(*([np.arange(max_level + 1)] * dim), indexing="ij"), axis=-1).reshape(-1, dim)
    u = (grid_l << shifts).sum(axis=1)
    off = kmap[u] < 0
    u, grid_l = u[off], grid_l[off]
    parts = []
    for s in range(0, len(u), 2048):
        p = 2 * grid_l[s : s + 2048] + 1
        d2 = ((pos[None, :, :] - p[:, None, :]) ** 2).sum(axis=2)  # [m, N]
        order = np.argsort(d2, axis=1, kind="stable")  # ties keep the lower grid index first
        sd = np.take_along_axis(d2, order, axis=1)
        rank = np.concatenate([np.zeros((len(p), 1), np.int64), np.cumsum(sd[:, 1:] != sd[:, :-1], axis=1)], axis=1)
        parts.append(np.where(rank < nwant, order, -1))  # the kept neighbours are a prefix of each row
    nbr = np.concatenate(parts, axis=0)
    count = (nbr >= 0).sum(axis=1)
    flat = nbr[nbr >= 0]  # row-major: each point's kept prefix, in order
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    row = np.full(size, -1, dtype=np.int64)
    row[u] = np.arange(len(u))
    t = torch.from_numpy
    return Lattice(dim, bits, t(pos.astype(np.float32)), t(levels), t(values), t(kmap), t(row),
                   t(flat), t(start.astype(np.int64)), t(count.astype(np.int64)))

#: runs searched at once (each has from one to a few hundred neighbours, 20-70 on average)
_RUNS = 32768


def best_neighbour(lat: Lattice, u: torch.Tensor, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                   shift: torch.Tensor | None = None) -> torch.Tensor:
    """ggml's ``iq2_find_best_neighbour`` / ``iq3_find_best_neighbour`` (``shift`` None) or
    ``iq1_find_best_neighbour2`` for many runs at once.

    ``u`` [M] off-grid lattice indices, ``x`` and ``w`` [dim, M] the runs' values and error weights,
    ``scale`` [M]: the grid index of the neighbour with the least ``sum w*(scale*q - x)^2`` (summed
    in ggml's order; the first in list order on a tie), where a point's ``q`` is its ``2l + 1``, or,
    given ``shift`` [M] (IQ1's +-delta), ``l - 1 + shift``."""
    if u.numel() > _RUNS:
        return torch.cat([best_neighbour(lat, u[s : s + _RUNS], x[:, s : s + _RUNS], w[:, s : s + _RUNS],
                                         scale[s : s + _RUNS], None if shift is None else shift[s : s + _RUNS])
                          for s in range(0, u.numel(), _RUNS)])
    dev = x.device
    m = u.numel()
    # torch's index_select with int32 indices is many times faster than tensor[index] here
    sel = torch.index_select
    p = sel(lat.row.to(dev), 0, u)
    cnt = sel(lat.count.to(dev), 0, p)
    seg = torch.repeat_interleave(torch.arange(m, device=dev, dtype=torch.int32), cnt)  # each entry's run
    first = (torch.cumsum(cnt, 0) - cnt).to(torch.int32)
    at0 = sel(sel(lat.start.to(dev), 0, p).to(torch.int32) - first, 0, seg)
    k = torch.arange(seg.numel(), device=dev, dtype=torch.int32) + at0
    idx = sel(lat.flat.to(dev), 0, k)  # the candidate grid points, in list order
    # every term w_i * (scale*q - x_i)^2 a run can meet takes one of nlev values per coordinate:
    # compute those once per run ([M, dim, nlev], ggml's float32 steps), then sum the gathered terms
    nlev = lat.nlev
    lv = torch.arange(nlev, device=dev, dtype=torch.float32)
    if shift is None:
        q = (2 * lv + 1)[None, None, :]
    else:
        q = ((lv - 1)[None, :] + shift[:, None])[:, None, :]
    diff = scale[:, None, None] * q - x.t()[:, :, None]
    terms = (w.t()[:, :, None] * diff * diff).reshape(-1)
    base = seg * (lat.dim * nlev)
    loff = sel(lat.term_offset.to(dev), 0, idx)  # [T, dim] int16
    d2 = sel(terms, 0, base + loff[:, 0])
    for i in range(1, lat.dim):
        d2 += sel(terms, 0, base + loff[:, i])
    seg64 = seg.long()
    least = torch.full((m,), torch.inf, device=dev).scatter_reduce(0, seg64, d2, "amin")
    n = seg.numel()
    at = torch.where(d2 == sel(least, 0, seg), torch.arange(n, device=dev, dtype=torch.int32), n)
    pick = torch.full((m,), n, device=dev, dtype=torch.int32).scatter_reduce(0, seg64, at, "amin")
    return sel(idx, 0, pick)


def nearest_on_grid(lat: Lattice, L: torch.Tensor, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                    shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs with levels ``L`` [dim, M] (int64, already rounded and clamped) moved onto the grid as
    ggml does: a point in the grid stays, one outside becomes its best neighbour
    (:func:`best_neighbour` with ``x``, ``w`` [dim, M], ``scale`` [M] and ``shift``).

    Returns (grid index [M], the levels on the grid [dim, M], whether the rounded point was in the grid [M])."""
    dev = L.device
    sel = torch.index_select
    u = lat.index(L)
    gi = sel(lat.kmap.to(dev), 0, u)
    on = gi >= 0
    if not bool(on.all()):
        off = (~on).nonzero()[:, 0]
        found = best_neighbour(lat, sel(u, 0, off), sel(x, 1, off), sel(w, 1, off), sel(scale, 0, off),
                               None if shift is None else sel(shift, 0, off))
        gi = gi.index_copy(0, off, found)
        L = sel(lat.levels.to(dev), 0, gi).t()
    return gi, L, on
