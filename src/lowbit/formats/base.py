"""The format interface and the registry of formats by name.

A format turns a 2-D float tensor ``[rows, cols]`` (rows = output features, cols = input
features, the layout of ``nn.Linear.weight``) into a :class:`QTensor` holding codes and
scales, and turns a QTensor back into floats.  Blocks and groups always run along a row
(the input dimension), as llama.cpp, GPTQ and bitsandbytes all do.

Each format file registers itself with :func:`register` (an exact name) or
:func:`register_family` (a parser for a family of names such as ``int4-g128``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.errors import FormatError, did_you_mean


@dataclass
class QTensor:
    """A quantized tensor: the format's name, the original shape, and its stored parts."""

    format: str
    shape: tuple[int, int]
    parts: dict[str, torch.Tensor]
    meta: dict[str, object] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def to(self, device: torch.device | str) -> QTensor:
        return QTensor(self.format, self.shape, {k: v.to(device) for k, v in self.parts.items()}, dict(self.meta))


@dataclass
class Grid:
    """The values each weight of a quantized tensor may take, given its stored scales: integer codes
    ``q`` in ``[qmin, qmax]`` decode to ``scale * (q - zero) + offset``, or, for a format with a
    code book, to ``scale * levels[q] + offset``.  Every field is per weight (``[rows, cols]``; a
    slice of columns of a full grid is a grid of those columns).

    Calibration methods (GPTQ, SpQR, ...) keep a format's scales and choose the codes themselves:
    :meth:`nearest` rounds arbitrary values to the grid, and the format's ``with_codes`` stores the
    chosen codes in place of its own.  The decoded values are computed exactly as the format's
    ``dequantize`` computes them."""

    scale: torch.Tensor
    zero: torch.Tensor | None
    offset: torch.Tensor | None
    qmin: int
    qmax: int
    levels: torch.Tensor | None = None  # code book (float32), or None for integer codes

    def __getitem__(self, cols: slice | int) -> Grid:
        sl = cols if isinstance(cols, slice) else slice(cols, cols + 1)

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, sl]

        return Grid(self.scale[:, sl], cut(self.zero), cut(self.offset), self.qmin, self.qmax, self.levels)

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (int64, shape of ``x``) of the grid values nearest to ``x``."""
        y = x if self.offset is None else x - self.offset
        safe = torch.where(self.scale == 0, torch.ones_like(self.scale), self.scale)
        y = y / safe
        if self.levels is not None:
            levels = self.levels.to(y.device)
            order = torch.argsort(levels)
            srt = levels[order]
            q = order[torch.bucketize(y.contiguous(), (srt[1:] + srt[:-1]) / 2)]
        else:
            if self.zero is not None:
                y = y + self.zero
            q = torch.round(y).clamp_(self.qmin, self.qmax).to(torch.int64)
        return torch.where(self.scale == 0, torch.full_like(q, max(self.qmin, 0)), q)

    def values(self, q: torch.Tensor) -> torch.Tensor:
        """The float32 values of codes ``q``."""
        if self.levels is not None:
            v = self.scale * self.levels.to(q.device)[q]
        else:
            qf = q.to(torch.float32)
            v = self.scale * (qf if self.zero is None else qf - self.zero)
        return v if self.offset is None else v + self.offset

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return self.values(self.nearest(x))


@dataclass
class VectorGrid:
    """The values a vector-quantized tensor may take given its stored scales: each run of ``dim``
    consecutive weights of a row is one code per stage, decoding to the sum over stages of
    ``scale[row, stage] * table[code]`` (one stage, or residual stages, each quantizing what the
    earlier ones left).  Calibration methods choose the codes ``dim`` columns at a time (GPTQ
    becomes block LDLQ)."""

    scale: torch.Tensor  # [rows, stages]
    dim: int
    table: torch.Tensor  # [codes, dim] float32
    search: Callable[[torch.Tensor], torch.Tensor]  # [n, dim] in table units -> nearest codes [n]

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Codes ``[rows, cols // dim, stages]`` for ``x`` ``[rows, cols]``, stage by stage (greedy)."""
        rows, cols = x.shape
        table = self.table.to(x.device)
        out = []
        rest = x
        for st in range(self.scale.shape[1]):
            s = self.scale[:, st : st + 1]
            safe = torch.where(s == 0, torch.ones_like(s), s)
            c = self.search((rest / safe).reshape(-1, self.dim)).reshape(rows, cols // self.dim)
            out.append(c)
            if st + 1 < self.scale.shape[1]:
                rest = rest - table[c].reshape(rows, cols) * s
        return torch.stack(out, dim=2)

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        rows = codes.shape[0]
        table = self.table.to(codes.device)
        return sum(table[codes[..., st]].reshape(rows, -1) * self.scale[:, st : st + 1]
                   for st in range(codes.shape[2]))  # type: ignore[return-value]

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return self.values(self.nearest(x))


class Format:
    """Base class. Subclasses set ``name`` and implement the three methods below."""

    name: str = ""
    #: Number of consecutive input columns that share scales (0 = no constraint).
    block_size: int = 0
    #: The GGUF tensor type this format writes as, or None if GGUF cannot hold it.
    gguf_type: int | None = None
    description: str = ""
    #: the type llama.cpp writes instead where a tensor's rows do not fit this type's blocks
    #: (llama-quant.cpp's fallback: Q4_K -> Q5_0), or None (then FP16)
    gguf_fallback: str | None = None
    #: True if an importance matrix given to :meth:`quantize` changes the result (every format
    #: accepts one; the others ignore it)
    uses_imatrix: bool = False
    #: True where quantizing needs an importance matrix (llama.cpp's IQ1/IQ2 types assert one)
    requires_imatrix: bool = False
    #: True where llama-quantize refuses to write this type without one (llama-quant.cpp's
    #: tensor_requires_imatrix: IQ1_S/M, IQ2_XXS/XS/S, IQ3_XXS), even where ggml could
    llama_needs_imatrix: bool = False

    def quantize(self, w: torch.Tensor, name: str = "tensor", imatrix: torch.Tensor | None = None) -> QTensor:
        """Quantize ``w`` ([rows, cols]); ``name`` names the tensor in errors; ``imatrix`` is one
        importance weight per input column (``[cols]``), used where :attr:`uses_imatrix` is True and
        ignored elsewhere."""
        raise NotImplementedError

    def dequantize(self, q: QTensor) -> torch.Tensor:
        """The float32 values ``[rows, cols]`` of ``q``.  A format with a grid decodes on one path,
        its grid's values of its stored codes (``grid(q).values(codes(q))``, or the vector grid's),
        so what calibration methods see is what is decoded; the others override this."""
        if self.vector_dim:
            return self.vector_grid(q).values(self.codes(q, torch.int32))
        if self.has_grid:
            return self.grid(q).values(self.codes(q, torch.int32))
        raise NotImplementedError(f"format {self.name} has neither a grid nor a dequantize of its own")

    def storage_bits(self, shape: tuple[int, int]) -> int:
        """Exact number of bits stored for a tensor of ``shape``, scales and zero points included."""
        raise NotImplementedError

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        return self.storage_bits(shape) / (shape[0] * shape[1])

    # ---- shared checks -------------------------------------------------------------
    def check(self, w: torch.Tensor, name: str = "tensor") -> torch.Tensor:
        """Validate ``w`` and return it as contiguous float32; raise FormatError naming ``name``."""
        if w.dim() != 2:
            raise FormatError(f"{name}: format {self.name} needs a 2-D tensor, got shape {tuple(w.shape)}")
        if self.block_size and w.shape[1] % self.block_size:
            raise FormatError(
                f"{name}: {w.shape[1]} columns are not divisible by the block size {self.block_size} of {self.name}"
            )
        w = w.detach().to(torch.float32).contiguous()
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise FormatError(f"{name}: {bad} NaN or Inf values in the weights; refusing to quantize")
        return w

    def roundtrip(self, w: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(w))

    def tensor_bits(self, qt: QTensor) -> int:
        """Bits stored for ``qt`` (formats whose size depends on the data, such as SpQR's
        outliers, override this; for the others it is :meth:`storage_bits` of the shape)."""
        return self.storage_bits(qt.shape)

    # ---- fixed scales, chosen codes (used by GPTQ and other calibration methods) ----------
    #: True where :meth:`grid` and :meth:`with_codes` are implemented
    has_grid: bool = False
    #: vector formats (one code per run of this many weights of a row, per stage) implement
    #: :meth:`vector_grid` and take ``[rows, cols // vector_dim, stages]`` codes in :meth:`with_codes`
    vector_dim: int = 0

    def vector_grid(self, qt: QTensor) -> VectorGrid:
        raise FormatError(f"format {self.name} is not a vector format")

    @property
    def calibratable(self) -> bool:
        """True where GPTQ (and methods built on it) can choose this format's codes."""
        return self.has_grid or self.vector_dim > 0

    #: columns that share scales: codes chosen for a slice of this many columns (a multiple of it)
    #: may be re-scaled from that slice alone (0: the whole row shares them)
    @property
    def scale_group(self) -> int:
        return self.block_size

    def grid(self, qt: QTensor) -> Grid:
        """Per-weight grid of the values ``qt``'s stored scales allow."""
        raise FormatError(f"format {self.name} does not expose its grid, so calibration methods cannot choose its codes")

    def codes(self, qt: QTensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """The stored codes (``[rows, cols]`` in the grid's range, or ``[rows, cols // dim, stages]``
        for a vector format; integers of ``dtype``, which :meth:`dequantize` narrows to int32): the
        inverse of :meth:`with_codes`."""
        raise FormatError(f"format {self.name} does not expose its grid, so calibration methods cannot choose its codes")

    def with_codes(self, qt: QTensor, codes: torch.Tensor) -> QTensor:
        """``qt`` with its codes replaced by ``codes`` (int, ``[rows, cols]``, in the grid's range);
        the scales stay as they are."""
        raise FormatError(f"format {self.name} does not expose its grid, so calibration methods cannot choose its codes")

    @property
    def joinable(self) -> bool:
        """True where :meth:`join_columns` works (every GGUF block type, integer and NF4/FP4 formats)."""
        return self.has_grid and self.gguf_type is not None

    def join_columns(self, qts: list[QTensor]) -> QTensor:
        """One tensor from tensors that hold consecutive column slices (whole groups) of the same rows."""
        if not qts or not all(set(q.parts) == {"blocks"} for q in qts):
            raise FormatError(f"format {self.name} cannot join column slices")
        rows = qts[0].shape[0]
        blocks = torch.cat([q.parts["blocks"].reshape(rows, -1) for q in qts], dim=1)
        return QTensor(self.name, (rows, sum(q.shape[1] for q in qts)), {"blocks": blocks})

    def __repr__(self) -> str:
        return f"<format {self.name}>"


_EXACT: dict[str, Format] = {}
_FAMILIES: list[tuple[str, Callable[[str], Format | None]]] = []


_VERSION = [0]


def registry_version() -> int:
    """A number that changes whenever a format or a family registers (for tables derived from the
    registry, such as the GGUF file types, to rebuild themselves)."""
    return _VERSION[0]


def register(fmt: Format) -> Format:
    key = fmt.name.lower()
    if key in _EXACT:
        raise ValueError(f"format {fmt.name} registered twice")
    _EXACT[key] = fmt
    _VERSION[0] += 1
    return fmt


_FAMILY_INFO: dict[str, tuple[str, tuple[str, ...]]] = {}


def register_family(example: str, parser: Callable[[str], Format | None], description: str = "",
                    instances: tuple[str, ...] = ()) -> None:
    """Register a parser for a family of names; ``example`` (the grammar), ``description`` and a few
    ``instances`` are shown in listings."""
    _FAMILIES.append((example, parser))
    _FAMILY_INFO[example] = (description, instances)
    _VERSION[0] += 1


def family_info() -> dict[str, tuple[str, tuple[str, ...]]]:
    """grammar -> (description, example members) of every registered family of formats."""
    return dict(_FAMILY_INFO)


def get_format(name: str) -> Format:
    key = name.strip().lower()
    if key in _EXACT:
        return _EXACT[key]
    for _, parser in _FAMILIES:
        fmt = parser(key)
        if fmt is not None:
            return fmt
    examples = ("int8", "int8-ch", "int4-g128", "int4-asym-g128", "int4-g64", "int3-asym-g64", "spqr3-g16")
    hint = did_you_mean(name, [*_EXACT, *examples])
    raise FormatError(f"unknown format '{name}'{hint} (`lowbit formats` lists them all)")


def list_formats() -> list[str]:
    """Names of the fixed formats plus an example of each family."""
    return sorted(_EXACT) + [ex for ex, _ in _FAMILIES]


def exact_formats() -> list[Format]:
    """Every format registered under a fixed name (not the families), in name order."""
    return [_EXACT[k] for k in sorted(_EXACT)]


class GGMLType(NamedTuple):
    """A GGML tensor type: its id in GGUF files, weights per block and bytes per block."""

    type_id: int
    block: int
    type_size: int


def ggml_type(name: str) -> GGMLType:
    """The GGML tensor type ``name`` (``"q4_k"``, ``"F16"``: any case), from gguf-py's tables
    (``GGMLQuantizationType`` and ``GGML_QUANT_SIZES``, the ids of ggml.h and the block sizes of
    ggml-common.h), so that no id or block size is typed by hand."""
    try:
        t = GGMLQuantizationType[name.upper()]
    except KeyError:
        raise FormatError(f"gguf-py knows no GGML type {name.upper()}") from None
    block, type_size = GGML_QUANT_SIZES[t]
    return GGMLType(int(t), block, type_size)


def ggml_quant_class(name: str) -> Any:
    """gguf-py's class for the GGML type ``name`` (its block decoder and, for the i-quants, grids)."""
    from gguf import quants

    cls = getattr(quants, name.upper(), None)
    if cls is None:
        raise FormatError(f"gguf-py has no decoder for GGML type {name.upper()}")
    return cls


class GGMLBlocks(Format):
    """A format stored as one tensor of ggml blocks (part ``blocks``): its GGML id, block size and
    bytes per block read from gguf-py (:func:`ggml_type`), and the bits those blocks take."""

    type_size: int = 0

    def use_ggml_type(self, name: str) -> None:
        """Take the id, block size and block bytes of the GGML type ``name``."""
        t = ggml_type(name)
        self.gguf_type, self.block_size, self.type_size = t.type_id, t.block, t.type_size

    def blocks(self, qt: QTensor) -> torch.Tensor:
        """``qt``'s blocks, one per row: ``[n_blocks, type_size]`` uint8."""
        return qt.parts["blocks"].reshape(-1, self.type_size)

    def storage_bits(self, shape: tuple[int, int]) -> int:
        return shape[0] * (shape[1] // self.block_size) * self.type_size * 8


def constant_like(t: torch.Tensor, value: float) -> torch.Tensor:
    """``value`` in every position of ``t``'s shape, as a read-only expanded view (no memory per
    weight): a grid's constant zero point."""
    return torch.full((1,) * t.dim(), value, dtype=t.dtype, device=t.device).expand_as(t)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_imatrix(imatrix: torch.Tensor, cols: int, name: str) -> torch.Tensor:
    """An importance vector must have one finite, non-negative weight per input column."""
    im = torch.as_tensor(imatrix).detach().to(torch.float32).reshape(-1)
    if im.numel() != cols:
        raise FormatError(f"{name}: importance matrix has {im.numel()} entries, the tensor has {cols} columns")
    if not torch.isfinite(im).all() or bool((im < 0).any()):
        raise FormatError(f"{name}: importance matrix has NaN, Inf or negative entries")
    return im.contiguous()


def fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """Values (``N`` of them, any shape) -> ``[N, 2]`` uint8: each one rounded to FP16, its two bytes
    in memory order (little-endian, as GGUF stores ``ggml_fp16_t``)."""
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """``[N, 2]`` uint8 FP16 bytes -> ``[N]`` float32: the inverse of :func:`fp16_bytes`."""
    return b.contiguous().view(torch.float16).reshape(-1).to(torch.float32)


def pack_nibbles_lohi(q: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes < 16 in pairs along the last dim: element 2i low nibble, 2i+1 high."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles_lohi(p: torch.Tensor) -> torch.Tensor:
    lo = p & 0x0F
    hi = p >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes of ``bits`` bits each (last dim) into a little-endian bit stream of bytes."""
    n = codes.shape[-1]
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.to(torch.uint8).unsqueeze(-1) >> shifts) & 1).flatten(-2)
    pad = (-stream.shape[-1]) % 8
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    weights = (1 << torch.arange(8, dtype=torch.int32, device=codes.device)).to(torch.uint8)
    out = (stream.reshape(*stream.shape[:-1], -1, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)
    assert out.shape[-1] == ceil_div(n * bits, 8)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` codes of ``bits`` bits each along the last dim, as uint8."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., : n * bits]
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device)).to(torch.uint8)
    return (stream.reshape(*stream.shape[:-1], n, bits) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


# ---- chunked, multi-threaded block quantization -----------------------------------------
#: rows are quantized in slices of about this many weights: large enough that each torch call does
#: real work (the searches make thousands of calls per slice), small enough to bound their memory
CHUNK_WEIGHTS = 1 << 20


def _threads() -> int:
    import os

    # Measured on 2 cores: slices in parallel threads are slower than one slice at a time with
    # torch's own threads inside each call, so parallel slices are opt-in.
    return max(1, int(os.environ.get("LOWBIT_THREADS", "1")))


def map_row_chunks(fn: Callable[[int, int], torch.Tensor], rows: int, cols: int, device: torch.device,
                   chunk_weights: int = CHUNK_WEIGHTS) -> torch.Tensor:
    """``torch.cat([fn(r0, r1) for each slice of rows])``, the slices computed in parallel.

    With ``LOWBIT_THREADS`` > 1 the CPU slices run on a pool of threads (torch releases the GIL
    inside its kernels); on a GPU slices of 16x as many weights run one at a time.  Every slice is independent, so the result does not depend on the threading."""
    if device.type != "cpu":
        chunk_weights *= 16
    step = max(1, chunk_weights // max(1, cols))
    bounds = [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
    n = _threads() if device.type == "cpu" else 1
    if n <= 1 or len(bounds) == 1:
        return torch.cat([fn(a, b) for a, b in bounds], dim=0)
    from concurrent.futures import ThreadPoolExecutor

    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per slice; the slices themselves run in parallel
    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            parts = list(pool.map(lambda ab: fn(*ab), bounds))
    finally:
        torch.set_num_threads(prev)
    return torch.cat(parts, dim=0)
