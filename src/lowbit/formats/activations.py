"""Activation quantizers: a batch of activations ``[tokens, features]`` in, codes and scales out,
and back.  Unlike weights, activations are quantized while the model runs:

* **dynamic, per token**: each row gets its own scale from its absmax, computed on the fly
  (symmetric integer codes in ``[-qmax, qmax]``, ``qmax = 2^(bits-1) - 1``, or FP8 values);
* **static, per tensor**: one scale and one zero point, fixed in advance from calibration text by an
  observer (:mod:`lowbit.algorithms.observers`); codes are signed and affine,
  ``x ~ scale * (q - zero)`` with ``q`` in ``[-2^(bits-1), 2^(bits-1) - 1]``.

Codes of up to 8 bits are held in int8 tensors so that integer matrix products (``torch._int_mm``)
can consume them directly; FP8 codes are ``torch.float8_e4m3fn`` / ``float8_e5m2`` tensors.
Nothing is registered here: these are not weight formats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import FormatError

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@dataclass
class ActCodes:
    """Quantized activations: ``codes`` (int8 or an FP8 dtype, ``[T, F]``), ``scale`` (float32,
    ``[T, 1]`` per token or ``[]`` per tensor) and, for static affine codes, ``zero`` (int)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: int = 0

    def dequantize(self) -> torch.Tensor:
        return (self.codes.to(torch.float32) - self.zero) * self.scale


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise FormatError(f"integer activations take 2 to 8 bits, not {bits}")


def signed_range(bits: int) -> tuple[int, int]:
    _check_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> ActCodes:
    """Symmetric absmax codes, one float32 scale per row (``absmax / qmax``; an all-zero row gets scale 1)."""
    _check_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    x = x.to(torch.float32)
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    codes = torch.round(x / scale).clamp_(-qmax, qmax).to(torch.int8)
    return ActCodes(codes, scale)


def quantize_per_token_fp8(x: torch.Tensor, variant: str = "e4m3") -> ActCodes:
    """FP8 values with one float32 scale per row mapping the row's absmax to the format's maximum."""
    dtype = FP8_DTYPES.get(variant)
    if dtype is None:
        raise FormatError(f"unknown FP8 variant '{variant}' (e4m3, e5m2)")
    fmax = float(torch.finfo(dtype).max)
    x = x.to(torch.float32)
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    codes = torch.clamp(x / scale, -fmax, fmax).to(dtype)
    return ActCodes(codes, scale)


def static_params(lo: float, hi: float, bits: int = 8, symmetric: bool = False) -> tuple[float, int]:
    """(scale, zero point) of a static per-tensor grid covering ``[lo, hi]`` (widened to contain 0,
    so that zero is exactly representable).  Symmetric grids have zero point 0."""
    qmin, qmax = signed_range(bits)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        amax = max(-lo, hi)
        return (amax / qmax if amax > 0 else 1.0), 0
    if hi - lo <= 0:
        return 1.0, 0
    scale = float(torch.tensor((hi - lo) / (qmax - qmin), dtype=torch.float32))
    zero = int(min(max(round(qmin - lo / scale), qmin), qmax))
    return scale, zero


def quantize_static(x: torch.Tensor, scale: float, zero: int, bits: int = 8) -> ActCodes:
    """Affine codes on a fixed grid: ``clamp(round(x / scale) + zero)``."""
    qmin, qmax = signed_range(bits)
    s = torch.tensor(scale, dtype=torch.float32)
    codes = (torch.round(x.to(torch.float32) / s) + zero).clamp_(qmin, qmax).to(torch.int8)
    return ActCodes(codes, s, int(zero))


def fake_quantize(x: torch.Tensor, bits: int = 8, fp8: str | None = None,
                  static: tuple[float, int] | None = None) -> torch.Tensor:
    """Quantize and dequantize in one step (float32 out): per token, FP8 per token, or static."""
    if static is not None:
        return quantize_static(x, static[0], static[1], bits).dequantize()
    if fp8 is not None:
        return quantize_per_token_fp8(x, fp8).dequantize()
    return quantize_per_token(x, bits).dequantize()
