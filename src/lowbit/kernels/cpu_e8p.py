"""CPU: lowbit's compiled kernel for E8P weights (``csrc/e8p_gemm.cpp``; ``e8p`` and ``e8p4``).

A row of 8 weights is one 16-bit code of the E8 lattice code book (QuIP#'s E8P) times the row's
scale; the kernel decodes a code from the 256 patterns of absolute values, its sign bits and its
shift, in registers, without the 2 MB code book or the float weight.  Its product is the float32
product of the exact dequantized weight up to float32 rounding (reassociated sums), so it is exact
and chosen by default.  Batches of up to 8 rows decode in registers; larger ones decode tiles of
rows to float32 for ATen's matrix multiply.
"""

from __future__ import annotations

import torch

from lowbit.formats import Format, QTensor
from lowbit.formats.lattice import DIM, E8PFormat, abs_patterns
from lowbit.kernels import Backend, Kernel, register_backend
from lowbit.kernels.native import cpu_kernels, loaded_kernels

#: batches up to this many rows take the register path
GEMV_MAX_M = 8



class E8PKernel(Kernel):
    backend = "cpu-e8p"

    def __init__(self, fmt: E8PFormat, qt: QTensor) -> None:
        self.rows, self.cols = qt.shape
        sfx = [fmt.stage_suffix(st) for st in range(fmt.stages)]
        self.codes = torch.stack([qt.parts["codes" + s].to(torch.int16) for s in sfx]).contiguous()
        self.scale = torch.stack([qt.parts["scale" + s].to(torch.float32).reshape(self.rows) for s in sfx]).contiguous()
        pats, parity = abs_patterns()
        self.patterns = pats.to(torch.float32).contiguous()
        self.parity = parity.to(torch.uint8).contiguous()

    def kernel_args(self) -> tuple:
        """The packed weight as the compiled kernel takes it, in its argument order."""
        return (self.codes, self.scale, self.patterns, self.parity)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # [..., cols] in x's dtype in and out: the compiled module flattens and converts
        return loaded_kernels().e8p_matmul(x, *self.kernel_args(), GEMV_MAX_M)

    def dequantize(self) -> torch.Tensor:
        return loaded_kernels().e8p_dequantize(*self.kernel_args())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kernel_args())


def _build(fmt: Format, qt: QTensor) -> Kernel | None:
    if not isinstance(fmt, E8PFormat) or len(qt.shape) != 2 or qt.shape[1] % DIM or cpu_kernels() is None:
        return None
    if any(t.device.type != "cpu" for t in qt.parts.values()):
        return None
    return E8PKernel(fmt, qt)


register_backend(Backend(
    "cpu-e8p", "cpu", "lowbit's compiled kernel for E8P (E8 lattice) codes: decoded in registers from 24 KB of "
    "tables (patterns, sign masks, shifts)", "float32 rounding (the exact weight's sums, reassociated)", _build,
    rank=20, tolerance=1e-5, exact=True))
