"""CPU: symmetric per-channel integer weights through ATen's int8 matmul (``_weight_int8pack_mm``):
``x @ (q * scale[r])^T`` with int8 codes ``q`` and one float scale per output row."""

from __future__ import annotations

import torch

from lowbit.formats import Format, QTensor
from lowbit.kernels import Backend, Kernel, register_backend
from lowbit.kernels.affine import exact_codes, integer_grid


class Int8PackKernel(Kernel):
    backend = "cpu-int8pack"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        self.codes = codes.to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16).contiguous()
        self.rows, self.cols = codes.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # fast in bfloat16 only (float32 is several times slower than float32 F.linear)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.cols).to(torch.bfloat16), self.codes, self.scale)
        return y.reshape(*x.shape[:-1], self.rows).to(x.dtype)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 2


def _build(fmt: Format, qt: QTensor) -> Kernel | None:
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm") or len(qt.shape) != 2:
        return None
    if any(t.device.type != "cpu" for t in qt.parts.values()):
        return None
    grid = integer_grid(fmt, qt)
    if grid is None or grid.offset is not None or grid.qmin < -128 or grid.qmax > 127 \
            or grid.qmax - grid.qmin < 16:  # 4-bit grids take the int4 kernel
        return None
    zero = grid.zero
    if zero is not None and not bool((zero == 0).all()):
        return None
    s = grid.scale
    if not bool((s == s[:, :1]).all()):  # one scale per row
        return None
    codes = exact_codes(fmt, qt, grid)
    return None if codes is None else Int8PackKernel(codes, s[:, 0])


register_backend(Backend("cpu-int8pack", "cpu", "ATen's int8 matmul: symmetric integer weights with one scale per row "
                         "(int8-ch, int8-t)", "bfloat16 rounding of the input, the scales and the output", _build, rank=14,
                         tolerance=1e-2, exact=False))
