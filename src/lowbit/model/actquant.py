"""Weights *and* activations quantized: W8A8 (integer or FP8), W4A4, static full-integer layers,
LLM.int8() and SmoothQuant.

Scheme names (``lowbit quantize --format`` / ``lowbit compare --formats``):

* ``w8a8``: int8 weights (absmax, one scale per output channel) and int8 activations quantized on
  the fly per token; the product is an integer matrix product (int32 accumulation) scaled back to
  floats.  ``w4a4``, ``w4a8``, ``w6a6`` ...: the same with other bit widths (2 to 8).
* ``w8a8-static[-minmax|-pct|-mse]``: activations on one static per-tensor grid (scale and zero
  point) chosen from calibration text by an observer (default ``minmax``); full-integer arithmetic,
  the zero point subtracted through the weights' column sums.
* ``w8a8-fp8``: FP8 E4M3 weights (one scale per channel) and FP8 E4M3 activations per token;
  products of FP8 values are exact in float32, accumulation in float32, as on FP8 tensor cores.
* ``llm-int8[-t<threshold>]``: LLM.int8() (Dettmers et al., 2022): int8 weights per output row,
  int8 activations per token, except the input features where any value exceeds the threshold
  (6.0 by default) in the current batch: those go through a 16-bit path.  Each layer counts how
  many features it routed there.

With ``+smoothquant`` the activations are smoothed first (:mod:`lowbit.algorithms.smoothquant`,
factors folded into the previous norm or linear layer).  The linear layers inside the decoder
blocks are converted; embeddings, output head and norms stay in FP16 as for weight-only formats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.observers import Observer
from lowbit.algorithms.smoothquant import search_alpha, smoothing_factors
from lowbit.errors import LowbitError
from lowbit.formats import QTensor, get_format
from lowbit.formats.activations import quantize_per_token, quantize_per_token_fp8, quantize_static, static_params
from lowbit.formats.integer import IntFormat
from lowbit.model.actscheme import ActScheme, parse_act_scheme
from lowbit.model.layers import apply_scale, decoder_layers, fold_into_previous, layers_prefix, scale_groups, set_module
from lowbit.model.quantize import QuantLinear, QuantReport, TensorRecord, as_module, plan_for, quantize_rest, stamp


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 product of int8 matrices ``a`` [M, K] and ``b`` [K, N]."""
    try:
        return torch._int_mm(a, b)
    except RuntimeError:  # shapes a backend's kernel refuses (e.g. small M on CUDA): exact in float64
        return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)


