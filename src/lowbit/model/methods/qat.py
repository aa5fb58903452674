"""Quantization-aware training: the model fine-tuned through fake quantization against the original
(knowledge distillation on the calibration text), then quantized for real
(:func:`lowbit.model.qat.qat_quantize`)."""

from __future__ import annotations

import copy

from torch import nn

from lowbit.model.methods.base import Method, RunInputs, register_method
from lowbit.model.qat import QATConfig, qat_quantize
from lowbit.model.quantize import QuantReport
from lowbit.model.schemes import Scheme


class QAT(Method):
    name = "qat"
    description = "quantization-aware training: distillation through fake quantization, then round-to-nearest"
    activations = True
    order = 6

    def run(self, model: nn.Module, scheme: Scheme, inputs: RunInputs) -> tuple[QuantReport, dict[str, object]]:
        cfg = inputs.qat if isinstance(inputs.qat, QATConfig) else QATConfig()
        teacher = inputs.teacher if inputs.teacher is not None else copy.deepcopy(model)
        try:
            report, result = qat_quantize(model, teacher, scheme.name, inputs.chunks, cfg,  # type: ignore[arg-type]
                                          progress=inputs.progress)
        finally:
            del teacher
        return report, {"training": result, "qat": cfg}


register_method(QAT())
