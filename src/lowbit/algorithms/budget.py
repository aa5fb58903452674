"""Choose one format per tensor to minimise the predicted loss under a size budget.

The problem is a multiple-choice knapsack: tensor ``t`` may be stored in any of its candidates
``(bits, loss)``; pick one candidate per tensor so that the bits sum to at most the budget and the
losses (predicted, assumed additive across tensors) sum to the least.

Two solvers run and the better answer wins:

* **dynamic programming** over the budget cut into ``resolution`` equal units, each candidate's
  size rounded *up* to whole units (so a solution that fits in units fits in bits), and once more
  rounded to the nearest unit (kept only if it fits in bits): exact up to that rounding, and immune to the trap of greedy methods when one tensor (a token embedding) is
  much larger than the rest;
* the **Lagrangian walk** on each tensor's lower convex hull of (bits, loss): from the smallest
  candidates, always take the upgrade that saves the most loss per bit, until the next one does not
  fit (optimal at every point it visits).

A last pass spends what is left on any single upgrade that still fits, the most loss saved per bit
first.  The result never exceeds the budget; if even the smallest candidates do not fit, it says so.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Candidate:
    format: str
    bits: int  # stored bits of the tensor in this format
    loss: float  # predicted loss (e.g. KLD) of storing the tensor this way


@dataclass
class Solution:
    choice: dict[str, Candidate]
    bits: int
    loss: float
    budget: int

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.choice.values():
            out[c.format] = out.get(c.format, 0) + 1
        return out


def lower_hull(cands: list[Candidate]) -> list[Candidate]:
    """Lower convex hull of (bits, loss), from fewest bits up, keeping only points that lower the loss."""
    pts = sorted(cands, key=lambda c: (c.bits, c.loss))
    best: list[Candidate] = []
    for c in pts:  # drop dominated points: more bits and no less loss
        if best and c.loss >= best[-1].loss:
            continue
        if best and c.bits == best[-1].bits:
            best[-1] = c
            continue
        best.append(c)
    hull: list[Candidate] = []
    for c in best:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a-c: not on the lower hull
            if (b.loss - a.loss) * (c.bits - a.bits) >= (c.loss - a.loss) * (b.bits - a.bits):
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def _dp(candidates: dict[str, list[Candidate]], budget: int, resolution: int, ceil: bool = True) -> dict[str, Candidate] | None:
    import numpy as np

    names = list(candidates)
    unit = max(1, -(-budget // resolution))

    def units(bits: int) -> int:
        return -(-bits // unit) if ceil else (bits + unit // 2) // unit

    cap = budget // unit
    inf = float("inf")
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    picks = np.zeros((len(names), cap + 1), dtype=np.int16)
    for i, n in enumerate(names):
        new = np.full(cap + 1, inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for k, c in enumerate(candidates[n]):
            u = units(c.bits)
            if u > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[u:] = best[: cap + 1 - u] + c.loss
            better = cand < new
            new[better] = cand[better]
            pick[better] = k
        best, picks[i] = new, pick
    if not np.isfinite(best).any():
        return None
    b = int(np.nanargmin(np.where(np.isfinite(best), best, np.nan)))
    choice = {}
    for i in range(len(names) - 1, -1, -1):
        c = candidates[names[i]][int(picks[i, b])]
        choice[names[i]] = c
        b -= units(c.bits)
    return choice


def solve(candidates: dict[str, list[Candidate]], budget: int, resolution: int = 1 << 16) -> Solution:
    """The choice of one candidate per tensor with total bits <= ``budget`` and least total loss
    (see the module's text)."""
    if not candidates:
        raise LowbitError("nothing to choose formats for")
    for name, cs in candidates.items():
        if not cs:
            raise LowbitError(f"{name}: no candidate format")
    hulls = {n: lower_hull(cs) for n, cs in candidates.items()}
    pos = dict.fromkeys(hulls, 0)
    total = sum(h[0].bits for h in hulls.values())
    if total > budget:
        raise LowbitError(f"the budget of {budget / 8e6:.2f} MB is below the smallest choice ({total / 8e6:.2f} MB "
                          f"with the fewest-bit candidate for every tensor)")
    heap: list[tuple[float, str]] = []

    def push(n: str) -> None:
        h, i = hulls[n], pos[n]
        if i + 1 < len(h):
            gain = (h[i].loss - h[i + 1].loss) / (h[i + 1].bits - h[i].bits)
            heapq.heappush(heap, (-gain, n))

    for n in hulls:
        push(n)
    while heap:
        _, n = heapq.heappop(heap)
        h, i = hulls[n], pos[n]
        extra = h[i + 1].bits - h[i].bits
        if total + extra > budget:
            continue  # this upgrade does not fit; smaller ones of other tensors may
        total += extra
        pos[n] = i + 1
        push(n)
    choice = {n: hulls[n][pos[n]] for n in hulls}
    # sizes rounded up always fit; rounded to nearest they may (checked in bits) and lose less to rounding
    for ceil in (True, False):
        dp = _dp(candidates, budget, resolution, ceil)
        if (dp is not None and sum(c.bits for c in dp.values()) <= budget
                and sum(c.loss for c in dp.values()) < sum(c.loss for c in choice.values())):
            choice = dp
    total = sum(c.bits for c in choice.values())
    # spend what is left: the single best remaining upgrade per step, any candidate that fits
    while True:
        best: tuple[float, str, Candidate] | None = None
        for n, cs in candidates.items():
            cur = choice[n]
            for c in cs:
                d_bits = c.bits - cur.bits
                if c.loss < cur.loss and total + d_bits <= budget:
                    score = (cur.loss - c.loss) / max(d_bits, 1)
                    if best is None or score > best[0]:
                        best = (score, n, c)
        if best is None:
            break
        _, n, c = best
        total += c.bits - choice[n].bits
        choice[n] = c
    loss = sum(c.loss for c in choice.values())
    assert total == sum(c.bits for c in choice.values()) <= budget
    return Solution(choice, total, loss, budget)
