"""llama.cpp's 1-bit i-quants, byte-identical with libggml: IQ1_S (1.5625 bpw) and IQ1_M (1.75).

Each run of 8 weights is one point of a 2048-point grid with coordinates -1, 0, +1, shifted by
+-1/8 (the *delta*, one per block in IQ1_S, one per run in IQ1_M), times a 3-bit scale per block
(32 weights in IQ1_S, 16 in IQ1_M) and an FP16 super-scale per 256.

The quantizer is ggml's ``quantize_row_iq1_s_impl`` / ``quantize_row_iq1_m_impl``.  A block's
weights are sorted, and every split of the sorted weights into three groups (levels -1, 0, +1),
with every choice of deltas, is scored exactly from prefix sums of ``w*x`` and ``w``: 1122
candidates per block for IQ1_S, 612 for IQ1_M, taken in ggml's order with its comparison.  Runs
that land off the grid move to their best neighbour (:mod:`lowbit.formats.lattice_ggml`), and the
scale is refit.  IQ1_M refits its super-scale over the whole super-block as well.  Every block of a
slice of rows is searched at once.  IQ1_S needs an importance matrix (ggml asserts one); IQ1_M does
not, though llama-quantize refuses to make either without one.
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.formats.base import QTensor, fp16_bytes, fp16_from_bytes, register
from lowbit.formats.ggml_ref import csqrt, f32, one_where_zero, sdiv, seqsum
from lowbit.formats.igrid import SuperBlockFormat
from lowbit.formats.lattice_ggml import Lattice, lattice, nearest_on_grid

QK_K = 256
DELTA = 0.125  # IQ1S_DELTA = IQ1M_DELTA
X_P = (-1 + DELTA, DELTA, 1 + DELTA)
X_M = (-1 - DELTA, -DELTA, 1 - DELTA)
FLT_MAX = float(np.finfo(np.float32).max)


def prefix(t: torch.Tensor) -> torch.Tensor:
    """[n, G] -> [n + 1, G]: 0, t0, t0 + t1, ... summed one after another in float32 (torch's
    cumsum accumulates in double on the CPU)."""
    out = torch.zeros((t.shape[0] + 1, t.shape[1]), dtype=t.dtype, device=t.device)
    for j in range(t.shape[0]):
        torch.add(out[j], t[j], out=out[j + 1])
    return out


def pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every split (i1, i2), 0 <= i1 <= i2 <= n, in ggml's loop order."""
    i1, i2 = np.triu_indices(n + 1)
    return torch.from_numpy(i1.astype(np.int64)), torch.from_numpy(i2.astype(np.int64))


