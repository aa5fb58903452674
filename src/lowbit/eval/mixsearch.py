"""Fit a model to a budget: per-tensor sensitivities, a predicted loss for every (tensor, format),
and the mix of formats with the least predicted loss under a size budget.

**Targets.**  A GGUF file (``target="gguf"``): every tensor llama.cpp quantizes (the embedding and
output head included) gets one of the llama.cpp types lowbit writes (:func:`gguf_candidates`), 1-D tensors
stay F32.  A lowbit checkpoint (``target="lowbit"``): the linear layers of the decoder blocks get any
of lowbit's formats (:data:`LOWBIT_TYPES` by default: integer codes per group, NF4, FP8, FP16 ...),
the embedding, output head and norms stay FP16, as :mod:`lowbit.model.policy` keeps them.

**Proxy.**  Storing tensor ``t`` in format ``f`` changes its weights by ``dW``; the layer's output
error on calibration activations is about ``sum_j imp_j * sum_i dW_ij^2`` (``imp`` = mean squared
input per column: the importance matrix, i.e. the diagonal of ``X^T X / tokens``).  That error is
cheap to compute for every format.

**Calibration of the proxy.**  How much a layer's output error costs in the model's final KL
divergence differs from layer to layer.  For each tensor, lowbit quantizes *that tensor alone* in
a reference type (4-bit: Q4_K where its rows fit, Q4_0 elsewhere), measures the KL divergence from
the original on calibration text, and sets the tensor's sensitivity ``alpha_t = KLD_t / err_t(ref)``.
The predicted loss of a whole mix is ``sum_t alpha_t * err_t(f_t)``: small perturbations add up.
:func:`validate` measures real mixes to check that the predictions order them correctly.

**Search.**  :func:`lowbit.algorithms.budget.solve` picks the formats.  Budgets count every stored
bit of the file's tensors (the tensors outside the search at their storage precision), over all
weights, as llama.cpp's bits-per-weight figures do.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.budget import Candidate, Solution, solve
from lowbit.env import __version__, atomic_path, cache_dir
from lowbit.errors import LowbitError
from lowbit.eval.data import files_digest
from lowbit.eval.runner import torch_logits_fn
from lowbit.formats import get_format
from lowbit.io.gguf_out import array_digest
from lowbit.model.gguf_mix import allows_quantization, gguf_name, gguf_types
from lowbit.model.layers import decoder_layers, unique_params
from lowbit.model.load import LoadedModel
from lowbit.model.policy import LINEAR_ROLES, TensorChoice, role_of
from lowbit.model.quantize import plan_for, quantize_rest


def gguf_candidates() -> tuple[str, ...]:
    """Every llama.cpp type the search may put in a GGUF file: each quantized GGUF type of the format
    registry (a new one is a candidate without an edit here), and FP16."""
    return (*gguf_types(), "fp16")

#: the default candidates for a lowbit checkpoint: integer codes from 2 to 8 bits per group or
#: channel, NF4 (plain and double-quantized), FP8 per channel and FP16
LOWBIT_TYPES = ("int2-asym-g32", "int2-asym-g64", "int3-asym-g32", "int3-asym-g64", "int3-asym-g128",
                "int4-asym-g32", "int4-asym-g64", "int4-asym-g128", "nf4", "nf4-dq", "int5-asym-g64",
                "int6-asym-g64", "int8-ch", "fp8-e4m3-ch", "fp16")
TARGETS = ("gguf", "lowbit")


def default_types(target: str) -> tuple[str, ...]:
    if target not in TARGETS:
        raise LowbitError(f"unknown search target {target!r} (use {' or '.join(TARGETS)})")
    return gguf_candidates() if target == "gguf" else LOWBIT_TYPES


def check_types(types: tuple[str, ...], target: str) -> tuple[str, ...]:
    """``types`` as format names, each known and storable in ``target``'s files (a clear error otherwise)."""
    out = []
    for t in types:
        fmt = get_format(t)  # a FormatError for an unknown name
        if target == "gguf" and fmt.name not in gguf_candidates():
            raise LowbitError(f"{t}: not a type the search can write into a GGUF file "
                              f"(use {', '.join(gguf_candidates())})")
        if fmt.name == "f32":
            raise LowbitError("f32 is not a candidate: it stores more than the original")
        out.append(fmt.name)
    if not out:
        raise LowbitError("the search needs at least one candidate format")
    return tuple(dict.fromkeys(out))


