"""K-quants, IQ4 and importance-matrix quantization: byte equality with libggml, dequantization
equal to gguf-py's, exact bits per weight, and the importance matrix doing its job."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from lowbit.errors import FormatError
from lowbit.formats import get_format
from lowbit.testing.synthetic import importance_like

KQ = {"q2_k": T.Q2_K, "q3_k": T.Q3_K, "q4_k": T.Q4_K, "q5_k": T.Q5_K, "q6_k": T.Q6_K,
      "iq4_nl": T.IQ4_NL, "iq4_xs": T.IQ4_XS}  # fmt: skip
LEGACY_IM = {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1, "q8_0": T.Q8_0}
SHAPES = [(1, 256), (7, 512), (33, 1536)]


def _awkward(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Random weights of random scale plus what trips super-block quantizers: an all-zero
    super-block, a zero sub-block, a constant sub-block, ties, one-sided blocks and an outlier."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.001, 0.2)).astype(np.float32)
    flat = w.reshape(-1)
    if shape[0] > 1:
        flat[:256] = 0.0
    flat[256 % flat.size : 256 % flat.size + 16] = 0.0
    flat[32:48] = 0.125
    flat[48:80] = flat[48:80].round(1)
    flat[96:128] = np.abs(flat[96:128])  # a block with no negative values (min clamps to 0)
    flat[140] = 30.0 * flat[140:170].std() + 0.1
    return w


_imatrix = importance_like


@pytest.mark.parametrize("name", list(KQ))
@pytest.mark.parametrize("shape", SHAPES)
def test_kquant_bytes_match_libggml(name, shape, ggml):
    fmt = get_format(name)
    for seed in range(3):
        w = _awkward(shape, seed)
        for im in (None, _imatrix(shape[1], seed)):
            ours = fmt.quantize(torch.from_numpy(w), imatrix=None if im is None else torch.from_numpy(im))
            ref = ggml.quantize(int(KQ[name]), w, im)
            assert np.array_equal(ours.parts["blocks"].numpy(), ref), (seed, im is not None)
            deq = quants.dequantize(ref, KQ[name]).reshape(shape)
            assert np.array_equal(fmt.dequantize(ours).numpy(), deq), (seed, im is not None)


@pytest.mark.parametrize("name", list(LEGACY_IM))
@pytest.mark.parametrize("shape", [(5, 64), (33, 576)])
def test_legacy_types_with_imatrix_match_libggml(name, shape, ggml):
    fmt = get_format(name)
    for seed in range(3):
        w = _awkward(shape, seed)
        im = _imatrix(shape[1], seed)
        ours = fmt.quantize(torch.from_numpy(w), imatrix=torch.from_numpy(im)).parts["blocks"].numpy()
        assert np.array_equal(ours, ggml.quantize(int(LEGACY_IM[name]), w, im)), seed


def _real(smol_weights) -> dict[str, torch.Tensor]:
    """Real SmolLM2 tensors whose rows are whole super-blocks (576 columns are not: take 512)."""
    return {
        "blk.7.ffn_down.weight": smol_weights["blk.7.ffn_down.weight"],
        "blk.0.attn_q.weight[:, :512]": smol_weights["blk.0.attn_q.weight"][:, :512].contiguous(),
        "blk.29.ffn_up.weight[:, :256]": smol_weights["blk.29.ffn_up.weight"][:, :256].contiguous(),
    }


@pytest.mark.parametrize("name", list(KQ) + ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_real_weights_match_libggml_with_and_without_imatrix(name, smol_weights, ggml):
    fmt = get_format(name)
    for tname, w in _real(smol_weights).items():
        im = _imatrix(w.shape[1], 7)
        for imx in (None, im):
            q = fmt.quantize(w, imatrix=None if imx is None else torch.from_numpy(imx))
            ref = ggml.quantize(int(fmt.gguf_type), w.numpy(), imx)
            assert np.array_equal(q.parts["blocks"].numpy(), ref), (tname, imx is not None)


EXPECTED_BPW = {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625, "iq4_nl": 4.5, "iq4_xs": 4.25}


@pytest.mark.parametrize("name,bpw", list(EXPECTED_BPW.items()))
def test_bits_per_weight(name, bpw):
    fmt = get_format(name)
    shape = (64, 1536)
    assert fmt.bits_per_weight(shape) == bpw
    assert fmt.quantize(torch.randn(shape)).nbytes() * 8 == fmt.storage_bits(shape)


def _rel(w: torch.Tensor, d: torch.Tensor, col_w: torch.Tensor | None = None) -> float:
    e = (w.double() - d.double()) ** 2
    s = w.double() ** 2
    if col_w is not None:
        e, s = e * col_w.double(), s * col_w.double()
    return float(e.sum() / s.sum())


def test_error_falls_with_bits(smol_weights):
    # heavy-tailed random weights: every extra bit must pay
    g = torch.Generator().manual_seed(0)
    r = torch.randn(64, 1536, generator=g) * torch.rand(64, 1536, generator=g).pow(4) * 0.05
    errs = {n: _rel(r, get_format(n).roundtrip(r)) for n in ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]}
    assert errs["q2_k"] > errs["q3_k"] > errs["q4_k"] > errs["q5_k"] > errs["q6_k"]
    assert _rel(r, get_format("iq4_xs").roundtrip(r)) < 1.3 * errs["q4_k"]
    # the real SmolLM2 weights sit on the source file's Q4_1 grid (min + d*k per 32 weights), which
    # Q4_K/Q5_K's 32-wide sub-blocks with a min nearly reproduce: there the three top K-quants all
    # land near 3e-4 and only the 2- and 3-bit ones lose much
    w = smol_weights["blk.7.ffn_down.weight"]
    real = {n: _rel(w, get_format(n).roundtrip(w)) for n in ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]}
    assert real["q2_k"] > real["q3_k"] > real["q4_k"]
    assert max(real["q4_k"], real["q5_k"], real["q6_k"]) < 1e-3 and real["q2_k"] < 0.2


@pytest.mark.parametrize("name", ["q3_k", "q4_k", "iq4_xs", "q4_0"])
def test_imatrix_lowers_the_error_it_weights(name, smol_weights):
    """Quantizing with an importance vector lowers the importance-weighted error (what it is for)."""
    w = smol_weights["blk.7.ffn_down.weight"]
    im = torch.from_numpy(_imatrix(w.shape[1], 3))
    fmt = get_format(name)
    plain = _rel(w, fmt.roundtrip(w), im)
    weighted = _rel(w, fmt.dequantize(fmt.quantize(w, imatrix=im)), im)
    assert weighted < 0.9 * plain, (plain, weighted)


def test_bad_shapes_and_imatrix_are_refused():
    with pytest.raises(FormatError, match="576 columns are not divisible by the block size 256"):
        get_format("q4_k").quantize(torch.randn(4, 576), name="blk.0.attn_q.weight")
    with pytest.raises(FormatError, match="importance matrix has 100 entries"):
        get_format("q4_k").quantize(torch.randn(4, 256), name="t", imatrix=torch.ones(100))
    with pytest.raises(FormatError, match="NaN, Inf or negative"):
        get_format("q6_k").quantize(torch.randn(4, 256), name="t", imatrix=-torch.ones(256))
    w = torch.randn(4, 256)
    w[1, 3] = float("nan")
    with pytest.raises(FormatError, match="blk.3.ffn_up.weight: 1 NaN"):
        get_format("iq4_xs").quantize(w, name="blk.3.ffn_up.weight")


def test_best_index_int8_equals_ggml_binary_search():
    """The midpoint search equals ggml's binary search with its float32 comparison, including exact
    midpoints (ties go up), the levels themselves, values beyond the ends and tiny values."""
    from lowbit.formats.ggml_ref import best_index_int8
    from lowbit.formats.iquants import KVALUES

    vals = np.array(KVALUES, dtype=np.float32)

    def ggml(x: np.float32) -> int:
        if x <= vals[0]:
            return 0
        if x >= vals[-1]:
            return len(vals) - 1
        ml, mu = 0, len(vals) - 1
        while mu - ml > 1:
            mav = (ml + mu) // 2
            if x < vals[mav]:
                mu = mav
            else:
                ml = mav
        return mu - 1 if np.float32(x - vals[mu - 1]) < np.float32(vals[mu] - x) else mu

    rng = np.random.default_rng(0)
    mids = (vals[:-1] + vals[1:]) / 2
    xs = np.concatenate([
        rng.uniform(-200, 200, 20000), rng.standard_normal(2000) * 1e-3, vals, mids,
        np.nextafter(mids, np.float32(-1e9)), np.nextafter(mids, np.float32(1e9)), [0.0, -0.0, 1e-30, -1e-30],
    ]).astype(np.float32)
    ours = best_index_int8(torch.from_numpy(vals), torch.from_numpy(xs)).numpy()
    assert [int(i) for i in ours] == [ggml(x) for x in xs]
