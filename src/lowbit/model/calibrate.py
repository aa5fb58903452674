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
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.awq import AWQConfig, search_clip, search_scales
from lowbit.algorithms.gptq import GPTQConfig, gptq_quantize
from lowbit.algorithms.hessian import InputStats
from lowbit.algorithms.spqr import SpQRConfig, spqr_quantize
from lowbit.errors import LowbitError
from lowbit.formats import QTensor, get_format
from lowbit.formats.integer import IntFormat
from lowbit.model.qat import QATConfig
from lowbit.model.quantize import QuantLinear, QuantReport, TensorRecord, plan_for, quantize_rest, stamp
from lowbit.model.rotated import quip_quantize

METHODS = ("rtn", "gptq", "awq", "quip", "spqr")


@dataclass
class CalibConfig:
    method: str = "gptq"
    n_samples: int = 128  # calibration chunks
    seq_len: int = 512  # tokens per chunk
    batch_size: int = 8
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    awq: AWQConfig = field(default_factory=AWQConfig)
    #: SpQR: target fraction of weights kept as FP16 outliers
    spqr_outliers: float = 0.01
    #: SmoothQuant's migration strength
    smooth_alpha: float | None = 0.5  # None: searched per group
    qat: QATConfig = field(default_factory=QATConfig)
    seed: int = 0
    device: str = "cpu"


@dataclass
class LayerLog:
    layer: int
    name: str
    error: float  # relative output error on the calibration inputs
    rtn_error: float
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)


