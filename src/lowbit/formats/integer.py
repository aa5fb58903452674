"""Integer quantization: absmax (symmetric) and zero-point (affine), 2-8 bits.

Names: ``int<bits>[-asym][-t|-ch|-g<group>][-clip]``.

* ``int8`` : symmetric, one scale per output channel (row).
* ``int4-g128`` : symmetric, one scale per 128 consecutive input columns (where 128 does not divide
  the row, the last group of each row is shorter: 576 columns = 4 groups of 128 + 1 of 64).
* ``int4-asym-g128`` : affine, a scale and a ``bits``-bit zero point per group (GPTQ/AWQ style).
* ``int8-t`` : one scale for the whole tensor.
* ``-clip`` : search, per group, the clipping ratio of the range that minimises the squared error
  (outliers are clipped instead of stretching the grid).

Symmetric codes lie in ``[-2^(b-1), 2^(b-1)-1]`` with scale ``absmax / (2^(b-1)-1)``; affine codes in
``[0, 2^b-1]`` with ``scale = (max-min)/(2^b-1)`` and ``zero = clamp(round(-min/scale))``. Scales are
stored as FP16 (FP32 for a per-tensor scale) and the codes are computed from the stored, rounded
scale so that dequantization reproduces exactly what was chosen.
"""

from __future__ import annotations

import re

import torch

from lowbit.formats.base import (
    Format,
    FormatError,
    Grid,
    QTensor,
    ceil_div,
    pack_bits,
    register_family,
    unpack_bits,
)

CLIP_GRID = torch.linspace(1.0, 0.5, 26).tolist()


