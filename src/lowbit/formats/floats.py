"""Floating-point formats: FP32, FP16, BF16, and FP8 (E4M3, E5M2) with a per-tensor or per-channel scale.

FP8 names: ``fp8-e4m3`` / ``fp8-e5m2`` (one FP32 scale per tensor) and ``fp8-e4m3-ch`` /
``fp8-e5m2-ch`` (one FP32 scale per output channel).  The scale maps the absolute maximum to the
largest finite value of the type (448 for E4M3, 57344 for E5M2); rounding is to nearest even.
"""

from __future__ import annotations

import torch

from lowbit.errors import FormatError
from lowbit.formats.base import Format, QTensor, ggml_type, register


class CastFormat(Format):
    """Plain cast to a narrower float type."""

    def __init__(self, name: str, dtype: torch.dtype, gguf_type: int, description: str) -> None:
        self.name = name
        self.dtype = dtype
        self.gguf_type = gguf_type
        self.description = description
        self.bits = torch.finfo(dtype).bits

    def quantize(self, w: torch.Tensor, name: str = "tensor", imatrix: torch.Tensor | None = None) -> QTensor:
        w = self.check(w, name)
        q = w.to(self.dtype)
        if not torch.isfinite(q).all():
            raise FormatError(f"{name}: values overflow {self.name} (largest |w| = {w.abs().max():.3g})")
        return QTensor(self.name, tuple(w.shape), {"values": q})

    def dequantize(self, qt: QTensor) -> torch.Tensor:
        return qt.parts["values"].to(torch.float32)

    def storage_bits(self, shape: tuple[int, int]) -> int:
        return shape[0] * shape[1] * self.bits


class FP8Format(Format):
    def __init__(self, variant: str, per_channel: bool) -> None:
        self.dtype = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[variant]
        self.fmax = float(torch.finfo(self.dtype).max)
        self.per_channel = per_channel
        self.name = f"fp8-{variant}{'-ch' if per_channel else ''}"
        self.description = f"FP8 {variant.upper()}, FP32 scale per {'channel' if per_channel else 'tensor'}"

    def quantize(self, w: torch.Tensor, name: str = "tensor", imatrix: torch.Tensor | None = None) -> QTensor:
        w = self.check(w, name)
        amax = w.abs().amax(dim=1, keepdim=True) if self.per_channel else w.abs().amax().reshape(1, 1)
        scale = torch.where(amax > 0, amax / self.fmax, torch.ones_like(amax))
        q = torch.clamp(w / scale, -self.fmax, self.fmax).to(self.dtype)
        return QTensor(self.name, tuple(w.shape), {"values": q.view(torch.uint8), "scale": scale.reshape(-1)})

    def dequantize(self, qt: QTensor) -> torch.Tensor:
        v = qt.parts["values"].view(self.dtype).to(torch.float32)
        return v * qt.parts["scale"].reshape(-1, 1)

    def storage_bits(self, shape: tuple[int, int]) -> int:
        return shape[0] * shape[1] * 8 + 32 * (shape[0] if self.per_channel else 1)


register(CastFormat("f32", torch.float32, ggml_type("F32").type_id, "FP32, the unquantized reference"))
register(CastFormat("fp16", torch.float16, ggml_type("F16").type_id, "IEEE half precision"))
register(CastFormat("bf16", torch.bfloat16, ggml_type("BF16").type_id, "bfloat16"))
for _v in ("e4m3", "e5m2"):
    register(FP8Format(_v, per_channel=False))
    register(FP8Format(_v, per_channel=True))
