"""lowbit: quantize large language models, write files other engines load, and measure honestly what
each format costs.

    import lowbit
    m = lowbit.load_model("smollm2")              # a .gguf file, a Hugging Face directory, or 'smollm2'
    report = lowbit.quantize_model(m, "nf4")     # in place; report.bits_per_weight, report.size_bytes
    lowbit.save(m, "smol-nf4")                   # a lowbit checkpoint that load_model reads back
    lowbit.export(m, "smol-ct", "compressed-tensors")  # a layout other engines load (gptq, awq, bitsandbytes)

    from transformers import AutoModelForCausalLM
    q = AutoModelForCausalLM.from_pretrained("smol-nf4")  # with lowbit imported: the same quantized model
"""

__version__ = "0.1.0"

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.formats import QTensor, get_format, list_formats  # noqa: E402
from lowbit.io.checkpoint import save  # noqa: E402
from lowbit.io.exports import export  # noqa: E402
from lowbit.model import load_model, quantize_model  # noqa: E402
from lowbit.model.hf_quantizer import install as _register_with_transformers  # noqa: E402

_register_with_transformers()  # from_pretrained(lowbit_dir) gives lowbit's quantized model (when transformers loads)

__all__ = ["LowbitError", "QTensor", "export", "get_format", "list_formats", "load_model", "quantize_model", "save"]
