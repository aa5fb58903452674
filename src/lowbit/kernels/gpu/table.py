"""Triton kernels for table-coded group-wise weights (the GPU side of ``cpu_table``).

A weight of ``rows`` x ``cols`` is stored as codes ``u`` (4 or 8 bits), a table ``T`` of float
values and one scale ``s`` and one base ``b`` per group of ``group`` columns of a row::

    W[r, c] = s[r, g] * T[u[r, c]] + b[r, g],    g = c // group.

Integer grids (int4 per group symmetric and asymmetric, Q4_0, Q4_1, Q8_0, the K-quants' sub-blocks)
take the identity table ``T[k] = k`` (the codes are converted, not looked up); code books (NF4, FP4,
IQ4_NL) take ``T`` = the book.  4-bit codes are packed two to a byte along a row: byte ``j`` holds
column ``2j`` in its low nibble and column ``2j + 1`` in its high one; the kernels multiply the even
and the odd columns of the input separately, so the nibbles never need interleaving.

* :func:`gemv` (batches of up to 8 rows): each program decodes a tile of ``BN`` output rows once and
  multiplies it with every input row in float32, over a slice of the columns (split-K: the slices'
  partial sums are added atomically into a float32 output).
* :func:`gemm` (larger batches): tiles of the weight are decoded to the input's dtype and multiplied
  with ``tl.dot`` (float32 accumulation; IEEE float32 for float32 inputs; see :func:`interpreted`).

Their product is that of the exact dequantized weight, up to float32 rounding in the GEMV and, in the
GEMM, the weight rounded to the input's dtype (as ``F.linear`` on the dequantized weight rounds it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: batches up to this many rows take the GEMV kernel
GEMV_MAX_M = 8


@triton.jit
def _decode(u, t_ptr, IDENTITY: tl.constexpr):
    if IDENTITY:
        return u.to(tl.float32)
    return tl.load(t_ptr + u.to(tl.int32))


@triton.jit
def _weight4(q_ptr, t_ptr, s_ptr, b_ptr, rn, j, wm, K, NG, GROUP: tl.constexpr, IDENTITY: tl.constexpr):
    """Columns 2j and 2j + 1 of rows rn of the weight (float32), from the packed 4-bit codes."""
    q = tl.load(q_ptr + rn[:, None] * (K // 2) + j[None, :], mask=wm, other=0)
    g = (2 * j) // GROUP
    s = tl.load(s_ptr + rn[:, None] * NG + g[None, :], mask=wm, other=0.0)
    b = tl.load(b_ptr + rn[:, None] * NG + g[None, :], mask=wm, other=0.0)
    return _decode(q & 15, t_ptr, IDENTITY) * s + b, _decode(q >> 4, t_ptr, IDENTITY) * s + b


@triton.jit
def _weight8(q_ptr, t_ptr, s_ptr, b_ptr, rn, k, wm, K, NG, GROUP: tl.constexpr, IDENTITY: tl.constexpr):
    """Columns k of rows rn of the weight (float32), from the 8-bit codes."""
    q = tl.load(q_ptr + rn[:, None] * K + k[None, :], mask=wm, other=0)
    g = k // GROUP
    s = tl.load(s_ptr + rn[:, None] * NG + g[None, :], mask=wm, other=0.0)
    b = tl.load(b_ptr + rn[:, None] * NG + g[None, :], mask=wm, other=0.0)
    return _decode(q, t_ptr, IDENTITY) * s + b


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, t_ptr, s_ptr, b_ptr, y_ptr, M, N, K, NG, stride_xm, stride_ym,
                 GROUP: tl.constexpr, BITS: tl.constexpr, IDENTITY: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    n_ok = rn < N
    m_ok = rm < M
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if BITS == 4:
        HK: tl.constexpr = BK // 2
        for k0 in range(pid_k * BK, K, BK * SPLIT):
            j = k0 // 2 + tl.arange(0, HK)  # byte index: columns 2j, 2j + 1
            j_ok = j < K // 2
            wm = n_ok[:, None] & j_ok[None, :]
            w_lo, w_hi = _weight4(q_ptr, t_ptr, s_ptr, b_ptr, rn, j, wm, K, NG, GROUP, IDENTITY)
            xm = m_ok[:, None] & j_ok[None, :]
            xe = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * j[None, :], mask=xm, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * j[None, :] + 1, mask=xm, other=0.0).to(tl.float32)
            acc += tl.sum(xe[:, None, :] * w_lo[None, :, :], axis=2)
            acc += tl.sum(xo[:, None, :] * w_hi[None, :, :], axis=2)
    else:
        for k0 in range(pid_k * BK, K, BK * SPLIT):
            k = k0 + tl.arange(0, BK)
            k_ok = k < K
            wm = n_ok[:, None] & k_ok[None, :]
            w = _weight8(q_ptr, t_ptr, s_ptr, b_ptr, rn, k, wm, K, NG, GROUP, IDENTITY)
            xv = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(xv[:, None, :] * w[None, :, :], axis=2)
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    om = m_ok[:, None] & n_ok[None, :]
    if SPLIT == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=om)
    else:
        tl.atomic_add(out, acc, mask=om)


@triton.jit
def _gemm_kernel(x_ptr, q_ptr, t_ptr, s_ptr, b_ptr, y_ptr, M, N, K, NG, stride_xm, stride_ym,
                 GROUP: tl.constexpr, BITS: tl.constexpr, IDENTITY: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if BITS == 4:
        HK: tl.constexpr = BK // 2
        for k0 in range(0, K, BK):
            j = k0 // 2 + tl.arange(0, HK)
            j_ok = j < K // 2
            wm = n_ok[:, None] & j_ok[None, :]
            w_lo, w_hi = _weight4(q_ptr, t_ptr, s_ptr, b_ptr, rn, j, wm, K, NG, GROUP, IDENTITY)
            w_lo, w_hi = w_lo.to(dt), w_hi.to(dt)
            xm = m_ok[:, None] & j_ok[None, :]
            xe = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * j[None, :], mask=xm, other=0.0)
            xo = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * j[None, :] + 1, mask=xm, other=0.0)
            if IEEE:
                acc = tl.dot(xe.to(tl.float32), tl.trans(w_lo.to(tl.float32)), acc, input_precision="ieee")
                acc = tl.dot(xo.to(tl.float32), tl.trans(w_hi.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(xe, tl.trans(w_lo), acc)
                acc = tl.dot(xo, tl.trans(w_hi), acc)
    else:
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            k_ok = k < K
            wm = n_ok[:, None] & k_ok[None, :]
            w = _weight8(q_ptr, t_ptr, s_ptr, b_ptr, rn, k, wm, K, NG, GROUP, IDENTITY).to(dt)
            xv = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(xv.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(xv, tl.trans(w), acc)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def interpreted() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors).  The interpreter's ``tl.dot``
    mistakes bfloat16 operands for integers, so there the GEMM multiplies bfloat16 tiles as float32:
    the same values (the weight is rounded to bfloat16 first) and the same float32 sums a GPU's
    bfloat16 dot computes, up to their order."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[rows, cols]`` (integers in ``[0, 2**bits)``) as the kernels store them (uint8)."""
    u = codes.to(torch.uint8)
    if bits == 8:
        return u.contiguous()
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def gemv(x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
         group: int, bits: int, identity: bool, split: int | None = None, bn: int = 32, bk: int = 128) -> torch.Tensor:
    """``x [m, cols] @ W^T`` for ``m`` up to :data:`GEMV_MAX_M`, in ``x``'s dtype."""
    m, k = x.shape
    n = scale.shape[0]
    assert 0 < m <= GEMV_MAX_M
    nblk = triton.cdiv(n, bn)
    kblk = triton.cdiv(k, bk)
    if split is None:  # enough programs to fill the GPU twice over
        split = max(1, min(kblk, triton.cdiv(2 * _sm_count(x.device), nblk)))
    split = max(1, min(split, kblk))
    y = (torch.empty if split == 1 else torch.zeros)((m, n), dtype=x.dtype if split == 1 else torch.float32,
                                                     device=x.device)
    bm = max(1, triton.next_power_of_2(m))
    _gemv_kernel[(nblk, split)](x, codes, table, scale, base, y, m, n, k, scale.shape[1], x.stride(0), y.stride(0),
                                GROUP=group, BITS=bits, IDENTITY=identity, BM=bm, BN=bn, BK=bk, SPLIT=split)
    return y.to(x.dtype)


def gemm(x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
         group: int, bits: int, identity: bool, bm: int | None = None, bn: int = 64, bk: int = 64) -> torch.Tensor:
    """``x [m, cols] @ W^T`` for any ``m`` (tiles of ``bm`` x ``bn`` outputs), in ``x``'s dtype."""
    m, k = x.shape
    n = scale.shape[0]
    if bm is None:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _gemm_kernel[grid](x, codes, table, scale, base, y, m, n, k, scale.shape[1], x.stride(0), y.stride(0),
                       GROUP=group, BITS=bits, IDENTITY=identity, BM=bm, BN=bn, BK=bk,
                       IEEE=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreted()))
    return y
