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
``ggml_quantize_chunk`` exactly.  Each type is a class with its block layout, named as ggml-common.h
names the fields of ``block_qN_K``.
"""

from __future__ import annotations

import torch

from lowbit.formats.base import (
    Format,
    Grid,
    QTensor,
    check_imatrix,
    constant_like,
    fp16_bytes,
    fp16_from_bytes,
    ggml_type,
    map_row_chunks,
    register,
)
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


def _pack_q6_codes(L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[NB, 256] codes 0..63 -> (ql [NB, 128], qh [NB, 64])."""
    L = L.to(torch.uint8).reshape(-1, 2, 4, 32)  # [nb, half, s, l]
    low = L & 0x0F
    ql = torch.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)
    hi = L >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return ql.reshape(-1, 128), qh.reshape(-1, 64)


# ---- block layouts ------------------------------------------------------------------------
class BlockLayout:
    """The named byte fields of one super-block, in storage order (ggml-common.h's ``block_qN_K``)."""

    def __init__(self, *fields: tuple[str, int]) -> None:
        self.fields: dict[str, slice] = {}
        pos = 0
        for name, size in fields:
            self.fields[name] = slice(pos, pos + size)
            pos += size
        #: bytes per super-block
        self.size = pos

    def split(self, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """Blocks ``[NB, size]`` -> each field's bytes ``[NB, field size]`` (views)."""
        return {name: b[:, sl] for name, sl in self.fields.items()}

    def join(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each field's bytes ``[NB, field size]`` (uint8) -> blocks ``[NB, size]``."""
        return torch.cat([parts[name] for name in self.fields], dim=1)


# ---- the types ------------------------------------------------------------------------------
class KQuant(Format):
    """A K-quant type: super-blocks of 256 weights stored as :attr:`layout`.

    Each type implements :meth:`fit` (ggml's quantizer: the fields other than the codes, and the
    codes), :meth:`pack_codes` (codes into their fields), :meth:`unpack_codes` (the inverse) and
    :meth:`sub_scales`.  A code ``q`` (0..:attr:`qmax`) decodes to ``dl * (q - zero)`` where the type
    has a :attr:`zero` (Q3_K, Q6_K), else to ``dl * q - ml``, with ``dl`` and ``ml`` its sub-block's
    scale and min: :meth:`dequantize` is the grid's values of the codes, the one decoding path."""

    block_size = QK_K
    uses_imatrix = True
    has_grid = True
    layout: BlockLayout
    #: codes lie in 0..qmax
    qmax: int
    #: the code of value 0 (Q3_K, Q6_K), or None for the types with a min per sub-block
    zero: float | None = None

    def __init__(self, name: str, bits: int, desc: str, fallback: str) -> None:
        self.name = name
        self.gguf_fallback = fallback
        t = ggml_type(name)  # the id and block size of the GGML type of the same name
        assert (t.block, t.type_size) == (QK_K, self.layout.size), f"{name}: gguf-py's block layout differs from lowbit's"
        self.gguf_type = t.type_id
        self.type_size = t.type_size
        self.bits = bits
        self.description = desc

    # ---- per type ----------------------------------------------------------------------
    def fit(self, x: torch.Tensor, qw: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Super-blocks ``x`` [NB, 256] (error weights ``qw`` of the same shape, or None): the bytes
        of every field but the codes', and the codes [NB, 256]."""
        raise NotImplementedError

    def pack_codes(self, L: torch.Tensor) -> dict[str, torch.Tensor]:
        """Codes [NB, 256] (0..qmax) -> the bytes of the fields that hold them."""
        raise NotImplementedError

    def sub_scales(self, f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per weight [NB, 256]: the sub-block scale ``dl`` and min ``ml`` (None where the type has a zero)."""
        raise NotImplementedError

    def unpack_codes(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        """The stored codes [NB, 256] (uint8, 0..qmax) of blocks split into their fields."""
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------
    def quantize_blocks(self, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        fields, L = self.fit(x, qw)
        return self.layout.join({**fields, **self.pack_codes(L)})

    def quantize(self, w: torch.Tensor, name: str = "tensor", imatrix: torch.Tensor | None = None) -> QTensor:
        w = self.check(w, name)
        rows, cols = w.shape
        qw_row = None
        if imatrix is not None:
            qw_row = check_imatrix(imatrix, cols, name).to(w.device)

        def run(r0: int, r1: int) -> torch.Tensor:
            x = w[r0:r1].reshape(-1, QK_K)
            qw = None if qw_row is None else qw_row.reshape(1, -1).expand(r1 - r0, -1).reshape(-1, QK_K)
            return self.quantize_blocks(x, qw)

        blocks = map_row_chunks(run, rows, cols, w.device).reshape(rows, -1)
        return QTensor(self.name, (rows, cols), {"blocks": blocks})

    def _split(self, qt: QTensor) -> dict[str, torch.Tensor]:
        return self.layout.split(qt.parts["blocks"].reshape(-1, self.type_size))

    def codes(self, qt: QTensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return self.unpack_codes(self._split(qt)).reshape(qt.shape).to(dtype)

    # ---- grid (GPTQ and other methods choose the codes) -----------------------------
    def grid(self, qt: QTensor) -> Grid:
        """Per weight: ``dl * q - ml`` (Q2_K, Q4_K, Q5_K) or ``dl * (q - zero)`` (Q3_K: q = 0..7, the
        high bit from hmask, zero 4; Q6_K: zero 32)."""
        rows, cols = qt.shape
        dl, ml = self.sub_scales(self._split(qt))
        dl = dl.reshape(rows, cols)
        if ml is None:
            assert self.zero is not None
            return Grid(dl, constant_like(dl, self.zero), None, 0, self.qmax)
        return Grid(dl, None, (-ml).reshape(rows, cols), 0, self.qmax)

    def with_codes(self, qt: QTensor, codes: torch.Tensor) -> QTensor:
        rows, _ = qt.shape
        f = self._split(qt)
        f.update(self.pack_codes(codes.reshape(-1, QK_K).clamp(0, self.qmax)))
        return QTensor(self.name, qt.shape, {"blocks": self.layout.join(f).reshape(rows, -1)}, dict(qt.meta))

    def storage_bits(self, shape: tuple[int, int]) -> int:
        return shape[0] * (shape[1] // QK_K) * self.type_size * 8


class Q2K(KQuant):
    """16 sub-blocks of 16: a byte of 4-bit scale (low) and 4-bit min (high) each, 2-bit codes, and
    FP16 ``d`` and ``dmin`` for the scales and mins."""

    layout = BlockLayout(("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2))
    qmax = 3

    def fit(self, x: torch.Tensor, qw: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
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
        return {"scales": sc_byte.to(torch.uint8), "d": fp16_bytes(d), "dmin": fp16_bytes(dmin)}, L

    def pack_codes(self, L: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"qs": _pack_2bit(L)}

    def sub_scales(self, f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        sc = f["scales"]
        d, dmin = fp16_from_bytes(f["d"]), fp16_from_bytes(f["dmin"])
        dl = (d[:, None] * (sc & 0x0F).to(torch.float32)).repeat_interleave(16, dim=1)
        ml = (dmin[:, None] * (sc >> 4).to(torch.float32)).repeat_interleave(16, dim=1)
        return dl, ml

    def unpack_codes(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        return _unpack_2bit(f["qs"])


class Q3K(KQuant):
    """16 sub-blocks of 16 with 6-bit signed scales (12 bytes) against an FP16 ``d``; 3-bit codes:
    the low two bits in ``qs``, the high bit in ``hmask``."""

    layout = BlockLayout(("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2))
    qmax = 7
    zero = 4.0

    def fit(self, x: torch.Tensor, qw: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
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
        return {"scales": sc_bytes, "d": fp16_bytes(d)}, L

    def pack_codes(self, L: torch.Tensor) -> dict[str, torch.Tensor]:
        hmask, qs = _pack_q3_codes(L)
        return {"hmask": hmask, "qs": qs}

    def sub_scales(self, f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        sc = _unpack_scales_q3(f["scales"])
        d = fp16_from_bytes(f["d"])
        return (d[:, None] * sc).repeat_interleave(16, dim=1), None

    def unpack_codes(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        hmask = f["hmask"]
        shifts = torch.arange(8, dtype=torch.uint8, device=hmask.device).reshape(1, 8, 1)
        high = ((hmask[:, None, :] >> shifts) & 1).reshape(-1, QK_K)
        return _unpack_2bit(f["qs"]) | (high << 2)


class _Q45K(KQuant):
    """Q4_K and Q5_K: 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min (12 bytes) against
    FP16 ``d`` and ``dmin``; codes of 4 (Q4_K) or 5 (Q5_K, the high bits in ``qh``) bits."""

    def fit(self, x: torch.Tensor, qw: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        nmax = self.qmax
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
        return {"d": fp16_bytes(d), "dmin": fp16_bytes(dmin), "scales": _pack_scales_k4(ls, lm)}, L

    def sub_scales(self, f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        d, dmin = fp16_from_bytes(f["d"]), fp16_from_bytes(f["dmin"])
        ls, lm = _unpack_scales_k4(f["scales"])
        dl = (d[:, None] * ls).repeat_interleave(32, dim=1)
        ml = (dmin[:, None] * lm).repeat_interleave(32, dim=1)
        return dl, ml



class Q4K(_Q45K):
    layout = BlockLayout(("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128))
    qmax = 15

    def pack_codes(self, L: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"qs": _pack_4bit_64(L)}

    def unpack_codes(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        return _unpack_4bit_64(f["qs"])


class Q5K(_Q45K):
    layout = BlockLayout(("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128))
    qmax = 31

    def pack_codes(self, L: torch.Tensor) -> dict[str, torch.Tensor]:
        L = L.to(torch.uint8)
        high = (L >> 4).reshape(-1, 4, 2, 32)  # [nb, chunk c, half s, j]: bit 2c+s of qh[j]
        shifts = torch.arange(8, dtype=torch.uint8, device=L.device).reshape(1, 4, 2, 1)
        qh = (high << shifts).reshape(-1, 8, 32).sum(dim=1, dtype=torch.int32).to(torch.uint8)
        return {"qh": qh, "qs": _pack_4bit_64(L & 0x0F)}

    def unpack_codes(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        qh = f["qh"]
        q = _unpack_4bit_64(f["qs"])
        shifts = torch.arange(8, dtype=torch.uint8, device=qh.device).reshape(1, 8, 1)
        high = ((qh[:, None, :] >> shifts) & 1).reshape(-1, QK_K)
        return q | (high << 4)


class Q6K(KQuant):
    """16 sub-blocks of 16 with 8-bit signed scales against an FP16 ``d``; 6-bit codes: the low four
    bits in ``ql``, the high two in ``qh``.  A block whose scales are all (near) zero is stored as
    zero bytes, as ggml does."""

    layout = BlockLayout(("ql", 128), ("qh", 64), ("scales", 16), ("d", 2))
    qmax = 63
    zero = 32.0

    def fit(self, x: torch.Tensor, qw: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
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
        fields = {"scales": sc.to(torch.int8).view(torch.uint8), "d": fp16_bytes(d)}
        # a zero block: every field zero (codes 0 pack to zero bytes)
        fields = {k: torch.where(zero[:, None], torch.zeros_like(v), v) for k, v in fields.items()}
        return fields, torch.where(zero[:, None], torch.zeros_like(L), L)

    def pack_codes(self, L: torch.Tensor) -> dict[str, torch.Tensor]:
        ql, qh = _pack_q6_codes(L)
        return {"ql": ql, "qh": qh}

    def sub_scales(self, f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        sc = f["scales"].contiguous().view(torch.int8).to(torch.float32)
        d = fp16_from_bytes(f["d"])
        return (d[:, None] * sc).repeat_interleave(16, dim=1), None

    def unpack_codes(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        ql = f["ql"].reshape(-1, 2, 2, 32)  # [nb, half, part, l]
        qh = f["qh"].reshape(-1, 2, 1, 32)
        low = torch.stack([ql[:, :, 0] & 0x0F, ql[:, :, 1] & 0x0F, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=ql.device).reshape(1, 1, 4, 1)
        hi = (qh >> shifts) & 3
        return (low | (hi << 4)).reshape(-1, QK_K)


register(Q2K("q2_k", 2, "llama.cpp Q2_K: 2-bit, 16x16 with 4-bit scales and mins, 2.625 bpw", fallback="q4_0"))
register(Q3K("q3_k", 3, "llama.cpp Q3_K: 3-bit, 16x16 with 6-bit scales, 3.4375 bpw", fallback="q4_0"))
register(Q4K("q4_k", 4, "llama.cpp Q4_K: 4-bit, 8x32 with 6-bit scales and mins, 4.5 bpw", fallback="q5_0"))
register(Q5K("q5_k", 5, "llama.cpp Q5_K: 5-bit, 8x32 with 6-bit scales and mins, 5.5 bpw", fallback="q5_1"))
register(Q6K("q6_k", 6, "llama.cpp Q6_K: 6-bit, 16x16 with 8-bit scales, 6.5625 bpw", fallback="q8_0"))
