"""The reference backend: dequantize the whole weight at every call, then ``F.linear``.  It takes
every format on every device; the others are measured against it."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from lowbit.formats import Format, QTensor
from lowbit.kernels import Backend, Kernel, register_backend


class DequantKernel(Kernel):
    backend = "dequant"

    def __init__(self, fmt: Format, qt: QTensor) -> None:
        self.fmt, self.qt = fmt, qt
        self.device = next(iter(qt.parts.values())).device if qt.parts else torch.device("cpu")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fmt.dequantize(self.qt).to(x.dtype))

    @property
    def nbytes(self) -> int:
        return 0  # it holds the format's own parts, nothing more


register_backend(Backend("dequant", "any", "dequantizes the whole weight at every call, then F.linear",
                         "the float product of the exact dequantized weight in the input's dtype",
                         lambda fmt, qt: DequantKernel(fmt, qt), rank=1000))
