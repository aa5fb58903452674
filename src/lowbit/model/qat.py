"""Quantization-aware training: fine-tune a model through fake quantization.

Each linear layer inside the decoder blocks becomes a :class:`FakeQuantLinear`: its forward pass
uses the weight as the format would store it (quantize, then dequantize, with any of lowbit's
weight formats), and optionally activations quantized the same way as at run time (per token,
integer or FP8); the backward pass treats both roundings as the identity (straight-through
estimator), so the full-precision weights receive the gradient of the loss *of the quantized
model*.  The loss is the KL divergence from the original model's next-token distribution
(distillation on calibration text), which is what lowbit's evaluation measures.

After training, :func:`unwrap` turns the layers back into plain linear layers holding the trained
full-precision weights, and the normal quantization path stores them: the codes are exactly those
the last training steps saw, and the result exports like any other quantized model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.formats import Format, get_format
from lowbit.formats.activations import fake_quantize
from lowbit.model.actquant import quantize_act_model
from lowbit.model.actscheme import parse_act_scheme
from lowbit.model.layers import layers_prefix, set_module
from lowbit.model.quantize import plan_for, quantize_model, stamp


class FakeQuantLinear(nn.Module):
    """A linear layer computing with fake-quantized weights (and activations), straight-through gradients."""

    def __init__(self, linear: nn.Linear, fmt: Format, a_bits: int | None = None, fp8: str | None = None) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.fmt = fmt
        self.a_bits = a_bits
        self.fp8 = fp8
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def quantized_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return self.fmt.dequantize(self.fmt.quantize(self.weight.detach())).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + (self.quantized_weight() - self.weight).detach()
        if self.a_bits is not None or self.fp8 is not None:
            with torch.no_grad():
                xq = fake_quantize(x.detach().reshape(-1, x.shape[-1]), self.a_bits or 8, self.fp8)
            x = x + (xq.reshape(x.shape).to(x.dtype) - x).detach()
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        act = f", act=fp8-{self.fp8}" if self.fp8 else (f", act=int{self.a_bits}" if self.a_bits else "")
        return f"in={self.in_features}, out={self.out_features}, format={self.fmt.name}{act}"


@dataclass
class QATConfig:
    steps: int = 100
    lr: float = 5e-5
    batch_size: int = 2
    warmup: float = 0.1  # fraction of steps with a linear warm-up, then a cosine decay to 0
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class QATResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def wrap(model: nn.Module, weight_format: str, a_bits: int | None = None, fp8: str | None = None) -> list[str]:
    """Replace the decoder blocks' linear layers that ``weight_format`` quantizes by fake-quant layers;
    returns their names."""
    choices = plan_for(model, weight_format)
    prefix = layers_prefix(model)
    names = []
    for n, m in list(model.named_modules()):
        ch = choices.get(f"{n}.weight")
        if isinstance(m, nn.Linear) and ch is not None and ch.quantized:
            if not n.startswith(prefix + "."):
                continue  # embeddings and the output head stay as they are
            fmt = get_format(ch.format)
            set_module(model, n, FakeQuantLinear(m, fmt, a_bits, fp8))
            names.append(n)
    if not names:
        raise LowbitError(f"{weight_format}: no linear layer to train")
    return names


def unwrap(model: nn.Module) -> None:
    """Fake-quant layers back to plain linear layers holding their (trained) full-precision weights."""
    for n, m in list(model.named_modules()):
        if isinstance(m, FakeQuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device,
                            dtype=m.weight.dtype)
            lin.weight = m.weight
            if m.bias is not None:
                lin.bias = m.bias
            set_module(model, n, lin)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), in float32."""
    t = torch.log_softmax(teacher_logits.to(torch.float32), dim=-1)
    s = torch.log_softmax(student_logits.to(torch.float32), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def train(model: nn.Module, teacher: nn.Module, chunks: torch.Tensor, cfg: QATConfig | None = None,
          progress: bool = True) -> QATResult:
    """Fine-tune the fake-quant layers' weights of ``model`` (wrapped by :func:`wrap`) to match
    ``teacher`` on the calibration token ``chunks``; every other parameter stays frozen."""
    import time

    cfg = cfg or QATConfig()
    if cfg.steps < 1 or cfg.lr <= 0:
        raise LowbitError(f"QAT needs steps >= 1 and lr > 0 (got {cfg.steps}, {cfg.lr})")
    if len(chunks) == 0:
        raise LowbitError("QAT needs calibration text")
    layers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    if not layers:
        raise LowbitError("no fake-quant layers: call qat.wrap(model, format) first")
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for m in layers:
        m.weight.requires_grad_(True)
        params.append(m.weight)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warm = max(1, int(cfg.warmup * cfg.steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(chunks), generator=gen)
    dev = next(model.parameters()).device
    res = QATResult()
    t0 = time.perf_counter()
    model.train()
    teacher.eval()
    pos = 0
    try:
        bar = tqdm(range(cfg.steps), desc="QAT", unit="step", disable=not progress, leave=False)
        for _ in bar:
            if pos + cfg.batch_size > len(order):
                order, pos = torch.randperm(len(chunks), generator=gen), 0
            batch = chunks[order[pos : pos + cfg.batch_size]].to(dev)
            pos += cfg.batch_size
            with torch.no_grad():
                t_logits = teacher(input_ids=batch, use_cache=False).logits
            s_logits = model(input_ids=batch, use_cache=False).logits
            loss = kd_loss(s_logits, t_logits)
            if not torch.isfinite(loss):
                raise FloatingPointError("QAT: the loss became non-finite; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            res.losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{res.losses[-1]:.4f}")
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        model.train(was_training)
    res.seconds = time.perf_counter() - t0
    return res


def qat_quantize(model: nn.Module, teacher: nn.Module, scheme: str, chunks: torch.Tensor,
                 cfg: QATConfig | None = None, progress: bool = True):  # type: ignore[no-untyped-def]
    """Fine-tune ``model`` through fake quantization in ``scheme`` (a weight format, a llama.cpp file
    type, or a dynamic activation scheme such as ``w4a8`` / ``w8a8-fp8``) against ``teacher``, then
    quantize it for real.  Returns (QuantReport, QATResult)."""
    act = parse_act_scheme(scheme)
    if act is not None and (act.static or act.kind == "llm-int8"):
        raise LowbitError(f"{scheme}: QAT trains dynamic activation schemes only (w4a8, w8a8, w8a8-fp8)")
    wf = act.weight_format if act is not None else scheme
    wrap(model, wf, a_bits=act.a_bits if act is not None and act.kind == "int" else None,
         fp8="e4m3" if act is not None and act.kind == "fp8" else None)
    try:
        result = train(model, teacher, chunks, cfg, progress)
    finally:
        unwrap(model)
    report = quantize_act_model(model, act, progress=progress) if act is not None else quantize_model(model, scheme, progress=progress)
    report.format = f"{scheme}+qat"
    stamp(model, scheme, "qat")
    return report, result