def candidate_types(cols: int, allowed: tuple[str, ...] | None = None) -> list[str]:
    """The candidates (default: the llama.cpp types) whose blocks fit rows of ``cols`` values."""
    pool = list(gguf_candidates() if allowed is None else allowed)
    return [t for t in pool if not get_format(t).block_size or cols % get_format(t).block_size == 0]


def reference_type(cols: int, types: list[str] | None = None) -> str:
    """The type each tensor's sensitivity is measured at: a 4-bit one, where most of a budget's
    choices lie (Q4_K where rows fit, else Q4_0; among other candidates the one nearest 4.5 bits)."""
    gg = "q4_k" if cols % get_format("q4_k").block_size == 0 else "q4_0"
    if types is None or gg in types:
        return gg
    if not types:
        raise LowbitError(f"no candidate fits rows of {cols} values")
    return min(types, key=lambda t: (abs(get_format(t).bits_per_weight((256, cols)) - 4.5), t))


@dataclass
class TensorSensitivity:
    name: str  # Hugging Face parameter name
    key: str  # its name in a mix: the GGUF tensor name (GGUF target) or the parameter name (lowbit)
    shape: tuple[int, int]
    bits: dict[str, int]  # stored bits per candidate type
    err: dict[str, float]  # importance-weighted squared error per candidate type
    ref: str
    ref_kld: float
    alpha: float

    def predicted(self, fmt: str) -> float:
        return self.alpha * self.err[fmt]


