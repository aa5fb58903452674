"""Conformance: every format in the registry keeps the contract of :class:`lowbit.formats.Format`.

The formats are read from the registry itself (``list_formats()``, each family expanded into the
members it names in ``family_info()``), so a newly registered format is checked here without anyone
editing a list.  Each one, on random float32 weights of a shape that fits it, must:

* round-trip: ``dequantize(quantize(w))`` has ``w``'s shape, is float32 and finite, decodes rows of
  zeros to zeros, and its relative RMS error stays under a bound that tightens with the bits per
  weight (checked to reject broken formats below);
* store exactly the bits it counts: ``QTensor.nbytes() * 8 == tensor_bits == storage_bits(shape)``
  (SpQR's outliers are the one data-dependent case: see its own test);
* refuse, with a FormatError, columns that break its blocks, and take any column count if it has none;
* where it exposes a grid (``calibratable``): ``codes`` reads back exactly the codes that
  ``with_codes`` stored, the grid's values of the stored codes are what ``dequantize`` computes (the
  one decoding path: gguf-py's decoding below is the independent reference), and ``with_codes``
  leaves the scales alone;
* where it is ``joinable``: tensors of column slices join into the tensor of the whole;
* where it has a GGUF type: its bytes are one tensor of ggml blocks that gguf-py (or, for a type
  gguf-py cannot decode, libggml's ``to_float``) decodes to the same floats.

Overlaps (kept small on purpose): tests/formats/test_formats.py and test_kquants.py check
``nbytes == storage_bits`` and the error of a hand-picked list of formats on real weights, and
gguf-py's dequantization of the legacy, K and IQ4 types; test_grid.py checks the grid identity,
``with_codes`` and ``join_columns`` for hand-picked lists.  Here the same contracts run over the
whole registry, plus what those lists leave out (odd row counts, ragged columns, vector grids,
F32/F16/BF16 in gguf-py, column slices of joined grids).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from lowbit.errors import FormatError
from lowbit.formats import Format, QTensor, family_info, get_format, list_formats
from lowbit.formats.base import Grid
from lowbit.formats.spqr import SpQRFormat

ROWS = 21  # odd, and more than one (and a part) of SpQR's 16-row statistics blocks


def _registry() -> dict[str, Format]:
    """Every registered format, by its canonical name: the exact ones, and the members each family names."""
    families = family_info()
    out: dict[str, Format] = {}
    for name in list_formats():
        for member in (families[name][1] if "<" in name else (name,)):
            fmt = get_format(member)
            out.setdefault(fmt.name, fmt)
    return out


FORMATS = _registry()
NAMES = sorted(FORMATS)


def _cols(fmt: Format) -> int:
    """Columns that fit the format: a multiple of 256 and of its block, scale group and vector length."""
    cols = 256
    for n in (fmt.block_size, fmt.scale_group, fmt.vector_dim):
        if n > 0:
            cols = math.lcm(cols, n)
    return cols


def _weights(fmt: Format, shape: tuple[int, int], salt: int = 0) -> torch.Tensor:
    """Gaussian weights, rows of different scales (x1/4 to x4) and one row of zeros, seeded per format."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{fmt.name}/{salt}".encode()))
    w = torch.randn(shape, generator=g) * 0.02
    w *= torch.exp2(torch.rand(shape[0], 1, generator=g) * 4 - 2)
    w[3] = 0.0
    return w


def quantize(fmt: Format, w: torch.Tensor) -> QTensor:
    """``fmt.quantize(w)``, with a flat importance matrix for the formats that need one (flat, so that
    column slices see what the whole sees; the libggml byte tests use real-looking ones)."""
    if not fmt.requires_imatrix:
        return fmt.quantize(w)
    return fmt.quantize(w, imatrix=torch.ones(w.shape[1]))


_CACHE: dict[str, tuple[torch.Tensor, QTensor]] = {}


def _quantized(name: str) -> tuple[torch.Tensor, QTensor]:
    """(weights, their QTensor) at the format's fitting shape, quantized once for all the tests."""
    if name not in _CACHE:
        fmt = FORMATS[name]
        w = _weights(fmt, (ROWS, _cols(fmt)))
        _CACHE[name] = (w, quantize(fmt, w))
    return _CACHE[name]


