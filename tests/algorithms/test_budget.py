"""The per-tensor format search under a size budget."""

from __future__ import annotations

import itertools
import random

import pytest

from lowbit.algorithms.budget import Candidate, lower_hull, solve
from lowbit.errors import LowbitError


def _instance(rng: random.Random, n: int, k: int) -> dict[str, list[Candidate]]:
    out = {}
    for t in range(n):
        size = rng.choice([1000, 4000, 9000])
        cands = []
        for j in range(k):
            bits = size * rng.choice([2, 3, 4, 5, 6, 8]) + rng.randint(0, 50)
            loss = rng.random() * size / bits
            cands.append(Candidate(f"f{j}", bits, loss))
        out[f"t{t}"] = cands
    return out


def _brute(inst: dict[str, list[Candidate]], budget: int) -> float | None:
    best = None
    for combo in itertools.product(*inst.values()):
        if sum(c.bits for c in combo) <= budget:
            loss = sum(c.loss for c in combo)
            best = loss if best is None else min(best, loss)
    return best


def test_never_over_budget_and_near_the_optimum():
    rng = random.Random(0)
    exact = trials = 0
    for _ in range(300):
        inst = _instance(rng, rng.randint(2, 5), rng.randint(2, 4))
        lo = sum(min(c.bits for c in cs) for cs in inst.values())
        hi = sum(max(c.bits for c in cs) for cs in inst.values())
        budget = rng.randint(lo, hi)
        sol = solve(inst, budget)
        assert sol.bits <= budget and sol.bits == sum(c.bits for c in sol.choice.values())
        assert set(sol.choice) == set(inst)
        opt = _brute(inst, budget)
        assert opt is not None
        # a Lagrangian solution is off the optimum by at most one tensor's largest loss step
        gap = max(max(c.loss for c in cs) - min(c.loss for c in cs) for cs in inst.values())
        assert sol.loss <= opt + gap + 1e-12
        trials += 1
        exact += abs(sol.loss - opt) < 1e-12
    assert exact / trials > 0.8, exact / trials


def test_large_budget_takes_the_least_loss_and_small_budget_is_refused():
    inst = {"a": [Candidate("q2", 200, 5.0), Candidate("q4", 400, 1.0), Candidate("q8", 800, 0.1)],
            "b": [Candidate("q2", 100, 9.0), Candidate("q4", 200, 2.0), Candidate("q8", 400, 0.5)]}
    sol = solve(inst, 10_000)
    assert {n: c.format for n, c in sol.choice.items()} == {"a": "q8", "b": "q8"}
    sol = solve(inst, 300)
    assert sol.bits == 300 and sol.choice["a"].format == "q2" and sol.choice["b"].format == "q2"
    # 200 bits more: b's upgrade saves 7 for 100 bits, a's 4 for 200; b goes first
    sol = solve(inst, 400)
    assert sol.choice["b"].format == "q4" and sol.choice["a"].format == "q2"
    with pytest.raises(LowbitError, match="below the smallest choice"):
        solve(inst, 299)


def test_hull_drops_dominated_and_non_convex_points():
    cs = [Candidate("a", 100, 10.0), Candidate("b", 200, 9.9), Candidate("c", 300, 2.0), Candidate("d", 300, 3.0),
          Candidate("e", 400, 2.5), Candidate("f", 500, 0.5)]
    assert [c.format for c in lower_hull(cs)] == ["a", "c", "f"]


def test_one_huge_tensor_does_not_trap_the_search():
    """Greedy upgrades by loss saved per bit spend the budget on small tensors and leave no room for
    the big one whose upgrade saves more in all; the dynamic programme does not fall for it."""
    inst = {"embedding": [Candidate("q4", 1000, 40.0), Candidate("q8", 2000, 0.0)]}
    for i in range(50):
        inst[f"layer{i}"] = [Candidate("q4", 10, 1.0), Candidate("q8", 20, 0.5)]
    sol = solve(inst, 2500)
    assert sol.bits <= 2500
    assert sol.choice["embedding"].format == "q8"
    assert sol.loss == pytest.approx(50.0)
