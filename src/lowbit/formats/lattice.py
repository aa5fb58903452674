"""E8P: a 2-bit vector code book on the E8 lattice (the idea of QuIP#, Tseng et al., 2024).

Scalar 2-bit formats give every weight one of four levels; a lattice code book quantizes 8
weights at once to one of 2^16 points of 8-dimensional space, still 2 bits per weight, but the
points are packed far more efficiently (E8 is the densest packing in 8 dimensions) and have the
shape of a ball, which is what Gaussian-like weights fill — after incoherence processing
(``--method quip``) they are close to Gaussian.

The code book, built here from its definition:

* ``D8^ = D8 + 1/2``: 8-vectors of half-integers whose sum is even.  Its points of squared norm at
  most 10 have 227 different patterns of absolute values (entries 1/2, 3/2, 5/2); 29 patterns of
  squared norm 12 (five 3/2 and three 1/2, the three chosen to spread evenly over the
  coordinates) make 256.
* Each pattern with the signs that keep the sum even: 128 sign choices (7 free signs, the 8th
  fixed by parity), 2^15 points in all.
* Every point shifted by +1/4 or -1/4 in all coordinates: 2^16 points, a subset of ``E8 + 1/4``.

A code is 16 bits: the pattern (bits 0-7), the signs of coordinates 0-6 (bits 8-14), the shift
(bit 15).  One FP16 scale per row: ``2 + 16 / cols`` bits per weight (``e8p``).  ``e8p4`` adds a
second E8P code with its own row scales for what the first leaves (residual vector quantization,
as QuIP# does for 4 bits): ``4 + 32 / cols`` bits per weight.

The nearest point is found exactly without searching all 2^16: for a shift, the best signs for a
pattern are the signs of the input, and if their parity is wrong, the coordinate whose flip costs
least is flipped; so the search is over 2 x 256 patterns.
"""

from __future__ import annotations

import functools
import itertools

import torch

from lowbit.errors import FormatError
from lowbit.formats.base import Format, QTensor, VectorGrid, register

DIM = 8
SHIFT = 0.25


@functools.lru_cache(maxsize=1)
def abs_patterns() -> tuple[torch.Tensor, torch.Tensor]:
    """The 256 absolute-value patterns ``[256, 8]`` (float32) and the parity of each (bool: an odd
    number of its entries exceed 1/2, so an odd number of negative signs keeps the sum even)."""
    ball: list[tuple[int, ...]] = []
    for m in itertools.product(range(3), repeat=DIM):  # entries m + 1/2
        if sum((x + 0.5) ** 2 for x in m) <= 10:
            ball.append(m)
    assert len(ball) == 227
    ball.sort(key=lambda m: (sum((x + 0.5) ** 2 for x in m), m))
    # norm 12: three entries 1/2, five 3/2; pick 29 of the 56, each step the triple that keeps the
    # counts of 1/2 per coordinate most even (ties: first in lexicographic order)
    counts = [0] * DIM
    chosen: list[tuple[int, ...]] = []
    triples = list(itertools.combinations(range(DIM), 3))
    while len(chosen) < 256 - len(ball):
        best = min((t for t in triples if t not in chosen),
                   key=lambda t: (max(counts[i] + (i in t) for i in range(DIM)), sum(counts[i] for i in t)))
        chosen.append(best)
        for i in best:
            counts[i] += 1
    extra = [tuple(0 if i in t else 1 for i in range(DIM)) for t in chosen]
    m = torch.tensor(ball + extra, dtype=torch.float32)
    return m + 0.5, (m.sum(1).to(torch.int64) % 2).bool()


@functools.lru_cache(maxsize=1)
def codebook() -> torch.Tensor:
    """All 2^16 points ``[65536, 8]`` (float32), row ``c`` the point of code ``c``."""
    pats, parity = abs_patterns()
    c = torch.arange(1 << 16)
    k, signs, shift = c & 255, (c >> 8) & 127, c >> 15
    neg7 = (signs[:, None] >> torch.arange(DIM - 1)) & 1  # [n, 7]
    last = (neg7.sum(1) + parity[k].long()) % 2  # the 8th sign makes the count of negatives match the parity
    neg = torch.cat([neg7, last[:, None]], dim=1).bool()
    pts = torch.where(neg, -pats[k], pats[k])
    return pts + torch.where(shift.bool(), SHIFT, -SHIFT)[:, None]


