"""llama.cpp's legacy block types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, byte-identical with libggml.

Blocks of 32 consecutive weights along a row.  The arithmetic follows ggml's reference
quantizers step by step in float32 (the same operations in the same order), so the bytes match:

* Q4_0 / Q5_0: ``d = v / -8`` (``-16``) where ``v`` is the element of largest magnitude (first one
  on ties), codes ``min(15, trunc(x/d + 8.5))`` (``31`` and ``16.5``); ``x ≈ d * (q - 8)``.
* Q4_1 / Q5_1: ``d = (max - min) / 15`` (``31``), ``m = min``, codes ``trunc((x - m)/d + 0.5)``;
  ``x ≈ d * q + m``.
* Q8_0: ``d = absmax / 127``, codes ``roundf(x/d)`` (half away from zero); ``x ≈ d * q``.

``x/d`` is computed as ``x * (1/d)`` in float32, as ggml does; ``d`` and ``m`` are stored as FP16.
Ties follow ggml's loops (the first extreme element wins), which decides the sign of a zero ``d``
or ``m`` in blocks of signed zeros; there gguf-py's numpy quantizer differs from libggml, and lowbit
follows libggml.
Layout of one block: ``d`` (fp16) [``m`` (fp16)] [``qh``: 32 high bits, little-endian] then the
codes, 4-bit codes packed as element j in the low nibble and element j+16 in the high nibble of
byte j.
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
    pack_bits,
    register,
    unpack_bits,
)
from lowbit.formats.ggml_ref import csqrt, make_qkx_quants, make_qx_quants, sdiv, seqsum

QK = 32


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: round half away from zero, exactly (no x + 0.5 double rounding)."""
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per row, the first element of largest magnitude (with its sign), as ggml's scan finds it.

    The row's max and min decide it, except where they tie in magnitude; only those rows need the
    (slower) search for the first index."""
    hi = x.amax(dim=1, keepdim=True)
    lo = x.amin(dim=1, keepdim=True)
    out = torch.where(-lo > hi, lo, hi)
    tie = ((-lo == hi) & (hi > 0)).reshape(-1)
    if bool(tie.any()):
        sub = x[tie]
        out[tie] = sub.gather(1, sub.abs().argmax(dim=1, keepdim=True))
    return out


class LegacyGGUF(Format):
    block_size = QK

    def __init__(self, name: str, bits: int, affine: bool) -> None:
        self.name = name
        t = ggml_type(name)  # the id and block size of the GGML type of the same name
        self.gguf_type = t.type_id
        self.type_size = t.type_size
        self.bits = bits
        self.affine = affine
        self.uses_imatrix = bits != 8  # Q8_0 has no weighted variant in ggml
        # the layout read and written here: d [m] [qh] codes
        head = 4 if affine else 2
        layout = head + (4 if bits == 5 else 0) + (QK if bits == 8 else QK // 2)
        assert (t.block, t.type_size) == (QK, layout), f"{name}: gguf-py's block layout differs from lowbit's"
        self.description = f"llama.cpp {name.upper()}, blocks of 32, {'d and min' if affine else 'd only'} in FP16"

    # ---------------------------------------------------------------------------------
    def quantize(self, w: torch.Tensor, name: str = "tensor", imatrix: torch.Tensor | None = None) -> QTensor:
        w = self.check(w, name)
        rows, cols = w.shape
        im = None
        if imatrix is not None and self.bits != 8:
            im = check_imatrix(imatrix, cols, name).to(w.device)

        def run(r0: int, r1: int) -> torch.Tensor:
            x = w[r0:r1]
            return self._blocks(x) if im is None else self._blocks_weighted(x, im)

        blocks = map_row_chunks(run, rows, cols, w.device).reshape(rows, -1)
        return QTensor(self.name, (rows, cols), {"blocks": blocks})

    def _blocks(self, w: torch.Tensor) -> torch.Tensor:
        """ggml's reference quantizer (quantize_row_qN_ref) for rows ``w``: [rows, row bytes]."""
        rows = w.shape[0]
        x = w.reshape(-1, QK)
        head: list[torch.Tensor]
        if self.bits == 8:
            d = x.abs().amax(dim=1, keepdim=True) / 127
            inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
            q = roundf(x * inv).to(torch.int8).view(torch.uint8)
            return torch.cat([fp16_bytes(d), q], dim=1).reshape(rows, -1)
        nmax = 2**self.bits - 1
        if self.affine:
            # ggml keeps the first element equal to the min (max): it matters for -0.0 vs 0.0
            lo = x.gather(1, x.argmin(dim=1, keepdim=True))
            hi = x.gather(1, x.argmax(dim=1, keepdim=True))
            d = (hi - lo) / nmax
            inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
            q = torch.trunc((x - lo) * inv + 0.5)
            head = [fp16_bytes(d), fp16_bytes(lo)]
        else:
            vmax = _signed_absmax(x)
            # ggml starts from max = 0.0 and replaces it only on a strictly larger magnitude, so a
            # block of zeros (of either sign) gets d = 0.0 / -8 = -0.0 (gguf-py differs here)
            vmax = torch.where(vmax == 0, torch.zeros_like(vmax), vmax)
            d = vmax / -(2 ** (self.bits - 1))
            inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
            q = torch.trunc(x * inv + (2 ** (self.bits - 1) + 0.5))
            head = [fp16_bytes(d)]
        return self._pack(rows, head, q.clamp(0, nmax).to(torch.uint8))

    def _pack(self, rows: int, head: list[torch.Tensor], q: torch.Tensor) -> torch.Tensor:
        low = q & 0x0F
        nib = low[:, : QK // 2] | (low[:, QK // 2 :] << 4)
        if self.bits == 5:
            head = head + [pack_bits(q >> 4, 1)]
        return torch.cat(head + [nib], dim=1).reshape(rows, -1)

    def _blocks_weighted(self, w: torch.Tensor, imatrix: torch.Tensor) -> torch.Tensor:
        """ggml's quantize_row_q{4,5}_{0,1}_impl: scales searched under imatrix-weighted error."""
        rows, cols = w.shape
        wt = w.t()
        sigma2 = sdiv(seqsum(wt * wt), float(cols))  # per row, over the whole row
        qw = imatrix[None, :] * csqrt(sigma2[:, None] + w * w)
        xg = w.reshape(-1, QK).t().contiguous()
        wg = qw.reshape(-1, QK).t().contiguous()
        if self.affine:
            d, the_min, L = make_qkx_quants(xg, wg, 2**self.bits - 1, -0.9, 0.05, 36, False, strict_empty=True)
            head = [fp16_bytes(d), fp16_bytes(-the_min)]
        else:
            d, L = make_qx_quants(xg, 2 ** (self.bits - 1), 1, wg)
            head = [fp16_bytes(d)]
        return self._pack(rows, head, L.t().to(torch.uint8))

    def codes(self, qt: QTensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        blocks = qt.parts["blocks"].reshape(-1, self.type_size)
        if self.bits == 8:
            return blocks[:, 2:].contiguous().view(torch.int8).to(dtype).reshape(qt.shape)
        pos = 4 if self.affine else 2
        nib = blocks[:, pos + 4 :] if self.bits == 5 else blocks[:, pos:]
        q = torch.cat([nib & 0x0F, nib >> 4], dim=1)
        if self.bits == 5:
            q = q | (unpack_bits(blocks[:, pos : pos + 4], 1, QK) << 4)
        return q.to(dtype).reshape(qt.shape)

    # ---- grid (GPTQ and other methods choose the codes) -----------------------------
    has_grid = True

    def grid(self, qt: QTensor) -> Grid:
        rows, cols = qt.shape
        blocks = qt.parts["blocks"].reshape(-1, self.type_size)

        def per_weight(v: torch.Tensor) -> torch.Tensor:
            return v.reshape(-1, 1).expand(-1, QK).reshape(rows, cols)

        d = per_weight(fp16_from_bytes(blocks[:, 0:2]))
        if self.bits == 8:
            return Grid(d, None, None, -128, 127)
        nmax = 2**self.bits - 1
        if self.affine:
            return Grid(d, None, per_weight(fp16_from_bytes(blocks[:, 2:4])), 0, nmax)
        return Grid(d, constant_like(d, float(2 ** (self.bits - 1))), None, 0, nmax)

    def with_codes(self, qt: QTensor, codes: torch.Tensor) -> QTensor:
        rows, cols = qt.shape
        blocks = qt.parts["blocks"].reshape(-1, self.type_size)
        q = codes.reshape(-1, QK).to(torch.int64)
        if self.bits == 8:
            out = torch.cat([blocks[:, 0:2], q.to(torch.int8).view(torch.uint8)], dim=1)
        else:
            head = [blocks[:, 0:4] if self.affine else blocks[:, 0:2]]
            out = self._pack(rows, head, q.clamp(0, 2**self.bits - 1).to(torch.uint8)).reshape(-1, self.type_size)
        return QTensor(self.name, qt.shape, {"blocks": out.reshape(rows, -1)}, dict(qt.meta))

    def storage_bits(self, shape: tuple[int, int]) -> int:
        return shape[0] * (shape[1] // QK) * self.type_size * 8


register(LegacyGGUF("q4_0", 4, affine=False))
register(LegacyGGUF("q4_1", 4, affine=True))
register(LegacyGGUF("q5_0", 5, affine=False))
register(LegacyGGUF("q5_1", 5, affine=True))
register(LegacyGGUF("q8_0", 8, affine=False))
