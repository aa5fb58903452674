"""llama.cpp's ternary types TQ1_0 and TQ2_0 (BitNet b1.58 and TriLM weights): every weight is
-1, 0 or +1 times one FP16 scale per super-block of 256, the block's largest magnitude.

Both quantizers are ggml's ``quantize_row_tq1_0_ref`` / ``quantize_row_tq2_0_ref`` (ggml-quants.c):
``d = max |x|``, ``q = lroundf(x / d) + 1`` in 0..2; neither reads an importance matrix.  They
differ in how they store the codes:

* TQ2_0 (2.0625 bpw): 2 bits per code, byte ``32*h + l`` holding codes ``128h + l + 32s`` at bits
  ``2s`` (the Q2_K layout), then ``d``;
* TQ1_0 (1.6875 bpw): five codes per byte as a base-3 number scaled to 0..255 (``ceil(q * 256 /
  243)``, so a byte times ``3**n`` keeps trit ``n`` in its top bits), 48 bytes for the first 240
  codes (32 bytes of codes ``m + 32n``, then 16 of ``160 + m + 16n``), 4 bytes of four codes each
  for the last 16 (``240 + j + 4n``, scaled as five with a zero last trit), then ``d``.
"""

from __future__ import annotations

import torch

from lowbit.formats.base import (
    GGMLBlocks,
    Grid,
    QTensor,
    constant_like,
    fp16_bytes,
    fp16_from_bytes,
    map_row_chunks,
    register,
)
from lowbit.formats.ggml_ref import sdiv
from lowbit.formats.gguf_legacy import roundf

QK_K = 256


def _ternary_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Super-blocks ``x`` [NB, 256] -> (FP16 bytes of ``d`` [NB, 2], codes 0..2 [NB, 256] uint8)."""
    d = x.abs().amax(dim=1, keepdim=True)
    inv = torch.where(d != 0, sdiv(1.0, torch.where(d != 0, d, 1.0)), 0.0)
    q = (roundf(x * inv) + 1).clamp_(0, 2).to(torch.uint8)
    return fp16_bytes(d), q


def _pack_base3(q: torch.Tensor, n: int) -> torch.Tensor:
    """Codes ``q`` [..., n, m] (0..2; trit ``k`` of byte ``m`` along dim -2, the first most
    significant) -> bytes [..., m]: the base-3 number padded to five trits, scaled to 0..255 rounding up."""
    v = torch.zeros(q.shape[:-2] + q.shape[-1:], dtype=torch.int32, device=q.device)
    for k in range(n):
        v = v * 3 + q[..., k, :].to(torch.int32)
    v = v * 3 ** (5 - n)
    return ((v * 256 + 242) // 243).to(torch.uint8)


def _unpack_base3(b: torch.Tensor, n: int) -> torch.Tensor:
    """Bytes [..., m] -> their first ``n`` trits [..., n, m] (uint8), as ggml decodes them:
    ``((uint8)(b * 3**k) * 3) >> 8``."""
    b = b.to(torch.int32)
    return torch.stack([(((b * 3**k) & 0xFF) * 3) >> 8 for k in range(n)], dim=-2).to(torch.uint8)


class Ternary(GGMLBlocks):
    """TQ1_0 or TQ2_0: ternary codes against one FP16 scale per 256 weights."""

    has_grid = True

    def __init__(self, name: str, description: str) -> None:
        self.name = name
        self.use_ggml_type(name)
        assert self.block_size == QK_K, f"{name}: gguf-py's block size differs from lowbit's"
        self.description = description
        # llama-quant.cpp's tensor_type_fallback: rows that do not fit 256-blocks get Q4_0
        self.gguf_fallback = "q4_0"

    # ---- the code layout (per type) --------------------------------------------------------
    def pack(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Codes [NB, 256] and the FP16 bytes of ``d`` [NB, 2] -> blocks [NB, type_size]."""
        raise NotImplementedError

    def unpack(self, blocks: torch.Tensor) -> torch.Tensor:
        """Blocks [NB, type_size] -> codes [NB, 256] (uint8)."""
        raise NotImplementedError

    # ---- the Format interface ------------------------------------------------------------
    def quantize(self, w: torch.Tensor, name: str = "tensor", imatrix: torch.Tensor | None = None) -> QTensor:
        w = self.check(w, name)
        rows, cols = w.shape

        def run(r0: int, r1: int) -> torch.Tensor:
            d, q = _ternary_codes(w[r0:r1].reshape(-1, QK_K))
            return self.pack(q, d)

        blocks = map_row_chunks(run, rows, cols, w.device).reshape(rows, -1)
        return QTensor(self.name, (rows, cols), {"blocks": blocks})

    def grid(self, qt: QTensor) -> Grid:
        """Per weight ``d * (q - 1)``, codes 0..2."""
        d = fp16_from_bytes(self.blocks(qt)[:, -2:])
        scale = d[:, None].expand(-1, QK_K).reshape(qt.shape)
        return Grid(scale, constant_like(scale, 1.0), None, 0, 2)

    def codes(self, qt: QTensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return self.unpack(self.blocks(qt)).reshape(qt.shape).to(dtype)

    def with_codes(self, qt: QTensor, codes: torch.Tensor) -> QTensor:
        rows, _ = qt.shape
        b = self.blocks(qt)
        q = codes.reshape(-1, QK_K).clamp(0, 2).to(torch.uint8)
        return QTensor(self.name, qt.shape, {"blocks": self.pack(q, b[:, -2:]).reshape(rows, -1)}, dict(qt.meta))


class TQ1(Ternary):
    def pack(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        nb = q.shape[0]
        a = _pack_base3(q[:, :160].reshape(nb, 5, 32), 5)
        b = _pack_base3(q[:, 160:240].reshape(nb, 5, 16), 5)
        h = _pack_base3(q[:, 240:].reshape(nb, 4, 4), 4)
        return torch.cat([a, b, h, d], dim=1)

    def unpack(self, blocks: torch.Tensor) -> torch.Tensor:
        nb = blocks.shape[0]
        a = _unpack_base3(blocks[:, :32], 5).reshape(nb, 160)
        b = _unpack_base3(blocks[:, 32:48], 5).reshape(nb, 80)
        h = _unpack_base3(blocks[:, 48:52], 4).reshape(nb, 16)
        return torch.cat([a, b, h], dim=1)


class TQ2(Ternary):
    def pack(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        g = q.reshape(-1, 2, 4, 32)
        qs = g[:, :, 0] | (g[:, :, 1] << 2) | (g[:, :, 2] << 4) | (g[:, :, 3] << 6)
        return torch.cat([qs.reshape(-1, 64), d], dim=1)

    def unpack(self, blocks: torch.Tensor) -> torch.Tensor:
        """Codes 0..3 (3 only in a block not made by ggml's quantizer)."""
        qs = blocks[:, :64].reshape(-1, 2, 1, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).reshape(1, 1, 4, 1)
        return ((qs >> shifts) & 3).reshape(-1, QK_K)


register(TQ1("tq1_0", "llama.cpp TQ1_0: ternary, five codes per byte, FP16 scale per 256, 1.6875 bpw"))
register(TQ2("tq2_0", "llama.cpp TQ2_0: ternary in 2-bit codes, FP16 scale per 256, 2.0625 bpw"))
