"""Quantize a model in memory: linear layers become :class:`QuantLinear`, which keeps the codes
and dequantizes them on the fly in each forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.formats import Format, QTensor, get_format
from lowbit.kernels import Kernel, build_kernel, check_backend
from lowbit.model.gguf_mix import file_type, gguf_name, info_from_config
from lowbit.model.layers import set_module, shared_param_ids, unique_params
from lowbit.model.policy import TensorChoice, check_scheme, plan_model

#: the attribute of a model quantized by lowbit that holds the codes of its quantized parameters other
#: than linear layers' weights (embeddings), by parameter name: what a checkpoint stores for them
QUANTIZED_PARAMS = "lowbit_quantized_params"


#: the attribute that records how lowbit quantized a model: (scheme, method)
RECIPE = "lowbit_recipe"


def stamp(model: nn.Module, scheme: str, method: str) -> None:
    """Record on ``model`` the scheme and method lowbit quantized it with (saved with it)."""
    setattr(model, RECIPE, (str(scheme), str(method)))


def recipe_of(model: nn.Module) -> tuple[str, str] | None:
    r = getattr(model, RECIPE, None)
    return (str(r[0]), str(r[1])) if isinstance(r, tuple) and len(r) == 2 else None


def quantized_params(model: nn.Module) -> dict[str, QTensor]:
    """The codes of the parameters (not linear layers) that lowbit quantized in place in ``model``."""
    return dict(getattr(model, QUANTIZED_PARAMS, None) or {})


def _placeholder_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: object) -> None:
    if not getattr(module, "loading", False):  # while a loader fills the layer, its state is its parts only
        state_dict[prefix + "weight"] = torch.empty(0, dtype=torch.float16)


def _drop_placeholder_hook(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    w = state_dict.get(prefix + "weight")
    if w is not None and w.numel() == 0:
        del state_dict[prefix + "weight"]


def mark_quantized(module: nn.Module) -> None:
    """Give a quantized layer an empty ``weight`` entry in its state dict: anything that saves the
    model through its state dict (``save_pretrained``, ``torch.save``) stores it, and a loader that
    expects a float weight there stops at the size mismatch instead of initializing it at random."""
    module.register_state_dict_post_hook(_placeholder_hook)
    module.register_load_state_dict_pre_hook(_drop_placeholder_hook)


#: every kind of quantized linear layer, by the name a checkpoint's manifest records
_KINDS: dict[str, type[QuantLinear]] = {}


def quant_kind(name: str) -> type[QuantLinear]:
    """The quantized-layer class a checkpoint's manifest entry of kind ``name`` is rebuilt with."""
    cls = _KINDS.get(name)
    if cls is None:
        raise LowbitError(f"unknown quantized layer kind {name!r} (known: {', '.join(_KINDS)})")
    return cls


