"""SpQR's storage (Dettmers et al., 2023): small groups with quantized statistics, plus a sparse set
of outlier weights kept in FP16.

Name: ``spqr<bits>[-g<group>]`` (default group 16), e.g. ``spqr3-g16``.

* Weights: ``bits``-bit codes, affine per group of ``group`` consecutive input columns:
  ``w ~ (q - z) * s``.
* Statistics: the scales ``s`` and zero points ``z`` of a column group are themselves quantized to
  3 bits (min-max, affine), in blocks of 16 consecutive rows, each block with an FP16 minimum and
  step: 6 bits per group of weights plus 64 bits per 16 groups.
* Outliers: weights listed by position with their FP16 value, which replaces the decoded value.
  They cost 32 bits each (16-bit value, 16-bit column index) plus a 32-bit row pointer per row
  (compressed sparse rows), all counted in :meth:`SpQRFormat.tensor_bits`.

Round-to-nearest (:meth:`quantize`) keeps no outliers; :func:`lowbit.algorithms.spqr.spqr_quantize`
chooses them from calibration data.
"""

from __future__ import annotations

import re

import torch

from lowbit.formats.base import Format, FormatError, Grid, QTensor, ceil_div, pack_bits, register_family, unpack_bits

STAT_BITS = 3
STAT_ROWS = 16


