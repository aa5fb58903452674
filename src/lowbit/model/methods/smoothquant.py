"""SmoothQuant (Xiao et al., 2023): per channel factors that move the activations' outliers into the
weights, folded into the previous operation, before an activation scheme's layers are built
(:func:`lowbit.model.actquant.smooth_model`)."""

from __future__ import annotations

from torch import nn

from lowbit.errors import LowbitError
from lowbit.model.actquant import ActConfig, quantize_act_model
from lowbit.model.methods.base import Method, RunInputs, register_method
from lowbit.model.quantize import QuantReport
from lowbit.model.schemes import Scheme


class SmoothQuant(Method):
    name = "smoothquant"
    description = "SmoothQuant: activation outliers migrated into the weights by folded per-channel factors"
    weights = False
    activations = True
    order = 5

    def run(self, model: nn.Module, scheme: Scheme, inputs: RunInputs) -> tuple[QuantReport, dict[str, object]]:
        act = scheme.act
        if act is None:
            raise LowbitError("SmoothQuant smooths activations: give an activation scheme")
        cfg = ActConfig(True, inputs.alpha, inputs.calib.batch_size)
        report = quantize_act_model(model, act, inputs.chunks, cfg, progress=inputs.progress)
        return report, {"smoothing": report.details.get("smoothing", {})}


register_method(SmoothQuant())
