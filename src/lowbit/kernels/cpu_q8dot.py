"""CPU: lowbit's fast compiled kernel for integer-coded group-wise weights (``csrc/q8dot.cpp``).

The input is rounded to int8 per block of 32 columns, one scale per block (``max |x| / 127``), as
llama.cpp's CPU dot products round it, and the codes are multiplied in integers (AVX2's
``vpmaddubsw``); the bases' term uses the exact sums of the input.  It takes integer grids of up to 256
codes whose scales hold over groups of 32 or more columns: int2-int8 per group or channel, Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants.  It is not exact (the input's rounding), so it is chosen
only by name or with ``--backend fast``; batches above 8 rows multiply the exact weight (tiles decoded
to float32 for ATen), so prefill is not rounded.
"""

from __future__ import annotations

import torch

from lowbit.formats import Format, QTensor
from lowbit.kernels import Backend, Kernel, register_backend
from lowbit.kernels.affine import TableWeight, integer_grid, table_weight
from lowbit.kernels.native import cpu_kernels, loaded_kernels

#: batches up to this many rows take the integer path
GEMV_MAX_M = 8


def pack(tw: TableWeight) -> torch.Tensor:
    """The codes as the kernel stores them: 4-bit codes 32 columns to 16 bytes (byte j holds column j
    in its low nibble and column j + 16 in its high one); 8-bit codes as int8 ``u - 128``."""
    if tw.bits == 4:
        v = tw.codes.to(torch.uint8).reshape(tw.rows, tw.cols // 32, 2, 16)
        return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(tw.rows, tw.cols // 2).contiguous()
    return (tw.codes - 128).to(torch.int8).contiguous()



class Q8DotKernel(Kernel):
    backend = "cpu-q8dot"

    def __init__(self, tw: TableWeight) -> None:
        self.rows, self.cols, self.group, self.bits = tw.rows, tw.cols, tw.group, tw.bits
        assert tw.levels is not None
        #: the codes' centre: the input's rounding errors meet the centred weight (llama.cpp's symmetric dots)
        self.center = tw.levels // 2
        self.codes = pack(tw)
        self.scale = tw.scale.to(torch.float32).contiguous()
        self.base = tw.base.to(torch.float32).contiguous()

    def kernel_args(self) -> tuple:
        """The packed weight as the compiled kernel takes it, in its argument order."""
        return (self.codes, self.scale, self.base, self.rows, self.cols, self.group, self.bits, self.center)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # [..., cols] in x's dtype in and out: the compiled module flattens and converts
        return loaded_kernels().q8_matmul(x, *self.kernel_args(), GEMV_MAX_M)

    def dequantize(self) -> torch.Tensor:
        return loaded_kernels().q8_dequantize(*self.kernel_args())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.base))


def _build(fmt: Format, qt: QTensor) -> Kernel | None:
    if any(t.device.type != "cpu" for t in qt.parts.values()) or cpu_kernels() is None:
        return None
    if integer_grid(fmt, qt) is None:  # code books (NF4, FP4, IQ4_NL): not integers
        return None
    tw = table_weight(fmt, qt)
    if tw is None or tw.group % 32 or tw.levels is None:
        return None
    return Q8DotKernel(tw)


register_backend(Backend(
    "cpu-q8dot", "cpu", "lowbit's compiled integer kernel: the input rounded to int8 per 32 columns (as llama.cpp "
    "does), integer dot products with integer grids of up to 256 codes in groups of 32-256 columns",
    "the input rounded to int8 per 32 columns (batches of up to 8 rows; larger ones exact)", _build, rank=12,
    tolerance=2e-2, exact=False))