class QuantLinear(nn.Module):
    """A linear layer whose weight stays quantized: its format's parts are its buffers (what is
    saved), and its product runs on a kernel of :mod:`lowbit.kernels`, built on first use for the
    device the layer is on.  ``backend`` (None: the best that takes the format) names the kernel
    backend; :func:`set_backend` sets it for a whole model.

    The family of quantized layers (rotated, activation-quantized ...) subclasses this one; a
    subclass that sets ``kind`` registers itself, saves what it adds to its codes in
    :meth:`manifest_extra` and is rebuilt from that by :meth:`from_manifest`."""

    kind = "linear"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            _KINDS[cls.kind] = cls

    def manifest_extra(self) -> dict[str, object]:
        """What a checkpoint's manifest records of this layer beyond its format, shape and bias."""
        return {}

    @classmethod
    def from_manifest(cls, qt: QTensor, bias: torch.Tensor | None, entry: dict) -> QuantLinear:
        """The layer a manifest ``entry`` (with :meth:`manifest_extra`'s fields) describes."""
        return cls(qt, bias)

    def __init__(self, qt: QTensor, bias: torch.Tensor | None, backend: str | None = None) -> None:
        super().__init__()
        mark_quantized(self)
        self.fmt: Format = get_format(qt.format)
        self.shape = qt.shape
        self.meta = qt.meta
        self.out_features, self.in_features = qt.shape
        self._parts = list(qt.parts)
        for k, v in qt.parts.items():
            self.register_buffer(f"q_{k}", v)
        self.bias = bias  # shared with the replaced layer, so later in-place rounding reaches it
        self.backend = backend
        self._kernel: Kernel | None = None
        self._kernel_key: tuple = ()

    @property
    def qtensor(self) -> QTensor:
        return QTensor(self.fmt.name, self.shape, {k: getattr(self, f"q_{k}") for k in self._parts}, self.meta)

    def dequantized_weight(self) -> torch.Tensor:
        """The layer's effective float weight."""
        return self.fmt.dequantize(self.qtensor)

    def stored_weight(self) -> torch.Tensor:
        """The float weight the kernel multiplies by (the dequantized stored codes)."""
        return self.fmt.dequantize(self.qtensor)

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the kernel multiplies by the stored weight (a subclass may transform the input)."""
        return x

    def kernel_output(self, y: torch.Tensor) -> torch.Tensor:
        return y

    @property
    def kernel(self) -> Kernel:
        """The kernel for the layer's current parts, device and backend (rebuilt when any changed)."""
        bufs = self._buffers  # not getattr: this runs at every product, a few hundred times per token
        key = (self.backend, *[(t.data_ptr(), t.device) for t in (bufs[f"q_{k}"] for k in self._parts)])
        if self._kernel is None or key != self._kernel_key:
            self._kernel = build_kernel(self.fmt, self.qtensor, self.backend)
            self._kernel_key = key
        return self._kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.kernel_input(x)
        if torch.is_grad_enabled() and x.requires_grad:  # gradients flow through the float product only
            y = F.linear(x, self.stored_weight().to(x.dtype))
        else:
            y = self.kernel(x)
        y = self.kernel_output(y)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, format={self.fmt.name}"


_KINDS[QuantLinear.kind] = QuantLinear


class TiedQuantHead(nn.Linear):
    """An output head tied to a token embedding stored in a format (quantized, or kept in FP16).  Its
    weight stays the embedding's (dequantized values: shared, saved and exported as before); its
    product runs on a kernel of the embedding's codes, which decode to that same weight.  The float product is taken instead where
    no fast kernel takes the format, the input is on another device, gradients are wanted, or the
    weight was changed in place since it was quantized."""

    tied_qt: QTensor
    tied_version: int
    tied_kernel: Kernel | None
    #: the kernel policy or backend (None: the best exact one); see :func:`set_backend`
    tied_backend: str | None = None

    @classmethod
    def adopt(cls, head: nn.Linear, qt: QTensor) -> None:
        head.__class__ = cls
        head.tied_qt, head.tied_version, head.tied_kernel = qt, head.weight._version, None
        if all(t.device.type == "cpu" for t in qt.parts.values()):
            head.build_kernel()  # now, not in the first product (a generation's prefill)

    def build_kernel(self) -> None:
        fmt = get_format(self.tied_qt.format)
        try:
            k = build_kernel(fmt, self.tied_qt, self.tied_backend)
        except LowbitError:  # a backend named for the layers that does not take the embedding's format
            k = build_kernel(fmt, self.tied_qt)
        self.tied_kernel = k if k.backend != "dequant" else None
        if self.tied_kernel is None:
            self.tied_version = -1  # nothing faster than the float product

    def __getstate__(self) -> dict:
        # a copy's weight (deepcopy, pickle) starts again at version 0: record whether the kernel still
        # matches the weight, for __setstate__ to carry over
        state = dict(self.__dict__)
        state["tied_current"] = self.tied_version >= 0 and self.weight._version == self.tied_version
        return state

    def __setstate__(self, state: dict) -> None:
        current = state.pop("tied_current", False)
        super().__setstate__(state)
        if self.tied_version >= 0:
            self.tied_version = self.weight._version if current else -2  # -2: changed before it was copied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        usable = (self.weight._version == self.tied_version and not (torch.is_grad_enabled() and x.requires_grad)
                  and x.dtype == self.weight.dtype)
        if usable and self.tied_kernel is None:
            self.build_kernel()
        k = self.tied_kernel
        if usable and k is not None and k.device == x.device:
            y = k(x)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, self.weight, self.bias)


