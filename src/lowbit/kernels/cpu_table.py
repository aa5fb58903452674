"""CPU: lowbit's compiled kernel for table-coded group-wise weights (``csrc/table_gemm.cpp``).

It takes every format whose weights are ``scale * table[code] + base`` over aligned runs of 16 or
more columns: integer grids of up to 256 codes (int2-int8 per group or channel, Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q2_K-Q6_K) and code books of up to 16 values (NF4, FP4, IQ4_NL).  Its product is the
float32 product of the exact dequantized weight up to float32 rounding (it only reassociates the
sums), so it is exact and chosen by default.  Batches of up to 8 rows decode the codes in
registers; larger ones decode tiles of rows to float32 for ATen's matrix multiply.
"""

from __future__ import annotations

import torch

from lowbit.formats import Format, QTensor
from lowbit.kernels import Backend, Kernel, register_backend
from lowbit.kernels.affine import TableWeight, table_weight
from lowbit.kernels.native import cpu_kernels, loaded_kernels

#: batches up to this many rows take the register path (measured: above it, tiles and ATen are faster)
GEMV_MAX_M = 8


def pack(tw: TableWeight) -> torch.Tensor:
    """The codes as the kernel stores them: 4-bit codes 16 columns to 8 bytes (byte j holds column j
    in its low nibble and column j + 8 in its high one), 8-bit codes one byte each."""
    u = tw.codes.to(torch.uint8)
    if tw.bits == 8:
        return u.contiguous()
    v = u.reshape(tw.rows, tw.cols // 16, 2, 8)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(tw.rows, tw.cols // 2).contiguous()



class TableKernel(Kernel):
    backend = "cpu-table"

    def __init__(self, tw: TableWeight) -> None:
        self.rows, self.cols, self.group, self.bits = tw.rows, tw.cols, tw.group, tw.bits
        self.codes = pack(tw)
        self.table = tw.table.to(torch.float32).contiguous()
        self.scale = tw.scale.to(torch.float32).contiguous()
        self.base = tw.base.to(torch.float32).contiguous()

    def kernel_args(self) -> tuple:
        """The packed weight as the compiled kernel takes it, in its argument order."""
        return (self.codes, self.table, self.scale, self.base, self.rows, self.cols, self.group, self.bits)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # [..., cols] in x's dtype in and out: the compiled module flattens and converts
        return loaded_kernels().matmul(x, *self.kernel_args(), GEMV_MAX_M)

    def dequantize(self) -> torch.Tensor:
        return loaded_kernels().dequantize(*self.kernel_args())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.table, self.scale, self.base))


def _build(fmt: Format, qt: QTensor) -> Kernel | None:
    if any(t.device.type != "cpu" for t in qt.parts.values()) or cpu_kernels() is None:
        return None
    tw = table_weight(fmt, qt)
    return None if tw is None else TableKernel(tw)


register_backend(Backend(
    "cpu-table", "cpu", "lowbit's compiled kernel: scale * table[code] + base over groups of 16-256 columns "
    "(integer grids of up to 256 codes, code books of up to 16 values)",
    "float32 rounding (the exact weight's sums, reassociated)", _build, rank=20, tolerance=1e-5, exact=True))