class _Stop(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (``model.model.layers``)."""
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise LowbitError(f"{type(model).__name__}: cannot find the decoder layers (model.model.layers)")
    return layers


def capture_layer_inputs(model: nn.Module, chunks: torch.Tensor, batch_size: int,
                         device: str | torch.device = "cpu") -> list[tuple[torch.Tensor, dict]]:
    """Hidden states (and the keyword arguments: position embeddings, masks) that the first decoder
    layer receives for each batch of ``chunks``; the rest of the model is not run."""
    layers = decoder_layers(model)
    got: list[tuple[torch.Tensor, dict]] = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hs = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        got.append((hs.detach(), kw))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for i in range(0, len(chunks), batch_size):
                try:
                    model.model(input_ids=chunks[i : i + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return got


def _run_layer(layer: nn.Module, batches: list[tuple[torch.Tensor, dict]], keep: bool) -> list[torch.Tensor]:
    outs = []
    with torch.inference_mode():
        for hs, kw in batches:
            out = layer(hs, **kw)
            if isinstance(out, tuple):
                out = out[0]
            if keep:
                outs.append(out.detach())
    return outs


def _collect(layer: nn.Module, linears: dict[str, nn.Linear], batches: list[tuple[torch.Tensor, dict]],
             hessian: bool = True) -> dict[str, InputStats]:
    """Input statistics of each linear layer over ``batches``.  Linear layers that receive the very
    same input tensor (q/k/v after the input norm, gate/up after the feed-forward norm) share one
    :class:`InputStats`: the Hessian is accumulated and held once for them."""
    stats: dict[str, InputStats] = {}
    seen: list[tuple[torch.Tensor, InputStats]] = []  # this batch's inputs (kept alive: identity is safe)
    owner: dict[int, str] = {}  # id of an InputStats -> the layer that accumulates into it

    def hook(n: str, x: torch.Tensor) -> None:
        for t, st in seen:
            if t is x:
                if stats.setdefault(n, st) is not st:
                    raise LowbitError(f"calibration: {n} shared another layer's input in one batch and not in another")
                return
        st = stats.get(n)
        if st is None:
            with torch.inference_mode(False):  # normal tensors, updated in place after the forward passes
                st = stats[n] = InputStats(linears[n].in_features, linears[n].weight.device, hessian)
            owner[id(st)] = n
        elif owner[id(st)] != n:  # shared another layer's input before, but not this one now
            raise LowbitError(f"calibration: {n} shared another layer's input in one batch and not in another")
        st.add(x)
        seen.append((x, st))

    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: hook(n, a[0])) for n, m in linears.items()]
    try:
        for batch in batches:
            seen.clear()
            _run_layer(layer, [batch], keep=False)
    finally:
        seen.clear()
        for h in hooks:
            h.remove()
    return stats


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


# ---- AWQ: which operation feeds which linear layers ------------------------------------------
def awq_groups(layer: nn.Module) -> list[tuple[str, list[str]]]:
    """(previous op, linear layers it feeds) pairs where a scale can be folded into the previous op:
    the input norm into q/k/v, the post-attention norm into gate/up, up into down, and v into o when
    their shapes allow (no grouped-query attention)."""
    names = {n for n, _ in layer.named_modules()}
    groups = []
    if {"input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"} <= names:
        groups.append(("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]))
    if {"self_attn.v_proj", "self_attn.o_proj"} <= names:
        v, o = layer.get_submodule("self_attn.v_proj"), layer.get_submodule("self_attn.o_proj")
        if v.weight.shape[0] == o.weight.shape[1]:
            groups.append(("self_attn.v_proj", ["self_attn.o_proj"]))
    ffn_norm = "pre_feedforward_layernorm" if "pre_feedforward_layernorm" in names else "post_attention_layernorm"
    if {ffn_norm, "mlp.gate_proj", "mlp.up_proj"} <= names:
        groups.append((ffn_norm, ["mlp.gate_proj", "mlp.up_proj"]))
    if {"mlp.up_proj", "mlp.down_proj"} <= names:
        groups.append(("mlp.up_proj", ["mlp.down_proj"]))
    return groups


def _fold_into_previous(prev: nn.Module, s: torch.Tensor) -> None:
    """Divide the outputs of ``prev`` (a norm or a linear layer) by ``s``."""
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.div_(s[:, None].to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
            return
        w = getattr(prev, "weight", None)
        if w is None:
            raise LowbitError(f"AWQ cannot fold a scale into {type(prev).__name__}")
        if "Gemma" in type(prev).__name__:  # Gemma's norms multiply by (1 + weight)
            w.copy_(((1.0 + w.float()) / s - 1.0).to(w.dtype))
        else:
            w.div_(s.to(w.dtype))


def apply_scale(layer: nn.Module, prev_name: str, names: list[str], s: torch.Tensor) -> None:
    """Multiply the input columns of the linear layers ``names`` by ``s`` and divide the outputs of
    ``prev_name`` by it: the layer computes the same function (exactly, in full precision)."""
    _fold_into_previous(layer.get_submodule(prev_name), s)
    with torch.no_grad():
        for n in names:
            w = layer.get_submodule(n).weight
            w.mul_(s[None, :].to(w.dtype))


# ---- the driver ---------------------------------------------------------------------------
def calibrate_quantize(loaded, scheme: str, chunks: torch.Tensor, cfg: CalibConfig | None = None,  # type: ignore[no-untyped-def]
                       progress: bool = True, imatrix: dict | None = None) -> tuple[QuantReport, list[LayerLog]]:
    """Quantize ``loaded.model`` in place with ``scheme`` (a lowbit format or llama.cpp file type),
    choosing codes with ``cfg.method`` from the calibration token ``chunks`` ([n, seq_len])."""
    cfg = cfg or CalibConfig()
    if cfg.method not in METHODS:
        raise LowbitError(f"unknown method '{cfg.method}' (methods: {', '.join(METHODS)})")
    model = loaded.model
    choices = plan_for(model, scheme)
    if cfg.method == "rtn":
        from lowbit.model.quantize import quantize_model

        return quantize_model(model, scheme, progress=progress, imatrix=imatrix), []
    check_method_formats(choices, cfg.method)
    torch.manual_seed(cfg.seed)
    layers = decoder_layers(model)
    report = QuantReport(f"{scheme}+{cfg.method}")
    logs: list[LayerLog] = []
    done: set[str] = set()
    prefix = _layers_prefix(model, layers)
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


def calibrate_layer(layer: nn.Module, li: int, prefix: str, choices: dict, batches: list[tuple[torch.Tensor, dict]],
                    cfg: CalibConfig, report: QuantReport, logs: list[LayerLog], done: set[str]) -> list[tuple[torch.Tensor, dict]]:
    """Quantize decoder layer ``li`` (``layer``, in place) with ``cfg.method`` from its inputs
    ``batches``, and return its quantized outputs on them: the next layer's inputs."""
    linears = calibrated_linears(layer, li, prefix, choices)
    fmts = {n: get_format(choices[f"{prefix}.{li}.{n}.weight"].format) for n in linears}
    stats = _collect(layer, linears, batches)
    if cfg.method == "awq":
        _awq_layer(layer, linears, fmts, stats, cfg, li, logs)
    for n, m in linears.items():
        t0 = time.perf_counter()
        fmt = fmts[n]
        w = m.weight.detach().to(torch.float32)
        h = stats[n].hessian()
        if cfg.method == "gptq":
            res = gptq_quantize(w, h, fmt, cfg.gptq, name=f"{prefix}.{li}.{n}")
            qt, err, rtn_err, extra = res.qtensor, res.error, res.rtn_error, {"damp": res.damp}
            new: nn.Module = QuantLinear(qt, m.bias)
        elif cfg.method == "awq":
            qt, err, rtn_err = _awq_quantize(w, fmt, h, cfg, name=n)
            extra = {}
            new = QuantLinear(qt, m.bias)
        elif cfg.method == "quip":
            new, err, rtn_err, extra = quip_quantize(w, h, fmt, m.bias, cfg, seed=cfg.seed + 1000 * li + len(logs))
            qt = new.qtensor  # type: ignore[assignment]
        else:
            res = spqr_quantize(w, h, fmt, SpQRConfig(outlier_fraction=cfg.spqr_outliers, gptq=cfg.gptq),
                                name=f"{prefix}.{li}.{n}")
            qt, err, rtn_err = res.qtensor, res.error, res.rtn_error
            extra = {"outliers": float(res.outliers)}
            new = QuantLinear(qt, m.bias)
        _set_module(layer, n, new)
        full = f"{prefix}.{li}.{n}.weight"
        done.add(full)
        report.tensors.append(TensorRecord(full, tuple(w.shape), fmt.name, True, fmt.tensor_bits(qt), err))
        logs.append(LayerLog(li, n, err, rtn_err, time.perf_counter() - t0, extra))
    del stats
    outs = _run_layer(layer, batches, keep=True)
    return [(o, kw) for o, (_, kw) in zip(outs, batches, strict=True)]


def check_method_formats(choices: dict, method: str) -> None:
    """Refuse a format the method cannot produce before any work is done (``choices``: the plan of a
    model's tensors, Hugging Face or GGUF names)."""
    from lowbit.formats.spqr import SpQRFormat
    from lowbit.model.policy import LINEAR_ROLES, role_of

    for name, ch in choices.items():
        if not ch.quantized or role_of(name) not in LINEAR_ROLES:
            continue
        fmt = get_format(ch.format)
        if method == "spqr" and not isinstance(fmt, SpQRFormat):
            raise LowbitError(f"{name}: the SpQR method stores its result in an spqr format (e.g. spqr3-g16), "
                              f"not {fmt.name}")
        if method in ("gptq", "quip") and not fmt.calibratable:
            raise LowbitError(f"{name}: {method.upper()} needs a format that exposes its grid; {fmt.name} does not")


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


def _layers_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for n, m in model.named_modules():
        if m is layers:
            return n
    raise LowbitError("decoder layers not found among the model's modules")


def _awq_layer(layer: nn.Module, linears: dict[str, nn.Linear], fmts: dict, stats: dict[str, InputStats],
               cfg: CalibConfig, li: int, logs: list[LayerLog]) -> None:
    """Search AWQ scales for each (previous op, linears) group of the layer and fold them in.

    Scaling leaves the layer's full-precision function unchanged, so one pass of statistics serves
    every group: a group's inputs become ``x / s``, and their statistics are rescaled in place
    (``H / (s s^T)``, ``mean|x| / s``) for the quantization that follows."""
    for prev_name, names in awq_groups(layer):
        names = [n for n in names if n in linears]
        if not names:
            continue
        st = stats[names[0]]
        ws = [linears[n].weight.detach().to(torch.float32) for n in names]
        s, alpha, loss, base = search_scales(ws, [fmts[n] for n in names], st.mean_abs(), st.hessian(), cfg.awq)
        if alpha == 0.0 and bool((s == 1).all()):
            continue
        apply_scale(layer, prev_name, names, s)
        s64 = s.to(torch.float64)
        for stn in {id(stats[n]): stats[n] for n in names}.values():  # shared statistics rescaled once
            if stn.h is not None:
                stn.h /= s64[:, None] * s64[None, :]
            stn.abs_sum /= s64
            stn.sq_sum /= s64 * s64
        logs.append(LayerLog(li, f"awq:{prev_name}", loss, base, 0.0, {"alpha": alpha}))


def _awq_quantize(w: torch.Tensor, fmt, h: torch.Tensor, cfg: CalibConfig, name: str) -> tuple[QTensor, float, float]:  # type: ignore[no-untyped-def]
    """Quantize an (already AWQ-scaled) weight, with the clipping search for integer formats (not
    for the query and key projections, whose errors the attention scores amplify, as AutoAWQ)."""
    imatrix = torch.diagonal(h).to(torch.float32).clamp_min(0)
    rtn = fmt.quantize(w, imatrix=imatrix) if fmt.uses_imatrix else fmt.quantize(w)
    qt = rtn
    if cfg.awq.clip and isinstance(fmt, IntFormat) and fmt.group >= 0 and not name.endswith(("q_proj", "k_proj")):
        ratio = search_clip(w, fmt, h, cfg.awq)
        qt = fmt.quantize_clipped(w, ratio)
    h32 = h.to(torch.float32)
    den = float(((w @ h32) * w).sum()) or 1.0

    def rel(q: QTensor) -> float:
        dw = fmt.dequantize(q) - w
        return float(((dw @ h32) * dw).sum()) / den

    return qt, rel(qt), rel(rtn)

