"""SpQR (Dettmers et al., 2023): GPTQ on small groups with quantized scales, and the weights whose
error stays largest kept in FP16 as sparse outliers (:func:`lowbit.algorithms.spqr.spqr_quantize`);
its result is stored in an ``spqr`` format."""

from __future__ import annotations

import torch

from lowbit.algorithms.spqr import SpQRConfig, spqr_quantize
from lowbit.errors import LowbitError
from lowbit.formats import Format
from lowbit.formats.spqr import SpQRFormat
from lowbit.model.methods.base import CalibConfig, LinearResult, Method, register_method
from lowbit.model.quantize import QuantLinear


class SpQR(Method):
    name = "spqr"
    description = "SpQR: GPTQ on small groups with quantized scales, the hardest weights kept as FP16 outliers"
    layerwise = True
    order = 4

    def check_format(self, fmt: Format, name: str) -> None:
        if not isinstance(fmt, SpQRFormat):
            raise LowbitError(f"{name}: the SpQR method stores its result in an spqr format (e.g. spqr3-g16), "
                              f"not {fmt.name}")

    def quantize_linear(self, w: torch.Tensor, h: torch.Tensor, fmt: Format, bias: torch.Tensor | None,
                        cfg: CalibConfig, name: str, seed: int) -> LinearResult:
        res = spqr_quantize(w, h, fmt, SpQRConfig(outlier_fraction=cfg.spqr_outliers, gptq=cfg.gptq), name=name)
        return LinearResult(QuantLinear(res.qtensor, bias), res.qtensor, res.error, res.rtn_error,
                            {"outliers": float(res.outliers)})


register_method(SpQR())
