"""Vectorized re-implementations of the scale searches in ggml's quantizers (ggml-quants.c).

Each function here works on many groups at once.  A group tensor has shape ``[n, G]``: element
index first, group index second, so that a column ``t[k]`` is contiguous.  Every arithmetic step
is the float32 operation ggml performs, in ggml's order, so the results are bit-identical:

* sums are sequential (``acc = acc + v`` element after element, starting where ggml starts), never
  pairwise or tree reductions (:func:`seqsum`);
* ``nearest_int`` is round-half-to-even (ggml's magic-number trick), :func:`torch.round`;
* products such as ``w*x[i]*l`` are evaluated left to right, as C does;
* "first element wins" ties (``if (ax > amax)``) are reproduced with ``argmax``, which returns the
  first occurrence;
* searches over candidate scales whose candidates do not depend on earlier choices are computed
  for all candidates at once and then selected sequentially with ggml's exact comparison; those
  whose candidates depend on earlier choices (``make_qkx2/3_quants`` move ``min``) run candidate
  by candidate, vectorized over groups.

Only float32 tensors; CPU or CUDA.  These are private helpers of the GGUF formats.
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = float(np.float32(1e-15))


def f32(v: float) -> float:
    """The float32 value of ``v`` as a Python float (exact)."""
    return float(np.float32(v))


def f32_lin(a: float, b: float, i: int, c: float) -> float:
    """float32 evaluation of C's ``a + b*i + c`` (left to right)."""
    t = np.float32(np.float32(b) * np.float32(i))
    t = np.float32(np.float32(a) + t)
    return float(np.float32(t + np.float32(c)))


def fp16_round(v: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 then back to float32 (round to nearest even)."""
    return v.to(torch.float16).to(torch.float32)


def seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sequential float32 sum over dim 0 starting from +0.0, as ``float s = 0; for (...) s += t[i];``."""
    acc = torch.zeros_like(t[0])
    for k in range(t.shape[0]):
        acc.add_(t[k])
    return acc


def seqsum_from_first(t: torch.Tensor) -> torch.Tensor:
    """Sequential sum that starts from the first element (``float s = t[0]; for (i = 1; ...)``)."""
    acc = t[0].clone()
    for k in range(1, t.shape[0]):
        acc.add_(t[k])
    return acc


def first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, |value|) of the first element of largest magnitude along dim 0."""
    ax = x.abs()
    idx = ax.argmax(dim=0, keepdim=True)
    return x.gather(0, idx)[0], ax.gather(0, idx)[0]


def first_min(x: torch.Tensor) -> torch.Tensor:
    return x.gather(0, x.argmin(dim=0, keepdim=True))[0]


def first_max(x: torch.Tensor) -> torch.Tensor:
    return x.gather(0, x.argmax(dim=0, keepdim=True))[0]


def sdiv(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """Correctly rounded float32 ``a / b`` where either side may be a Python number.

    ``number / tensor`` in PyTorch is computed as ``reciprocal(tensor) * number`` (and on CUDA
    ``tensor / number`` as a multiplication by the reciprocal), which is not C's division.
    """
    if not isinstance(a, torch.Tensor):
        a = torch.tensor([a], dtype=torch.float32, device=b.device)  # type: ignore[union-attr]
    if not isinstance(b, torch.Tensor):
        b = torch.tensor([b], dtype=torch.float32, device=a.device)
    return torch.div(a, b)


def csqrt(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (C's sqrtf).  torch's float32 sqrt on the CPU is a
    vectorized approximation that is off by one ulp on about 1% of inputs; the float64 root rounded
    to float32 is exact."""
    return torch.sqrt(t.to(torch.float64)).to(torch.float32)


def one_where_zero(d: torch.Tensor) -> torch.Tensor:
    """``d`` with its zeros replaced by ones: a divisor for a ``torch.where`` that discards those lanes."""
    return torch.where(d == 0, torch.ones_like(d), d)


