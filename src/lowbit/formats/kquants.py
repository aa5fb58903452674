"""llama.cpp's K-quants Q2_K, Q3_K, Q4_K, Q5_K and Q6_K, byte-identical with libggml.

Super-blocks of 256 weights along a row, split into sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 32
(Q4_K, Q5_K) whose scales (and mins) are themselves quantized to 4, 6 or 8 bits against one or
two FP16 super-block scales.

Without an importance matrix each type follows ggml's reference quantizer
(``quantize_row_qN_K_ref``); with one (a weight per input column, e.g. the mean squared activation
from :mod:`lowbit.algorithms.imatrix`) it follows ``quantize_row_qN_K_impl``: the errors are
weighted by ``imatrix * sqrt(sigma2 + x^2)`` and the sub-block scales are fitted with a weighted
search.  All searches run vectorized over every sub-block of the tensor at once (see
:mod:`lowbit.formats.ggml_ref`), in float32 with ggml's order of operations, so the bytes match
``ggml_quantize_chunk`` exactly.  Block layouts are ggml's (ggml-common.h).
"""

from __future__ import annotations

import torch

from lowbit.errors import FormatError
from lowbit.formats.base import Format, Grid, QTensor, map_row_chunks, register
from lowbit.formats.ggml_ref import (
    GROUP_MAX_EPS,
    csqrt,
    first_absmax,
    fp16_round,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    sdiv,
    seqsum,
)

QK_K = 256


def _f16b(v: torch.Tensor) -> torch.Tensor:
    """[N] float32 -> [N, 2] little-endian FP16 bytes."""
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _from_f16b(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).reshape(-1).to(torch.float32)


def _groups(x: torch.Tensor, n: int) -> torch.Tensor:
    """[NB, 256] -> [n, NB*256/n] (element-major groups)."""
    return x.reshape(-1, n).t().contiguous()


def _ungroup(t: torch.Tensor, nb: int) -> torch.Tensor:
    """[n, NB*256/n] -> [NB, 256]."""
    return t.t().reshape(nb, QK_K)


def _u8_wrap(v: torch.Tensor) -> torch.Tensor:
    """C's conversion of an int to uint8_t (modulo 256)."""
    return (v.to(torch.int32) & 0xFF).to(torch.int32)


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """[NB, 256] codes < 4 -> [NB, 64]: byte 32*h + l holds L[128h + l + 32*s] at bits 2s."""
    q = L.to(torch.uint8).reshape(-1, 2, 4, 32)
    out = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return out.reshape(-1, 64)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    q = qs.reshape(-1, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device).reshape(1, 1, 4, 1)
    return ((q >> shifts) & 3).reshape(-1, QK_K)


def _pack_4bit_64(L: torch.Tensor) -> torch.Tensor:
    """[NB, 256] codes < 16 -> [NB, 128]: byte 32*c + l = L[64c + l] | L[64c + 32 + l] << 4."""
    q = L.to(torch.uint8).reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _unpack_4bit_64(qs: torch.Tensor) -> torch.Tensor:
    q = qs.reshape(-1, 4, 1, 32)
    return torch.cat([q & 0x0F, q >> 4], dim=2).reshape(-1, QK_K)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """ggml's 12-byte packing of eight 6-bit scales and eight 6-bit mins (Q4_K, Q5_K)."""
    ls = ls.to(torch.uint8)
    lm = lm.to(torch.uint8)
    b0 = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    b1 = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    b2 = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return torch.cat([b0, b1, b2], dim=1)


def _unpack_scales_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo_s = s[:, 0:4] & 63
    lo_m = s[:, 4:8] & 63
    hi_s = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    hi_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([lo_s, hi_s], 1).to(torch.float32), torch.cat([lo_m, hi_m], 1).to(torch.float32)


def _pack_scales_q3(l6: torch.Tensor) -> torch.Tensor:
    """Sixteen 6-bit values (0..63) -> ggml's 12-byte Q3_K scale layout."""
    l6 = l6.to(torch.uint8)
    low = l6 & 0x0F
    b = low[:, :8] | (low[:, 8:] << 4)
    hi = (l6 >> 4).reshape(-1, 4, 4)  # [NB, j//4, j%4]
    h = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return torch.cat([b, h], dim=1)


