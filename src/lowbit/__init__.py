"""lowbit: quantize large language models, write files other engines load, and measure honestly what
each format costs.

    import lowbit
    m = lowbit.load_model("smollm2")              # a .gguf file, a Hugging Face directory, or 'smollm2'
    report = lowbit.quantize(m, "nf4")           # in place; report.bits_per_weight, report.size_bytes
    lowbit.quantize(m2, "q3_k_m+gptq", chunks=calibration_token_ids)  # any recipe: scheme+method
    lowbit.save(m, "smol-nf4")                   # a lowbit checkpoint that load_model reads back
    lowbit.export(m, "smol-ct", "compressed-tensors")  # a layout other engines load (gptq, awq, bitsandbytes)

    from transformers import AutoModelForCausalLM
    q = AutoModelForCausalLM.from_pretrained("smol-nf4")  # with lowbit imported: the same quantized model
"""

from lowbit.env import __version__
from lowbit.errors import LowbitError
from lowbit.formats import QTensor, get_format, list_formats
from lowbit.io.checkpoint import save
from lowbit.io.exports import export
from lowbit.model import load_model, quantize_model
from lowbit.model.hf_quantizer import install as _register_with_transformers
from lowbit.model.recipe import Recipe, quantize

_register_with_transformers()  # from_pretrained(lowbit_dir) gives lowbit's quantized model (when transformers loads)

__all__ = ["LowbitError", "QTensor", "Recipe", "__version__", "export", "get_format", "list_formats", "load_model",
           "quantize", "quantize_model", "save"]