def _quantize_stat(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """3-bit min-max quantization of ``v`` [ng, rows] in blocks of 16 rows: (codes [ng, rows],
    lo [ng, nb] fp16, step [ng, nb] fp16, decoded values [ng, rows] float32)."""
    ng, rows = v.shape
    nb = ceil_div(rows, STAT_ROWS)
    pad = nb * STAT_ROWS - rows
    vp = torch.nn.functional.pad(v, (0, pad), value=float("nan")) if pad else v
    blk = vp.reshape(ng, nb, STAT_ROWS)
    lo = torch.nan_to_num(blk, nan=float("inf")).amin(dim=2)
    hi = torch.nan_to_num(blk, nan=float("-inf")).amax(dim=2)
    lo16 = lo.to(torch.float16)
    step16 = ((hi - lo16.float()) / (2**STAT_BITS - 1)).to(torch.float16)
    lo_f, step_f = lo16.float(), step16.float()
    safe = torch.where(step_f > 0, step_f, torch.ones_like(step_f))
    codes = torch.round((blk - lo_f[..., None]) / safe[..., None]).clamp(0, 2**STAT_BITS - 1)
    codes = torch.nan_to_num(codes, nan=0.0).reshape(ng, nb * STAT_ROWS)[:, :rows]
    vals = _decode_stat(codes, lo16, step16, rows)
    return codes.to(torch.uint8), lo16, step16, vals


def _decode_stat(codes: torch.Tensor, lo16: torch.Tensor, step16: torch.Tensor, rows: int) -> torch.Tensor:
    lo = lo16.float().repeat_interleave(STAT_ROWS, dim=1)[:, :rows]
    step = step16.float().repeat_interleave(STAT_ROWS, dim=1)[:, :rows]
    return lo + codes.float() * step


class SpQRFormat(Format):
    def __init__(self, bits: int, group: int) -> None:
        if not 2 <= bits <= 8:
            raise FormatError(f"SpQR takes 2 to 8 bits, not {bits}")
        self.bits = bits
        self.group = group
        self.block_size = group
        self.name = f"spqr{bits}-g{group}"
        self.description = (f"SpQR {bits}-bit, groups of {group} with 3-bit statistics (blocks of 16 rows), "
                            "FP16 outliers")

    # ---- statistics ---------------------------------------------------------------------
    def fit(self, g: torch.Tensor, exclude: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Quantized statistics for groups ``g`` [rows, ng, group]; weights where ``exclude`` is True
        (outliers) do not count towards the range."""
        rows, ng, _ = g.shape
        if exclude is None:
            lo, hi = g.amin(dim=2), g.amax(dim=2)
        else:
            lo = torch.where(exclude, torch.full_like(g, float("inf")), g).amin(dim=2)
            hi = torch.where(exclude, torch.full_like(g, float("-inf")), g).amax(dim=2)
            empty = ~torch.isfinite(lo)
            lo = torch.where(empty, torch.zeros_like(lo), lo)
            hi = torch.where(empty, torch.zeros_like(hi), hi)
        qmax = 2**self.bits - 1
        scale = (hi - lo) / qmax
        zero = torch.where(scale > 0, -lo / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(lo))
        s_codes, s_lo, s_step, s_q = _quantize_stat(scale.t().contiguous())
        z_codes, z_lo, z_step, z_q = _quantize_stat(zero.t().contiguous())
        return {"s_codes": s_codes, "s_lo": s_lo, "s_step": s_step, "z_codes": z_codes, "z_lo": z_lo,
                "z_step": z_step, "scale": s_q.t(), "zero": z_q.t()}

    def grid_of_stats(self, st: dict[str, torch.Tensor], cols: int) -> Grid:
        """Per-weight grid of statistics from :meth:`fit` (``scale``, ``zero`` [rows, ng])."""
        rep = cols // st["scale"].shape[1]
        return Grid(st["scale"].repeat_interleave(rep, dim=1), st["zero"].repeat_interleave(rep, dim=1), None,
                    0, 2**self.bits - 1)

    def _check_cols(self, cols: int, name: str) -> None:
        if cols % self.group:
            raise FormatError(f"{name}: {cols} columns are not divisible by the SpQR group size {self.group}")

    def encode(self, shape: tuple[int, int], codes: torch.Tensor, stats: list[dict[str, torch.Tensor]],
               out_idx: torch.Tensor | None = None, out_val: torch.Tensor | None = None) -> QTensor:
        """Store codes [rows, cols], the statistics of each column group in order, and outliers
        (flat indices ``row * cols + col``, FP16 values)."""
        rows, cols = shape
        cat = {k: torch.cat([s[k] for s in stats], dim=0) for k in ("s_codes", "z_codes", "s_lo", "s_step", "z_lo", "z_step")}
        parts = {
            "codes": pack_bits(codes.to(torch.uint8), self.bits),
            "s_codes": pack_bits(cat["s_codes"].reshape(1, -1), STAT_BITS),
            "z_codes": pack_bits(cat["z_codes"].reshape(1, -1), STAT_BITS),
            "stats": torch.stack([cat["s_lo"], cat["s_step"], cat["z_lo"], cat["z_step"]]),  # fp16 [4, ng, nb]
            "out_idx": (torch.zeros(0, dtype=torch.int32) if out_idx is None else out_idx.to(torch.int32)),
            "out_val": (torch.zeros(0, dtype=torch.float16) if out_val is None else out_val.to(torch.float16)),
        }
        return QTensor(self.name, (rows, cols), parts)

    def _stats(self, qt: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = qt.shape
        ng = cols // self.group
        st = qt.parts["stats"]
        s_codes = unpack_bits(qt.parts["s_codes"], STAT_BITS, ng * rows).reshape(ng, rows)
        z_codes = unpack_bits(qt.parts["z_codes"], STAT_BITS, ng * rows).reshape(ng, rows)
        scale = _decode_stat(s_codes, st[0], st[1], rows).t()
        zero = _decode_stat(z_codes, st[2], st[3], rows).t()
        return scale, zero

    # ---- the Format interface --------------------------------------------------------------
    def quantize(self, w: torch.Tensor, name: str = "tensor", imatrix: torch.Tensor | None = None) -> QTensor:
        w = self.check(w, name)
        rows, cols = w.shape
        self._check_cols(cols, name)
        ng = cols // self.group
        st = self.fit(w.reshape(rows, ng, self.group))
        grid = self.grid_of_stats(st, cols)
        stats = [{k: v[g : g + 1] for k, v in st.items() if k not in ("scale", "zero")} for g in range(ng)]
        return self.encode((rows, cols), grid.nearest(w), stats)

    def codes(self, qt: QTensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return unpack_bits(qt.parts["codes"], self.bits, qt.shape[1]).to(dtype)

    def dequantize(self, qt: QTensor) -> torch.Tensor:
        """The grid's values of the codes, with the outliers written over them."""
        out = super().dequantize(qt)
        idx = qt.parts["out_idx"].long()
        if idx.numel():
            out.view(-1)[idx] = qt.parts["out_val"].to(torch.float32)
        return out

    has_grid = True

    def grid(self, qt: QTensor) -> Grid:
        scale, zero = self._stats(qt)
        return self.grid_of_stats({"scale": scale, "zero": zero}, qt.shape[1])

    def with_codes(self, qt: QTensor, codes: torch.Tensor) -> QTensor:
        parts = dict(qt.parts)
        parts["codes"] = pack_bits(codes.clamp(0, 2**self.bits - 1).to(torch.uint8), self.bits)
        return QTensor(self.name, qt.shape, parts, dict(qt.meta))

    def storage_bits(self, shape: tuple[int, int]) -> int:
        """Bits without outliers (see :meth:`tensor_bits` for a stored tensor)."""
        rows, cols = shape
        ng = ceil_div(cols, self.group)
        nb = ceil_div(rows, STAT_ROWS)
        return (rows * ceil_div(cols * self.bits, 8) * 8 + 2 * ceil_div(ng * rows * STAT_BITS, 8) * 8
                + 4 * 16 * ng * nb)

    def tensor_bits(self, qt: QTensor) -> int:
        k = int(qt.parts["out_idx"].numel())
        return self.storage_bits(qt.shape) + (32 * k + 32 * qt.shape[0] if k else 0)


_NAME = re.compile(r"spqr([2-8])(?:-g(\d+))?")
_cache: dict[str, SpQRFormat] = {}


def _parse(name: str) -> Format | None:
    m = _NAME.fullmatch(name)
    if not m:
        return None
    g = int(m.group(2) or 16)
    if g < 2:
        raise FormatError(f"format {name}: group size must be at least 2")
    fmt = SpQRFormat(int(m.group(1)), g)
    return _cache.setdefault(fmt.name, fmt)


register_family("spqr<2-8>[-g<N>]", _parse,
                "SpQR: small groups (default 16) with 3-bit quantized statistics, plus FP16 outliers "
                "(made by --method spqr)", ("spqr3-g16", "spqr4-g16", "spqr2-g16"))
