"""llama.cpp's Q1_0 (1.125 bpw): one sign bit per weight and one FP16 scale per block of 128, the
block's mean magnitude, so a weight decodes to ``+d`` or ``-d``.

The quantizer is ggml's ``quantize_row_q1_0_ref``: ``d = (sum |x|) / 128`` summed in order in
float32, bit ``j`` (byte ``j / 8``, bit ``j % 8``) set where ``x[j] >= 0``.  It reads no importance
matrix.  llama.cpp defines no fallback type for Q1_0, so a tensor whose rows are not a multiple of
128 cannot take it (llama-quantize stops there too).
"""

from __future__ import annotations

import torch

from lowbit.formats.base import (
    GGMLBlocks,
    Grid,
    QTensor,
    fp16_bytes,
    fp16_from_bytes,
    map_row_chunks,
    pack_bits,
    register,
    unpack_bits,
)
from lowbit.formats.ggml_ref import seqsum

#: the two values a code decodes to, in units of ``d``
LEVELS = (-1.0, 1.0)


class Q1(GGMLBlocks):
    has_grid = True

    def __init__(self) -> None:
        self.name = "q1_0"
        self.use_ggml_type(self.name)
        self.description = "llama.cpp Q1_0: sign bits, FP16 mean magnitude per block of 128, 1.125 bpw"

    def quantize(self, w: torch.Tensor, name: str = "tensor", imatrix: torch.Tensor | None = None) -> QTensor:
        w = self.check(w, name)
        rows, cols = w.shape
        qk = self.block_size

        def run(r0: int, r1: int) -> torch.Tensor:
            x = w[r0:r1].reshape(-1, qk)
            d = seqsum(x.abs().t().contiguous()) / qk
            return torch.cat([fp16_bytes(d), pack_bits((x >= 0).to(torch.uint8), 1)], dim=1)

        blocks = map_row_chunks(run, rows, cols, w.device).reshape(rows, -1)
        return QTensor(self.name, (rows, cols), {"blocks": blocks})

    def grid(self, qt: QTensor) -> Grid:
        """Per weight ``d * (-1, +1)[bit]``."""
        d = fp16_from_bytes(self.blocks(qt)[:, :2])
        scale = d[:, None].expand(-1, self.block_size).reshape(qt.shape)
        return Grid(scale, None, None, 0, 1, torch.tensor(LEVELS, dtype=torch.float32))

    def codes(self, qt: QTensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return unpack_bits(self.blocks(qt)[:, 2:], 1, self.block_size).reshape(qt.shape).to(dtype)

    def with_codes(self, qt: QTensor, codes: torch.Tensor) -> QTensor:
        rows, _ = qt.shape
        b = self.blocks(qt)
        bits = pack_bits(codes.reshape(-1, self.block_size).clamp(0, 1).to(torch.uint8), 1)
        return QTensor(self.name, qt.shape, {"blocks": torch.cat([b[:, :2], bits], dim=1).reshape(rows, -1)},
                       dict(qt.meta))


register(Q1())