def error_bound(bpw: float) -> float:
    """Largest relative RMS error allowed at ``bpw`` bits per weight.

    Rounding to a uniform grid loses half its error per added bit (6 dB/bit); floating-point formats
    spend some of their bits on the exponent (FP8 E5M2: 5 of 8) and gain less per bit.  The bound asks
    for half that rate, 2^(-bpw/2), times 1.5: loose (every format measures at under 0.7 of it on
    Gaussian weights, the worst being 2-bit integers and FP8 E5M2) but it tightens with the bits, so a
    16-bit format that rounds like a 2-bit one fails, and it is below 0.9, so a format that decodes to
    zeros (error 1) fails at any bit count."""
    return min(0.9, 1.5 * 2.0 ** (-bpw / 2))


def value_bits(fmt: Format, shape: tuple[int, int]) -> float:
    """Bits per weight that carry values: the stored bits, less what codes of a grid with fewer values
    than their bits allow leave unused (ternary codes in 2 bits: log2(3) of them), so that TQ1_0 and
    TQ2_0, made for weights that are ternary already, are held to what three values can do."""
    bpw = fmt.bits_per_weight(shape)
    if not fmt.calibratable or fmt.vector_dim:
        return bpw
    qt = quantize(fmt, torch.zeros(shape))
    g = fmt.grid(qt)
    n = len(g.levels) if g.levels is not None else g.qmax - g.qmin + 1
    return bpw - (math.ceil(math.log2(n)) - math.log2(n))


def roundtrip_problems(fmt: Format, w: torch.Tensor, d: torch.Tensor) -> list[str]:
    """What is wrong with ``d`` as the dequantized ``w`` (empty: nothing)."""
    if tuple(d.shape) != tuple(w.shape):
        return [f"shape {tuple(d.shape)}, not {tuple(w.shape)}"]
    problems = []
    if d.dtype != torch.float32:
        problems.append(f"dtype {d.dtype}, not float32")
    if not bool(torch.isfinite(d).all()):
        return [*problems, f"{int((~torch.isfinite(d)).sum())} values not finite"]
    zero_rows = (w == 0).all(dim=1)
    if bool((d[zero_rows] != 0).any()):
        problems.append("a row of zeros does not decode to zeros")
    bpw = value_bits(fmt, tuple(w.shape))
    err = float((d.double() - w.double()).norm() / w.double().norm())
    if bpw >= 32:
        if not torch.equal(d, w):
            problems.append(f"{bpw} bits per weight, yet the round trip is not exact (relative RMS error {err:.3g})")
    elif not err < error_bound(bpw):
        problems.append(f"relative RMS error {err:.4g} at {bpw:.4g} bits per weight, bound {error_bound(bpw):.4g}")
    return problems


def _same_grid(a: Grid, b: Grid) -> bool:
    def same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))

    return (same(a.scale, b.scale) and same(a.zero, b.zero) and same(a.offset, b.offset) and same(a.levels, b.levels)
            and (a.qmin, a.qmax) == (b.qmin, b.qmax))


def _same_layout(a: QTensor, b: QTensor) -> bool:
    """Same parts, each of the same dtype and shape."""
    return set(a.parts) == set(b.parts) and all(
        a.parts[k].dtype == b.parts[k].dtype and a.parts[k].shape == b.parts[k].shape for k in a.parts)


# ---- the registry ------------------------------------------------------------------------
def test_registry_is_expanded_and_every_family_names_members():
    families = family_info()
    for name in list_formats():
        if "<" in name:
            assert families[name][1], f"family {name} names no members: nothing of it can be checked here"
    assert len(NAMES) >= 30  # 34 when written; a registry that lost its modules would shrink


@pytest.mark.parametrize("name", NAMES)
def test_canonical_name_resolves_to_itself(name):
    fmt = FORMATS[name]
    assert get_format(name).name == name  # QTensor.format and checkpoints name formats by it
    assert fmt.description
    assert fmt.block_size >= 0 and fmt.scale_group >= 0 and fmt.vector_dim >= 0


