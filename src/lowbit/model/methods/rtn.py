"""Round-to-nearest: every tensor quantized on its own in its planned format (an importance matrix
weighs the scale search of the formats that take one); activation schemes convert their layers
without calibration, or with an observer's static ranges."""

from __future__ import annotations

from torch import nn

from lowbit.model.actquant import ActConfig, quantize_act_model
from lowbit.model.methods.base import Method, RunInputs, register_method
from lowbit.model.quantize import QuantReport, quantize_model
from lowbit.model.schemes import Scheme


class RoundToNearest(Method):
    name = "rtn"
    description = "round-to-nearest, each tensor on its own; an importance matrix weighs the formats that take one"
    activations = True
    calibrated = False
    takes_imatrix = True
    order = 0

    def run(self, model: nn.Module, scheme: Scheme, inputs: RunInputs) -> tuple[QuantReport, dict[str, object]]:
        act = scheme.act
        if act is not None:
            chunks = inputs.chunks if act.static else None
            cfg = ActConfig(False, inputs.alpha, inputs.calib.batch_size)
            return quantize_act_model(model, act, chunks, cfg, progress=inputs.progress), {}
        return quantize_model(model, scheme.name, progress=inputs.progress, imatrix=inputs.imatrix), {}


register_method(RoundToNearest())
