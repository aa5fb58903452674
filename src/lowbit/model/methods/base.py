"""What a quantization method is, and the registry of them.

A method chooses the codes of a scheme (a tensor format, a llama.cpp file type or an activation
scheme); it does not define the stored format.  Every method declares:

* what it applies to: weight formats, activation schemes, or both;
* whether it reads calibration text, and whether it takes an importance matrix;
* which formats it can produce (:meth:`Method.check_format`, asked before any work is done);
* whether its layers are plain quantized linear layers (GGUF files and the other engines' layouts
  can hold them) and whether it can run one decoder layer at a time from a safetensors directory;
* how it works: **layer-wise** methods (GPTQ, AWQ, SpQR, QuIP) quantize one linear layer at a time
  from the statistics of its inputs, after an optional preparation of the whole decoder layer
  (AWQ's scales), inside :func:`lowbit.model.calibrate.calibrate_quantize`; the others transform the
  whole model (:meth:`Method.run`: round-to-nearest, SmoothQuant, QAT).

A new method is one module of this package that calls :func:`register_method`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.algorithms.awq import AWQConfig
from lowbit.algorithms.gptq import GPTQConfig
from lowbit.algorithms.hessian import InputStats
from lowbit.errors import LowbitError, did_you_mean
from lowbit.formats import Format, QTensor
from lowbit.model.quantize import QuantReport
from lowbit.model.schemes import Scheme


@dataclass
class CalibConfig:
    """Calibration settings shared by the methods, and the options of each."""

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


@dataclass
class LinearResult:
    """One linear layer quantized by a layer-wise method: the module that replaces it, its stored
    codes, and the relative output errors ``tr(dW H dW^T) / tr(W H W^T)`` of the method and of
    round-to-nearest on the calibration inputs."""

    module: nn.Module
    qtensor: QTensor
    error: float
    rtn_error: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class RunInputs:
    """What a whole-model method may use: the calibration token chunks, the settings, an importance
    matrix, the model to distil from (QAT; a copy of the model when None) and SmoothQuant's alpha."""

    chunks: torch.Tensor | None = None
    calib: CalibConfig = field(default_factory=CalibConfig)
    qat: object | None = None  # a lowbit.model.qat.QATConfig
    imatrix: dict | None = None
    teacher: nn.Module | None = None
    alpha: float | None = 0.5
    progress: bool = True


class Method:
    """A quantization method (see the module's docstring).  Subclasses set the class attributes and
    implement :meth:`quantize_linear` (layer-wise) or :meth:`run` (whole model)."""

    name: str = ""
    description: str = ""
    weights: bool = True  # applies to weight formats and file types
    activations: bool = False  # applies to activation schemes
    calibrated: bool = True  # reads calibration text
    takes_imatrix: bool = False  # +imatrix / --imatrix
    layerwise: bool = False
    streams: bool = False  # safetensors directory -> GGUF one decoder layer at a time
    plain_layers: bool = True  # GGUF files and export layouts can hold its layers
    order: int = 100  # where `lowbit formats` and --method list it

    def check_format(self, fmt: Format, name: str) -> None:
        """Raise a LowbitError if this method cannot produce ``fmt`` for the tensor ``name``."""

    def prepare_layer(self, layer: nn.Module, linears: dict[str, nn.Linear], fmts: dict[str, Format],
                      stats: dict[str, InputStats], cfg: CalibConfig, li: int, logs: list[LayerLog]) -> None:
        """Before a decoder layer's linear layers are quantized (layer-wise methods)."""

    def quantize_linear(self, w: torch.Tensor, h: torch.Tensor, fmt: Format, bias: torch.Tensor | None,
                        cfg: CalibConfig, name: str, seed: int) -> LinearResult:
        """Quantize one linear layer's float32 weight ``w`` from its inputs' Hessian ``h``."""
        raise NotImplementedError(f"{self.name} is not a layer-wise method")

    def run(self, model: nn.Module, scheme: Scheme, inputs: RunInputs) -> tuple[QuantReport, dict[str, object]]:
        """Quantize ``model`` in place under ``scheme`` (a :class:`lowbit.model.schemes.Scheme`);
        returns the QuantReport and what the method measured on the way (method-specific)."""
        raise NotImplementedError(f"{self.name} runs layer by layer")


def require_grid(method: Method, fmt: Format, name: str) -> None:
    """For methods built on GPTQ: the format must expose the grid its codes are chosen on."""
    if not fmt.calibratable:
        raise LowbitError(f"{name}: {method.name.upper()} needs a format that exposes its grid; {fmt.name} does not")


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if not method.name or method.name in _METHODS:
        raise ValueError(f"method name {method.name!r} is empty or taken")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    m = _METHODS.get(str(name).strip().lower())
    if m is None:
        raise LowbitError(f"unknown method '{name}'{did_you_mean(str(name), list(_METHODS))} "
                          f"(methods: {', '.join(list_methods())})")
    return m


def list_methods() -> list[str]:
    """Every registered method's name, in their declared order (round-to-nearest first)."""
    return sorted(_METHODS, key=lambda n: (_METHODS[n].order, n))