# ---- round trip and size -----------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_keeps_shape_and_error_within_the_bits(name):
    fmt = FORMATS[name]
    w, qt = _quantized(name)
    assert roundtrip_problems(fmt, w, fmt.dequantize(qt)) == []
    # all zeros: nothing to divide by
    z = torch.zeros(ROWS, _cols(fmt))
    dz = fmt.dequantize(quantize(fmt, z))
    assert dz.shape == z.shape and torch.equal(dz, z)


@pytest.mark.parametrize("name", NAMES)
def test_quantize_is_deterministic_and_leaves_its_input_alone(name):
    fmt = FORMATS[name]
    w, qt = _quantized(name)
    x = w.clone()
    again = quantize(fmt, x)
    assert torch.equal(x, w)
    assert _same_layout(again, qt)
    for k, v in qt.parts.items():
        assert torch.equal(again.parts[k], v), k


@pytest.mark.parametrize("name", NAMES)
def test_qtensor_bytes_are_the_counted_bits(name):
    fmt = FORMATS[name]
    w, qt = _quantized(name)
    shape = tuple(w.shape)
    assert qt.format == fmt.name and tuple(qt.shape) == shape
    assert all(isinstance(t, torch.Tensor) for t in qt.parts.values())
    assert qt.nbytes() * 8 == fmt.storage_bits(shape)
    assert fmt.tensor_bits(qt) == fmt.storage_bits(shape)
    assert fmt.bits_per_weight(shape) == fmt.storage_bits(shape) / (shape[0] * shape[1])


@pytest.mark.parametrize("name", NAMES)
def test_columns_that_break_a_block_are_refused_and_others_taken(name):
    fmt = FORMATS[name]
    base = _cols(fmt)
    if fmt.block_size:
        with pytest.raises(FormatError):
            quantize(fmt, torch.randn(ROWS, base + 1))
        return
    # no block: any column count, ragged last groups and bit-packed rows that end mid-byte included
    shape = (ROWS, base + 37)
    w = _weights(fmt, shape, salt=2)
    qt = quantize(fmt, w)
    assert tuple(qt.shape) == shape
    assert roundtrip_problems(fmt, w, fmt.dequantize(qt)) == []
    assert qt.nbytes() * 8 == fmt.tensor_bits(qt) == fmt.storage_bits(shape)


def test_error_bound_rejects_broken_formats():
    """The round-trip check is not vacuous: formats that decode wrongly, or claim bits they do not
    use, fail it."""

    class Pretender(Format):
        """Another format's rounding, passed off as ``bits`` bits per weight."""

        def __init__(self, inner: Format, bits: int) -> None:
            self.inner, self.bits, self.name = inner, bits, f"{inner.name}-as-{bits}-bits"

        def quantize(self, w: torch.Tensor) -> QTensor:
            return self.inner.quantize(w)

        def dequantize(self, q: QTensor) -> torch.Tensor:
            return self.inner.dequantize(q)

        def storage_bits(self, shape: tuple[int, int]) -> int:
            return self.bits * shape[0] * shape[1]

    w = _weights(get_format("q4_0"), (ROWS, 256))
    broken_decoders = {"zeros": torch.zeros_like, "signs lost": torch.abs, "columns lost": lambda d: d[:, :-8],
                       "NaN": lambda d: d * float("nan"), "float16": lambda d: d.half(),
                       "zeros decode to 1e-3": lambda d: d + 1e-3 * (d == 0)}
    for inner in ("q4_0", "int2-asym-g32", "fp16", "e8p"):
        fmt = get_format(inner)
        d = fmt.roundtrip(w)
        assert roundtrip_problems(fmt, w, d) == []
        for what, decode in broken_decoders.items():
            assert roundtrip_problems(fmt, w, decode(d)), (inner, what)
    # formats claiming about twice their bits or more: 2-bit rounding as 16 bits, 4.5 as 10, FP16 as FP32
    for inner, bits in (("int2-asym-g32", 16), ("q4_0", 10), ("fp16", 32)):
        pretender = Pretender(get_format(inner), bits)
        assert roundtrip_problems(pretender, w, pretender.roundtrip(w)), pretender.name