class IntFormat(Format):
    def __init__(self, bits: int, symmetric: bool, group: int, clip: bool) -> None:
        if not 2 <= bits <= 8:
            raise FormatError(f"integer formats take 2 to 8 bits, not {bits}")
        self.bits = bits
        self.symmetric = symmetric
        self.group = group  # >0: group size, 0: per channel, -1: per tensor
        self.clip = clip
        gran = {0: "-ch", -1: "-t"}.get(group, f"-g{group}")
        self.name = f"int{bits}{'' if symmetric else '-asym'}{gran}{'-clip' if clip else ''}"
        # groups need not divide the row: a shorter last group takes the remainder
        kind = "absmax symmetric" if symmetric else "zero-point affine"
        where = {0: "per channel", -1: "per tensor"}.get(group, f"per group of {group}")
        self.description = f"{bits}-bit {kind}, {where}{', MSE-clipped' if clip else ''}"

    # ---------------------------------------------------------------------------------
    def segments(self, cols: int) -> list[tuple[int, int, int]]:
        """The scale groups of a row of ``cols`` columns, as (start, end, group size) column ranges
        cut into whole groups of that size: one range of full groups, then a last, shorter group
        where the size does not divide the row (576 = 4*128 + 64); the whole row in one range per
        channel or per tensor.  :meth:`quantize_clipped` takes its ratios per group in this order."""
        if self.group <= 0:
            return [(0, cols, cols)]
        full = cols - cols % self.group
        segs = [(0, full, self.group)] if full else []
        if cols % self.group:
            segs.append((full, cols, cols - full))
        return segs

    def groups_per_row(self, cols: int) -> int:
        """Scale groups in a row of ``cols`` columns (1 per channel or per tensor)."""
        return 1 if self.group <= 0 else ceil_div(cols, self.group)

    def _params(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale (rounded to its storage precision) and zero point from a range per group."""
        sdtype = torch.float32 if self.group == -1 else torch.float16
        if self.symmetric:
            qmax = 2 ** (self.bits - 1) - 1
            amax = torch.maximum(lo.abs(), hi.abs())
            scale = (amax / qmax).to(sdtype).to(torch.float32)
            return scale, None
        qmax = 2**self.bits - 1
        scale = ((hi - lo) / qmax).to(sdtype).to(torch.float32)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-lo / safe), 0, qmax)
        return scale, zero

    def _codes(self, g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        if self.symmetric:
            lim = 2 ** (self.bits - 1)
            return torch.clamp(torch.round(g * inv), -lim, lim - 1)
        assert zero is not None
        return torch.clamp(torch.round(g * inv) + zero, 0, 2**self.bits - 1)

    def _decode(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        return (q - zero) * scale if zero is not None else q * scale

    def _quantize_groups(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Codes, scales and zero points for a ``[n_groups, group]`` tensor."""
        lo = g.amin(dim=1, keepdim=True)
        hi = g.amax(dim=1, keepdim=True)
        if self.symmetric:
            lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
        scale, zero = self._params(lo, hi)
        q = self._codes(g, scale, zero)
        if self.clip:
            best_err = ((self._decode(q, scale, zero) - g) ** 2).sum(1, keepdim=True)
            for r in CLIP_GRID[1:]:
                s_r, z_r = self._params(lo * r, hi * r)
                q_r = self._codes(g, s_r, z_r)
                err = ((self._decode(q_r, s_r, z_r) - g) ** 2).sum(1, keepdim=True)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                q = torch.where(better, q_r, q)
                scale = torch.where(better, s_r, scale)
                if zero is not None and z_r is not None:
                    zero = torch.where(better, z_r, zero)
        return q, scale, zero

    def quantize(self, w: torch.Tensor, name: str = "tensor", imatrix: torch.Tensor | None = None) -> QTensor:
        w = self.check(w, name)
        rows, cols = w.shape
        if self.group == -1:
            q, scale, zero = self._quantize_groups(w.reshape(1, -1))
            codes, scales, zeros = q.reshape(rows, cols), scale.reshape(1, 1), zero
        else:
            cs, ss, zs = [], [], []
            for a, b, gs in self.segments(cols):
                q, scale, zero = self._quantize_groups(w[:, a:b].reshape(-1, gs))
                cs.append(q.reshape(rows, b - a))
                ss.append(scale.reshape(rows, -1))
                if zero is not None:
                    zs.append(zero.reshape(rows, -1))
            codes, scales = torch.cat(cs, 1), torch.cat(ss, 1)
            zeros = torch.cat(zs, 1) if zs else None
        return self._pack(rows, cols, codes, scales, zeros)

    def _pack(self, rows: int, cols: int, codes: torch.Tensor, scales: torch.Tensor,
              zeros: torch.Tensor | None) -> QTensor:
        offset = 2 ** (self.bits - 1) if self.symmetric else 0
        parts = {
            "codes": pack_bits((codes + offset).to(torch.uint8), self.bits),
            "scale": scales.reshape(-1).to(torch.float32 if self.group == -1 else torch.float16),
        }
        if zeros is not None:
            parts["zero"] = pack_bits(zeros.reshape(1, -1).to(torch.uint8), self.bits)
        return QTensor(self.name, (rows, cols), parts)

    # ---- grid (GPTQ and other methods choose the codes) -----------------------------
    has_grid = True

    @property
    def scale_group(self) -> int:
        return max(self.group, 0)

    def _group_sizes(self, cols: int) -> torch.Tensor:
        sizes = [gs for a, b, gs in self.segments(cols) for _ in range((b - a) // gs)]
        return torch.tensor(sizes, dtype=torch.long)

    def _per_weight(self, t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """[rows * groups] per-group values -> [rows, cols] per weight."""
        if self.group == -1:
            return t.reshape(1, 1).expand(rows, cols)
        t = t.reshape(rows, -1)
        return torch.repeat_interleave(t, self._group_sizes(cols).to(t.device), dim=1)

    def grid(self, qt: QTensor) -> Grid:
        rows, cols = qt.shape
        scale = qt.parts["scale"].to(torch.float32)
        if self.symmetric:
            lim = 2 ** (self.bits - 1)
            return Grid(self._per_weight(scale, rows, cols), None, None, -lim, lim - 1)
        zero = unpack_bits(qt.parts["zero"], self.bits, scale.numel()).to(torch.float32)
        return Grid(self._per_weight(scale, rows, cols), self._per_weight(zero, rows, cols), None,
                    0, 2**self.bits - 1)

    def codes(self, qt: QTensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        offset = 2 ** (self.bits - 1) if self.symmetric else 0
        return unpack_bits(qt.parts["codes"], self.bits, qt.shape[1]).to(dtype) - offset

    def with_codes(self, qt: QTensor, codes: torch.Tensor) -> QTensor:
        offset = 2 ** (self.bits - 1) if self.symmetric else 0
        parts = dict(qt.parts)
        parts["codes"] = pack_bits((codes.to(torch.int64) + offset).to(torch.uint8), self.bits)
        return QTensor(self.name, qt.shape, parts, dict(qt.meta))

    @property
    def joinable(self) -> bool:
        return self.group > 0

    def join_columns(self, qts: list[QTensor]) -> QTensor:
        if not self.joinable or not qts:
            raise FormatError(f"format {self.name} cannot join column slices (its scales are not per group)")
        rows = qts[0].shape[0]
        codes, scales, zeros = [], [], []
        for q in qts:
            codes.append(self.codes(q))
            s_ = q.parts["scale"].to(torch.float32).reshape(rows, -1)
            scales.append(s_)
            if "zero" in q.parts:
                zeros.append(unpack_bits(q.parts["zero"], self.bits, s_.numel()).to(torch.float32).reshape(rows, -1))
        cols = sum(q.shape[1] for q in qts)
        return self._pack(rows, cols, torch.cat(codes, 1), torch.cat(scales, 1), torch.cat(zeros, 1) if zeros else None)

    def quantize_clipped(self, w: torch.Tensor, ratio: torch.Tensor, name: str = "tensor") -> QTensor:
        """Round to nearest with each group's range shrunk by ``ratio`` (``[rows, groups]``, in
        (0, 1], groups as :meth:`segments` lists them): the clipping that AWQ searches for."""
        w = self.check(w, name)
        rows, cols = w.shape
        if self.group == -1:
            raise FormatError(f"{self.name}: clipping ratios need groups or channels, not one scale per tensor")
        ratio = ratio.to(w.device, torch.float32).reshape(rows, -1)
        cs, ss, zs = [], [], []
        gi = 0
        for a, b, gs in self.segments(cols):
            n = (b - a) // gs
            g = w[:, a:b].reshape(-1, gs)
            r = ratio[:, gi : gi + n].reshape(-1, 1)
            lo = g.amin(dim=1, keepdim=True) * r
            hi = g.amax(dim=1, keepdim=True) * r
            if self.symmetric:
                lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
            scale, zero = self._params(lo, hi)
            cs.append(self._codes(g, scale, zero).reshape(rows, b - a))
            ss.append(scale.reshape(rows, -1))
            if zero is not None:
                zs.append(zero.reshape(rows, -1))
            gi += n
        return self._pack(rows, cols, torch.cat(cs, 1), torch.cat(ss, 1), torch.cat(zs, 1) if zs else None)

    def storage_bits(self, shape: tuple[int, int]) -> int:
        rows, cols = shape
        codes = rows * ceil_div(cols * self.bits, 8) * 8
        if self.group == -1:
            return codes + 32 + (0 if self.symmetric else 8)
        ngroups = rows * self.groups_per_row(cols)
        zeros = 0 if self.symmetric else ceil_div(ngroups * self.bits, 8) * 8
        return codes + 16 * ngroups + zeros


_NAME = re.compile(r"int([2-8])(-asym|-sym)?(?:-(t|ch|g(\d+)))?(-clip)?")
_cache: dict[str, IntFormat] = {}


def _parse(name: str) -> Format | None:
    m = _NAME.fullmatch(name)
    if not m:
        return None
    bits, asym, gran, group, clip = m.groups()
    if group is not None:
        g = int(group)
        if g < 2:
            raise FormatError(f"format {name}: group size must be at least 2")
    else:
        g = -1 if gran == "t" else 0
    fmt = IntFormat(int(bits), asym != "-asym", g, bool(clip))
    return _cache.setdefault(fmt.name, fmt)


register_family("int<2-8>[-asym][-t|-ch|-g<N>][-clip]", _parse,
                "integer codes: symmetric (absmax) or -asym (zero point); one scale per tensor (-t), per channel "
                "(-ch, the default) or per group of N columns; -clip: MSE-searched clipping",
                ("int8", "int8-ch", "int4-g128", "int4-asym-g128", "int4-asym-g64", "int3-asym-g64-clip", "int2-asym-g32"))
