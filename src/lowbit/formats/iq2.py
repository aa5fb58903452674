"""llama.cpp's 2-bit i-quants, byte-identical with libggml: IQ2_XXS (2.0625 bpw), IQ2_XS (2.3125)
and IQ2_S (2.5625).

Each run of 8 weights is one point of a fixed grid of magnitudes (256, 512 or 1024 points, levels
0..2 per coordinate) and its signs, times a 4-bit scale per block (32 weights for IQ2_XXS, 16 for
the others) of an FP16 super-scale per 256.  IQ2_XXS and IQ2_XS store 7 signs per run (the parity
rule) and need an importance matrix (ggml asserts one); IQ2_S stores all 8 and can do without,
though llama-quantize refuses to make any of them without one.  The quantizer is the shared
search of :mod:`lowbit.formats.igrid` with each type's parameters from ggml-quants.c.
"""

from __future__ import annotations

import torch

from lowbit.formats.base import fp16_bytes, fp16_from_bytes, register
from lowbit.formats.ggml_ref import f32
from lowbit.formats.igrid import IQGrid


class IQ2XXS(IQGrid):
    """``quantize_row_iq2_xxs_impl``: blocks of 32, a first scale from make_qp_quants, 13 candidates."""

    requires_imatrix = True
    sub = 32
    qp_start = True
    n_cand = 6

    def pack(self, d, ls, gi, signs, skip):
        nb = d.shape[0]
        g = gi.reshape(nb, 8, 4).to(torch.uint8)
        s = signs.reshape(nb, 8, 4)
        word = s[..., 0] | (s[..., 1] << 7) | (s[..., 2] << 14) | (s[..., 3] << 21) | (ls << 28)
        wb = torch.stack([(word >> (8 * k)) & 0xFF for k in range(4)], dim=2).to(torch.uint8)
        return torch.cat([fp16_bytes(d), torch.cat([g, wb], dim=2).reshape(nb, 64)], dim=1)

    def unpack(self, blocks):
        nb = blocks.shape[0]
        d = fp16_from_bytes(blocks[:, :2])
        q = blocks[:, 2:66].reshape(nb, 8, 8).to(torch.int64)
        gi = q[:, :, :4].reshape(nb, 32)
        word = q[:, :, 4] | (q[:, :, 5] << 8) | (q[:, :, 6] << 16) | (q[:, :, 7] << 24)
        signs = torch.stack([(word >> (7 * k)) & 127 for k in range(4)], dim=2).reshape(nb, 32)
        return d, word >> 28, gi, signs


class IQ2XS(IQGrid):
    """``quantize_row_iq2_xs_impl``: blocks of 16, 19 candidates, a refit of the runs left off the grid."""

    requires_imatrix = True
    sub = 16

    def pack(self, d, ls, gi, signs, skip):
        nb = d.shape[0]
        q = gi | (signs << 9)  # [NB, 32] uint16
        qb = torch.stack([q & 0xFF, q >> 8], dim=2).reshape(nb, 64).to(torch.uint8)
        sc = (ls[:, 0::2] | (ls[:, 1::2] << 4)).to(torch.uint8)
        return torch.cat([fp16_bytes(d), qb, sc], dim=1)

    def unpack(self, blocks):
        nb = blocks.shape[0]
        d = fp16_from_bytes(blocks[:, :2])
        qb = blocks[:, 2:66].reshape(nb, 32, 2).to(torch.int64)
        q = qb[..., 0] | (qb[..., 1] << 8)
        sc = blocks[:, 66:74].to(torch.int64)
        ls = torch.stack([sc & 0x0F, sc >> 4], dim=2).reshape(nb, 16)
        return d, ls, q & 511, q >> 9


class IQ2S(IQGrid):
    """``quantize_row_iq2_s_impl``: IQ2_XS's search on 1024 points with all 8 signs stored."""

    sub = 16
    nwant = 1
    parity = False
    eps = f32(1e-8)
    sigma_num = 2.0
    noim_sigma = 0.25
    d_factor = f32(0.9875)
    zero_empty = False

    def pack(self, d, ls, gi, signs, skip):
        nb = d.shape[0]
        qh = (gi >> 8).reshape(nb, 8, 4) << (2 * torch.arange(4, device=gi.device))
        qh = qh.sum(dim=2)
        sc = ls[:, 0::2] | (ls[:, 1::2] << 4)
        parts = [gi & 255, signs, qh, sc]
        return torch.cat([fp16_bytes(d)] + [t.to(torch.uint8) for t in parts], dim=1)

    def unpack(self, blocks):
        nb = blocks.shape[0]
        d = fp16_from_bytes(blocks[:, :2])
        b = blocks.to(torch.int64)
        lo, signs, qh, sc = b[:, 2:34], b[:, 34:66], b[:, 66:74], b[:, 74:82]
        hi = (qh[:, :, None] >> (2 * torch.arange(4, device=b.device))) & 3
        ls = torch.stack([sc & 0x0F, sc >> 4], dim=2).reshape(nb, 16)
        return d, ls, lo | (hi.reshape(nb, 32) << 8), signs


register(IQ2XXS("iq2_xxs", "llama.cpp IQ2_XXS: 8-weight grid points (256) with signs, 4-bit scale per 32, 2.06 bpw; needs an imatrix"))
register(IQ2XS("iq2_xs", "llama.cpp IQ2_XS: 8-weight grid points (512) with signs, 4-bit scale per 16, 2.31 bpw; needs an imatrix"))
register(IQ2S("iq2_s", "llama.cpp IQ2_S: 8-weight grid points (1024) with 8 signs, 4-bit scale per 16, 2.56 bpw"))
