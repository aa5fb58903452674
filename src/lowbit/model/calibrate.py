"""Calibration-based quantization of a whole model, one decoder layer at a time.

Calibration text is cut into chunks; the chunks' hidden states at the input of the first decoder
layer are captured once.  Then, for each layer in turn:

1. the layer runs on the current hidden states, with hooks that accumulate each linear layer's
   input statistics (``X^T X``, mean |x|; :class:`~lowbit.algorithms.hessian.InputStats`);
2. the method quantizes the layer's linear layers from those statistics (GPTQ, AWQ, SpQR, QuIP);
3. the *quantized* layer runs on the same hidden states, and its outputs become the next layer's
   inputs, so every layer is calibrated on what the quantized layers before it produce.

Memory holds the model, one layer's statistics and the calibration hidden states (two copies:
inputs and outputs of the current layer), never every layer's activations.  Tensors outside the
decoder layers (embeddings, output head, norms) are quantized or kept by the same rules as
:func:`lowbit.model.quantize.quantize_model`.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.model.layers import (
    LayerInputs,
    capture_layer_inputs,
    collect_input_stats,
    decoder_layers,
    layers_prefix,
    next_inputs,
    set_module,
)
from lowbit.model.methods import CalibConfig, LayerLog, Method, get_method, list_methods
from lowbit.model.policy import LINEAR_ROLES, TensorChoice, role_of
from lowbit.model.quantize import QuantReport, TensorRecord, as_module, plan_for, quantize_model, quantize_rest, stamp

__all__ = ["CalibConfig", "LayerLog", "calibrate_layer", "calibrate_quantize", "calibrated_linears",
           "check_method_formats", "layerwise_methods"]


def layerwise_methods() -> list[str]:
    """The registered methods that quantize one decoder layer at a time."""
    return [n for n in list_methods() if get_method(n).layerwise]


# ---- the driver ---------------------------------------------------------------------------
def calibrate_quantize(loaded: object, scheme: str, chunks: torch.Tensor, cfg: CalibConfig | None = None,
                       progress: bool = True, imatrix: dict | None = None) -> tuple[QuantReport, list[LayerLog]]:
    """Quantize ``loaded`` (a module, or what load_model returns) in place with ``scheme`` (a lowbit
    format or llama.cpp file type), choosing codes with ``cfg.method`` (a layer-wise method, or
    ``rtn``) from the calibration token ``chunks`` ([n, seq_len])."""
    cfg = cfg or CalibConfig()
    method = get_method(cfg.method)
    if method.name != "rtn" and not method.layerwise:
        raise LowbitError(f"{method.name} does not quantize layer by layer (layer-wise methods: "
                          f"{', '.join(layerwise_methods())})")
    model = as_module(loaded)
    choices = plan_for(model, scheme)
    if method.name == "rtn":
        return quantize_model(model, scheme, progress=progress, imatrix=imatrix), []
    check_method_formats(choices, method)
    torch.manual_seed(cfg.seed)
    layers = decoder_layers(model)
    report = QuantReport(f"{scheme}+{cfg.method}")
    logs: list[LayerLog] = []
    done: set[str] = set()
    prefix = layers_prefix(model, layers)
    batches = capture_layer_inputs(model, chunks, cfg.batch_size, cfg.device)
    bar = tqdm(range(len(layers)), desc=f"{cfg.method} {scheme}", unit="layer", disable=not progress, leave=False)
    for li in bar:
        batches = calibrate_layer(layers[li], li, prefix, choices, batches, cfg, report, logs, done)
        recent = [lg for lg in logs if lg.layer == li]
        if recent:
            bar.set_postfix(err=f"{sum(lg.error for lg in recent) / len(recent):.4f}",
                            rtn=f"{sum(lg.rtn_error for lg in recent) / len(recent):.4f}")
    rest = quantize_rest(model, scheme, choices, skip=done, progress=progress, imatrix=imatrix)
    report.tensors = _merge(report.tensors, rest.tensors, model)
    stamp(model, scheme, cfg.method)
    return report, logs


def calibrated_linears(layer: nn.Module, li: int, prefix: str, choices: dict) -> dict[str, nn.Linear]:
    """The linear layers of decoder layer ``li`` that the plan ``choices`` quantizes (local names)."""
    return {n: m for n, m in layer.named_modules()
            if isinstance(m, nn.Linear) and (ch := choices.get(f"{prefix}.{li}.{n}.weight")) is not None and ch.quantized}


def calibrate_layer(layer: nn.Module, li: int, prefix: str, choices: dict, batches: LayerInputs,
                    cfg: CalibConfig, report: QuantReport, logs: list[LayerLog], done: set[str]) -> LayerInputs:
    """Quantize decoder layer ``li`` (``layer``, in place) with ``cfg.method`` from its inputs
    ``batches``, and return its quantized outputs on them: the next layer's inputs."""
    method = get_method(cfg.method)
    linears = calibrated_linears(layer, li, prefix, choices)
    fmts = {n: get_format(choices[f"{prefix}.{li}.{n}.weight"].format) for n in linears}
    stats = collect_input_stats(layer, linears, batches)
    method.prepare_layer(layer, linears, fmts, stats, cfg, li, logs)
    for n, m in linears.items():
        t0 = time.perf_counter()
        fmt, full = fmts[n], f"{prefix}.{li}.{n}"
        w = m.weight.detach().to(torch.float32)
        res = method.quantize_linear(w, stats[n].hessian(), fmt, m.bias, cfg, name=full,
                                     seed=cfg.seed + 1000 * li + len(logs))
        set_module(layer, n, res.module)
        done.add(f"{full}.weight")
        report.tensors.append(TensorRecord(f"{full}.weight", tuple(w.shape), fmt.name, True, fmt.tensor_bits(res.qtensor),
                                           res.error))
        logs.append(LayerLog(li, n, res.error, res.rtn_error, time.perf_counter() - t0, res.extra))
    del stats
    return next_inputs(layer, batches)


def check_method_formats(choices: dict[str, TensorChoice], method: Method | str) -> None:
    """Refuse a format the method cannot produce before any work is done (``choices``: the plan of a
    model's tensors, Hugging Face or GGUF names)."""
    m = method if isinstance(method, Method) else get_method(method)
    for name, ch in choices.items():
        if ch.quantized and role_of(name) in LINEAR_ROLES:
            m.check_format(get_format(ch.format), name)


def _merge(calibrated: list[TensorRecord], rest: list[TensorRecord], model: nn.Module) -> list[TensorRecord]:
    """All records in the model's parameter order."""
    by_name = {t.name: t for t in calibrated + rest}
    order = [n for n, _ in model.named_parameters()] + [t.name for t in calibrated]
    seen, out = set(), []
    for n in order:
        if n in by_name and n not in seen:
            seen.add(n)
            out.append(by_name[n])
    return out