def select(qx: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """ggml's running choice over candidates [C, G]: a candidate wins where ``sumq2 > 0`` and
    ``sumqx^2 > best * sumq2``, then ``best = (sumqx / sumq2) * sumqx``.  The winner per block, or -1."""
    qxx = qx * qx
    gain = (qx / one_where_zero(q2)) * qx
    ok = q2 > 0
    best = torch.full(qx.shape[1:], -FLT_MAX, dtype=qx.dtype, device=qx.device)
    choice = torch.full(qx.shape[1:], -1, dtype=torch.int64, device=qx.device)
    for c in range(qx.shape[0]):
        take = ok[c] & (qxx[c] > best * q2[c])
        best = torch.where(take, gain[c], best)
        choice.masked_fill_(take, c)
    return choice


def split_levels(idx: torch.Tensor, i1: torch.Tensor, i2: torch.Tensor) -> torch.Tensor:
    """Levels 0/1/2 [n, G] of the weights whose sorted positions are ``idx`` [n, G]: sorted position
    j gets 0 below ``i1``, 1 below ``i2`` and 2 from there."""
    j = torch.arange(idx.shape[0], device=idx.device)[:, None]
    ls = (j >= i1[None, :]).to(torch.int64) + (j >= i2[None, :]).to(torch.int64)
    return torch.empty_like(ls).scatter_(0, idx, ls)


class IQ1(SuperBlockFormat):
    sub = 32
    eps = 0.0
    chunk_weights = 1 << 17  # 1122 candidates per block of 32

    @property
    def lattice(self) -> Lattice:
        return lattice("iq1_s", 2, 3, 2)  # IQ1_M shares IQ1_S's grid and neighbour lists

    def sorted_blocks(self, x: torch.Tensor, qw: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Super-blocks [NB, 256] -> (blocks xb [sub, G], error weights, all-zero blocks [G], the sort
        order of each block [sub, G], w*x and w in that order)."""
        nsub = QK_K // self.sub
        xt = x.t()
        sig = sdiv(2.0 * seqsum(xt * xt), float(QK_K)).repeat_interleave(nsub)[None, :]
        xb = x.reshape(-1, self.sub).t().contiguous()
        weight = xb * xb if qw is None else qw.reshape(-1, self.sub).t() * csqrt(sig + xb * xb)
        skip = xb.abs().amax(dim=0) < self.eps
        _, idx = torch.sort(xb, dim=0, stable=True)  # glibc's qsort here is a merge sort: stable
        return xb, weight, skip, idx, (weight * xb).gather(0, idx), weight.gather(0, idx)

    @staticmethod
    def split_choice(qx: torch.Tensor, q2: torch.Tensor, idx: torch.Tensor, i1: torch.Tensor, i2: torch.Tensor,
                     per: int) -> tuple[torch.Tensor, ...]:
        """The winning candidate (``per`` delta choices per split) -> (no winner [G], scale [G] made
        positive, levels [sub, G] (flipped with it), flipped [G], the winner's delta choice [G])."""
        choice = select(qx, q2)
        ch = choice.clamp(min=0)
        scale = qx.gather(0, ch[None])[0] / one_where_zero(q2.gather(0, ch[None])[0])
        L = split_levels(idx, i1[ch // per], i2[ch // per])
        neg = scale < 0
        return choice < 0, torch.where(neg, -scale, scale), torch.where(neg[None, :], 2 - L, L), neg, ch % per

    def decode(self, qt: QTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale per run [NB, 32], delta per run [NB, 32], grid index per run [NB, 32])."""
        raise NotImplementedError

    def dequantize(self, qt: QTensor) -> torch.Tensor:
        dl, delta, gi = self.decode(qt)
        vals = self.lattice.values.to(gi.device)[gi]  # [NB, 32, 8]
        return (dl[..., None] * (vals + delta[..., None])).reshape(qt.shape)

    def on_grid(self, L: torch.Tensor, xb: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Levels [sub, G] of blocks onto the grid, with per-run deltas ``shift`` [R, G]:
        (grid indices [R, G], levels [sub, G], every run already on the grid [G])."""
        r, g = self.sub // 8, xb.shape[1]

        def runs(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(r, 8, g).permute(1, 0, 2).reshape(8, -1)

        gi, Lg, on = nearest_on_grid(self.lattice, runs(L), runs(xb), runs(weight), scale.repeat(r), shift.reshape(-1))
        Lg = Lg.reshape(8, r, g).permute(1, 0, 2).reshape(self.sub, g)
        return gi.reshape(r, g), Lg, on.reshape(r, g).all(dim=0)

    def refit(self, L: torch.Tensor, xb: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor,
              scale: torch.Tensor, redo: torch.Tensor) -> torch.Tensor:
        """ggml's refit of the blocks in ``redo``: ``sumqx / sumq2`` with ``q = l - 1 + delta``, where both
        sums are positive."""
        q = (L - 1).to(torch.float32) + shift.repeat_interleave(8, dim=0)
        wq = weight * q
        sqx, sq2 = seqsum(wq * xb), seqsum(wq * q)
        return torch.where(redo & (sqx > 0) & (sq2 > 0), sqx / one_where_zero(sq2), scale)


class IQ1S(IQ1):
    """``quantize_row_iq1_s_impl``: blocks of 32, one delta per block."""

    requires_imatrix = True
    sub = 32
    eps = f32(1e-12)

    def superblocks(self, x, qw):
        nb = x.shape[0]
        xb, weight, skip, idx, wx, ws = self.sorted_blocks(x, qw)
        dev, g = xb.device, xb.shape[1]
        sx, sw = prefix(wx), prefix(ws)
        i1, i2 = (t.to(dev) for t in pairs(32))
        a, b, c = sx[i1] - sx[0], sx[i2] - sx[i1], sx[32] - sx[i2]
        aw, bw, cw = sw[i1] - sw[0], sw[i2] - sw[i1], sw[32] - sw[i2]
        cands = []
        for xx in (X_P, X_M):
            qx = a * xx[0] + b * xx[1] + c * xx[2]
            q2 = aw * xx[0] * xx[0] + bw * xx[1] * xx[1] + cw * xx[2] * xx[2]
            cands.append((qx, q2))
        qx = torch.stack([cands[0][0], cands[1][0]], dim=1).reshape(-1, g)  # per split: x_p, then x_m
        q2 = torch.stack([cands[0][1], cands[1][1]], dim=1).reshape(-1, g)
        none, scale, L, neg, v = self.split_choice(qx, q2, idx, i1, i2, 2)
        skip = skip | none
        sign = torch.where((v == 0) != neg, 1.0, -1.0)
        shift = (sign * DELTA)[None, :].expand(4, -1)
        gi, L, all_on = self.on_grid(L, xb, weight, scale, shift)
        scale = self.refit(L, xb, weight, shift, scale, ~all_on)
        scale = torch.where(skip, torch.zeros_like(scale), scale)
        sign = torch.where(skip, torch.ones_like(sign), sign)
        gi = torch.where(skip[None, :], torch.zeros_like(gi), gi)
        d, ls, empty = self.odd_levels(scale.reshape(nb, 8), 7)
        ls = ls | torch.where(sign.reshape(nb, 8) < 0, 8, 0)
        ls = torch.where(empty[:, None], torch.zeros_like(ls), ls)
        d = torch.where(empty, torch.zeros_like(d), d * f32(1.125))
        gi = gi.t().reshape(nb, 8, 4)  # block, run
        qh = ((gi >> 8) << (3 * torch.arange(4, device=dev))).sum(dim=2) | (ls << 12)
        qhb = torch.stack([qh & 0xFF, qh >> 8], dim=2).reshape(nb, 16)
        return torch.cat([fp16_bytes(d), (gi & 255).reshape(nb, 32).to(torch.uint8), qhb.to(torch.uint8)], dim=1)

    def decode(self, qt):
        b = self.blocks(qt)
        nb = b.shape[0]
        d = fp16_from_bytes(b[:, :2])
        qs = b[:, 2:34].to(torch.int64).reshape(nb, 8, 4)
        qhb = b[:, 34:50].to(torch.int64).reshape(nb, 8, 2)
        qh = qhb[..., 0] | (qhb[..., 1] << 8)  # [NB, 8]
        gi = qs | (((qh[..., None] >> (3 * torch.arange(4, device=b.device))) & 7) << 8)
        dl = d[:, None] * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)
        delta = torch.where((qh & 0x8000) != 0, -DELTA, DELTA)
        return dl.repeat_interleave(4, dim=1), delta.repeat_interleave(4, dim=1), gi.reshape(nb, 32)


MASKS = (0x00, 0x80, 0x08, 0x88)


class IQ1M(IQ1):
    """``quantize_row_iq1_m_impl``: blocks of 16, a delta per run, the super-scale refit."""

    sub = 16
    eps = f32(1e-7)

    def superblocks(self, x, qw):
        nb = x.shape[0]
        xb, weight, skip, idx, wx, ws = self.sorted_blocks(x, qw)
        dev, g = xb.device, xb.shape[1]
        half = idx >= 8
        zero = torch.zeros_like(wx)
        px = [prefix(torch.where(half, zero, wx)), prefix(torch.where(half, wx, zero))]
        pw = [prefix(torch.where(half, zero, ws)), prefix(torch.where(half, ws, zero))]
        i1, i2 = (t.to(dev) for t in pairs(16))
        p2, m2 = X_P[2], X_M[2]
        cp1, cp2 = f32(X_P[0] * X_P[0] - X_P[1] * X_P[1]), f32(X_P[1] * X_P[1] - X_P[2] * X_P[2])
        cm1, cm2 = f32(X_M[0] * X_M[0] - X_M[1] * X_M[1]), f32(X_M[1] * X_M[1] - X_M[2] * X_M[2])
        qxp, qxm, q2p, q2m = [], [], [], []
        for h in range(2):
            tx, tw = px[h][16], pw[h][16]
            sx = px[h][i1] + px[h][i2]
            qxp.append(tx * p2 - sx)
            qxm.append(tx * m2 - sx)
            q2p.append(tw * p2 * p2 + pw[h][i1] * cp1 + pw[h][i2] * cp2)
            q2m.append(tw * m2 * m2 + pw[h][i1] * cm1 + pw[h][i2] * cm2)
        qx = torch.stack([qxp[0] + qxp[1], qxp[0] + qxm[1], qxm[0] + qxp[1], qxm[0] + qxm[1]], dim=1).reshape(-1, g)
        q2 = torch.stack([q2p[0] + q2p[1], q2p[0] + q2m[1], q2m[0] + q2p[1], q2m[0] + q2m[1]], dim=1).reshape(-1, g)
        none, scale, L, neg, k = self.split_choice(qx, q2, idx, i1, i2, 4)
        skip = skip | none
        k = torch.where(neg, 3 - k, k)
        shift = torch.stack([torch.where(k < 2, DELTA, -DELTA), torch.where(k % 2 == 0, DELTA, -DELTA)])  # [2, G]
        gi, L, all_on = self.on_grid(L, xb, weight, scale, shift)
        scale = self.refit(L, xb, weight, shift, scale, ~all_on)
        scale = torch.where(skip, torch.zeros_like(scale), scale)
        k = torch.where(skip, torch.zeros_like(k), k)
        gi = torch.where(skip[None, :], torch.zeros_like(gi), gi)
        d, ls, empty = self.odd_levels(scale.reshape(nb, 16), 7)  # ls [NB, 16]
        # the super-scale refit over the whole super-block, on the stored points and deltas
        lat = self.lattice
        shift = torch.stack([torch.where(k < 2, DELTA, -DELTA), torch.where(k % 2 == 0, DELTA, -DELTA)])
        lv = lat.levels.to(dev)[gi]  # [2, G, 8]
        q = (lv - 1).to(torch.float32) + shift[..., None]
        q = q.permute(1, 0, 2).reshape(g, 16).t()  # [16, G] in weight order
        q = q * (2 * ls.reshape(-1) + 1).to(torch.float32)[None, :]
        wq = weight * q
        sqx = seqsum((wq * xb).t().reshape(nb, QK_K).t())
        sq2 = seqsum((wq * q).t().reshape(nb, QK_K).t())
        d = torch.where(sq2 > 0, sqx / one_where_zero(sq2), d)
        dbits = fp16_bytes(d * f32(1.1125)).to(torch.int64)
        u16 = dbits[:, 0] | (dbits[:, 1] << 8)
        ls4 = ls.reshape(nb, 4, 4)
        sc = (ls4 << (3 * torch.arange(4, device=dev))).sum(dim=2)
        sc = sc | (((u16[:, None] >> (4 * torch.arange(4, device=dev))) & 0xF) << 12)
        sc = torch.where(empty[:, None], torch.zeros_like(sc), sc)
        gi = gi.t().reshape(nb, 16, 2)
        masks = torch.tensor(MASKS, dtype=torch.int64, device=dev)[k].reshape(nb, 16)
        qh = (gi[..., 0] >> 8) | ((gi[..., 1] >> 8) << 4) | torch.where(empty[:, None], 0, masks)
        scb = torch.stack([sc & 0xFF, sc >> 8], dim=2).reshape(nb, 8)
        return torch.cat([(gi & 255).reshape(nb, 32), qh, scb], dim=1).to(torch.uint8)

    def decode(self, qt):
        b = self.blocks(qt).to(torch.int64)
        nb = b.shape[0]
        qs = b[:, :32].reshape(nb, 16, 2)
        qh = b[:, 32:48]  # [NB, 16]
        scb = b[:, 48:56].reshape(nb, 4, 2)
        sc = scb[..., 0] | (scb[..., 1] << 8)  # [NB, 4]
        u16 = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000)
        d = fp16_from_bytes(torch.stack([u16 & 0xFF, u16 >> 8], dim=1).to(torch.uint8))
        ls = (sc[:, :, None] >> (3 * torch.arange(4, device=b.device))) & 7  # [NB, 4, 4] -> block 4i + j
        dl = d[:, None] * (2 * ls.reshape(nb, 16) + 1).to(torch.float32)
        gi = torch.stack([qs[..., 0] | ((qh << 8) & 0x700), qs[..., 1] | ((qh << 4) & 0x700)], dim=2)
        delta = torch.stack([torch.where((qh & 0x08) != 0, -DELTA, DELTA), torch.where((qh & 0x80) != 0, -DELTA, DELTA)], dim=2)
        return dl.repeat_interleave(2, dim=1), delta.reshape(nb, 32), gi.reshape(nb, 32)


register(IQ1S("iq1_s", "llama.cpp IQ1_S: 8-weight points of a ternary grid (2048), 3-bit scale per 32, 1.56 bpw; needs an imatrix"))
register(IQ1M("iq1_m", "llama.cpp IQ1_M: 8-weight points of a ternary grid (2048), delta per run, 3-bit scale per 16, 1.75 bpw"))
