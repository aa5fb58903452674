"""Observers: watch a layer's activations on calibration text and choose a static quantization range.

* ``minmax``: the smallest and largest value seen (every outlier stretches the grid);
* ``pct``: the 0.01th and 99.99th percentiles (outliers beyond them are clipped);
* ``mse``: the clipping of the min-max range that minimises the squared quantization error of the
  observed values (a grid search over shrink factors).

Percentile and MSE work on a uniform random sample of the observed values (at most ``sample``
values in all, every observed value equally likely to be kept), so memory stays bounded however
long the calibration text is.  The result is a (scale, zero point) pair for
:func:`lowbit.formats.activations.quantize_static`.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats.activations import quantize_static, static_params

OBSERVERS = ("minmax", "pct", "mse")


class Observer:
    def __init__(self, kind: str = "minmax", bits: int = 8, symmetric: bool = False, percentile: float = 99.99,
                 sample: int = 1 << 18, seed: int = 0) -> None:
        if kind not in OBSERVERS:
            raise LowbitError(f"unknown observer '{kind}' (observers: {', '.join(OBSERVERS)})")
        self.kind, self.bits, self.symmetric, self.percentile = kind, bits, symmetric, percentile
        self.lo, self.hi = float("inf"), float("-inf")
        self.sample_size = sample
        self.count = 0
        self._kept: list[torch.Tensor] = []
        self._p = 1.0
        self._gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).to(torch.float32)
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise LowbitError("observer: non-finite activations in the calibration pass")
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        self.count += x.numel()
        if self.kind != "minmax":
            # a Bernoulli sample with one probability for every value seen; halved (and the kept
            # values thinned to match) whenever the sample outgrows twice its target size
            keep = torch.rand(x.numel(), generator=self._gen) < self._p
            self._kept.append(x[keep.to(x.device)].cpu())
            while sum(k.numel() for k in self._kept) > 2 * self.sample_size:
                allv = torch.cat(self._kept)
                self._kept = [allv[torch.rand(allv.numel(), generator=self._gen) < 0.5]]
                self._p /= 2

    def _values(self) -> torch.Tensor:
        return torch.cat(self._kept) if self._kept else torch.zeros(1)

    def range(self) -> tuple[float, float]:
        """The chosen (lo, hi)."""
        if self.count == 0:
            raise LowbitError("observer saw no activations: is the layer used by the calibration text?")
        if self.kind == "minmax":
            return self.lo, self.hi
        v = self._values()
        if self.kind == "pct":
            q = torch.quantile(v.double()[: 1 << 24], torch.tensor([1 - self.percentile / 100, self.percentile / 100],
                                                                     dtype=torch.float64))
            return float(q[0]), float(q[1])
        best, best_err = (self.lo, self.hi), float("inf")
        for r in torch.linspace(1.0, 0.2, 41).tolist():
            lo, hi = self.lo * r, self.hi * r
            s, z = static_params(lo, hi, self.bits, self.symmetric)
            err = float(((quantize_static(v, s, z, self.bits).dequantize() - v) ** 2).mean())
            if err < best_err:
                best, best_err = (lo, hi), err
        return best

    def params(self) -> tuple[float, int]:
        """(scale, zero point) for static quantization of this layer's inputs."""
        lo, hi = self.range()
        return static_params(lo, hi, self.bits, self.symmetric)
