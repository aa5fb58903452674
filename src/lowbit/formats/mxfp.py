"""4-bit floats in ggml's blocks: MXFP4 (OCP microscaling) and NVFP4 (NVIDIA's FP4).

Each weight is one of the 16 E2M1 values, stored as ggml's doubled table ``kvalues_mxfp4`` (0, 1,
2, 3, 4, 6, 8, 12 and their negatives) times a block scale that already holds the factor 1/2:

* MXFP4 (4.25 bpw): blocks of 32 with a shared power-of-two scale, an E8M0 byte ``e`` decoding to
  ``2**(e - 128)``; ``e = floor(log2(max |x|)) - 2 + 127`` (``quantize_row_mxfp4_ref``).
* NVFP4 (4.5 bpw): blocks of 64 in four sub-blocks of 16, each with an unsigned E4M3 scale byte
  fitted to ``max |x| / 6`` (ggml's ``ggml_fp32_to_ue4m3``: truncate to three mantissa bits, round
  up on the next bit, saturate at 448), decoding to half its E4M3 value (``quantize_row_nvfp4_ref``).

Codes are the table entry nearest each weight, the first on a tie (ggml's ``best_index_mxfp4``).
Neither type reads an importance matrix.  Nibble layout per block (MXFP4) or sub-block (NVFP4):
byte ``j`` holds weight ``j`` in its low nibble and weight ``j + half`` in its high one.
"""

from __future__ import annotations

import torch

from lowbit.formats.base import GGMLBlocks, Grid, QTensor, map_row_chunks, register
from lowbit.formats.ggml_ref import sdiv

#: ggml's kvalues_mxfp4: twice the E2M1 values, in code order
KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def best_index(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """For every weight ``x`` [..., n] with its scale ``d`` [..., 1]: the code whose ``kvalue * d``
    is nearest in float32, the first one on a tie (uint8)."""
    kv = torch.tensor(KVALUES, dtype=torch.float32, device=x.device)
    err = (kv * d.unsqueeze(-1) - x.unsqueeze(-1)).abs()  # [..., n, 16]
    return err.argmin(dim=-1).to(torch.uint8)


def pack_halves(q: torch.Tensor) -> torch.Tensor:
    """Codes [..., 2h] -> bytes [..., h]: code ``j`` low nibble, code ``j + h`` high."""
    h = q.shape[-1] // 2
    return q[..., :h] | (q[..., h:] << 4)


def unpack_halves(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b & 0x0F, b >> 4], dim=-1)


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """ggml_e8m0_to_fp32_half: ``2**(e - 128)`` (subnormal for e < 2), exact in float32."""
    return torch.ldexp(torch.ones_like(e, dtype=torch.float64), e.to(torch.float64) - 128).to(torch.float32)


def fp32_to_ue4m3(x: torch.Tensor) -> torch.Tensor:
    """ggml_fp32_to_ue4m3 on float32 ``x`` (bytes, uint8)."""
    pos = x > 0
    x = torch.where(pos, x.clamp(max=448.0), torch.ones_like(x))
    bits = x.view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - 127 + 7
    man = (bits >> 20) & 0x7
    # subnormal: man = (int)(x * 512 + 0.5), at most 7, nothing below 1
    sub = torch.trunc(x * 512.0 + 0.5).to(torch.int32).clamp(max=7)
    sub = torch.where(sub < 1, 0, sub)
    m2 = man + ((bits >> 19) & 1)
    carry = m2 > 7
    e2 = torch.where(carry, exp + 1, exp)
    m2 = torch.where(carry, 0, m2)
    normal = torch.where(e2 >= 15, 0x7E, (e2 << 3) | m2)
    out = torch.where(exp <= 0, sub, torch.where(exp >= 15, 0x7E, normal))
    return torch.where(pos, out, 0).to(torch.uint8)


def ue4m3_half(b: torch.Tensor) -> torch.Tensor:
    """ggml_ue4m3_to_fp32: half the unsigned E4M3 value of byte ``b`` (0 for 0 and 0x7F), exact."""
    b = b.to(torch.int32)
    exp, man = (b >> 3) & 0xF, b & 0x7
    raw = torch.where(exp == 0, man.to(torch.float64) * 2.0**-9,
                      torch.ldexp((8 + man).to(torch.float64), (exp - 10).to(torch.float64)))
    return torch.where((b == 0) | (b == 0x7F), 0.0, raw * 0.5).to(torch.float32)