# ------------------------------------------------------------------------------------------
def make_qx_quants(
    x: torch.Tensor, nmax: int, rmse_type: int, qw: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants for ``x`` [n, G]: (scale [G], L [n, G] as float codes in 0..2*nmax-1)."""
    mx, amax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    smx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = sdiv(float(-nmax), smx)
    if rmse_type == 0:
        lv = torch.round(iscale * x).clamp_(-nmax, nmax - 1)
        scale = sdiv(1.0, iscale)
        L = lv + nmax
    else:
        return_early = rmse_type < 0
        rt = abs(rmse_type)
        if qw is not None:
            w = qw
        elif rt == 1:
            w = x * x
        elif rt == 2:
            w = torch.ones_like(x)
        elif rt == 3:
            w = x.abs()
        else:
            w = csqrt(x.abs())
        wx = w * x
        lv = torch.round(iscale * x).clamp_(-nmax, nmax - 1)
        sumlx = seqsum(wx * lv)
        suml2 = seqsum(w * lv * lv)
        scale = torch.where(suml2 != 0, sumlx / one_where_zero(suml2), torch.zeros_like(sumlx))
        L = lv + nmax
        if return_early:
            half = f32(0.5) * (scale + sdiv(1.0, iscale))
            scale = torch.where(suml2 > 0, half, sdiv(1.0, iscale))
        else:
            best = scale * sumlx
            cands = [i for i in range(-9, 10) if i != 0]
            # one candidate at a time (the [n, G] temporaries stay in cache); the codes of the
            # winning candidate are recomputed once at the end from its inverse scale
            sel = iscale
            for i in cands:
                isc = sdiv(-f32_lin(nmax, 0.1, i, 0.0), smx)
                lc = torch.round(isc[None, :] * x).clamp_(-nmax, nmax - 1)
                s_lx = seqsum(wx * lc)
                s_l2 = seqsum(w * lc * lc)
                take = (s_l2 > 0) & (s_lx * s_lx > best * s_l2)
                if bool(take.any()):
                    sel = torch.where(take, isc, sel)
                    scale = torch.where(take, s_lx / one_where_zero(s_l2), scale)
                    best = torch.where(take, scale * s_lx, best)
            L = torch.round(sel[None, :] * x).clamp_(-nmax, nmax - 1) + nmax
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero[None, :], torch.zeros_like(L), L)
    return scale, L


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_q3_quants with do_rmse = true: (scale [G], L [n, G] in 0..2*nmax-1)."""
    n = x.shape[0]
    mx, amax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    smx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = sdiv(float(-nmax), smx)
    L = torch.round(iscale * x).clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = seqsum(wx * L)
    suml2 = seqsum(w * L * L)
    for _ in range(5):
        for i in range(n):
            wi, wxi, xi, Li = w[i], wx[i], x[i], L[i]
            slx = sumlx - wxi * Li
            ok = slx > 0
            sl2 = suml2 - wi * Li * Li
            new_l = torch.round(xi * sl2 / torch.where(ok, slx, torch.ones_like(slx))).clamp_(-nmax, nmax - 1)
            ok = ok & (new_l != Li)
            slx = slx + wxi * new_l
            sl2 = sl2 + wi * new_l * new_l
            ok = ok & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = torch.where(ok, new_l, Li)
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / one_where_zero(suml2), torch.zeros_like(sumlx))
    L = L + nmax
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero[None, :], torch.zeros_like(L), L)
    return scale, L