def _unpack_scales_q3(s: torch.Tensor) -> torch.Tensor:
    low = torch.cat([s[:, :8] & 0x0F, s[:, :8] >> 4], dim=1)
    h = s[:, 8:12]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=s.device)
    hi = ((h[:, None, :] >> shifts[None, :, None]) & 3).reshape(-1, 16)
    return (low | (hi << 4)).to(torch.float32) - 32


def _pos_max(t: torch.Tensor) -> torch.Tensor:
    """``float m = 0; for (...) if (v > m) m = v;`` over dim 1: the largest positive value, else +0.0."""
    m = t.amax(dim=1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _sigma_sum(x: torch.Tensor) -> torch.Tensor:
    """Sequential sum of squares over each 256-weight super-block: [NB, 256] -> [NB]."""
    xt = x.t()
    return seqsum(xt * xt)


# ------------------------------------------------------------------------------------------
def _q2_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    nb = x.shape[0]
    xg = _groups(x, 16)  # [16, nb*16]
    if qw is None:
        w = xg.abs()
        scales, mins, L = make_qkx_quants(xg, w, 3, -0.5, 0.1, 15, True, strict_empty=False)
        scales, mins = scales.view(nb, 16), mins.view(nb, 16)
        max_scale = _pos_max(scales)
        max_min = _pos_max(mins)
        has_s, has_m = max_scale > 0, max_min > 0
        inv_s = torch.where(has_s, sdiv(15.0, torch.where(has_s, max_scale, 1.0)), 0.0)
        ls = torch.where(has_s[:, None], _u8_wrap(torch.round(inv_s[:, None] * scales)), 0)
        inv_m = torch.where(has_m, sdiv(15.0, torch.where(has_m, max_min, 1.0)), 0.0)
        lm = torch.where(has_m[:, None], torch.round(inv_m[:, None] * mins).to(torch.int32), 0)
        sc_byte = (ls | (lm << 4)) & 0xFF
        d = torch.where(has_s, sdiv(max_scale, 15.0), 0.0)
        dmin = torch.where(has_m, sdiv(max_min, 15.0), 0.0)
    else:
        sigma2 = _sigma_sum(x) / QK_K
        qwg = _groups(qw, 16)
        s2 = sigma2.repeat_interleave(16)[None, :]
        w = qwg * csqrt(s2 + xg * xg)
        sw = seqsum(w).view(nb, 16).t().contiguous()
        scales, mins, L = make_qkx_quants(xg, w, 3, -0.9, 0.05, 36, False, strict_empty=True)
        d, Ls = make_qp_quants(scales.view(nb, 16).t().contiguous(), 15, sw)
        dmin, Lm = make_qp_quants(mins.view(nb, 16).t().contiguous(), 15, sw)
        sc_byte = (Ls.t().to(torch.int32) | (Lm.t().to(torch.int32) << 4)) & 0xFF
    d16, dmin16 = fp16_round(d), fp16_round(dmin)
    L = _ungroup(L, nb)
    dd = (d16[:, None] * (sc_byte & 0x0F).to(torch.float32)).repeat_interleave(16, dim=1)
    dm = (dmin16[:, None] * (sc_byte >> 4).to(torch.float32)).repeat_interleave(16, dim=1)
    ok = dd != 0
    lq = torch.round((x + dm) / torch.where(ok, dd, 1.0)).clamp_(0, 3)
    L = torch.where(ok, lq, L)
    return torch.cat([sc_byte.to(torch.uint8), _pack_2bit(L), _f16b(d), _f16b(dmin)], dim=1)


def _q3_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    nb = x.shape[0]
    xg = _groups(x, 16)
    if qw is None:
        scales, L = make_q3_quants(xg, 4)
        scales = scales.view(nb, 16)
        max_scale, _ = first_absmax(scales.t())
        has = max_scale != 0
        iscale = sdiv(-32.0, torch.where(has, max_scale, 1.0))
        li = torch.round(iscale[:, None] * scales)
        li = ((li.to(torch.int32) + 128) & 0xFF) - 128  # int8_t
        l6 = torch.where(has[:, None], li.clamp(-32, 31) + 32, 0)
        sc_bytes = torch.where(has[:, None], _pack_scales_q3(l6), 0).to(torch.uint8)
        d = torch.where(has, sdiv(1.0, iscale), 0.0)
    else:
        sigma2 = 2 * _sigma_sum(x) / QK_K
        qwg = _groups(qw, 16)
        s2 = sigma2.repeat_interleave(16)[None, :]
        w = qwg * csqrt(s2 + xg * xg)
        sw = seqsum(w).view(nb, 16).t().contiguous()
        scales, L = make_qx_quants(xg, 4, 1, w)
        d, Ls = make_qx_quants(scales.view(nb, 16).t().contiguous(), 32, 1, sw)
        sc_bytes = _pack_scales_q3(Ls.t())
    d16 = fp16_round(d)
    L = _ungroup(L, nb)
    sc = _unpack_scales_q3(sc_bytes)
    dd = (d16[:, None] * sc).repeat_interleave(16, dim=1)
    ok = dd != 0
    lq = torch.round(x / torch.where(ok, dd, 1.0)).clamp_(-4, 3) + 4
    L = torch.where(ok, lq, L).to(torch.uint8)
    return torch.cat([*_pack_q3_codes(L), sc_bytes, _f16b(d)], dim=1)


def _pack_q3_codes(L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[NB, 256] codes 0..7 -> (hmask [NB, 32], low two bits [NB, 64])."""
    L = L.to(torch.uint8)
    high = L > 3
    L = torch.where(high, L - 4, L)
    # hmask: bit (j // 32) of byte (j % 32) for weight j
    hb = high.to(torch.uint8).reshape(-1, 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8, device=L.device).reshape(1, 8, 1)
    hmask = (hb << shifts).sum(dim=1, dtype=torch.int32).to(torch.uint8)
    return hmask, _pack_2bit(L)


def _q45_k(x: torch.Tensor, qw: torch.Tensor | None, nmax: int) -> torch.Tensor:
    nb = x.shape[0]
    xg = _groups(x, 32)  # [32, nb*8]
    if qw is None:
        sum_x2 = seqsum(xg * xg)
        av_x = csqrt(sum_x2 / 32)
        w = av_x[None, :] + xg.abs()
        if nmax == 15:
            scales, mins, L = make_qkx_quants(xg, w, 15, -1.0, 0.1, 20, False, strict_empty=False)
        else:
            scales, mins, L = make_qkx_quants(xg, w, 31, -0.5, 0.1, 15, False, strict_empty=False)
        scales, mins = scales.view(nb, 8), mins.view(nb, 8)
        max_scale = _pos_max(scales)
        max_min = _pos_max(mins)
        inv_s = torch.where(max_scale > 0, sdiv(63.0, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
        inv_m = torch.where(max_min > 0, sdiv(63.0, torch.where(max_min > 0, max_min, 1.0)), 0.0)
        ls = _u8_wrap(torch.round(inv_s[:, None] * scales)).clamp(max=63)
        lm = _u8_wrap(torch.round(inv_m[:, None] * mins)).clamp(max=63)
        d = sdiv(max_scale, 63.0)
        dmin = sdiv(max_min, 63.0)
    else:
        sigma2 = 2 * _sigma_sum(x) / QK_K
        qwg = _groups(qw, 32)
        s2 = sigma2.repeat_interleave(8)[None, :]
        w = qwg * csqrt(s2 + xg * xg)
        sw = seqsum(w).view(nb, 8).t().contiguous()
        scales, mins, L = make_qkx_quants(xg, w, nmax, -0.9, 0.05, 36, False, strict_empty=True)
        d, Ls = make_qp_quants(scales.view(nb, 8).t().contiguous(), 63, sw)
        dmin, Lm = make_qp_quants(mins.view(nb, 8).t().contiguous(), 63, sw)
        ls = Ls.t().to(torch.int32).clamp(max=63)
        lm = Lm.t().to(torch.int32).clamp(max=63)
    d16, dmin16 = fp16_round(d), fp16_round(dmin)
    L = _ungroup(L, nb)
    dd = (d16[:, None] * ls.to(torch.float32)).repeat_interleave(32, dim=1)
    dm = (dmin16[:, None] * lm.to(torch.float32)).repeat_interleave(32, dim=1)
    ok = dd != 0
    lq = torch.round((x + dm) / torch.where(ok, dd, 1.0)).clamp_(0, nmax)
    L = torch.where(ok, lq, L).to(torch.uint8)
    head = [_f16b(d), _f16b(dmin), _pack_scales_k4(ls, lm)]
    return torch.cat(head + _pack_q45_codes(L, nmax), dim=1)


def _pack_q45_codes(L: torch.Tensor, nmax: int) -> list[torch.Tensor]:
    """[NB, 256] codes -> Q4_K's 128 bytes of nibbles, or Q5_K's 32 bytes of high bits and 128 of nibbles."""
    L = L.to(torch.uint8)
    if nmax == 15:
        return [_pack_4bit_64(L)]
    high = (L >> 4).reshape(-1, 4, 2, 32)  # [nb, chunk c, half s, j]: bit 2c+s of qh[j]
    shifts = torch.arange(8, dtype=torch.uint8, device=L.device).reshape(1, 4, 2, 1)
    qh = (high << shifts).reshape(-1, 8, 32).sum(dim=1, dtype=torch.int32).to(torch.uint8)
    return [qh, _pack_4bit_64(L & 0x0F)]


def _q6_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    nb = x.shape[0]
    xg = _groups(x, 16)
    scales, L = make_qx_quants(xg, 32, 1, None if qw is None else _groups(qw, 16))
    scales = scales.view(nb, 16)
    max_scale, max_abs = first_absmax(scales.t())
    zero = max_abs < GROUP_MAX_EPS
    iscale = sdiv(-128.0, torch.where(zero, 1.0, max_scale))
    d = sdiv(1.0, iscale)
    sc = torch.round(iscale[:, None] * scales).clamp(max=127)
    d16 = fp16_round(d)
    L = _ungroup(L, nb)
    dd = (d16[:, None] * sc).repeat_interleave(16, dim=1)
    ok = dd != 0
    lq = torch.round(x / torch.where(ok, dd, 1.0)).clamp_(-32, 31) + 32
    L = torch.where(ok, lq, L)
    sc8 = sc.to(torch.int8).view(torch.uint8)
    out = torch.cat([*_pack_q6_codes(L), sc8, _f16b(d)], dim=1)
    return torch.where(zero[:, None], torch.zeros_like(out), out)


def _pack_q6_codes(L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[NB, 256] codes 0..63 -> (ql [NB, 128], qh [NB, 64])."""
    L = L.to(torch.uint8).reshape(-1, 2, 4, 32)  # [nb, half, s, l]
    low = L & 0x0F
    ql = torch.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)
    hi = L >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return ql.reshape(-1, 128), qh.reshape(-1, 64)


# ------------------------------------------------------------------------------------------
def _deq_q2_k(b: torch.Tensor) -> torch.Tensor:
    sc = b[:, 0:16]
    q = _unpack_2bit(b[:, 16:80]).to(torch.float32)
    d, dmin = _from_f16b(b[:, 80:82]), _from_f16b(b[:, 82:84])
    dl = (d[:, None] * (sc & 0x0F).to(torch.float32)).repeat_interleave(16, dim=1)
    ml = (dmin[:, None] * (sc >> 4).to(torch.float32)).repeat_interleave(16, dim=1)
    return dl * q - ml


def _deq_q3_k(b: torch.Tensor) -> torch.Tensor:
    hmask = b[:, 0:32]
    q = _unpack_2bit(b[:, 32:96]).to(torch.float32)
    sc = _unpack_scales_q3(b[:, 96:108])
    d = _from_f16b(b[:, 108:110])
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
    high = ((hmask[:, None, :] >> shifts) & 1).reshape(-1, QK_K).to(torch.float32)
    dl = (d[:, None] * sc).repeat_interleave(16, dim=1)
    return dl * (q - 4 * (1 - high))


def _deq_q45_k(b: torch.Tensor, nmax: int) -> torch.Tensor:
    d, dmin = _from_f16b(b[:, 0:2]), _from_f16b(b[:, 2:4])
    ls, lm = _unpack_scales_k4(b[:, 4:16])
    if nmax == 15:
        q = _unpack_4bit_64(b[:, 16:144]).to(torch.float32)
    else:
        qh = b[:, 16:48]
        q = _unpack_4bit_64(b[:, 48:176])
        shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
        high = ((qh[:, None, :] >> shifts) & 1).reshape(-1, QK_K)
        q = (q | (high << 4)).to(torch.float32)
    dl = (d[:, None] * ls).repeat_interleave(32, dim=1)
    ml = (dmin[:, None] * lm).repeat_interleave(32, dim=1)
    return dl * q - ml


def _deq_q6_k(b: torch.Tensor) -> torch.Tensor:
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)  # [nb, half, part, l]
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = _from_f16b(b[:, 208:210])
    low = torch.stack([ql[:, :, 0] & 0x0F, ql[:, :, 1] & 0x0F, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    hi = (qh >> shifts) & 3
    q = (low | (hi << 4)).reshape(-1, QK_K).to(torch.float32) - 32
    dl = (d[:, None] * sc).repeat_interleave(16, dim=1)
    return dl * q


class KQuant(Format):
    block_size = QK_K

    def __init__(self, name: str, gguf_type: int, type_size: int, bits: int, desc: str) -> None:
        self.name = name
        self.gguf_type = gguf_type
        self.type_size = type_size
        self.bits = bits
        self.description = desc
        self.uses_imatrix = True

    def _quantize_blocks(self, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        if self.name == "q2_k":
            return _q2_k(x, qw)
        if self.name == "q3_k":
            return _q3_k(x, qw)
        if self.name == "q4_k":
            return _q45_k(x, qw, 15)
        if self.name == "q5_k":
            return _q45_k(x, qw, 31)
        return _q6_k(x, qw)

    def quantize(self, w: torch.Tensor, name: str = "tensor", imatrix: torch.Tensor | None = None) -> QTensor:
        w = self.check(w, name)
        rows, cols = w.shape
        qw_row = None
        if imatrix is not None:
            qw_row = check_imatrix(imatrix, cols, name).to(w.device)

        def run(r0: int, r1: int) -> torch.Tensor:
            x = w[r0:r1].reshape(-1, QK_K)
            qw = None if qw_row is None else qw_row.reshape(1, -1).expand(r1 - r0, -1).reshape(-1, QK_K)
            return self._quantize_blocks(x, qw)

        blocks = map_row_chunks(run, rows, cols, w.device).reshape(rows, -1)
        return QTensor(self.name, (rows, cols), {"blocks": blocks})

    def dequantize(self, qt: QTensor) -> torch.Tensor:
        b = qt.parts["blocks"].reshape(-1, self.type_size)
        if self.name == "q2_k":
            x = _deq_q2_k(b)
        elif self.name == "q3_k":
            x = _deq_q3_k(b)
        elif self.name == "q4_k":
            x = _deq_q45_k(b, 15)
        elif self.name == "q5_k":
            x = _deq_q45_k(b, 31)
        else:
            x = _deq_q6_k(b)
        return x.reshape(qt.shape)

    # ---- grid (GPTQ and other methods choose the codes) -----------------------------
    has_grid = True

    def grid(self, qt: QTensor) -> Grid:
        """Per weight: Q2_K/Q4_K/Q5_K decode ``dl * q - ml``, Q3_K ``dl * (q - 4)`` (q = 0..7, the high
        bit from hmask), Q6_K ``dl * (q - 32)``; ``dl`` and ``ml`` are the sub-block scale and min."""
        rows, cols = qt.shape
        b = qt.parts["blocks"].reshape(-1, self.type_size)

        def shaped(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(rows, cols)

        if self.name == "q2_k":
            sc = b[:, 0:16]
            d, dmin = _from_f16b(b[:, 80:82]), _from_f16b(b[:, 82:84])
            dl = (d[:, None] * (sc & 0x0F).to(torch.float32)).repeat_interleave(16, dim=1)
            ml = (dmin[:, None] * (sc >> 4).to(torch.float32)).repeat_interleave(16, dim=1)
            return Grid(shaped(dl), None, shaped(-ml), 0, 3)
        if self.name == "q3_k":
            dl = (_from_f16b(b[:, 108:110])[:, None] * _unpack_scales_q3(b[:, 96:108])).repeat_interleave(16, dim=1)
            return Grid(shaped(dl), torch.full_like(shaped(dl), 4.0), None, 0, 7)
        if self.name in ("q4_k", "q5_k"):
            d, dmin = _from_f16b(b[:, 0:2]), _from_f16b(b[:, 2:4])
            ls, lm = _unpack_scales_k4(b[:, 4:16])
            dl = (d[:, None] * ls).repeat_interleave(32, dim=1)
            ml = (dmin[:, None] * lm).repeat_interleave(32, dim=1)
            return Grid(shaped(dl), None, shaped(-ml), 0, 15 if self.name == "q4_k" else 31)
        sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
        dl = (_from_f16b(b[:, 208:210])[:, None] * sc).repeat_interleave(16, dim=1)
        return Grid(shaped(dl), torch.full_like(shaped(dl), 32.0), None, 0, 63)

    def with_codes(self, qt: QTensor, codes: torch.Tensor) -> QTensor:
        rows, _ = qt.shape
        b = qt.parts["blocks"].reshape(-1, self.type_size)
        L = codes.reshape(-1, QK_K)
        if self.name == "q2_k":
            out = torch.cat([b[:, 0:16], _pack_2bit(L.clamp(0, 3)), b[:, 80:84]], dim=1)
        elif self.name == "q3_k":
            out = torch.cat([*_pack_q3_codes(L.clamp(0, 7)), b[:, 96:110]], dim=1)
        elif self.name in ("q4_k", "q5_k"):
            nmax = 15 if self.name == "q4_k" else 31
            out = torch.cat([b[:, 0:16], *_pack_q45_codes(L.clamp(0, nmax), nmax)], dim=1)
        else:
            out = torch.cat([*_pack_q6_codes(L.clamp(0, 63)), b[:, 192:210]], dim=1)
        return QTensor(self.name, qt.shape, {"blocks": out.reshape(rows, -1)}, dict(qt.meta))

    def storage_bits(self, shape: tuple[int, int]) -> int:
        return shape[0] * (shape[1] // QK_K) * self.type_size * 8


def check_imatrix(imatrix: torch.Tensor, cols: int, name: str) -> torch.Tensor:
    """An importance vector must have one finite, non-negative weight per input column."""
    im = torch.as_tensor(imatrix).detach().to(torch.float32).reshape(-1)
    if im.numel() != cols:
        raise FormatError(f"{name}: importance matrix has {im.numel()} entries, the tensor has {cols} columns")
    if not torch.isfinite(im).all() or bool((im < 0).any()):
        raise FormatError(f"{name}: importance matrix has NaN, Inf or negative entries")
    return im.contiguous()


# GGML type ids and block sizes from ggml.h / ggml-common.h
register(KQuant("q2_k", 10, 84, 2, "llama.cpp Q2_K: 2-bit, 16x16 with 4-bit scales and mins, 2.625 bpw"))
register(KQuant("q3_k", 11, 110, 3, "llama.cpp Q3_K: 3-bit, 16x16 with 6-bit scales, 3.4375 bpw"))
register(KQuant("q4_k", 12, 144, 4, "llama.cpp Q4_K: 4-bit, 8x32 with 6-bit scales and mins, 4.5 bpw"))
register(KQuant("q5_k", 13, 176, 5, "llama.cpp Q5_K: 5-bit, 8x32 with 6-bit scales and mins, 5.5 bpw"))
register(KQuant("q6_k", 14, 210, 6, "llama.cpp Q6_K: 6-bit, 16x16 with 8-bit scales, 6.5625 bpw"))
