"""Model layer: load models, decide per-tensor formats, swap modules for quantized ones."""

from lowbit.model.load import DEFAULT_MODEL, LoadedModel, load_model
from lowbit.model.quantize import QuantLinear, QuantReport, quantize_model

__all__ = ["DEFAULT_MODEL", "LoadedModel", "QuantLinear", "QuantReport", "load_model", "quantize_model"]