def make_qkx_quants(
    x: torch.Tensor,
    w: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
    strict_empty: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants (``strict_empty=False``: returns early when max == min) and
    make_qkx3_quants (``strict_empty=True``: when max <= min).  Returns (scale, the_min, L)."""
    mn = first_min(x)
    mx = first_max(x)
    sum_w = seqsum_from_first(w)
    sum_x = seqsum_from_first(w * x)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    empty = (mx <= mn) if strict_empty else (mx == mn)
    rng = torch.where(empty, torch.ones_like(mx), mx - mn)
    iscale = sdiv(float(nmax), rng)
    scale = sdiv(1.0, iscale)
    L = torch.round(iscale * (x - mn)).clamp_(0, nmax)

    def err(sc: torch.Tensor, m: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        diff = sc * lv + m - x
        diff = diff.abs() if use_mad else diff * diff
        return seqsum(w * diff)

    best = err(scale, mn, L)
    # the codes of the winning candidate are recomputed at the end from its inverse scale and
    # the min it was computed with (the same operations, so the same values)
    sel_isc, sel_mn = iscale, mn
    if nstep >= 1:
        for i in range(nstep + 1):
            c = f32_lin(rmin, rdelta, i, float(nmax))
            rng = torch.where(empty, torch.ones_like(mx), mx - mn)
            isc = sdiv(c, rng)
            la = torch.round(isc * (x - mn)).clamp_(0, nmax)
            wl = w * la
            sum_l = seqsum(wl)
            sum_l2 = seqsum(wl * la)
            sum_xl = seqsum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            ok = D > 0
            sD = torch.where(ok, D, torch.ones_like(D))
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / sD
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / sD
            pos = this_min > 0
            this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
            this_scale = torch.where(pos, sum_xl / one_where_zero(sum_l2), this_scale)
            cur = err(this_scale, this_min, la)
            take = ok & (cur < best) & ~empty
            sel_isc = torch.where(take, isc, sel_isc)
            sel_mn = torch.where(take, mn, sel_mn)
            best = torch.where(take, cur, best)
            scale = torch.where(take, this_scale, scale)
            mn = torch.where(take, this_min, mn)
        L = torch.round(sel_isc * (x - sel_mn)).clamp_(0, nmax)
    L = torch.where(empty[None, :], torch.zeros_like(L), L)
    scale = torch.where(empty, torch.zeros_like(scale), scale)
    return scale, -mn, L


def make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qp_quants (``x`` [n, G], weights ``qw``): (scale [G], L [n, G] as ggml stores it,
    uint8).  ``x`` is non-negative for Q2_K; the i-quants pass runs with one negated magnitude."""
    n = x.shape[0]
    mx = x.amax(dim=0).clamp(min=0.0)
    zero = mx < GROUP_MAX_EPS
    smx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = sdiv(float(nmax), smx)
    # ggml keeps L in uint8: a negative level (the i-quants pass one flipped magnitude) wraps mod 256
    # where L is stored and read, while the sums take the int value
    L = torch.remainder(torch.round(iscale * x), 256)
    scale = sdiv(1.0, iscale)
    diff = x - scale * L
    best = seqsum(qw * diff * diff)
    for i in range(-4, 5):
        if i == 0:
            continue
        isc = sdiv(f32_lin(0.0, 0.1, i, float(nmax)), smx)
        sc = sdiv(1.0, isc)
        lv = torch.round(isc * x).clamp_(max=nmax)
        diff = x - sc * lv
        mse = seqsum(qw * diff * diff)
        take = mse < best
        best = torch.where(take, mse, best)
        iscale = torch.where(take, isc, iscale)
    lv = torch.round(iscale * x).clamp_(max=nmax)
    wx = qw * x
    sumlx = seqsum(wx * lv)
    suml2 = seqsum(qw * lv * lv)
    L = torch.remainder(lv, 256)
    for _ in range(5):
        for i in range(n):
            wi, wxi, xi, Li = qw[i], wx[i], x[i], L[i]
            slx = sumlx - wxi * Li
            sl2 = suml2 - wi * Li * Li
            ok = (slx > 0) & (sl2 > 0)
            new_l = torch.round(xi * sl2 / torch.where(ok, slx, torch.ones_like(slx))).clamp_(max=nmax)
            ok = ok & (new_l != Li)
            slx = slx + wxi * new_l
            sl2 = sl2 + wi * new_l * new_l
            ok = ok & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = torch.where(ok, torch.remainder(new_l, 256), Li)
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / one_where_zero(suml2), torch.zeros_like(sumlx))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero[None, :], torch.zeros_like(L), L)
    return scale, L


def best_index_int8(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8 (binary search, then the nearer neighbour, ties going up) for sorted
    float32 integer levels ``values`` (an int8 codebook such as IQ4's).

    That is the number of midpoints between neighbouring levels that are <= x: ggml compares
    ``x - lo < hi - x`` in float32, which can differ from ``x < (lo + hi) / 2`` only where the two
    differences round to the same float, i.e. with x within an ulp of a midpoint; the IQ4 levels'
    midpoints are all at least 4.5 away from 0, and there both differences are exact."""
    mids = (values[:-1] + values[1:]) * 0.5
    return torch.bucketize(x, mids, right=True)