# ---- grids: the values calibration methods choose from -----------------------------------
@pytest.mark.parametrize("name", [n for n in NAMES if FORMATS[n].calibratable and not FORMATS[n].vector_dim])
def test_grid_values_are_what_dequantize_computes(name):
    fmt = FORMATS[name]
    w, qt = _quantized(name)
    dq = fmt.dequantize(qt)
    grid = fmt.grid(qt)
    for t in (grid.scale, grid.zero, grid.offset):
        assert t is None or tuple(t.shape) == tuple(qt.shape)  # every field is per weight
    # the codes of the stored values give them back exactly
    codes = grid.nearest(dq)
    assert tuple(codes.shape) == tuple(qt.shape) and grid.qmin <= int(codes.min()) and int(codes.max()) <= grid.qmax
    assert torch.equal(grid.values(codes), dq)
    c = fmt.codes(qt)
    assert c.dtype == torch.int64 and tuple(c.shape) == tuple(qt.shape)
    assert grid.qmin <= int(c.min()) and int(c.max()) <= grid.qmax
    assert torch.equal(grid.values(c), dq)
    # codes chosen elsewhere (here: nearest to the weights), stored by with_codes, decode to the grid's
    # values; the scales and the layout stay as they were
    chosen = grid.nearest(w)
    qt2 = fmt.with_codes(qt, chosen)
    assert torch.equal(fmt.dequantize(qt2), grid.values(chosen))
    assert _same_grid(fmt.grid(qt2), grid)
    assert _same_layout(qt2, qt) and qt2.nbytes() * 8 == fmt.storage_bits(tuple(qt.shape))
    assert torch.equal(fmt.codes(qt2), chosen)
    # a slice of columns of the grid is the grid of those columns
    a, b = 5, qt.shape[1] - 3
    assert torch.equal(grid[a:b].values(chosen[:, a:b]), grid.values(chosen)[:, a:b])
    assert torch.equal(grid[a].values(chosen[:, a : a + 1]), grid.values(chosen)[:, a : a + 1])


@pytest.mark.parametrize("name", [n for n in NAMES if FORMATS[n].vector_dim])
def test_vector_grid_values_are_what_dequantize_computes(name):
    fmt = FORMATS[name]
    w, qt = _quantized(name)
    rows, cols = qt.shape
    vg = fmt.vector_grid(qt)
    assert vg.dim == fmt.vector_dim and vg.scale.shape[0] == rows
    chosen = vg.nearest(w)
    assert tuple(chosen.shape) == (rows, cols // vg.dim, vg.scale.shape[1])
    qt2 = fmt.with_codes(qt, chosen)
    assert torch.equal(fmt.codes(qt2), chosen)
    assert torch.equal(fmt.dequantize(qt2), vg.values(chosen))
    assert torch.equal(fmt.vector_grid(qt2).scale, vg.scale) and torch.equal(fmt.vector_grid(qt2).table, vg.table)
    assert _same_layout(qt2, qt)
    if vg.scale.shape[1] == 1:  # one stage: a decoded vector is a code book point, found again exactly
        dq = fmt.dequantize(qt)
        assert torch.equal(vg.values(vg.nearest(dq)), dq)


# ---- column slices -----------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in NAMES if FORMATS[n].joinable])
def test_join_columns_of_slices_is_the_whole(name):
    fmt = FORMATS[name]
    sg = fmt.scale_group
    assert sg > 0, "a joinable format needs a scale group to cut its columns by"
    cols = 3 * _cols(fmt) + (0 if fmt.block_size else 37)  # a ragged last group where blocks allow it
    w = _weights(fmt, (ROWS, cols), salt=1)
    sizes = [sg, 2 * sg, cols - 3 * sg]
    bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(3) if sizes[i]]
    pieces = [quantize(fmt, w[:, a:b].contiguous()) for a, b in bounds]
    joined = fmt.join_columns(pieces)
    whole = quantize(fmt, w)
    assert joined.format == fmt.name and tuple(joined.shape) == (ROWS, cols)
    assert joined.nbytes() * 8 == fmt.storage_bits((ROWS, cols))
    assert torch.equal(fmt.dequantize(joined), torch.cat([fmt.dequantize(p) for p in pieces], dim=1))
    if fmt.calibratable:
        grid = fmt.grid(joined)
        for (a, b), p in zip(bounds, pieces, strict=True):
            assert _same_grid(grid[a:b], fmt.grid(p)), (a, b)
    # scales come from each group alone: the slices make the very tensor the whole makes
    assert _same_layout(joined, whole)
    for k, v in whole.parts.items():
        assert torch.equal(joined.parts[k], v), k


