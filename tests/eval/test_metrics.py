"""The perplexity method on small cases whose answers are computed independently."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.eval.metrics import Accumulator, make_chunks, scored_slice
from lowbit.eval.runner import Evaluation


class BigramModel(torch.nn.Module):
    """A fixed bigram table: the logits at a position depend on that position's token only."""

    def __init__(self, vocab: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, vocab, generator=g) * 2

    def logits(self, chunk: torch.Tensor) -> torch.Tensor:
        return self.table[chunk]


class ToyTokenizer:
    """Characters a-z as ids 1..26; 0 is BOS."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) - 96 for c in text if "a" <= c <= "z"]}


def _loaded(add_bos: bool) -> SimpleNamespace:
    return SimpleNamespace(tokenizer=ToyTokenizer(), add_bos=add_bos, bos_id=0)


def _reference_ppl(table: torch.Tensor, ids: list[int], n_ctx: int, bos: int | None) -> float:
    """llama-perplexity's loop written out token by token, in float64."""
    n_chunks = len(ids) // n_ctx
    nll, count = 0.0, 0
    for c in range(n_chunks):
        window = list(ids[c * n_ctx : (c + 1) * n_ctx])
        if bos is not None:
            window[0] = bos
        for j in range(n_ctx // 2, n_ctx - 1):
            row = table[window[j]].double()
            logz = math.log(sum(math.exp(float(v)) for v in row))
            nll += logz - float(row[window[j + 1]])
            count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("add_bos", [False, True])
def test_perplexity_matches_a_token_by_token_reference(add_bos):
    rng = np.random.default_rng(3)
    text = "".join(chr(97 + int(i)) for i in rng.integers(0, 26, 16 * 10 + 7))  # 10 chunks + tail dropped
    model = BigramModel(27, seed=1)
    loaded = _loaded(add_bos)
    ev = Evaluation(loaded, text, n_ctx=16, progress=False)
    assert ev.chunks.shape == (10, 16)  # the 7 (or 8) leftover tokens are dropped
    res = ev.run(lambda ch: model.logits(ch)[scored_slice(16)], "bigram")
    ids = ([0] if add_bos else []) + ToyTokenizer()(text)["input_ids"]
    assert res["tokens"] == 10 * 7  # positions 8..14 of each 16-token chunk are scored
    assert res["ppl"] == pytest.approx(_reference_ppl(model.table, ids, 16, 0 if add_bos else None), rel=1e-12)
    ev.close()


def test_kld_and_top_token_against_reference():
    rng = np.random.default_rng(0)
    text = "".join(chr(97 + int(i)) for i in rng.integers(0, 26, 64))
    ref_model, other = BigramModel(27, seed=1), BigramModel(27, seed=2)
    ev = Evaluation(_loaded(False), text, n_ctx=32, progress=False)
    base = ev.run(lambda ch: ref_model.logits(ch)[scored_slice(32)], "ref", as_reference=True)
    same = ev.run(lambda ch: ref_model.logits(ch)[scored_slice(32)], "same")
    assert same["kld_mean"] == pytest.approx(0.0, abs=1e-7) and same["same_top"] == 1.0
    assert same["ppl"] == pytest.approx(base["ppl"], rel=1e-6)
    diff = ev.run(lambda ch: other.logits(ch)[scored_slice(32)], "other")
    # independent KLD: explicit sum over the vocabulary for every scored position
    expect, agree, n = 0.0, 0, 0
    for ch in ev.chunks:
        for j in range(16, 31):
            p = torch.softmax(ref_model.table[ch[j]].double(), 0)
            q = torch.softmax(other.table[ch[j]].double(), 0)
            expect += float((p * (p.log() - q.log())).sum())
            agree += int(p.argmax() == q.argmax())
            n += 1
    assert diff["kld_mean"] == pytest.approx(expect / n, rel=1e-5)
    assert diff["same_top"] == pytest.approx(agree / n)
    assert diff["kld_p99"] >= diff["kld_median"] > 0
    ev.close()


def test_uniform_model_has_perplexity_vocab_size():
    acc = Accumulator()
    acc.add(torch.log_softmax(torch.zeros(100, 50).double(), -1), torch.randint(0, 50, (100,)))
    assert acc.result()["ppl"] == pytest.approx(50.0, rel=1e-12)


def test_chunking_rules():
    chunks = make_chunks(list(range(1, 1100)), 512, bos_id=0)
    assert chunks.shape == (2, 512) and chunks[0, 0] == 0 and chunks[1, 0] == 0 and chunks[1, 1] == 514
    assert scored_slice(512) == slice(256, 511)
    with pytest.raises(LowbitError, match="fewer than one context"):
        make_chunks([1, 2, 3], 512, None)
