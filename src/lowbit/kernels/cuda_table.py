"""GPU: lowbit's Triton kernels for table-coded group-wise weights (``gpu/table.py``).

They take what ``cpu-table`` takes on the CPU: every format whose weights are
``scale * table[code] + base`` over aligned runs of 16 or more columns (int4 per group, symmetric and
asymmetric; int8; Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; the K-quants Q2_K-Q6_K; NF4, FP4, IQ4_NL).  Batches
of up to 8 rows run a GEMV kernel in float32; larger ones a GEMM kernel that decodes tiles to the
input's dtype for ``tl.dot``.  Inputs of float16, bfloat16 and float32 are taken as they are.

Triton is imported only when a kernel is built (it is a development dependency; without it, or
without a GPU, this backend takes nothing).  The tests run the kernels on CPU tensors under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import torch

from lowbit.formats import Format, QTensor
from lowbit.kernels import Backend, Kernel, register_backend
from lowbit.kernels.affine import TableWeight, table_weight

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _programs() -> ModuleType:
    from lowbit.kernels.gpu import table  # imports triton: only where a kernel is built or run

    return table


class TritonTableKernel(Kernel):
    backend = "cuda-triton"

    def __init__(self, tw: TableWeight) -> None:
        prog = _programs()
        self.rows, self.cols, self.group, self.bits = tw.rows, tw.cols, tw.group, tw.bits
        self.device = tw.codes.device
        self.codes = prog.pack(tw.codes, tw.bits)
        self.table = tw.table.to(torch.float32).contiguous()
        self.identity = bool(torch.equal(self.table, torch.arange(self.table.numel(), dtype=torch.float32,
                                                                    device=self.table.device)))
        self.scale = tw.scale.to(torch.float32).contiguous()
        self.base = tw.base.to(torch.float32).contiguous()

    def kernel_args(self) -> tuple:
        """The packed weight as the compiled kernel takes it, in its argument order."""
        return (self.codes, self.table, self.scale, self.base, self.group, self.bits, self.identity)

    def __call__(self, x: torch.Tensor, **tiles: int) -> torch.Tensor:
        x2 = x.reshape(-1, self.cols)
        if x2.dtype not in _DTYPES:
            x2 = x2.to(torch.float32)
        x2 = x2.contiguous()
        prog = _programs()
        if x2.shape[0] == 0:
            y = x2.new_zeros((0, self.rows))
        elif x2.shape[0] <= prog.GEMV_MAX_M:
            y = prog.gemv(x2, *self.kernel_args(), **tiles)
        else:
            y = prog.gemm(x2, *self.kernel_args(), **tiles)
        return y.reshape(*x.shape[:-1], self.rows).to(x.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.table, self.scale, self.base))


def _build(fmt: Format, qt: QTensor) -> Kernel | None:
    if not qt.parts or any(t.device.type != "cuda" for t in qt.parts.values()) or not triton_available():
        return None
    tw = table_weight(fmt, qt)
    return None if tw is None else TritonTableKernel(tw)


register_backend(Backend(
    "cuda-triton", "cuda", "lowbit's Triton kernels: scale * table[code] + base over groups of 16-256 columns "
    "(integer grids of up to 256 codes, code books of up to 16 values); GEMV up to 8 rows, GEMM above",
    "float32 rounding (GEMV); the weight rounded to the input's dtype, float32 sums (GEMM)", _build, rank=10,
    tolerance=1e-5, exact=True))