@pytest.mark.parametrize("name", [n for n in NAMES if not FORMATS[n].joinable])
def test_a_format_that_cannot_join_column_slices_says_so(name):
    fmt = FORMATS[name]
    _, qt = _quantized(name)
    with pytest.raises(FormatError, match="cannot join"):
        fmt.join_columns([qt, qt])


# ---- GGUF --------------------------------------------------------------------------------
def ggml_bytes(qt: QTensor) -> np.ndarray:
    """The bytes GGUF stores for ``qt`` (what lowbit's GGUF writer writes): its one part, ``blocks``
    (ggml blocks) or ``values`` (F32/F16/BF16), as uint8 ``[rows, row bytes]``."""
    (part,) = qt.parts.values()
    return np.ascontiguousarray(part.contiguous().view(torch.uint8).numpy()).reshape(qt.shape[0], -1)


@pytest.mark.parametrize("name", [n for n in NAMES if FORMATS[n].gguf_type is not None])
def test_gguf_bytes_decode_alike_in_gguf_py(name, ggml):
    """gguf-py decodes the bytes to the same floats (libggml's own ``to_float`` for the types gguf-py
    cannot decode, such as Q1_0)."""
    fmt = FORMATS[name]
    w, qt = _quantized(name)
    rows, cols = qt.shape
    gtype = GGMLQuantizationType(fmt.gguf_type)
    block, type_size = GGML_QUANT_SIZES[gtype]
    assert len(qt.parts) == 1 and set(qt.parts) <= {"blocks", "values"}, list(qt.parts)
    assert max(fmt.block_size, 1) == block
    raw = ggml_bytes(qt)
    assert raw.shape == (rows, cols // block * type_size)
    assert raw.nbytes * 8 == fmt.storage_bits((rows, cols))
    try:
        ref = gguf_quants.dequantize(raw, gtype)
    except NotImplementedError:
        ref = ggml.dequantize(int(gtype), raw, rows * cols)
    assert np.array_equal(np.asarray(ref, dtype=np.float32).reshape(rows, cols), fmt.dequantize(qt).numpy())


# ---- the one format whose size depends on the data ---------------------------------------
@pytest.mark.parametrize("name", [n for n in NAMES if isinstance(FORMATS[n], SpQRFormat)])
def test_spqr_outliers_are_held_and_counted_as_described(name):
    """A format's size may depend on its data where it overrides tensor_bits (only SpQR does); what
    quantize() makes still stores exactly storage_bits (checked above for every format).  SpQR's
    outliers (made by --method spqr) are held as an int32 flat index and an FP16 value (48 bits) but
    counted as the compressed sparse rows SpQR describes: a 16-bit value and a 16-bit column index
    per outlier (32 bits) plus a 32-bit row pointer per row."""
    from lowbit.algorithms.spqr import SpQRConfig, spqr_quantize

    fmt = FORMATS[name]
    w = _weights(fmt, (ROWS, _cols(fmt)), salt=3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, w.shape[1], generator=g)
    res = spqr_quantize(w, x.t() @ x / x.shape[0], fmt, SpQRConfig(outlier_fraction=0.02))
    qt, k = res.qtensor, res.outliers
    base = fmt.storage_bits(tuple(w.shape))
    assert k > 0 and qt.parts["out_idx"].numel() == k
    assert qt.nbytes() * 8 == base + 48 * k
    assert fmt.tensor_bits(qt) == base + 32 * k + 32 * ROWS
    assert roundtrip_problems(fmt, w, fmt.dequantize(qt)) == []
