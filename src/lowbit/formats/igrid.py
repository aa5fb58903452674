"""What llama.cpp's 2- and 3-bit grid i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) share.

A super-block of 256 weights has an FP16 scale ``d`` and a 4-bit scale per block of 16 or 32.  In a
block, each run of ``dim`` weights (8 for IQ2, 4 for IQ3) stores the index of one grid point (its
magnitudes) and the signs go by runs of 8: all 8 stored, or 7 with an even count of minus signs
(the *parity* rule; where a run has an odd count, the sign of its least important weight is given
up).  The quantizer is ggml's ``quantize_row_iq2_*_impl`` / ``quantize_row_iq3_*_impl``:

1. error weights ``imatrix * sqrt(sigma2 + x^2)`` (without an importance matrix, ``x^2`` or
   ``sigma2/4 + x^2``);
2. a search over candidate scales ``(2 kMaxQ - 1 + i*step) / max``: each candidate rounds every run
   to the lattice and moves it onto the grid (:func:`lowbit.formats.lattice_ggml.nearest_on_grid`);
   the one with the largest ``sumqx^2 / sumq2`` wins;
3. a refit from the winner's scale of the runs that were off the grid (IQ3_S: of every run), or,
   for IQ2_XXS, a first scale from ``make_qp_quants`` and a refit of every run;
4. the super-scale ``max_scale / 31`` (times a per-type fudge factor when stored) and the 4-bit
   block scales rounded against it.

Every block of a slice of rows is searched at once, candidate after candidate, in ggml's float32
order.  A type file sets the parameters and the byte layout (``pack`` / ``unpack``).
"""

from __future__ import annotations

import torch

from lowbit.errors import FormatError
from lowbit.formats.base import GGMLBlocks, QTensor, check_imatrix, map_row_chunks
from lowbit.formats.ggml_ref import GROUP_MAX_EPS, csqrt, f32_lin, make_qp_quants, one_where_zero, sdiv, seqsum
from lowbit.formats.lattice_ggml import Lattice, lattice, nearest_on_grid

QK_K = 256


def ksigns() -> torch.Tensor:
    """ggml's ``ksigns_iq2xs``: 7 stored sign bits -> the 8 signs (bit 7 makes the count even)."""
    i = torch.arange(128, dtype=torch.int64)
    par = sum((i >> b) & 1 for b in range(7)) & 1
    return i | (par << 7)