@functools.lru_cache(maxsize=8)
def _codebook_on(device: str) -> torch.Tensor:
    """The code book, kept on ``device`` (decoding runs at every forward pass)."""
    return codebook().to(device)


@functools.lru_cache(maxsize=8)
def _patterns_on(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    pats, parity = abs_patterns()
    return pats.to(device), parity.to(device)


def nearest_codes(x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Codes (int64, ``[n]``) of the code book points nearest to the rows of ``x`` ``[n, 8]``."""
    pats, parity = _patterns_on(str(x.device))
    p2 = (pats * pats).sum(1)
    pt = pats.t().contiguous()  # [8, 256]
    bitw = (1 << torch.arange(DIM - 1, device=x.device))
    x = x.to(torch.float32)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for a in range(0, x.shape[0], chunk):
        xc = x[a : a + chunk]
        best_d: torch.Tensor | None = None
        best_code = torch.zeros(xc.shape[0], dtype=torch.int64, device=x.device)
        for sh, t in ((0, -SHIFT), (1, SHIFT)):
            y = xc - t
            ay, neg = y.abs(), y < 0
            wrong = (neg.sum(1) % 2).bool()[:, None] != parity[None, :]  # [c, 256]
            cost = ay[:, :1] * pt[0]  # per pattern, the cost of the cheapest coordinate to flip
            for i in range(1, DIM):
                cost = torch.minimum(cost, ay[:, i : i + 1] * pt[i])
            gain = ay @ pt - torch.where(wrong, cost, 0.0) * 2
            d = (y * y).sum(1, keepdim=True) + p2[None] - 2 * gain
            dk, k = d.min(dim=1)
            flip = wrong.gather(1, k[:, None])[:, 0]
            pos = (ay * pats[k]).argmin(dim=1)
            sgn = neg ^ (flip[:, None] & (torch.arange(DIM, device=x.device)[None] == pos[:, None]))
            code = k + ((sgn[:, : DIM - 1].long() * bitw).sum(1) << 8) + (sh << 15)
            if best_d is None:
                best_d, best_code = dk, code
            else:
                better = dk < best_d
                best_d = torch.where(better, dk, best_d)
                best_code = torch.where(better, code, best_code)
        out[a : a + chunk] = best_code
    return out


#: search range for the scale, in units of the row's RMS; the best for Gaussian rows is near 1
_SCALE_GRID = torch.linspace(0.7, 1.5, 9)


class E8PFormat(Format):
    """``stages`` = 1: E8P, 2 bits.  ``stages`` = 2: residual vector quantization (QuIP#'s RVQ),
    4 bits: a second E8P code, with its own row scale, for what the first leaves."""

    block_size = DIM
    vector_dim = DIM

    def __init__(self, stages: int) -> None:
        self.stages = stages
        self.name = "e8p" if stages == 1 else f"e8p{2 * stages}"
        self.description = ("E8 lattice code book, 8 weights per 16-bit code (QuIP#'s E8P), FP16 scale per row"
                            if stages == 1 else
                            f"{stages} residual E8P stages, {stages} x 16-bit codes per 8 weights, FP16 scales per row")

    @staticmethod
    def stage_suffix(stage: int) -> str:
        return "" if stage == 0 else str(stage + 1)

    def _codes(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        rows, cols = w.shape
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        units = (w / safe).reshape(-1, DIM)
        return nearest_codes(units).reshape(rows, cols // DIM)

    def _fit_scale(self, w: torch.Tensor, name: str, last: bool) -> torch.Tensor:
        """One stage's row scales for ``w`` (the weights, or what earlier stages left): a multiple of
        each row's RMS, the multiple chosen for the whole tensor on a sample of rows.  The last stage
        refits every row's scale by least squares to its codes; an earlier stage is judged by the
        error left after the next stage too (for two stages its best multiple is larger than for
        one: on Gaussian weights 0.0083 of the energy left instead of 0.0093)."""
        rows, cols = w.shape
        rms = _rms(w)
        if float(rms.max()) * float(_SCALE_GRID.max()) > float(torch.finfo(torch.float16).max) / 4:
            raise FormatError(f"{name}: weights of RMS {float(rms.max()):g} are too large for the FP16 row scales of {self.name}")
        idx = torch.linspace(0, rows - 1, min(rows, 64 if last else 32)).long().to(w.device)
        cb = _codebook_on(str(w.device))
        ws = w[idx]

        def left(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return x - cb[self._codes(x, s)].reshape(x.shape) * s

        errs = []
        for c in (_SCALE_GRID if last else _SCALE_GRID[::2]).tolist():
            r = left(ws, (rms[idx] * c).half().float())
            if not last:  # what the next stage, at its best multiple, leaves
                r2 = _rms(r)
                r = min((left(r, (r2 * c2).half().float()) for c2 in _SCALE_GRID[::2].tolist()),
                        key=lambda t: float((t**2).sum()))
            errs.append((float((r**2).sum()), c))
        scale = (rms * min(errs)[1]).half().float()
        if last:
            pts = cb[self._codes(w, scale)].reshape(rows, cols)
            den = (pts * pts).sum(1, keepdim=True)
            fit = torch.where(den > 0, (pts * w).sum(1, keepdim=True) / den.clamp_min(1e-30), scale)
            scale = torch.where(fit > 0, fit, scale).half().float()
        return torch.where(w.abs().amax(1, keepdim=True) == 0, torch.zeros_like(scale), scale)  # rows of zeros stay zero

    def quantize(self, w: torch.Tensor, name: str = "tensor", imatrix: torch.Tensor | None = None) -> QTensor:
        w = self.check(w, name)
        cb = _codebook_on(str(w.device))
        parts: dict[str, torch.Tensor] = {}
        rest = w
        for st in range(self.stages):
            scale = self._fit_scale(rest, name, last=st + 1 == self.stages)
            codes = self._codes(rest, scale)
            parts["codes" + self.stage_suffix(st)] = _to_int16(codes)
            parts["scale" + self.stage_suffix(st)] = scale.half()
            if st + 1 < self.stages:
                rest = rest - cb[codes].reshape(w.shape) * scale
        return QTensor(self.name, tuple(w.shape), parts)

    def codes(self, qt: QTensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.stack([qt.parts["codes" + self.stage_suffix(st)].to(dtype) & 0xFFFF
                            for st in range(self.stages)], dim=2)

    def storage_bits(self, shape: tuple[int, int]) -> int:
        return self.stages * (2 * shape[0] * shape[1] + 16 * shape[0])

    # ---- vector grid: GPTQ/LDLQ choose the codes, 8 columns at a time ----------------------
    def vector_grid(self, qt: QTensor) -> VectorGrid:
        scales = torch.cat([qt.parts["scale" + self.stage_suffix(st)].float() for st in range(self.stages)], dim=1)
        return VectorGrid(scales, DIM, _codebook_on(str(scales.device)), nearest_codes)

    def with_codes(self, qt: QTensor, codes: torch.Tensor) -> QTensor:
        """``codes``: ``[rows, cols // 8, stages]`` (or ``[rows, cols // 8]`` for one stage)."""
        if codes.dim() == 2:
            codes = codes[..., None]
        parts = dict(qt.parts)
        for st in range(self.stages):
            parts["codes" + self.stage_suffix(st)] = _to_int16(codes[..., st])
        return QTensor(self.name, qt.shape, parts, dict(qt.meta))


def _rms(w: torch.Tensor) -> torch.Tensor:
    rms = w.pow(2).mean(1, keepdim=True).sqrt()
    return torch.where(rms > 0, rms, torch.ones_like(rms))


def _to_int16(codes: torch.Tensor) -> torch.Tensor:
    """16-bit codes stored in int16 (safetensors and torch index with signed types)."""
    c = codes.to(torch.int64)
    return torch.where(c >= 1 << 15, c - (1 << 16), c).to(torch.int16)


register(E8PFormat(1))
register(E8PFormat(2))
