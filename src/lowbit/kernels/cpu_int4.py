"""CPU: integer formats through ATen's packed-int4 matrix multiply (``_weight_int4pack_mm_for_cpu``).

ATen's kernel computes ``x @ W^T`` with ``W[r, c] = (q[r, c] - 8) * scale[g, r] + zero[g, r]`` for
4-bit ``q`` and groups of 32, 64, 128 or 256 columns.  Any affine integer grid with at most 16 codes
maps onto it exactly (int2-int4 formats, Q4_0, Q4_1, Q4_K's sub-blocks); grids of up to 256 codes
(int5-int8 groups, Q5_0, Q5_1, Q5_K, Q8_0) are two 4-bit planes, ``u = 16 h + l``, multiplied
separately and summed.  Rows are padded to a multiple of 16 (what the kernel takes).

ATen's kernel is fast only in bfloat16 (in float32 or float16 it is slower than dequantizing the
whole weight), and takes its scales and zeros in the activations' dtype: this backend rounds the
input, the scales and zeros, and each plane's output to bfloat16 (float32 accumulation inside).
"""

from __future__ import annotations

import torch

from lowbit.formats import Format, QTensor
from lowbit.kernels import Backend, Kernel, register_backend
from lowbit.kernels.affine import AffineGroups, affine_groups


def _has_op() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


class Int4PackKernel(Kernel):
    backend = "cpu-int4pack"

    def __init__(self, ag: AffineGroups) -> None:
        self.rows, self.cols = ag.rows, ag.cols
        pad = -ag.rows % 16
        self.planes = 1 if ag.levels <= 16 else 2
        self.backend = "cpu-int4pack" if self.planes == 1 else "cpu-int4pack-2"
        # per segment: (start, end, group, [(packed, scale+zero float32)] per plane)
        self.parts: list[tuple[int, int, int, list[tuple[torch.Tensor, torch.Tensor]]]] = []
        for seg in ag.segments:
            u = seg.codes.to(torch.int32)
            s, b = seg.scale, seg.base
            if pad:
                u = torch.cat([u, torch.full((pad, u.shape[1]), 8 if self.planes == 1 else 0, dtype=torch.int32)])
                s = torch.cat([s, torch.zeros(pad, s.shape[1])])
                b = torch.cat([b, torch.zeros(pad, b.shape[1])])
            if self.planes == 1:
                # codes centred on 8 (the zero is then small, and rounds less): u' = u + off,
                # s * u + b = (u' - 8) * s + (b + (8 - off) s)
                off = 8 - ag.levels // 2
                planes = [(u + off, s, b + (8 - off) * s)]
            else:
                # codes centred on zero, c = u - levels/2 = 16 h + l with h in [-8, 7] and l in [0, 15]:
                # s * u + b = (h + 8 - 8) * 16 s  +  (l - 8) * s + (8 + levels/2) s + b; the high plane
                # carries the weight, the low one the rest, and neither a large zero
                c = u - ag.levels // 2
                planes = [((c >> 4) + 8, 16 * s, torch.zeros_like(s)), (c & 15, s, b + (8 + ag.levels // 2) * s)]
            packed = [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1),
                       torch.stack([sc.t(), zr.t()], dim=-1).to(torch.bfloat16).contiguous()) for q, sc, zr in planes]
            self.parts.append((seg.start, seg.end, seg.group, packed))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.cols).to(torch.bfloat16)
        y: torch.Tensor | None = None
        whole = len(self.parts) == 1
        for start, end, group, packed in self.parts:
            xs = x2 if whole else x2[:, start:end].contiguous()
            for p, sz in packed:
                r = torch.ops.aten._weight_int4pack_mm_for_cpu(xs, p, group, sz).to(torch.float32)
                y = r if y is None else y.add_(r)
        assert y is not None
        if y.shape[1] != self.rows:
            y = y[:, : self.rows]
        return y.reshape(*lead, self.rows).to(x.dtype)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() + sz.numel() * sz.element_size()
                   for *_, packed in self.parts for p, sz in packed)


def _build(fmt: Format, qt: QTensor, planes: int) -> Kernel | None:
    if not _has_op() or any(t.device.type != "cpu" for t in qt.parts.values()):
        return None
    ag = affine_groups(fmt, qt, max_levels=16 if planes == 1 else 256)
    if ag is None or (planes == 2 and ag.levels <= 16):
        return None
    return Int4PackKernel(ag)


register_backend(Backend(
    "cpu-int4pack", "cpu", "ATen's packed-int4 matmul: integer grids of up to 16 codes in groups of 32-256 "
    "(int2-int4, q4_0, q4_1, q4_k)", "bfloat16 rounding of the input, the scales and zeros, and the output",
    lambda fmt, qt: _build(fmt, qt, 1), rank=10, tolerance=1e-2, exact=False))
register_backend(Backend(
    "cpu-int4pack-2", "cpu", "two packed-int4 planes: integer grids of up to 256 codes in groups of 32-256 "
    "(int5-int8 groups, q5_0, q5_1, q5_k, q8_0)", "bfloat16 rounding of the input, the scales and zeros, and "
    "each plane's output", lambda fmt, qt: _build(fmt, qt, 2), rank=30, tolerance=1e-2, exact=False))