def set_backend(model: object, backend: str | None) -> int:
    """Run every quantized linear layer of ``model`` on the kernel backend ``backend``: a name of
    :func:`lowbit.kernels.backends`, "exact" or None (the best exact backend for each layer's format
    and device) or "fast" (the best of all, also those that round).  Returns the
    number of layers set; an unknown name is refused before any is changed."""
    check_backend(backend)
    n = 0
    for m in as_module(model).modules():
        if isinstance(m, QuantLinear):
            m.backend = backend
            n += 1
        elif isinstance(m, TiedQuantHead) and m.tied_backend != backend:
            m.tied_backend = backend
            if m.tied_version >= 0:  # built again for the new backend now, not in the next product (a prefill)
                m.tied_kernel = None
                if m.weight._version == m.tied_version and all(t.device.type == "cpu" for t in m.tied_qt.parts.values()):
                    m.build_kernel()
    return n


@dataclass
class TensorRecord:
    name: str
    shape: tuple[int, ...]
    format: str
    quantized: bool
    bits: int
    rel_error: float | None  # ||W - Q(W)||^2 / ||W||^2 (None: not measured)


@dataclass
class QuantReport:
    format: str
    tensors: list[TensorRecord] = field(default_factory=list)
    details: dict[str, object] = field(default_factory=dict)  # method-specific facts (e.g. SmoothQuant's alphas)
    #: a layer-wise method's per-layer errors (lowbit.model.methods.LayerLog), not saved
    logs: list = field(default_factory=list)
    #: what else the method measured on the way (SmoothQuant's alphas, QAT's losses), not saved
    measured: dict[str, object] = field(default_factory=dict)

    @property
    def total_bits(self) -> int:
        return sum(t.bits for t in self.tensors)

    @property
    def n_params(self) -> int:
        return sum(int(torch.Size(t.shape).numel()) for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.n_params

    @property
    def size_bytes(self) -> int:
        return self.total_bits // 8

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.format] = out.get(t.format, 0) + 1
        return out


def _storage_bits(fmt: Format, shape: tuple[int, ...]) -> int:
    return fmt.storage_bits((1, shape[0]) if len(shape) == 1 else (shape[0], shape[1]))


def _rel_error(w: torch.Tensor, dq: torch.Tensor) -> float:
    den = float((w.double() ** 2).sum())
    return float(((w.double() - dq.double()) ** 2).sum()) / den if den > 0 else 0.0


def plan_for(model: nn.Module, fmt_name: str, has_imatrix: bool = False) -> dict[str, TensorChoice]:
    """The format of every parameter of ``model`` under scheme ``fmt_name`` (see :mod:`policy`)."""
    check_scheme(fmt_name)  # fail early on an unknown name
    params = list(unique_params(model))
    info = info_from_config(model.config) if file_type(fmt_name) and hasattr(model, "config") else None
    return plan_model([(n, tuple(p.shape)) for n, p in params], fmt_name, info, _is_tied(model), has_imatrix=has_imatrix)


