"""Random orthogonal rotations for incoherence processing (QuIP / QuIP#).

A weight ``W`` and its inputs ``x`` are rotated, ``W' = R_out W R_in^T`` and ``x' = x R_in^T``, so
that ``x' W'^T R_out = x W^T`` exactly; quantizing ``W'`` instead of ``W`` spreads outlier weights
and outlier input channels over all coordinates (the weights become "incoherent"), which makes
them much easier to round.  ``R = K diag(s)`` with random signs ``s`` and ``K`` a Kronecker product
of small orthonormal factors, applied in ``O(n * sum of factor sizes)`` per vector:

* Hadamard matrices: Sylvester's for powers of two (split into factors of at most 128) and Paley's
  constructions for orders ``q + 1`` (prime ``q = 3 mod 4``) and ``2(q + 1)`` (prime ``q = 1 mod 4``),
  so 576 = 12 x 48 and 8960 = 20 x 448 have true Hadamard transforms;
* where the odd part of ``n`` has no Hadamard factor, a random orthogonal matrix (QR of a Gaussian)
  of that size times a Hadamard transform of the power-of-two part.
"""

from __future__ import annotations

import functools

import torch


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i), the quadratic character modulo the prime q."""
    squares = {(k * k) % q for k in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


@functools.lru_cache(maxsize=64)
def paley_hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``n`` (entries +-1, ``H H^T = n I``) from Paley's constructions, or None."""
    q = n - 1
    if q % 4 == 3 and _is_prime(q):  # Paley I
        Q = _jacobsthal(q)
        S = torch.zeros(n, n, dtype=torch.float64)
        S[0, 1:] = 1.0
        S[1:, 0] = -1.0
        S[1:, 1:] = Q
        return S + torch.eye(n, dtype=torch.float64)
    if n % 2 == 0:
        q = n // 2 - 1
        if q % 4 == 1 and _is_prime(q):  # Paley II
            Q = _jacobsthal(q)
            m = q + 1
            C = torch.zeros(m, m, dtype=torch.float64)
            C[0, 1:] = 1.0
            C[1:, 0] = 1.0
            C[1:, 1:] = Q
            zero_blk = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            one_blk = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            H = torch.kron((C == 0).to(torch.float64), zero_blk) + torch.kron(C, one_blk)
            return H
    return None


@functools.lru_cache(maxsize=64)
def sylvester_hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_factors(n: int, max_factor: int = 128) -> list[int] | None:
    """Orders of Hadamard factors whose Kronecker product has order ``n``, or None if none is known."""
    two = n & -n  # largest power of two dividing n
    odd_part = n // two
    extra: list[int] = []
    if odd_part > 1:
        for k in range(2, 40):  # n = m * 2^j with a Paley order m = odd_part * 2^k
            m = odd_part << k
            if m > min(n, 4 * max_factor) or (n // m) & (n // m - 1):
                break  # none, or only a large dense factor: a random orthogonal odd part is cheaper
            if paley_hadamard(m) is not None:
                extra = [m]
                two = n // m
                break
        else:
            return None
        if not extra:
            return None
    pw = []
    while two > 1:
        f = min(two, max_factor)
        pw.append(f)
        two //= f
    return extra + pw


def _orthonormal_factor(m: int, gen: torch.Generator, allow_random: bool) -> torch.Tensor:
    if m & (m - 1) == 0:
        return sylvester_hadamard(m) / m**0.5
    h = paley_hadamard(m)
    if h is not None:
        return h / m**0.5
    if not allow_random:
        raise ValueError(f"no Hadamard matrix of order {m}")
    q, r = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


class Rotation:
    """A random orthogonal ``R = K diag(s)`` of order ``n``, reproducible from ``seed``."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        self.signs = (torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) * 2 - 1).to(torch.float64)
        sizes = hadamard_factors(n)
        if sizes is None:
            two = n & -n
            odd = n // two
            sizes = [odd] + (hadamard_factors(two) or [])
            self.kind = f"random orthogonal {odd} x Hadamard {two}"
        else:
            self.kind = "Hadamard " + " x ".join(str(s) for s in sizes)
        self.factors = [_orthonormal_factor(m, gen, allow_random=True) for m in sizes]
        self._cache: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def _on(self, like: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        key = (like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = (self.signs.to(like.device, like.dtype),
                                [f.to(like.device, like.dtype) for f in self.factors])
        return self._cache[key]

    def _kron(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``x @ K^T`` (``transpose``) or ``x @ K`` along the last dimension."""
        _, factors = self._on(x)
        lead = x.shape[:-1]
        sizes = [f.shape[0] for f in factors]
        y = x.reshape(*lead, *sizes)
        nd = len(lead)
        for k, f in enumerate(factors):
            y = y.movedim(nd + k, -1)
            y = y @ (f.t() if transpose else f)
            y = y.movedim(-1, nd + k)
        return y.reshape(*lead, self.n)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ R^T`` along the last dimension (rotate)."""
        signs, _ = self._on(x)
        return self._kron(x * signs, transpose=True)

    def apply_inverse(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ R`` along the last dimension (undo :meth:`apply`)."""
        signs, _ = self._on(x)
        return self._kron(x, transpose=False) * signs

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return self.apply(torch.eye(self.n, dtype=dtype)).t()


def rotate_weight(w: torch.Tensor, r_out: Rotation, r_in: Rotation) -> torch.Tensor:
    """``R_out W R_in^T``."""
    return r_out.apply(r_in.apply(w).t()).t()


def rotate_hessian(h: torch.Tensor, r_in: Rotation) -> torch.Tensor:
    """``R_in H R_in^T``: the Hessian of the rotated inputs ``x R_in^T``."""
    return r_in.apply(r_in.apply(h).t()).t()
