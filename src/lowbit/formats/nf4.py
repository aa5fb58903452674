"""NF4 and FP4 (bitsandbytes' 4-bit data types), blocks of 64, optional double quantization.

Each block of 64 weights is divided by its absolute maximum (the block's ``absmax``) and every
value is replaced by the index of the nearest of 16 levels:

* NF4: the levels of the 4-bit NormalFloat type from the QLoRA paper (quantiles of a normal
  distribution, with an exact zero);
* FP4: bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit), normalised to [-1, 1].

Without double quantization the absmax is stored in FP32 (4.5 bits per weight).  With it
(``nf4-dq``, ``fp4-dq``), as bitsandbytes' ``compress_statistics`` does, the absmax values lose
their mean (one FP32 offset per tensor) and are quantized to 8 bits with the signed dynamic
(exponent + linear fraction) map in blocks of 256, each with an FP32 scale: 4.127 bits per weight.
"""

from __future__ import annotations

import torch

from lowbit.errors import FormatError
from lowbit.formats.base import Format, Grid, QTensor, ceil_div, pack_nibbles_lohi, register, unpack_nibbles_lohi

NF4_LEVELS = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]
)  # fmt: skip

# bitsandbytes' FP4 code book: codes 0-7 positive, 8-15 the same magnitudes negated.
_FP4_POS = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]) / 12.0
FP4_LEVELS = torch.cat([_FP4_POS, -_FP4_POS])

BLOCK = 64
DQ_BLOCK = 256


def dynamic_map_signed() -> torch.Tensor:
    """The 256-entry signed dynamic quantization map (Dettmers et al., 8-bit optimizers).

    One bit is the sign; the run of leading zero bits selects a decade ``10^-k`` (k = 6..0) and the
    remaining bits a linear fraction of that decade, giving fine steps near zero and coarse ones
    near one.  Level i of the fraction uses ``2^i`` midpoints of ``linspace(0.1, 1, 2^i + 1)``.
    """
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1)
        mids = ((edges[:-1] + edges[1:]) / 2) * 10.0 ** (i - 6)
        values += mids.tolist() + (-mids).tolist()
    out = torch.tensor(sorted(values), dtype=torch.float32)
    assert out.numel() == 256
    return out


DYNAMIC_MAP = dynamic_map_signed()


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of a code book (any order) for every element of ``x``."""
    order = torch.argsort(levels)
    srt = levels[order]
    mids = (srt[1:] + srt[:-1]) / 2
    idx = torch.bucketize(x, mids)
    return order[idx]


class FourBitFormat(Format):
    block_size = BLOCK

    def __init__(self, kind: str, double_quant: bool) -> None:
        self.kind = kind
        self.levels = NF4_LEVELS if kind == "nf4" else FP4_LEVELS
        self.double_quant = double_quant
        self.name = kind + ("-dq" if double_quant else "")
        self.description = f"bitsandbytes {kind.upper()}, block 64" + (", double-quantized scales" if double_quant else "")

    def quantize(self, w: torch.Tensor, name: str = "tensor", imatrix: torch.Tensor | None = None) -> QTensor:
        w = self.check(w, name)
        blocks = w.reshape(-1, BLOCK)
        absmax = blocks.abs().amax(dim=1)
        parts: dict[str, torch.Tensor] = {}
        if self.double_quant:
            offset = absmax.mean()
            centred = absmax - offset
            nb = centred.numel()
            padded = torch.nn.functional.pad(centred, (0, (-nb) % DQ_BLOCK)).reshape(-1, DQ_BLOCK)
            scale2 = padded.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
            codes2 = nearest_level(padded / scale2[:, None], DYNAMIC_MAP).to(torch.uint8)
            parts.update(absmax_codes=codes2.reshape(-1)[:nb], absmax_scale=scale2, absmax_offset=offset.reshape(1))
            absmax = self._absmax(parts)
        else:
            parts["absmax"] = absmax
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        codes = nearest_level(blocks / safe[:, None], self.levels).to(torch.uint8)
        parts["codes"] = pack_nibbles_lohi(codes.reshape(w.shape[0], -1))
        return QTensor(self.name, tuple(w.shape), parts)

    def _absmax(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        if "absmax" in parts:
            return parts["absmax"]
        codes2 = parts["absmax_codes"].long()
        nb = codes2.numel()
        scale2 = parts["absmax_scale"].repeat_interleave(DQ_BLOCK)[:nb]
        return DYNAMIC_MAP.to(scale2.device)[codes2] * scale2 + parts["absmax_offset"]

    def codes(self, qt: QTensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return unpack_nibbles_lohi(qt.parts["codes"]).to(dtype).reshape(qt.shape)

    # ---- grid (GPTQ and other methods choose the codes) -----------------------------
    has_grid = True

    def grid(self, qt: QTensor) -> Grid:
        absmax = self._absmax(qt.parts)
        scale = absmax[:, None].expand(-1, BLOCK).reshape(qt.shape)
        return Grid(scale, None, None, 0, 15, self.levels.to(absmax.device))

    def with_codes(self, qt: QTensor, codes: torch.Tensor) -> QTensor:
        parts = dict(qt.parts)
        parts["codes"] = pack_nibbles_lohi(codes.clamp(0, 15).to(torch.uint8).reshape(qt.shape[0], -1))
        return QTensor(self.name, qt.shape, parts, dict(qt.meta))

    @property
    def joinable(self) -> bool:
        return not self.double_quant  # double quantization's statistics span the whole tensor

    def join_columns(self, qts: list[QTensor]) -> QTensor:
        if not self.joinable or not qts:
            raise FormatError(f"format {self.name} cannot join column slices (double quantization spans the tensor)")
        rows = qts[0].shape[0]
        codes = torch.cat([q.parts["codes"].reshape(rows, -1) for q in qts], dim=1)
        absmax = torch.cat([q.parts["absmax"].reshape(rows, -1) for q in qts], dim=1).reshape(-1)
        return QTensor(self.name, (rows, sum(q.shape[1] for q in qts)), {"codes": codes, "absmax": absmax})

    def storage_bits(self, shape: tuple[int, int]) -> int:
        n = shape[0] * shape[1]
        nb = n // BLOCK
        if not self.double_quant:
            return 4 * n + 32 * nb
        return 4 * n + 8 * nb + 32 * ceil_div(nb, DQ_BLOCK) + 32


for _k in ("nf4", "fp4"):
    register(FourBitFormat(_k, double_quant=False))
    register(FourBitFormat(_k, double_quant=True))