@dataclass
class Sensitivities:
    tensors: dict[str, TensorSensitivity]
    fixed_bits: int  # bits of the tensors the search does not choose for (1-D tensors in F32)
    n_params: int  # every weight of the model (tied tensors once)
    chunks: int
    tokens: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    target: str = "gguf"  # what the mixes are for: a GGUF file or a lowbit checkpoint (see the module docs)

    def candidates(self) -> dict[str, list[Candidate]]:
        return {n: [Candidate(f, s.bits[f], s.predicted(f)) for f in s.bits] for n, s in self.tensors.items()}

    def _check(self, mix: dict[str, str]) -> dict[str, TensorSensitivity]:
        by_key = {s.key: s for s in self.tensors.values()}
        for g, t in mix.items():
            if g in by_key and t not in by_key[g].bits:
                raise LowbitError(f"{g}: type {t} was not measured (measured: {', '.join(by_key[g].bits)})")
        return by_key

    def predict(self, mix: dict[str, str]) -> float:
        """Predicted KLD of a mix (tensor key -> type)."""
        by_key = self._check(mix)
        return sum(by_key[g].predicted(t) for g, t in mix.items() if g in by_key)

    def bits_of(self, mix: dict[str, str]) -> int:
        by_key = self._check(mix)
        return self.fixed_bits + sum(by_key[g].bits[t] for g, t in mix.items() if g in by_key)

    def budget_for_bpw(self, bpw: float) -> int:
        return int(bpw * self.n_params)

    def restricted(self, allowed: tuple[str, ...] | set[str]) -> Sensitivities:
        """The same measurements with only the ``allowed`` types as candidates (each tensor keeps its
        sensitivity ``alpha``, measured at its reference type whether or not that type stays allowed)."""
        out = {}
        for n, t in self.tensors.items():
            keep = [f for f in t.bits if f in allowed]
            if not keep:
                raise LowbitError(f"{t.key}: none of the allowed types ({', '.join(sorted(allowed))}) was measured "
                                  f"for it (measured: {', '.join(t.bits)})")
            out[n] = replace(t, bits={f: t.bits[f] for f in keep}, err={f: t.err[f] for f in keep})
        return replace(self, tensors=out)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        for t in d["tensors"].values():  # type: ignore[union-attr]
            t["shape"] = list(t["shape"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Sensitivities:  # type: ignore[type-arg]
        def one(t: dict) -> TensorSensitivity:  # type: ignore[type-arg]
            t = {**t, "shape": tuple(t["shape"])}
            if "gguf" in t:  # version 1 files: GGUF searches only, the key was named for it
                t["key"] = t.pop("gguf")
            return TensorSensitivity(**t)

        return cls(**{**d, "tensors": {n: one(t) for n, t in d["tensors"].items()}})


SENS_VERSION = 2
#: versions :func:`load_sensitivities` still reads
SENS_READS = (1, 2)


def save_sensitivities(sens: Sensitivities, path: str | os.PathLike[str], key: dict[str, object]) -> None:
    """Write ``sens`` as JSON (atomically), with ``key``: what it was measured on (model, text, chunks),
    which :func:`load_sensitivities` checks before reusing it."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"version": SENS_VERSION, "key": key, "sensitivities": sens.to_dict()}) + "\n")


def load_sensitivities(path: str | os.PathLike[str], key: dict[str, object] | None = None) -> Sensitivities | None:
    """Sensitivities saved by :func:`save_sensitivities`; None when an entry of ``key`` differs from the
    saved one (measured on another model or text).  A damaged file is an error naming it."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        if doc.get("version") not in SENS_READS:
            raise LowbitError(f"{path}: sensitivity file version {doc.get('version')}, expected one of {SENS_READS}")
        saved = doc.get("key") or {}
        if key is not None and any(saved.get(k) != v for k, v in json.loads(json.dumps(key)).items()):
            return None
        return Sensitivities.from_dict(doc["sensitivities"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LowbitError(f"{path}: not a readable sensitivity file ({type(exc).__name__}: {exc})") from None


def _ref_logprobs(model: nn.Module, chunks: torch.Tensor, n_ctx: int) -> list[torch.Tensor]:
    fn = torch_logits_fn(model, n_ctx)
    return [torch.log_softmax(fn(c).double(), -1).float() for c in chunks]


def kld_against(model: nn.Module, chunks: torch.Tensor, ref: list[torch.Tensor], n_ctx: int) -> float:
    fn = torch_logits_fn(model, n_ctx)
    tot, n = 0.0, 0
    for c, r in zip(chunks, ref, strict=True):
        lp = torch.log_softmax(fn(c).double(), -1)
        r64 = r.double()
        tot += float((r64.exp() * (r64 - lp)).sum())
        n += r.shape[0]
    return tot / max(1, n)


class _Skip(nn.Module):
    """Stands in for a decoder layer whose output is already known: returns its input unchanged."""

    def __init__(self, layer: nn.Module, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        for attr in ("attention_type", "layer_idx", "is_sliding"):  # what model bodies read off their layers
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))

    def forward(self, *args: object, **kwargs: object) -> object:
        hs = args[0] if args else kwargs["hidden_states"]
        return (hs,) if self.as_tuple else hs


class LayerInputCache:
    """The hidden states entering every decoder layer for each calibration chunk (of the unmodified
    model), so that a change to layer ``L``'s weights is evaluated by running layers ``L`` onwards only."""

    def __init__(self, model: nn.Module, chunks: torch.Tensor, n_ctx: int) -> None:
        self.model, self.n_ctx = model, n_ctx
        self.layers = decoder_layers(model)
        self.inputs: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.as_tuple = False

        def pre(li: int):  # type: ignore[no-untyped-def]
            def fn(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                self.inputs[li].append((args[0] if args else kwargs["hidden_states"]).detach().clone())
            return fn

        def post(_m: nn.Module, _a: tuple, out: object) -> None:
            self.as_tuple = isinstance(out, tuple)

        hooks = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        hooks.append(self.layers[0].register_forward_hook(post))
        try:
            fn = torch_logits_fn(model, n_ctx)
            self.ref = [torch.log_softmax(fn(c).double(), -1).float() for c in chunks]
        finally:
            for h in hooks:
                h.remove()

    def kld_from(self, start: int, chunks: torch.Tensor) -> float:
        """Mean KLD against the reference when layers before ``start`` are unchanged."""
        if start <= 0:
            return kld_against(self.model, chunks, self.ref, self.n_ctx)
        saved = [self.layers[i] for i in range(start)]
        current: list[torch.Tensor] = []

        def swap(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (current[0],) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": current[0]}

        h = self.layers[start].register_forward_pre_hook(swap, with_kwargs=True)
        try:
            for i in range(start):
                self.layers[i] = _Skip(saved[i], self.as_tuple)
            fn = torch_logits_fn(self.model, self.n_ctx)
            tot, n = 0.0, 0
            for ci, (c, r) in enumerate(zip(chunks, self.ref, strict=True)):
                current[:] = [self.inputs[start][ci]]
                lp = torch.log_softmax(fn(c).double(), -1)
                r64 = r.double()
                tot += float((r64.exp() * (r64 - lp)).sum())
                n += r.shape[0]
            return tot / max(1, n)
        finally:
            h.remove()
            for i in range(start):
                self.layers[i] = saved[i]


def _layer_index(name: str) -> int:
    """Decoder layer index of a parameter name (``model.layers.7.mlp.up_proj.weight`` -> 7), -1 if none."""
    import re

    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def searched_shapes(params: list[tuple[str, tuple[int, ...]]], tied: bool, target: str = "gguf"
                    ) -> tuple[list[tuple[str, str, tuple[int, ...]]], int, int]:
    """The tensors a search chooses formats for, from the model's (name, shape) list (Hugging Face or
    GGUF names, each tensor once): (name, mix key, shape) of each; the bits of the others at their
    storage precision; and the number of weights.  ``tied``: the output head is the embedding."""
    default_types(target)
    todo, fixed, n_params = [], 0, 0
    for n, shape in params:
        numel = int(torch.Size(shape).numel())
        n_params += numel
        if target == "lowbit":
            if len(shape) == 2 and role_of(n) in LINEAR_ROLES and (".layers." in n or n.startswith("blk.")):
                todo.append((n, n, tuple(shape)))
            elif not (n == "lm_head.weight" and tied):
                fixed += 16 * numel  # embedding, head and norms stay FP16
            continue
        g = n if n.startswith("blk.") or n in ("token_embd.weight", "output.weight", "output_norm.weight") else gguf_name(n)
        if g is None:
            if n == "lm_head.weight" and tied:
                continue
            if len(shape) == 1:  # a norm llama's names do not cover (Gemma's pre/post norms, q/k norms): F32
                fixed += 32 * numel
                continue
            raise LowbitError(f"tensor {n} has no GGUF name; the search writes GGUF files")
        if allows_quantization(g, len(shape)):
            todo.append((n, g, tuple(shape)))
        else:
            fixed += 32 * numel
    return todo, fixed, n_params


def searched_tensors(model: nn.Module, target: str = "gguf") -> tuple[list[tuple[str, str, nn.Parameter]], int, int]:
    """The tensors a search chooses formats for, as (parameter name, mix key, parameter); the bits of
    the others at their storage precision; and the number of weights (tied tensors once)."""
    params = dict(unique_params(model))
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    todo, fixed, n_params = searched_shapes([(n, tuple(p.shape)) for n, p in params.items()], tied, target)
    return [(n, k, params[n]) for n, k, _ in todo], fixed, n_params


def size_bounds(params: list[tuple[str, tuple[int, ...]]], tied: bool, target: str,
                allowed: tuple[str, ...]) -> tuple[int, int]:
    """The fewest and most bits a search over ``allowed`` can give the model of ``params``
    (name, shape): every searched tensor in its smallest, or its largest, candidate that fits."""
    todo, fixed, _ = searched_shapes(params, tied, target)
    lo = hi = fixed
    for _n, key, shape in todo:
        rows, cols = int(shape[0]), int(torch.Size(shape[1:]).numel())
        types = candidate_types(cols, allowed)
        if not types:
            raise LowbitError(f"{key}: no allowed type fits rows of {cols} values")
        bits = [get_format(t).storage_bits((rows, cols)) for t in types]
        lo += min(bits)
        hi += max(bits)
    return lo, hi


def measure(loaded: LoadedModel, chunks: torch.Tensor, imatrix: dict[str, np.ndarray] | None = None,
            allowed: tuple[str, ...] | None = None, progress: bool = True, target: str = "gguf",
            previous: Sensitivities | None = None) -> Sensitivities:
    """Sensitivities of every tensor the search chooses for (see :func:`searched_tensors`), from the
    calibration token ``chunks`` (``[n, n_ctx]``) and the importance matrix ``imatrix`` (GGUF names;
    columns weighted equally where a tensor has none, e.g. the token embedding).  ``allowed`` are the
    candidate formats (default: :func:`default_types` of ``target``).

    ``previous`` (the same model and calibration, e.g. read back with :func:`load_sensitivities`) is
    reused: a tensor measured there keeps its sensitivity, and only the candidates it lacks are
    quantized, without running the model again.  A tensor's sensitivity and each format's error on it
    do not depend on the file they go to, so a GGUF search's measurements serve a lowbit search too."""
    model = loaded.model
    if len(chunks) == 0:
        raise LowbitError("sensitivity measurement needs calibration text")
    types_pool = check_types(tuple(allowed) if allowed is not None else default_types(target), target)
    n_ctx = int(chunks.shape[1])
    t0 = time.perf_counter()
    imatrix = imatrix or {}
    try:
        todo, fixed, n_params = searched_tensors(model, target)
    except LowbitError as exc:
        raise LowbitError(f"{loaded.path}: {exc}") from None
    old = previous.tensors if previous is not None else {}
    cache: LayerInputCache | None = None
    out: dict[str, TensorSensitivity] = {}
    notes = []
    bar = tqdm(todo, desc="sensitivity", unit="tensor", disable=not progress, leave=False)
    for n, key, p in bar:
        w = p.detach().to(torch.float32).reshape(p.shape[0], -1)
        cols = w.shape[1]
        g = gguf_name(n)
        im = imatrix.get(g) if g is not None else None
        types = candidate_types(cols, types_pool)
        if im is None:  # llama.cpp makes its 1-3-bit i-quants only with an importance matrix
            types = [t for t in types if not get_format(t).llama_needs_imatrix]
        if not types:
            raise LowbitError(f"{key}: no allowed type fits rows of {cols} values")
        prev = old.get(n)
        if prev is not None and tuple(prev.shape) != tuple(w.shape):
            raise LowbitError(f"{key}: the earlier sensitivities are for shape {prev.shape}, the model has {tuple(w.shape)}")
        imp = torch.ones(cols) if im is None else torch.as_tensor(np.asarray(im, np.float32))
        imp = imp.to(w.device)
        if imp.numel() != cols:
            raise LowbitError(f"importance matrix entry {g} has {imp.numel()} values, the tensor has {cols} columns")
        rt = prev.ref if prev is not None else reference_type(cols, types)
        bits = dict(prev.bits) if prev is not None else {}
        err = dict(prev.err) if prev is not None else {}
        ref_w = None
        for t in [t for t in types if t not in err]:
            fmt = get_format(t)
            qt = fmt.quantize(w, name=key, imatrix=None if im is None else imp)
            dq = fmt.dequantize(qt)
            bits[t] = fmt.storage_bits(tuple(w.shape))
            err[t] = float((((dq - w) ** 2).sum(0, dtype=torch.float64) * imp.double()).sum())
            if t == rt:
                ref_w = dq
        if prev is not None:
            kld, alpha = prev.ref_kld, prev.alpha
        else:
            err_ref = err[rt]
            if cache is None:
                cache = LayerInputCache(model, chunks, n_ctx)
            saved = p.detach().clone()
            try:
                with torch.no_grad():
                    p.copy_(ref_w.reshape(p.shape).to(p.dtype))  # type: ignore[union-attr]
                kld = cache.kld_from(_layer_index(n), chunks)
            finally:
                with torch.no_grad():
                    p.copy_(saved)
            alpha = kld / err_ref if err_ref > 0 else 0.0
        bits, err = {t: bits[t] for t in types}, {t: err[t] for t in types}
        out[n] = TensorSensitivity(n, key, (w.shape[0], w.shape[1]), bits, err, rt, kld, alpha)
    if any(s.alpha <= 0 for s in out.values()):
        notes.append("some tensors showed no measurable KL divergence at their reference type")
    tokens = len(chunks) * len(cache.ref[0]) if cache is not None else (previous.tokens if previous is not None else 0)
    seconds = time.perf_counter() - t0 + (previous.seconds if previous is not None else 0.0)  # the whole effort
    return Sensitivities(out, fixed, n_params, len(chunks), tokens, seconds, notes, target)


def model_files(src: Path) -> list[Path]:
    """The files that hold a model's weights and settings (what its sensitivities depend on)."""
    src = Path(src)
    if src.is_file():
        return [src]
    names = ("*.safetensors", "*.bin", "*.gguf", "config.json", "lowbit.json")
    return sorted({f for pat in names for f in src.glob(pat) if f.is_file()})


def cached_measure(loaded: LoadedModel, src: Path, chunks: torch.Tensor, imatrix: dict[str, np.ndarray] | None,
                   target: str, allowed: tuple[str, ...], progress: bool = True,
                   key_extra: dict[str, object] | None = None) -> tuple[Sensitivities, Path | None]:
    """:func:`measure`, remembered: sensitivities are kept in lowbit's cache under a key of the model's
    files (their SHA-256), the calibration chunks, the importance matrix, the target and lowbit's
    version, and a later run with the same key reuses them (measuring only candidate types it lacks,
    without running the model).  Returns the sensitivities restricted to ``allowed``, and the cache
    file when they were reused whole."""
    import hashlib

    key = {"model_sha256": files_digest(model_files(src)),
           "chunks_sha256": hashlib.sha256(chunks.numpy().tobytes()).hexdigest(), "chunks_shape": list(chunks.shape),
           "imatrix": array_digest(imatrix), "target": target, "lowbit": __version__, **(key_extra or {})}
    name = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = cache_dir() / "sensitivities" / f"{name}.json"
    prev = load_sensitivities(path, key) if path.is_file() else None
    pool = tuple(dict.fromkeys([*allowed, *sorted({t for s in (prev.tensors.values() if prev else []) for t in s.bits})]))
    sens = measure(loaded, chunks, imatrix, allowed=pool, progress=progress, target=target, previous=prev)
    reused = prev is not None and set(sens.tensors) <= set(prev.tensors) and all(
        set(sens.tensors[n].bits) <= set(prev.tensors[n].bits) for n in sens.tensors)
    if not reused:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_sensitivities(sens, path, key)
    return sens.restricted(allowed), (path if reused else None)


def search(sens: Sensitivities, budget_bits: int) -> tuple[dict[str, str], Solution]:
    """The mix (tensor key -> format) with the least predicted loss whose tensors take at most
    ``budget_bits`` bits in all."""
    free = budget_bits - sens.fixed_bits
    sol = solve(sens.candidates(), free)
    sol.bits += sens.fixed_bits
    sol.budget = budget_bits
    mix = {sens.tensors[n].key: c.format for n, c in sol.choice.items()}
    return mix, sol


def apply_mix(loaded: LoadedModel, mix: dict[str, str], imatrix: dict[str, np.ndarray] | None = None,
              progress: bool = False, target: str = "gguf"):  # type: ignore[no-untyped-def]
    """Quantize ``loaded.model`` in place with the formats of ``mix`` (keys as :func:`searched_tensors`
    gives them); the tensors outside it stay at their storage precision (GGUF: F32; lowbit: FP16)."""
    default_types(target)  # a clear error for an unknown target
    keep = TensorChoice("f32" if target == "gguf" else "fp16", False)
    choices = {}
    for n, _p in unique_params(loaded.model):
        k = gguf_name(n) if target == "gguf" else n
        t = mix.get(k) if k is not None else None
        choices[n] = TensorChoice(t, True) if t is not None else keep
    return quantize_rest(loaded.model, "mix", choices, skip=set(), progress=progress, imatrix=imatrix)


def mix_of_file_type(loaded: LoadedModel, ft_name: str, imatrix: bool) -> dict[str, str]:
    """llama.cpp's own per-tensor types of file type ``ft_name`` for this model (GGUF names)."""
    return {gguf_name(n): c.format for n, c in plan_for(loaded.model, ft_name, has_imatrix=imatrix).items()  # type: ignore[misc]
            if c.quantized and gguf_name(n) is not None}


def validate(loaded: LoadedModel, sens: Sensitivities, mixes: dict[str, dict[str, str]], chunks: torch.Tensor,
             imatrix: dict[str, np.ndarray] | None = None,
             on_result: Callable[[str, float, float, int], None] | None = None) -> dict[str, tuple[float, float, int]]:
    """Measured against predicted KLD of each named mix on ``chunks``: {name: (predicted, measured, bits)}."""
    import copy
    import dataclasses

    n_ctx = int(chunks.shape[1])
    ref = _ref_logprobs(loaded.model, chunks, n_ctx)
    out = {}
    for name, mix in mixes.items():
        work = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
        apply_mix(work, mix, imatrix, target=sens.target)
        measured = kld_against(work.model, chunks, ref, n_ctx)
        out[name] = (sens.predict(mix), measured, sens.bits_of(mix))
        if on_result is not None:
            on_result(name, *out[name])
        del work
    return out
