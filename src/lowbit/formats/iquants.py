"""llama.cpp's non-linear 4-bit types IQ4_NL and IQ4_XS, byte-identical with libggml.

Both map each weight to one of 16 fixed levels (``kvalues_iq4nl``, denser near zero) times a
block scale.  IQ4_NL: blocks of 32 with an FP16 scale (4.5 bpw).  IQ4_XS: super-blocks of 256 with
an FP16 super-scale and eight 6-bit block scales (4.25 bpw).  The scale of each block of 32 is the
best of 16 candidates under a weighted squared error (weights ``x^2``, or
``imatrix * sqrt(sigma2 + x^2)`` with an importance matrix), as ggml's quantize_row_iq4_nl_impl
does, evaluated for all blocks and candidates at once.
"""

from __future__ import annotations

import torch

from lowbit.formats.base import (
    Format,
    Grid,
    QTensor,
    check_imatrix,
    fp16_bytes,
    fp16_from_bytes,
    ggml_type,
    map_row_chunks,
    register,
)
from lowbit.formats.ggml_ref import GROUP_MAX_EPS, best_index_int8, csqrt, first_absmax, sdiv, seqsum

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
NTRY = 7


def _block_scales(xg: torch.Tensor, w: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of 32 (``xg`` [32, G]): the fitted scale ``d`` [G] and the first-pass codes [32, G]."""
    mx, amax = first_absmax(xg)
    zero = amax < GROUP_MAX_EPS
    smx = torch.where(zero, torch.ones_like(mx), mx)
    d = sdiv(-smx, float(KVALUES[0]))
    L = best_index_int8(vals, sdiv(1.0, d) * xg)
    q = vals[L]
    wq = w * q
    sumqx = seqsum(wq * xg)
    sumq2 = seqsum(wq * q)
    d = torch.where(sumq2 > 0, sumqx / torch.where(sumq2 > 0, sumq2, 1.0), 0.0)
    best = d * sumqx
    for t in range(-NTRY, NTRY + 1):  # one candidate at a time: the temporaries stay in cache
        idc = sdiv(float(t + KVALUES[0]), smx)
        qc = vals[best_index_int8(vals, idc[None, :] * xg)]
        wqc = w * qc
        sqx = seqsum(wqc * xg)
        sq2 = seqsum(wqc * qc)
        take = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = torch.where(take, sqx / torch.where(take, sq2, 1.0), d)
        best = torch.where(take, d * sqx, best)
    d = torch.where(zero, torch.zeros_like(d), d)
    return d, L


def _weights(x: torch.Tensor, qw: torch.Tensor | None, sb: int) -> torch.Tensor:
    """Per-weight error weights for super-blocks of ``sb`` (x: [N, sb])."""
    if qw is None:
        return x * x
    xt = x.t()
    sigma2 = seqsum(xt * xt) * (2.0 / sb)
    return qw * csqrt(sigma2[:, None] + x * x)


def _pack_nl(L: torch.Tensor) -> torch.Tensor:
    """[N, 32k] codes -> [N, 16k]: byte 16i + j = L[32i + j] | L[32i + 16 + j] << 4."""
    q = L.to(torch.uint8).reshape(L.shape[0], -1, 2, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(L.shape[0], -1)


def _unpack_nl(qs: torch.Tensor) -> torch.Tensor:
    q = qs.reshape(qs.shape[0], -1, 1, 16)
    return torch.cat([q & 0x0F, q >> 4], dim=2).reshape(qs.shape[0], -1).long()


def _iq4_nl(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    vals = torch.tensor(KVALUES, dtype=torch.float32, device=x.device)
    x = x.reshape(-1, 32)
    w = _weights(x, qw, 32)
    d, _ = _block_scales(x.t().contiguous(), w.t().contiguous(), vals)
    idl = torch.where(d != 0, sdiv(1.0, torch.where(d != 0, d, 1.0)), 0.0)
    L = best_index_int8(vals, idl[:, None] * x)
    return torch.cat([fp16_bytes(d), _pack_nl(L)], dim=1)


def _iq4_xs(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    vals = torch.tensor(KVALUES, dtype=torch.float32, device=x.device)
    x = x.reshape(-1, 256)
    nb = x.shape[0]
    w = _weights(x, qw, 256)
    d_blk, _ = _block_scales(x.reshape(-1, 32).t().contiguous(), w.reshape(-1, 32).t().contiguous(), vals)
    d_blk = d_blk.view(nb, 8)
    max_scale, _ = first_absmax(d_blk.t())
    d = -max_scale / 32
    idd = torch.where(d != 0, sdiv(1.0, torch.where(d != 0, d, 1.0)), 0.0)
    ls = torch.round(idd[:, None] * d_blk).clamp_(-32, 31)
    dl = d[:, None] * ls
    idl = torch.where(dl != 0, sdiv(1.0, torch.where(dl != 0, dl, 1.0)), 0.0)
    L = best_index_int8(vals, idl.repeat_interleave(32, dim=1) * x)
    lu = (ls + 32).to(torch.int32)
    lo = (lu & 0x0F).to(torch.uint8)
    scales_l = lo[:, 0::2] | (lo[:, 1::2] << 4)
    hi = lu >> 4
    scales_h = (hi << (2 * torch.arange(8, device=x.device, dtype=torch.int32))).sum(1, dtype=torch.int32)
    sh = torch.stack([scales_h & 0xFF, scales_h >> 8], dim=1).to(torch.uint8)
    return torch.cat([fp16_bytes(d), sh, scales_l, _pack_nl(L)], dim=1)


class IQ4(Format):
    def __init__(self, name: str, desc: str, fallback: str | None = None) -> None:
        self.name = name
        self.gguf_fallback = fallback
        t = ggml_type(name)  # the id and block layout of the GGML type of the same name
        self.gguf_type = t.type_id
        self.block_size = t.block
        self.type_size = t.type_size
        self.description = desc
        self.uses_imatrix = True

    def quantize(self, w: torch.Tensor, name: str = "tensor", imatrix: torch.Tensor | None = None) -> QTensor:
        w = self.check(w, name)
        rows, cols = w.shape
        qw_row = None if imatrix is None else check_imatrix(imatrix, cols, name).to(w.device)
        fn = _iq4_nl if self.block_size == 32 else _iq4_xs
        blk = self.block_size

        def run(r0: int, r1: int) -> torch.Tensor:
            x = w[r0:r1]
            qw = None if qw_row is None else qw_row.reshape(1, -1).expand(r1 - r0, -1)
            return fn(x.reshape(-1, blk), None if qw is None else qw.reshape(-1, blk))

        # IQ4's searches keep a candidate axis in their temporaries: smaller slices are faster
        blocks = map_row_chunks(run, rows, cols, w.device, chunk_weights=1 << 18).reshape(rows, -1)
        return QTensor(self.name, (rows, cols), {"blocks": blocks})

    def codes(self, qt: QTensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        b = qt.parts["blocks"].reshape(-1, self.type_size)
        head = 2 if self.block_size == 32 else 8
        return _unpack_nl(b[:, head:]).to(dtype).reshape(qt.shape)

    # ---- grid (GPTQ and other methods choose the codes) -----------------------------
    has_grid = True

    def grid(self, qt: QTensor) -> Grid:
        b = qt.parts["blocks"].reshape(-1, self.type_size)
        vals = torch.tensor(KVALUES, dtype=torch.float32, device=b.device)
        d = fp16_from_bytes(b[:, 0:2])
        if self.block_size == 32:
            dl = d[:, None].expand(-1, 32)
        else:
            sh = b[:, 2].to(torch.int32) | (b[:, 3].to(torch.int32) << 8)
            sl = b[:, 4:8]
            lo = torch.stack([sl & 0x0F, sl >> 4], dim=2).reshape(-1, 8).to(torch.int32)
            hi = (sh[:, None] >> (2 * torch.arange(8, device=b.device, dtype=torch.int32))) & 3
            ls = (lo | (hi << 4)) - 32
            dl = (d[:, None] * ls.to(torch.float32)).repeat_interleave(32, dim=1)
        return Grid(dl.reshape(qt.shape), None, None, 0, 15, vals)

    def with_codes(self, qt: QTensor, codes: torch.Tensor) -> QTensor:
        rows, _ = qt.shape
        b = qt.parts["blocks"].reshape(-1, self.type_size)
        head = 2 if self.block_size == 32 else 8
        out = torch.cat([b[:, :head], _pack_nl(codes.reshape(b.shape[0], -1).clamp(0, 15))], dim=1)
        return QTensor(self.name, qt.shape, {"blocks": out.reshape(rows, -1)}, dict(qt.meta))

    def storage_bits(self, shape: tuple[int, int]) -> int:
        return shape[0] * (shape[1] // self.block_size) * self.type_size * 8


register(IQ4("iq4_nl", "llama.cpp IQ4_NL: 16 non-linear levels, blocks of 32 with FP16 scale, 4.5 bpw"))
register(IQ4("iq4_xs", "llama.cpp IQ4_XS: 16 non-linear levels, 8x32 with 6-bit scales, 4.25 bpw",
                  fallback="iq4_nl"))