def signed_magnitudes(xb: torch.Tensor, weight: torch.Tensor, parity: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks ``xb`` [n, G] (n a multiple of 8) and their error weights -> (``xval`` [n, G], the
    magnitudes; sign bits per run of 8 [n // 8, G] int64).  With ``parity``, a run with an odd number
    of negatives keeps its least important weight (the first least ``w*x*x``) negated in ``xval``
    and its sign bit flipped, and 7 bits are kept, as ggml does."""
    n, g = xb.shape
    neg = xb < 0
    bit = (1 << torch.arange(8, dtype=torch.int64, device=xb.device))[None, :, None]
    s = (neg.reshape(n // 8, 8, g).to(torch.int64) * bit).sum(dim=1)
    xval = torch.where(neg, -xb, xb)
    if not parity:
        return xval, s
    x8 = xb.reshape(n // 8, 8, g)
    odd = (neg.reshape(n // 8, 8, g).sum(dim=1) % 2) == 1
    imin = (weight.reshape(n // 8, 8, g) * x8 * x8).argmin(dim=1)
    flip = odd[:, None, :] & (torch.arange(8, device=xb.device)[None, :, None] == imin[:, None, :])
    xval = torch.where(flip.reshape(n, g), -xval, xval)
    s = torch.where(odd, s ^ (1 << imin), s)
    return xval, s & 127


def fit(weight: torch.Tensor, xval: torch.Tensor, L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum w*x*q, sum w*q*q) with ``q = 2L + 1``, ggml's sequential sums."""
    q = (2 * L + 1).to(torch.float32)
    return seqsum(weight * xval * q), seqsum(weight * q * q)


class SuperBlockFormat(GGMLBlocks):
    """An i-quant of 256-weight super-blocks: ``superblocks`` makes the bytes of many at once; this
    class checks the arguments and runs it over slices of rows."""

    uses_imatrix = True
    llama_needs_imatrix = True
    gguf_fallback = "iq4_nl"  # llama-quant.cpp: every i-quant falls back to IQ4_NL
    #: weights per slice of rows (the searches hold a few tensors of this size per candidate)
    chunk_weights = 1 << 18

    def __init__(self, name: str, description: str) -> None:
        self.name = name
        self.description = description
        self.use_ggml_type(name)

    @property
    def joinable(self) -> bool:
        """Super-blocks are independent, so column slices of whole super-blocks join (no grid is
        exposed: calibration methods cannot choose these codes)."""
        return True

    def superblocks(self, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        """Super-blocks ``x`` and their importance ``qw`` (or None) [NB, 256] -> blocks [NB, type_size]."""
        raise NotImplementedError

    @staticmethod
    def odd_levels(scales: torch.Tensor, lmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block scales [NB, n] against a super-scale, as every i-quant rounds them: ``d = max /
        (2 lmax + 1)`` and ``l = clamp(nearest_int(0.5 * (scale / d - 1)), 0, lmax)``, so that
        ``(2l + 1) d`` is the block's scale.  Returns (d [NB] unscaled, l [NB, n] int64, all zero [NB])."""
        max_scale = scales.amax(dim=1)
        d = sdiv(max_scale, float(2 * lmax + 1))
        idd = sdiv(1.0, one_where_zero(d))
        ls = torch.round(0.5 * (idd[:, None] * scales - 1)).clamp_(0, lmax).to(torch.int64)
        return d, ls, max_scale == 0

    def quantize(self, w: torch.Tensor, name: str = "tensor", imatrix: torch.Tensor | None = None) -> QTensor:
        w = self.check(w, name)
        rows, cols = w.shape
        if imatrix is None and self.requires_imatrix:
            raise FormatError(f"{name}: {self.name} needs an importance matrix (--imatrix), as llama.cpp's does")
        qw = None if imatrix is None else check_imatrix(imatrix, cols, name).to(w.device)

        def run(r0: int, r1: int) -> torch.Tensor:
            x = w[r0:r1].reshape(-1, QK_K)
            q = None if qw is None else qw.reshape(1, -1).expand(r1 - r0, -1).reshape(-1, QK_K)
            return self.superblocks(x, q)

        blocks = map_row_chunks(run, rows, cols, w.device, chunk_weights=self.chunk_weights).reshape(rows, -1)
        return QTensor(self.name, (rows, cols), {"blocks": blocks})


class IQGrid(SuperBlockFormat):
    """A grid i-quant: the parameters below, and ``pack`` / ``unpack`` for its bytes."""

    # ---- per type --------------------------------------------------------------------------
    dim = 8  # weights per grid point
    bits = 2  # bits per coordinate of a lattice index
    kmax = 3  # levels 0..kmax-1
    nwant = 2  # neighbour lists: the grid points within this many distinct distances
    sub = 32  # weights per 4-bit block scale
    #: the candidate scales: i in -n..n, (2 kmax - 1 + i*step) / max
    n_cand, step = 9, 0.1
    #: IQ2_XXS: the first scale from make_qp_quants, candidates over 3*that, every run refit
    qp_start = False
    #: whether the runs count as on the grid before any candidate wins (IQ3_S: no)
    on_at_start = True
    #: refit every run, not only those the winner left off the grid (IQ3_S)
    refit_all = False
    parity = True
    #: a block whose largest magnitude is below this is zero (0.0: only an all-zero block)
    eps = GROUP_MAX_EPS
    sigma_num = 1.0  # sigma2 = sigma_num * sum(x^2) / 256
    #: without an importance matrix: weight = x^2 (0.0) or noim_sigma * sigma2 + x^2
    noim_sigma = 0.0
    d_factor = 1.0  # the stored super-scale is d * d_factor
    zero_empty = True  # a super-block with every scale zero: zero codes too (else they stay)

    @property
    def lattice(self) -> Lattice:
        return lattice(self.name, self.bits, self.nwant, self.kmax - 1)

    # ---- the layout (per type) -------------------------------------------------------------
    def pack(self, d: torch.Tensor, ls: torch.Tensor, gi: torch.Tensor, signs: torch.Tensor,
             skip: torch.Tensor) -> torch.Tensor:
        """(stored d [NB], 4-bit scales [NB, 256 // sub], grid indices [NB, 256 // dim], sign
        bits [NB, 32], the blocks stored as zero [NB, 256 // sub]) -> blocks [NB, type_size] uint8."""
        raise NotImplementedError

    def unpack(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`pack` (d as float32, the rest int64)."""
        raise NotImplementedError

    def block_scale(self, d: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
        """The decoded scale of each block (ggml's ``db``), from ``d`` [NB, 1] and ``ls``."""
        return d * (0.5 + ls.to(torch.float32)) * 0.25

    # ---- the search --------------------------------------------------------------------------
    def runs(self, t: torch.Tensor) -> torch.Tensor:
        """[sub, G] -> [dim, R*G]: the runs side by side (run r of block g is column r*G + g)."""
        n, g = t.shape
        return t.reshape(n // self.dim, self.dim, g).permute(1, 0, 2).reshape(self.dim, -1)

    def unruns(self, t: torch.Tensor) -> torch.Tensor:
        r = self.sub // self.dim
        return t.reshape(self.dim, r, -1).permute(1, 0, 2).reshape(self.sub, -1)

    def to_grid(self, L: torch.Tensor, xval: torch.Tensor, waux: torch.Tensor, scale: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Levels ``L`` [sub, G] onto the grid with block scales ``scale`` [G]:
        (levels [sub, G], on-grid flags [R, G])."""
        r = self.sub // self.dim
        _, Lg, on = nearest_on_grid(self.lattice, self.runs(L), self.runs(xval), self.runs(waux), scale.repeat(r))
        return self.unruns(Lg), on.reshape(r, -1)

    def level_round(self, idv: torch.Tensor, xval: torch.Tensor) -> torch.Tensor:
        """``clamp(nearest_int(0.5*(id*x - 1)), 0, kMaxQ-1)`` as int64."""
        return torch.round(0.5 * (idv * xval - 1)).clamp_(0, self.kmax - 1).to(torch.int64)

    def search(self, xval: torch.Tensor, weight: torch.Tensor, waux: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Blocks [sub, G] -> (scale [G], levels on the grid [sub, G], skipped [G])."""
        mx = xval.amax(dim=0)
        skip = mx <= 0 if self.eps == 0 else mx < self.eps
        r = self.sub // self.dim
        top = 2 * self.kmax - 1
        if self.qp_start:
            scale, _ = make_qp_quants(xval, self.kmax + 1, weight)
            ref = scale * self.kmax
            skip = skip | (ref <= 0)
        else:
            ref = mx
            scale = sdiv(torch.where(skip, torch.ones_like(mx), mx), float(top))
        ref = torch.where(skip, torch.ones_like(ref), ref)
        best = torch.zeros_like(mx)
        L = torch.zeros(xval.shape, dtype=torch.int64, device=xval.device)
        on = torch.full((r, xval.shape[1]), self.on_at_start, dtype=torch.bool, device=xval.device)
        for i in range(-self.n_cand, self.n_cand + 1):
            idv = sdiv(f32_lin(top, self.step, i, 0.0), ref)
            La, on_a = self.to_grid(self.level_round(idv, xval), xval, waux, sdiv(1.0, idv))
            sqx, sq2 = fit(weight, xval, La)
            take = (sq2 > 0) & (sqx * sqx > best * sq2)
            scale = torch.where(take, sqx / one_where_zero(sq2), scale)
            best = torch.where(take, scale * sqx, best)
            L = torch.where(take[None, :], La, L)
            on = torch.where(take[None, :], on_a, on)
        if self.qp_start:
            redo = scale > 0
            use = redo[None, :].expand(self.sub, -1)
        else:
            redo = (~on).any(dim=0) & (scale > 0)
            off = redo[None, :] if self.refit_all else (redo[None, :] & ~on)
            use = off.expand(r, -1).repeat_interleave(self.dim, dim=0)
        redo = redo & ~skip
        L2, _ = self.to_grid(self.level_round(sdiv(1.0, one_where_zero(scale)), xval), xval, waux, scale)
        L = torch.where(use, L2, L)
        sqx, sq2 = fit(weight, xval, L)
        scale = torch.where(redo & (sq2 > 0), sqx / one_where_zero(sq2), scale)
        return scale, L, skip

    # ---- a super-block -------------------------------------------------------------------
    def superblocks(self, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        nb = x.shape[0]
        sub, nsub = self.sub, QK_K // self.sub
        xt = x.t()
        sumx2 = seqsum(xt * xt)
        if self.sigma_num != 1.0:
            sumx2 = self.sigma_num * sumx2
        sig = sdiv(sumx2, float(QK_K)).repeat_interleave(nsub)[None, :]
        xb = x.reshape(-1, sub).t().contiguous()  # [sub, G], G = NB * nsub
        if qw is not None:
            weight = qw.reshape(-1, sub).t() * csqrt(sig + xb * xb)
        elif self.noim_sigma:
            weight = self.noim_sigma * sig + xb * xb
        else:
            weight = xb * xb
        waux = csqrt(weight)
        xval, signs = signed_magnitudes(xb, weight, self.parity)
        scale, L, skip = self.search(xval, weight, waux)
        lat = self.lattice
        gi = lat.kmap.to(x.device)[lat.index(self.runs(L))].reshape(sub // self.dim, -1)
        neg = scale < 0  # ggml: flip the scale and every sign ("should never happen")
        scale = torch.where(neg, -scale, scale)
        signs = torch.where(neg[None, :], (~signs) & (127 if self.parity else 255), signs)
        scale = torch.where(skip, torch.zeros_like(scale), scale)
        gi = torch.where(skip[None, :], torch.zeros_like(gi), gi)
        signs = torch.where(skip[None, :], torch.zeros_like(signs), signs)
        d, ls, empty = self.odd_levels(scale.reshape(nb, nsub), 15)
        if self.d_factor != 1.0:
            d = d * self.d_factor
        d = torch.where(empty, torch.zeros_like(d), d)
        ls = torch.where(empty[:, None], torch.zeros_like(ls), ls)
        gi = gi.t().reshape(nb, -1)  # run r of block b at b*R + r
        signs = signs.t().reshape(nb, -1)
        if self.zero_empty:
            gi = torch.where(empty[:, None], torch.zeros_like(gi), gi)
            signs = torch.where(empty[:, None], torch.zeros_like(signs), signs)
        return self.pack(d, ls, gi, signs, skip.reshape(nb, nsub))

    # ---- decoding --------------------------------------------------------------------------
    def dequantize(self, qt: QTensor) -> torch.Tensor:
        d, ls, gi, sb = self.unpack(self.blocks(qt))
        dev = d.device
        db = self.block_scale(d[:, None], ls)  # [NB, nsub]
        db = db.repeat_interleave(self.sub // self.dim, dim=1)  # per run
        vals = self.lattice.values.to(dev)[gi]  # [NB, runs, dim]
        sg = ksigns().to(dev)[sb] if self.parity else sb  # [NB, 32] 8 signs per 8 weights
        minus = ((sg[..., None] >> torch.arange(8, device=dev)) & 1).bool().reshape(vals.shape)
        y = db[..., None] * vals
        y = torch.where(minus, -y, y)
        return y.reshape(qt.shape)
