"""CPU: lowbit's compiled kernel for weights stored in 16-bit floats (``csrc/half_gemm.cpp``; the
``fp16`` and ``bf16`` formats).

The weight is held in its 16 bits (half the bytes of float32) and converted exactly in registers, so
the product is the float32 product of the exact weight up to float32 rounding: exact, and the
default.  It runs the output heads tied to an embedding kept in FP16 under the integer formats,
which are the largest matrix of a small model and read at every generated token.
"""

from __future__ import annotations

import torch

from lowbit.formats import Format, QTensor
from lowbit.kernels import Backend, Kernel, register_backend
from lowbit.kernels.native import cpu_kernels, loaded_kernels

#: batches up to this many rows take the GEMV
GEMV_MAX_M = 8
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}



class HalfKernel(Kernel):
    backend = "cpu-half"

    def __init__(self, w16: torch.Tensor) -> None:
        self.rows, self.cols = w16.shape
        self.w16 = w16.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # [..., cols] in x's dtype in and out: the compiled module flattens and converts
        return loaded_kernels().half_matmul(x, self.w16, GEMV_MAX_M)

    @property
    def nbytes(self) -> int:
        return self.w16.numel() * self.w16.element_size()


def _build(fmt: Format, qt: QTensor) -> Kernel | None:
    dt = _DTYPES.get(fmt.name)
    if dt is None or len(qt.shape) != 2 or cpu_kernels() is None:
        return None
    v = qt.parts.get("values")
    if v is None or v.device.type != "cpu" or v.dtype != dt:
        return None
    return HalfKernel(v.reshape(qt.shape))


register_backend(Backend(
    "cpu-half", "cpu", "lowbit's compiled kernel for weights stored in FP16 or BF16 (half float32's bytes, converted "
    "exactly in registers)", "float32 rounding (the exact weight's sums, reassociated)", _build, rank=20,
    tolerance=1e-5, exact=True))