def as_module(model: object) -> nn.Module:
    """The ``nn.Module`` of what :func:`lowbit.load_model` returns, or ``model`` itself when it is one."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(f"expected a torch module or what lowbit.load_model returns, got {type(model).__name__}")


def quantize_model(model: nn.Module, fmt_name: str, progress: bool = True,
                   imatrix: dict[str, np.ndarray] | None = None) -> QuantReport:
    """Quantize ``model`` (a module, or what :func:`lowbit.load_model` returns) in place with format (or llama.cpp file type, e.g. ``q4_k_m``)
    ``fmt_name`` under lowbit's tensor rules (:mod:`lowbit.model.policy`) and return what was
    stored for every weight.  ``imatrix`` maps parameter names (Hugging Face or GGUF) to importance
    vectors, used by the formats that take one (K-quants, IQ4, Q4_0...Q5_1).

    Linear layers chosen for quantization become :class:`QuantLinear`.  Embeddings (and an output
    head tied to them) receive the dequantized values of their format in place, since a lookup
    table gains nothing from dequantizing on the fly; kept tensors are rounded to their storage
    type (FP16, or F32 for GGUF's norms) so that what is evaluated is what would be stored.
    """
    model = as_module(model)
    choices = plan_for(model, fmt_name, has_imatrix=bool(imatrix))
    report = quantize_rest(model, fmt_name, choices, skip=set(), progress=progress, imatrix=imatrix)
    stamp(model, fmt_name + ("+imatrix" if imatrix else ""), "rtn")
    return report


def quantize_rest(model: nn.Module, fmt_name: str, choices: dict[str, TensorChoice], skip: set[str],
                  progress: bool = True, imatrix: dict[str, np.ndarray] | None = None) -> QuantReport:
    """Round-to-nearest for every parameter not in ``skip``, each in its planned format."""
    report = QuantReport(fmt_name)
    modules = dict(model.named_modules())
    params = [(n, p) for n, p in unique_params(model) if n not in skip]
    shared = shared_param_ids(model)
    bar = tqdm(params, desc=f"quantize {fmt_name}", unit="tensor", disable=not progress, leave=False)
    for name, p in bar:
        choice = choices[name]
        fmt = get_format(choice.format)
        w2 = p.detach().reshape(1, -1) if p.dim() == 1 else p.detach()
        im = None if not imatrix else imatrix.get(name, imatrix.get(gguf_name(name) or name))
        use = im is not None and fmt.uses_imatrix  # a matrix the format ignores is not checked against it
        qt = fmt.quantize(w2, name=name, imatrix=torch.as_tensor(np.asarray(im, dtype=np.float32)) if use else None)
        dq = fmt.dequantize(qt).reshape(p.shape)
        report.tensors.append(
            TensorRecord(name, tuple(p.shape), fmt.name, choice.quantized, _storage_bits(fmt, tuple(p.shape)),
                         _rel_error(p.detach(), dq))
        )
        mod_name, _, attr = name.rpartition(".")
        mod = modules.get(mod_name)
        if choice.quantized and isinstance(mod, nn.Linear) and attr == "weight" and id(p) not in shared:
            set_module(model, mod_name, QuantLinear(qt, mod.bias))
        else:
            with torch.no_grad():
                p.copy_(dq.to(p.dtype))
            if choice.quantized:
                record = getattr(model, QUANTIZED_PARAMS, None) or {}
                record[name] = qt
                setattr(model, QUANTIZED_PARAMS, record)
            head = _tied_head(model, p)
            if head is not None and p.dim() == 2:  # also a kept FP16 embedding: the head reads its 16 bits
                TiedQuantHead.adopt(head, qt)
    return report


def run_tied_head(model: nn.Module) -> bool:
    """Give the output head tied to ``model``'s token embedding a kernel of the embedding's stored
    form: its codes where it is quantized (:data:`QUANTIZED_PARAMS`), else FP16 or BF16 where its
    values are exactly those (a kept embedding is rounded to FP16).  Both decode to the weight
    itself, so the logits are those of the float product.  Returns whether the head has one;
    :func:`quantize_model` does this as it quantizes, a loader calls it on the model it built."""
    model = as_module(model)
    get_in = getattr(model, "get_input_embeddings", None)
    if get_in is None or not _is_tied(model):
        return False
    p = get_in().weight
    head = _tied_head(model, p)
    if head is None or p.dim() != 2 or p.is_meta:
        return False
    name = next((n for n, q in model.named_parameters() if q is p), None)
    qt = (getattr(model, QUANTIZED_PARAMS, None) or {}).get(name)
    if qt is None:
        w = p.detach()
        for fmt_name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            if w.dtype == dt or (w.is_floating_point() and torch.equal(w.to(dt).to(w.dtype), w)):
                qt = get_format(fmt_name).quantize(w)
                break
    if qt is None:
        return False
    TiedQuantHead.adopt(head, qt)
    return True


def _tied_head(model: nn.Module, p: torch.Tensor) -> nn.Linear | None:
    """The output head whose weight is ``p``, when ``p`` is the token embedding it is tied to."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if get_out is not None else None
    if type(head) in (nn.Linear, TiedQuantHead) and _is_tied(model) and head.weight is p:
        return head
    return None


def _is_tied(model: nn.Module) -> bool:
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None or get_out() is None:
        return False
    return get_in().weight is get_out().weight
