"""lowbit: quantize large language models and measure honestly what each format costs."""

from lowbit.errors import LowbitError
from lowbit.formats import QTensor, get_format, list_formats
from lowbit.model import load_model, quantize_model

__version__ = "0.1.0"
__all__ = ["LowbitError", "QTensor", "get_format", "list_formats", "load_model", "quantize_model"]