class FP4Blocks(GGMLBlocks):
    """E2M1 codes in ggml blocks; subclasses fit and decode the scales."""

    has_grid = True
    #: weights sharing one scale
    group: int
    #: bytes of scales at the start of a block
    scale_bytes: int

    def __init__(self, name: str, description: str, fallback: str | None) -> None:
        self.name = name
        self.use_ggml_type(name)
        self.description = description
        self.gguf_fallback = fallback

    def fit_scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Groups ``x`` [N, group] -> (scale bytes [N], scales [N, 1] float32)."""
        raise NotImplementedError

    def decode_scales(self, b: torch.Tensor) -> torch.Tensor:
        """Scale bytes -> float32 scales (same shape)."""
        raise NotImplementedError

    def quantize(self, w: torch.Tensor, name: str = "tensor", imatrix: torch.Tensor | None = None) -> QTensor:
        w = self.check(w, name)
        rows, cols = w.shape
        per_block = self.block_size // self.group

        def run(r0: int, r1: int) -> torch.Tensor:
            x = w[r0:r1].reshape(-1, self.group)
            sb, d = self.fit_scales(x)
            q = pack_halves(best_index(x, d)).reshape(-1, self.block_size // 2)
            return torch.cat([sb.reshape(-1, per_block), q], dim=1)

        blocks = map_row_chunks(run, rows, cols, w.device, chunk_weights=1 << 18).reshape(rows, -1)
        return QTensor(self.name, (rows, cols), {"blocks": blocks})

    def grid(self, qt: QTensor) -> Grid:
        d = self.decode_scales(self.blocks(qt)[:, : self.scale_bytes]).reshape(-1, 1)
        scale = d.expand(-1, self.group).reshape(qt.shape)
        return Grid(scale, None, None, 0, 15, torch.tensor(KVALUES, dtype=torch.float32))

    def codes(self, qt: QTensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        q = self.blocks(qt)[:, self.scale_bytes :].reshape(-1, self.group // 2)
        return unpack_halves(q).reshape(qt.shape).to(dtype)

    def with_codes(self, qt: QTensor, codes: torch.Tensor) -> QTensor:
        rows, _ = qt.shape
        b = self.blocks(qt)
        q = pack_halves(codes.reshape(-1, self.group).clamp(0, 15).to(torch.uint8)).reshape(b.shape[0], -1)
        out = torch.cat([b[:, : self.scale_bytes], q], dim=1)
        return QTensor(self.name, qt.shape, {"blocks": out.reshape(rows, -1)}, dict(qt.meta))


class MXFP4(FP4Blocks):
    group = 32
    scale_bytes = 1

    def fit_scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amax = x.abs().amax(dim=1)
        # floorf(log2f(amax)): the float64 logarithm rounded to float32 is log2f's correctly rounded value
        lg = torch.floor(torch.log2(amax.to(torch.float64)).to(torch.float32)).to(torch.int32)
        e = torch.where(amax > 0, (lg - 2 + 127) & 0xFF, 0).to(torch.uint8)
        return e, self.decode_scales(e)[:, None]

    def decode_scales(self, b: torch.Tensor) -> torch.Tensor:
        return e8m0_half(b)


class NVFP4(FP4Blocks):
    group = 16
    scale_bytes = 4

    def fit_scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ue = fp32_to_ue4m3(sdiv(x.abs().amax(dim=1), 6.0))
        return ue, ue4m3_half(ue)[:, None]

    def decode_scales(self, b: torch.Tensor) -> torch.Tensor:
        return ue4m3_half(b)


register(MXFP4("mxfp4", "MXFP4 (OCP microscaling): E2M1 values, blocks of 32 with a power-of-two scale, 4.25 bpw",
               fallback=None))
# llama.cpp has no fallback for NVFP4 (nor a file type): lowbit writes MXFP4, the same values in blocks of 32
register(NVFP4("nvfp4", "NVFP4: E2M1 values, blocks of 64 with an E4M3 scale per 16, 4.5 bpw", fallback="mxfp4"))