def _int_weight(qt: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes ``[out, in]`` and float32 scales ``[out]`` of a symmetric per-channel integer weight."""
    fmt = get_format(qt.format)
    if not isinstance(fmt, IntFormat) or not fmt.symmetric or fmt.group != 0:
        raise LowbitError(f"{qt.format}: integer activation layers need symmetric per-channel integer weights")
    return fmt.codes(qt).to(torch.int8), qt.parts["scale"].to(torch.float32).reshape(-1)


class ActQuantLinear(QuantLinear):
    """Base of the layers that quantize their inputs too; stores its weight like :class:`QuantLinear`."""

    kind = "act"

    def act_config(self) -> dict[str, object]:
        raise NotImplementedError

    def manifest_extra(self) -> dict[str, object]:
        return {"act": self.act_config()}

    @classmethod
    def from_manifest(cls, qt: QTensor, bias: torch.Tensor | None, entry: dict) -> ActQuantLinear:
        return act_linear(qt, bias, dict(entry.get("act") or {}))


class IntActLinear(ActQuantLinear):
    """Integer weights (per output channel) times integer activations (per token, or static per
    tensor with a zero point), multiplied in integers and scaled back."""

    def __init__(self, qt: QTensor, bias: torch.Tensor | None, a_bits: int = 8,
                 static: tuple[float, int] | None = None) -> None:
        super().__init__(qt, bias)
        codes, scale = _int_weight(qt)
        self.register_buffer("w_codes_t", codes.t().contiguous(), persistent=False)
        self.register_buffer("w_scale", scale, persistent=False)
        self.register_buffer("w_colsum", codes.to(torch.int32).sum(1), persistent=False)
        self.a_bits = a_bits
        self.static = static

    def act_config(self) -> dict[str, object]:
        return {"kind": "int", "a_bits": self.a_bits, "static": list(self.static) if self.static else None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.static is not None:
            ac = quantize_static(x2, self.static[0], self.static[1], self.a_bits)
        else:
            ac = quantize_per_token(x2, self.a_bits)
        acc = int_matmul(ac.codes, self.w_codes_t)
        if ac.zero:
            acc = acc - ac.zero * self.w_colsum[None, :]
        y = acc.to(torch.float32) * ac.scale * self.w_scale[None, :]
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


class FP8ActLinear(ActQuantLinear):
    """FP8 E4M3 weights (per channel) times FP8 E4M3 activations (per token), float32 accumulation."""

    def __init__(self, qt: QTensor, bias: torch.Tensor | None) -> None:
        super().__init__(qt, bias)
        fmt = get_format(qt.format)
        if fmt.name != "fp8-e4m3-ch":
            raise LowbitError(f"{qt.format}: FP8 activation layers need fp8-e4m3-ch weights")
        self.register_buffer("w_dec_t", qt.parts["values"].view(torch.float8_e4m3fn).to(torch.float32).t().contiguous(),
                             persistent=False)
        self.register_buffer("w_scale", qt.parts["scale"].to(torch.float32).reshape(-1), persistent=False)

    def act_config(self) -> dict[str, object]:
        return {"kind": "fp8"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ac = quantize_per_token_fp8(x2, "e4m3")
        y = (ac.codes.to(torch.float32) @ self.w_dec_t) * ac.scale * self.w_scale[None, :]
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


class LLMInt8Linear(ActQuantLinear):
    """LLM.int8(): the input features with any |value| over ``threshold`` in the current batch are
    multiplied in 16 bits (FP16 inputs times the FP16 dequantized weight columns), the rest in int8
    (per token / per output row absmax).  Counts the features routed to the 16-bit path."""

    def __init__(self, qt: QTensor, bias: torch.Tensor | None, threshold: float = 6.0) -> None:
        super().__init__(qt, bias)
        if qt.format != "int8-ch":
            raise LowbitError(f"{qt.format}: LLM.int8() needs int8-ch weights")
        codes, scale = _int_weight(qt)
        self.register_buffer("w_codes_t", codes.t().contiguous(), persistent=False)
        self.register_buffer("w_scale", scale, persistent=False)
        self.register_buffer("w_half_t", self.dequantized_weight().to(torch.float16).t().contiguous(), persistent=False)
        self.threshold = float(threshold)
        self.calls = 0
        self.outlier_features = 0  # summed over calls
        self.ever = torch.zeros(qt.shape[1], dtype=torch.bool)
        self.last_outliers = torch.zeros(0, dtype=torch.int64)

    def act_config(self) -> dict[str, object]:
        return {"kind": "llm-int8", "threshold": self.threshold}

    @property
    def outlier_fraction(self) -> float:
        """Mean fraction of input features sent to the 16-bit path per call."""
        return self.outlier_features / max(1, self.calls * self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
        mask = (x2.abs() > self.threshold).any(dim=0)
        cols = mask.nonzero().reshape(-1)
        self.calls += 1
        self.outlier_features += int(cols.numel())
        self.ever |= mask.cpu()
        self.last_outliers = cols.cpu()
        regular = x2.masked_fill(mask[None, :], 0.0) if cols.numel() else x2
        ac = quantize_per_token(regular, 8)
        y = int_matmul(ac.codes, self.w_codes_t).to(torch.float32) * ac.scale * self.w_scale[None, :]
        if cols.numel():
            # FP16 operands, float32 accumulation (what a tensor core's FP16 GEMM does)
            y = y + x2[:, cols].to(torch.float16).to(torch.float32) @ self.w_half_t[cols].to(torch.float32)
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def act_linear(qt: QTensor, bias: torch.Tensor | None, config: dict) -> ActQuantLinear:
    """Rebuild an activation-quantized layer from its weight and :meth:`ActQuantLinear.act_config`."""
    kind = config.get("kind")
    if kind == "int":
        st = config.get("static")
        return IntActLinear(qt, bias, int(config["a_bits"]), (float(st[0]), int(st[1])) if st else None)
    if kind == "fp8":
        return FP8ActLinear(qt, bias)
    if kind == "llm-int8":
        return LLMInt8Linear(qt, bias, float(config["threshold"]))
    raise LowbitError(f"unknown activation layer kind {kind!r}")


# ---- calibration passes ---------------------------------------------------------------------------
def _decoder_linears(model: nn.Module, choices: dict) -> dict[str, nn.Linear]:
    decoder_layers(model)  # a clear error for a model without decoder layers
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and f"{n}.weight" in choices and choices[f"{n}.weight"].quantized}


def _run_calibration(model: nn.Module, chunks: torch.Tensor, batch_size: int, hooks: dict[str, object],
                     progress: bool, desc: str) -> None:
    """Run the decoder body over ``chunks`` with a pre-hook ``fn(x)`` on each named module."""
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda _m, a, fn=fn: fn(a[0]))  # type: ignore[misc]
               for n, fn in hooks.items()]
    body = getattr(model, "model", model)
    dev = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for i in tqdm(range(0, len(chunks), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
                body(input_ids=chunks[i : i + batch_size].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()


def input_stats(model: nn.Module, names: list[str], chunks: torch.Tensor, batch_size: int = 8,
                progress: bool = False, sample_tokens: int = 0,
                seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per input channel max |x| of each named linear layer over ``chunks`` and, when
    ``sample_tokens`` > 0, a uniform random sample of about that many of its input rows (float32)."""
    amax: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    frac = min(1.0, sample_tokens / max(chunks.numel(), 1))
    gen = torch.Generator().manual_seed(seed)

    def make(n: str):  # type: ignore[no-untyped-def]
        def fn(x: torch.Tensor) -> None:
            x2 = x.detach().reshape(-1, x.shape[-1])
            m = x2.abs().amax(0).to(torch.float32)
            amax[n] = m if n not in amax else torch.maximum(amax[n], m)
            if sample_tokens > 0:
                keep = torch.rand(x2.shape[0], generator=gen) < frac
                rows[n].append(x2[keep.to(x2.device)].to(torch.float32).cpu())
        return fn

    _run_calibration(model, chunks, batch_size, {n: make(n) for n in names}, progress, "activation ranges")
    return amax, {n: torch.cat(r) for n, r in rows.items() if r}


def input_absmax(model: nn.Module, names: list[str], chunks: torch.Tensor, batch_size: int = 8,
                 progress: bool = False) -> dict[str, torch.Tensor]:
    """Per input channel max |x| of each named linear layer over the calibration ``chunks``."""
    return input_stats(model, names, chunks, batch_size, progress)[0]


def _fake_quantizers(scheme: ActScheme | None):  # type: ignore[no-untyped-def]
    """(activation, weight) fake quantizers of ``scheme``'s layers, for the alpha search."""
    s = scheme or ActScheme("w8a8", 8, 8, "int")
    wfmt = get_format(s.weight_format)

    def w_fq(w: torch.Tensor) -> torch.Tensor:
        return wfmt.dequantize(wfmt.quantize(w)).to(torch.float32)

    if s.kind == "fp8":
        return (lambda x: quantize_per_token_fp8(x, "e4m3").dequantize()), w_fq
    if s.static:  # the observer's grid depends on the smoothed inputs: judge by a per-tensor minmax grid
        def a_static(x: torch.Tensor) -> torch.Tensor:
            scale, zero = static_params(float(x.min()), float(x.max()), s.a_bits)
            return quantize_static(x, scale, zero, s.a_bits).dequantize()
        return a_static, w_fq
    return (lambda x: quantize_per_token(x, s.a_bits).dequantize()), w_fq


def smooth_model(model: nn.Module, chunks: torch.Tensor, alpha: float | None = 0.5, batch_size: int = 8,
                 progress: bool = False, scheme: ActScheme | None = None, sample_tokens: int = 4096,
                 grid: int = 20) -> dict[str, dict[str, float | None]]:
    """SmoothQuant: fold smoothing factors into every (previous op, linear layers) pair of each decoder
    layer where a fold is exact (norm -> q/k/v, norm -> gate/up, up -> down, v -> o).  Under
    grouped-query attention, the searched mode also smooths v -> o, the o columns of the query heads
    that share a value head sharing one factor; with a fixed alpha that fold made SmolLM2's W8A8
    worse (ΔPPL +1.61% against +1.36% at alpha 0.5), so a fixed alpha leaves it out.

    ``alpha=None`` searches the migration strength per group (:func:`search_alpha`): the one whose
    fake-quantized outputs (with ``scheme``'s quantizers, W8A8 by default) are closest to the
    original on a sample of ``sample_tokens`` calibration inputs.  Smoothing leaves the model's
    full-precision function unchanged, so one calibration pass serves every group.
    Returns, per group (named by its first linear layer), the alpha used and the largest factor."""
    layers = decoder_layers(model)
    prefix = layers_prefix(model, layers)
    groups = [(li, prev, names) for li, layer in enumerate(layers) for prev, names in scale_groups(layer)]
    ties: dict[int, torch.Tensor] = {}
    for li, layer in enumerate(layers):
        tie = gqa_value_tie(layer) if alpha is None else None  # only where the search can decline it
        if tie is not None:
            ties[li] = tie
            groups.append((li, "self_attn.v_proj", ["self_attn.o_proj"]))
    first = sorted({f"{prefix}.{li}.{names[0]}" for li, _, names in groups})
    amax, sample = input_stats(model, first, chunks, batch_size, progress, sample_tokens if alpha is None else 0)
    a_fq, w_fq = _fake_quantizers(scheme)
    out: dict[str, dict[str, float | None]] = {}
    for li, prev, names in tqdm(groups, desc="smoothing", unit="group", disable=not progress, leave=False):
        layer = layers[li]
        key = f"{prefix}.{li}.{names[0]}"
        if key not in amax:
            continue
        ws = [layer.get_submodule(n).weight for n in names]
        tie = ties.get(li) if prev == "self_attn.v_proj" else None
        if alpha is None:
            s, a, loss, base = search_alpha(sample[key], amax[key], ws, a_fq, w_fq, grid, tie=tie)
            out[key] = {"alpha": a, "loss": loss, "base_loss": base, "max_factor": float(s.max())}
            if a is None:
                continue
        else:
            s = smoothing_factors(amax[key], ws, alpha, tie=tie)
            out[key] = {"alpha": alpha, "max_factor": float(s.max())}
        s = s.to(ws[0].device)
        if tie is None:
            apply_scale(layer, prev, names, s)
        else:  # v's rows take one factor per shared channel, o's columns the expanded factors
            v_rows = torch.ones(int(tie.max()) + 1, dtype=s.dtype, device=s.device).index_copy_(0, tie.to(s.device), s)
            fold_into_previous(layer.get_submodule(prev), v_rows)
            with torch.no_grad():
                ws[0].mul_(s[None, :].to(ws[0].dtype))
    return out


def gqa_value_tie(layer: nn.Module) -> torch.Tensor | None:
    """For an attention block with grouped-query attention (fewer value heads than query heads), the
    value-projection row feeding each input column of the output projection (column ``h * d + i``
    of query head ``h`` reads row ``(h // groups) * d + i``); None without GQA or when the shapes
    are not those of a standard attention block."""
    try:
        attn = layer.get_submodule("self_attn")
        v, o = attn.get_submodule("v_proj"), attn.get_submodule("o_proj")
    except AttributeError:
        return None
    hd, groups = getattr(attn, "head_dim", None), getattr(attn, "num_key_value_groups", None)
    if not isinstance(hd, int) or not isinstance(groups, int) or groups <= 1:
        return None
    n_kv = v.weight.shape[0] // hd
    if v.weight.shape[0] != n_kv * hd or o.weight.shape[1] != n_kv * groups * hd:
        return None
    c = torch.arange(o.weight.shape[1])
    return (c // hd // groups) * hd + c % hd


def observe_static(model: nn.Module, names: list[str], chunks: torch.Tensor, observer: str, bits: int,
                   batch_size: int = 8, progress: bool = False) -> dict[str, tuple[float, int]]:
    """Static (scale, zero point) of each named layer's inputs from an observer over ``chunks``."""
    obs = {n: Observer(observer, bits=bits, sample=1 << 17, seed=i) for i, n in enumerate(names)}
    _run_calibration(model, chunks, batch_size, {n: obs[n].add for n in names}, progress, f"{observer} observers")
    return {n: o.params() for n, o in obs.items()}


@dataclass
class ActConfig:
    smoothquant: bool = False
    alpha: float | None = 0.5  # None: searched per group
    batch_size: int = 8


def quantize_act_model(model: nn.Module, scheme: str | ActScheme, chunks: torch.Tensor | None = None,
                       cfg: ActConfig | None = None, progress: bool = True) -> QuantReport:
    """Convert ``model`` in place to the activation scheme ``scheme``.  ``chunks`` (calibration token
    ids, ``[n, seq_len]``) are needed for SmoothQuant and static schemes.  ``model`` may be what
    :func:`lowbit.load_model` returns."""
    model = as_module(model)
    s = scheme if isinstance(scheme, ActScheme) else parse_act_scheme(scheme)
    if s is None:
        raise LowbitError(f"'{scheme}' is not an activation scheme (w8a8, w4a4, w8a8-static-mse, w8a8-fp8, llm-int8)")
    cfg = cfg or ActConfig()
    if (cfg.smoothquant or s.static) and (chunks is None or len(chunks) == 0):
        raise LowbitError(f"{s.name}{'+smoothquant' if cfg.smoothquant else ''} needs calibration text")
    smoothing: dict = {}
    if cfg.smoothquant:
        smoothing = smooth_model(model, chunks, cfg.alpha, cfg.batch_size, progress, s)  # type: ignore[arg-type]
    wfmt = get_format(s.weight_format)
    choices = plan_for(model, s.weight_format)
    linears = _decoder_linears(model, choices)
    static = observe_static(model, list(linears), chunks, s.observer, s.a_bits, cfg.batch_size,  # type: ignore[arg-type]
                            progress) if s.static else {}
    report = QuantReport(s.name + ("+smoothquant" if cfg.smoothquant else ""))
    if cfg.smoothquant:
        report.details["smoothing"] = smoothing
    done = set()
    for n, m in tqdm(list(linears.items()), desc=s.name, unit="layer", disable=not progress, leave=False):
        w = m.weight.detach()
        qt = wfmt.quantize(w.to(torch.float32), name=f"{n}.weight")
        if s.kind == "llm-int8":
            new: ActQuantLinear = LLMInt8Linear(qt, m.bias, s.threshold)
        elif s.kind == "fp8":
            new = FP8ActLinear(qt, m.bias)
        else:
            new = IntActLinear(qt, m.bias, s.a_bits, static.get(n))
        new.to(w.device)
        dq = wfmt.dequantize(qt)
        err = float(((w.double() - dq.double()) ** 2).sum() / max(float((w.double() ** 2).sum()), 1e-300))
        set_module(model, n, new)
        report.tensors.append(TensorRecord(f"{n}.weight", tuple(w.shape), wfmt.name, True,
                                           wfmt.storage_bits(tuple(w.shape)), err))  # type: ignore[arg-type]
        done.add(f"{n}.weight")
    rest = quantize_rest(model, s.weight_format, choices, skip=done, progress=False)
    report.tensors += rest.tensors
    stamp(model, s.name, "smoothquant" if cfg.smoothquant else "rtn")
    return report


def describe_smoothing(smoothing: dict[str, dict[str, float | None]]) -> str:
    """One line on the alphas a SmoothQuant run used (fixed, or searched per group)."""
    alphas = [v["alpha"] for v in smoothing.values()]
    fixed = {a for a in alphas if a is not None}
    if len(fixed) == 1 and None not in alphas and not any("loss" in v for v in smoothing.values()):
        return f"SmoothQuant alpha {fixed.pop():g}"
    used = sorted(a for a in alphas if a is not None)
    if not used:
        return f"SmoothQuant alpha searched: no smoothing helped in any of {len(alphas)} groups"
    med = used[len(used) // 2]
    return (f"SmoothQuant alpha searched per group: median {med:g}, range {used[0]:g}-{used[-1]:g}, "
            f"{len(alphas) - len(used)} of {len(alphas)} groups left unsmoothed")


def outlier_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per LLM.int8() layer: the mean fraction of input features sent to FP16 per call, and the
    fraction ever sent."""
    return {n: {"mean_fraction": m.outlier_fraction, "ever_fraction": float(m.ever.float().mean()), "calls": m.calls}
            for n, m in model.named_modules() if isinstance(m, LLMInt8Linear)}
