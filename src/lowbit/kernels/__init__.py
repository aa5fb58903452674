"""Kernels: multiply by packed weights without expanding the whole float weight.

A *backend* turns one quantized tensor (a :class:`~lowbit.formats.QTensor` of a format) into a
:class:`Kernel`, a callable ``y = kernel(x)`` computing ``x @ W^T`` for the tensor's exact
dequantized weight ``W``, within the rounding the backend states.  Every module of this package
registers its backends on import (adding a backend is adding one file); :func:`build_kernel` picks, for a
device, the first backend in order of rank that takes the tensor, and the dequantizing reference
backend takes every format on every device.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

import torch

from lowbit.errors import LowbitError
from lowbit.formats import Format, QTensor


class Kernel:
    """``x [..., in] -> x @ W^T [..., out]`` in ``x``'s dtype (no bias)."""

    backend: str = ""
    device: torch.device = torch.device("cpu")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes the kernel holds (its packed weight and scales)."""
        return 0


@dataclass(frozen=True)
class Backend:
    name: str
    #: the device type it runs on ("cpu", "cuda"), or "any"
    device: str
    description: str
    #: how close its product is to the exact one (float64 over the exact dequantized weight)
    bound: str
    #: ``build(fmt, qt)``: the kernel for ``qt`` (on ``qt``'s device), or None when the backend does not take it
    build: Callable[[Format, QTensor], Kernel | None]
    #: lower first
    rank: int
    #: relative error the tests hold it to (Frobenius norm of the error over that of the product, float32 inputs)
    tolerance: float = 1e-5
    #: True where its product is the float32 one up to float32 rounding.  Only exact backends are chosen
    #: by default; the others (which round the input or the scales) are chosen by name or with "fast".
    exact: bool = True


_BACKENDS: dict[str, Backend] = {}
_SCANNED = False


def register_backend(backend: Backend) -> Backend:
    if backend.name in _BACKENDS:
        raise ValueError(f"kernel backend {backend.name} registered twice")
    _BACKENDS[backend.name] = backend
    return backend


def backends() -> dict[str, Backend]:
    """Every registered backend by name, in order of rank."""
    global _SCANNED
    if not _SCANNED:
        import lowbit.kernels as pkg

        for m in sorted(x.name for x in pkgutil.iter_modules(pkg.__path__) if not x.name.startswith("_")):
            import_module(f"lowbit.kernels.{m}")
        _SCANNED = True
    return dict(sorted(_BACKENDS.items(), key=lambda kv: (kv[1].rank, kv[0])))


def get_backend(name: str) -> Backend:
    known = backends()
    if name not in known:
        from lowbit.errors import did_you_mean

        raise LowbitError(f"unknown kernel backend '{name}'{did_you_mean(name, known)} (known: {', '.join(known)})")
    return known[name]


#: what ``backend`` may be besides a backend's name: the best exact backend, or the best of all
POLICIES = {"exact": "the fastest backend whose product is exact up to float32 rounding (the default)",
            "fast": "the fastest backend, also those that round the input (to int8, as llama.cpp does, or bfloat16) "
                    "or the scales (bfloat16)"}


def check_backend(name: str | None) -> None:
    if name is not None and name not in POLICIES:
        get_backend(name)


def build_kernel(fmt: Format, qt: QTensor, backend: str | None = None) -> Kernel:
    """The kernel for ``qt`` on its device: of the best exact backend (``backend`` None or "exact"),
    of the best of all ("fast"), or of the backend named ``backend`` (an error when that one does
    not take ``qt``)."""
    dev = qt.parts[next(iter(qt.parts))].device.type if qt.parts else "cpu"
    if backend is not None and backend not in POLICIES:
        b = get_backend(backend)
        k = b.build(fmt, qt) if b.device in (dev, "any") else None
        if k is None:
            raise LowbitError(f"kernel backend {backend} does not take {fmt.name} {tuple(qt.shape)} on {dev}")
        return k
    for b in backends().values():
        if b.device in (dev, "any") and (b.exact or backend == "fast"):
            k = b.build(fmt, qt)
            if k is not None:
                return k
    raise LowbitError(f"no kernel backend takes {fmt.name} on {dev}")  # the reference takes everything


__all__ = ["POLICIES", "Backend", "Kernel", "backends", "build_kernel", "check_backend", "get_backend",
           "register_backend"]
