"""GPTQ (Frantar et al., 2022): each linear layer's codes chosen column by column, the rounding
error of each column spread over the columns not yet quantized through the inverse Hessian of the
layer's inputs (:func:`lowbit.algorithms.gptq.gptq_quantize`)."""

from __future__ import annotations

import torch

from lowbit.algorithms.gptq import gptq_quantize
from lowbit.formats import Format
from lowbit.model.methods.base import CalibConfig, LinearResult, Method, register_method, require_grid
from lowbit.model.quantize import QuantLinear


class GPTQ(Method):
    name = "gptq"
    description = "GPTQ: codes chosen column by column, errors compensated through the inputs' Hessian"
    layerwise = True
    streams = True
    order = 1

    def check_format(self, fmt: Format, name: str) -> None:
        require_grid(self, fmt, name)

    def quantize_linear(self, w: torch.Tensor, h: torch.Tensor, fmt: Format, bias: torch.Tensor | None,
                        cfg: CalibConfig, name: str, seed: int) -> LinearResult:
        res = gptq_quantize(w, h, fmt, cfg.gptq, name=name)
        return LinearResult(QuantLinear(res.qtensor, bias), res.qtensor, res.error, res.rtn_error, {"damp": res.damp})


register_method(GPTQ())
