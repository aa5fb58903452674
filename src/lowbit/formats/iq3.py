"""llama.cpp's 3-bit i-quants, byte-identical with libggml: IQ3_XXS (3.0625 bpw) and IQ3_S (3.4375).

Each run of 4 weights is one point of a fixed grid of magnitudes (IQ3_XXS: 256 points, IQ3_S: 512;
levels 0..7 per coordinate) and the signs go by 8 (IQ3_XXS: 7 stored, the parity rule; IQ3_S: all
8), times a 4-bit scale per 32 weights of an FP16 super-scale per 256.  The quantizer is ggml's
``quantize_row_iq3_xxs_impl`` / ``quantize_row_iq3_s_impl``, the shared search of
:mod:`lowbit.formats.igrid` with these types' parameters.  ggml quantizes both with or without an
importance matrix; llama-quantize refuses IQ3_XXS without one, not IQ3_S.
"""

from __future__ import annotations

import torch

from lowbit.formats.base import fp16_bytes, fp16_from_bytes, register
from lowbit.formats.ggml_ref import f32
from lowbit.formats.igrid import IQGrid


class IQ3(IQGrid):
    dim = 4
    bits = 3
    kmax = 8
    sub = 32
    step = 0.2
    sigma_num = 2.0


class IQ3XXS(IQ3):
    """``quantize_row_iq3_xxs_impl``: 31 candidates, a refit of the runs left off the grid."""

    n_cand = 15
    eps = f32(1e-8)
    d_factor = f32(1.0125)

    def pack(self, d, ls, gi, signs, skip):
        nb = d.shape[0]
        s = signs.reshape(nb, 8, 4)
        word = s[..., 0] | (s[..., 1] << 7) | (s[..., 2] << 14) | (s[..., 3] << 21) | (ls << 28)
        wb = torch.stack([(word >> (8 * k)) & 0xFF for k in range(4)], dim=2).reshape(nb, 32)
        return torch.cat([fp16_bytes(d), gi.to(torch.uint8), wb.to(torch.uint8)], dim=1)

    def unpack(self, blocks):
        nb = blocks.shape[0]
        d = fp16_from_bytes(blocks[:, :2])
        b = blocks.to(torch.int64)
        gi = b[:, 2:66]
        wb = b[:, 66:98].reshape(nb, 8, 4)
        word = wb[..., 0] | (wb[..., 1] << 8) | (wb[..., 2] << 16) | (wb[..., 3] << 24)
        signs = torch.stack([(word >> (7 * k)) & 127 for k in range(4)], dim=2).reshape(nb, 32)
        return d, word >> 28, gi, signs

    def block_scale(self, d, ls):
        return d * (0.5 + ls.to(torch.float32)) * 0.5


class IQ3S(IQ3):
    """``quantize_row_iq3_s_impl``: 19 candidates, no run counted on the grid before one wins, a
    refit of every run; all 8 signs stored."""

    llama_needs_imatrix = False  # llama-quant.cpp's tensor_requires_imatrix leaves IQ3_S out
    nwant = 3
    on_at_start = False
    refit_all = True
    parity = False
    eps = 0.0
    d_factor = f32(1.033)
    zero_empty = False

    def pack(self, d, ls, gi, signs, skip):
        nb = d.shape[0]
        qh = ((gi >> 8).reshape(nb, 8, 8) << torch.arange(8, device=gi.device)).sum(dim=2)
        sc = ls[:, 0::2] | (ls[:, 1::2] << 4)
        # ggml moves its qs and signs pointers past a block only when it stores one: the blocks after
        # an all-zero block land one block earlier, and the last ones stay zero (qh is indexed, not moved)
        order = torch.sort(skip.to(torch.int8), dim=1, stable=True).indices  # [NB, 8] kept blocks first
        gone = torch.gather(skip, 1, order)[..., None]
        lo = torch.gather((gi & 255).reshape(nb, 8, 8), 1, order[..., None].expand(-1, -1, 8))
        sg = torch.gather(signs.reshape(nb, 8, 4), 1, order[..., None].expand(-1, -1, 4))
        lo = torch.where(gone, 0, lo).reshape(nb, 64)
        sg = torch.where(gone, 0, sg).reshape(nb, 32)
        parts = [lo, qh, sg, sc]
        return torch.cat([fp16_bytes(d)] + [t.to(torch.uint8) for t in parts], dim=1)

    def unpack(self, blocks):
        nb = blocks.shape[0]
        d = fp16_from_bytes(blocks[:, :2])
        b = blocks.to(torch.int64)
        lo, qh, signs, sc = b[:, 2:66], b[:, 66:74], b[:, 74:106], b[:, 106:110]
        hi = (qh[:, :, None] >> torch.arange(8, device=b.device)) & 1
        ls = torch.stack([sc & 0x0F, sc >> 4], dim=2).reshape(nb, 8)
        return d, ls, lo | (hi.reshape(nb, 64) << 8), signs

    def block_scale(self, d, ls):
        return d * (1 + 2 * ls).to(torch.float32)


register(IQ3XXS("iq3_xxs", "llama.cpp IQ3_XXS: 4-weight grid points (256) with signs, 4-bit scale per 32, 3.06 bpw"))
register(IQ3S("iq3_s", "llama.cpp IQ3_S: 4-weight grid points (512) with 8 signs, 4-bit scale per 32, 3.44 bpw"))
