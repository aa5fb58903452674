"""Formats: byte equality with the references, exact bits per weight, error bounds on real weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from lowbit.errors import FormatError
from lowbit.formats import get_format, list_formats
from lowbit.formats.base import pack_bits, unpack_bits
from lowbit.formats.integer import IntFormat

LEGACY = {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1, "q8_0": T.Q8_0}
SHAPES = [(1, 32), (7, 96), (64, 576), (33, 1536)]


def _awkward(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Random weights plus the cases that trip quantizers: zero blocks, ties, constant blocks, outliers."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.001, 0.2)).astype(np.float32)
    w.reshape(-1)[:32] = 0.0
    if w.size >= 96:
        flat = w.reshape(-1)
        flat[32:64] = 0.25  # constant block
        flat[64:96] = flat[64:96].round(1)  # many ties in magnitude
        flat[70] = -flat[64:96].__abs__().max()  # negative and positive extreme of equal size
    if w.size > 200:
        w.reshape(-1)[150] = 40.0  # an outlier
    return w


@pytest.mark.parametrize("name", list(LEGACY))
@pytest.mark.parametrize("shape", SHAPES)
def test_legacy_bytes_match_gguf_and_libggml(name, shape, ggml):
    for seed in range(8):
        w = _awkward(shape, seed=seed)
        ours = get_format(name).quantize(torch.from_numpy(w)).parts["blocks"].numpy()
        assert np.array_equal(ours, ggml.quantize(int(LEGACY[name]), w)), seed
        # gguf-py picks a different sign for d (or m) of an all-zero block holding -0.0; elsewhere equal
        w = w + 0.0  # turns -0.0 into +0.0
        ours = get_format(name).quantize(torch.from_numpy(w)).parts["blocks"].numpy()
        assert np.array_equal(ours, quants.quantize(w, LEGACY[name])), seed


def test_signed_zero_block_follows_libggml(ggml):
    w = np.zeros((1, 32), dtype=np.float32)
    w[0, ::3] = -0.0
    for name, t in LEGACY.items():
        assert np.array_equal(get_format(name).quantize(torch.from_numpy(w)).parts["blocks"].numpy(), ggml.quantize(int(t), w))


def test_first_extreme_wins_when_max_and_min_tie(ggml):
    """Q4_0/Q5_0 take the sign of the first element of largest magnitude: check both orders."""
    w = np.linspace(-0.3, 0.3, 4 * 32, dtype=np.float32).reshape(4, 32)
    w[0, 3], w[0, 9] = -0.5, 0.5  # negative first
    w[1, 3], w[1, 9] = 0.5, -0.5  # positive first
    w[2, 0], w[2, 31] = -0.7, 0.7
    w[3, 0], w[3, 31] = 0.7, -0.7
    for name in ("q4_0", "q5_0"):
        ours = get_format(name).quantize(torch.from_numpy(w)).parts["blocks"].numpy()
        assert np.array_equal(ours, ggml.quantize(int(LEGACY[name]), w)), name


@pytest.mark.parametrize("name", list(LEGACY))
def test_legacy_on_real_weights(name, smol_weights, ggml):
    fmt = get_format(name)
    for tname, w in smol_weights.items():
        q = fmt.quantize(w)
        ref = ggml.quantize(int(LEGACY[name]), w.numpy())
        assert np.array_equal(q.parts["blocks"].numpy(), ref), tname
        assert np.array_equal(fmt.dequantize(q).numpy(), quants.dequantize(ref, LEGACY[name]).reshape(w.shape)), tname


EXPECTED_BPW = {
    "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5,
    "fp16": 16.0, "bf16": 16.0, "f32": 32.0,
    "nf4": 4.5, "fp4": 4.5,
    # 4 + 8/64 (absmax codes) + 32/(64*256) (second-level scales) + 32/(576*1536) (offset)
    "nf4-dq": 4 + 8 / 64 + 32 / (64 * 256) + 32 / (576 * 1536),
    "int4-g128": 4 + 16 / 128, "int4-asym-g128": 4 + (16 + 4) / 128, "int8": 8 + 16 / 1536,
    "int3-g64": 3 + 16 / 64, "int2-asym-g32": 2 + 18 / 32, "int8-t": 8 + 32 / (576 * 1536),
    "fp8-e4m3": 8 + 32 / (576 * 1536), "fp8-e5m2-ch": 8 + 32 / 1536,
}  # fmt: skip


@pytest.mark.parametrize("name,bpw", list(EXPECTED_BPW.items()))
def test_bits_per_weight_are_exact_and_match_what_is_stored(name, bpw):
    fmt = get_format(name)
    shape = (576, 1536)
    assert fmt.bits_per_weight(shape) == pytest.approx(bpw, rel=0, abs=1e-12)
    q = fmt.quantize(torch.randn(shape) * 0.02)
    assert q.nbytes() * 8 == fmt.storage_bits(shape)


# Relative squared error bounds on real SmolLM2 weights (measured values are well inside).
REL_ERR_MAX = {
    "fp16": 1e-6, "bf16": 3e-5, "fp8-e4m3": 3e-3, "fp8-e4m3-ch": 2e-3, "fp8-e5m2": 1e-2, "q8_0": 6e-5,
    "int8": 2e-4, "q5_1": 4e-3, "q5_0": 4e-3, "q4_1": 8e-3, "q4_0": 1.2e-2, "nf4": 1.2e-2, "nf4-dq": 1.2e-2,
    "fp4": 2.5e-2, "int4-g128": 2.5e-2, "int4-asym-g128": 1.6e-2, "int4-asym-g128-clip": 1.4e-2,
    "int3-asym-g64-clip": 5e-2, "int2-asym-g32-clip": 0.2,
}  # fmt: skip


def _rel(w: torch.Tensor, d: torch.Tensor) -> float:
    return float(((w.double() - d.double()) ** 2).sum() / (w.double() ** 2).sum())


@pytest.mark.parametrize("name", list(REL_ERR_MAX))
def test_roundtrip_error_on_real_weights(name, smol_weights):
    fmt = get_format(name)
    for tname, w in smol_weights.items():
        d = fmt.roundtrip(w)
        assert d.shape == w.shape and d.dtype == torch.float32
        assert torch.isfinite(d).all()
        assert _rel(w, d) < REL_ERR_MAX[name], (tname, _rel(w, d))


def test_ragged_last_group():
    w = torch.randn(3, 576)
    fmt = get_format("int4-asym-g128")
    q = fmt.quantize(w)
    assert q.parts["scale"].numel() == 3 * 5  # 4 groups of 128 and one of 64 per row
    d = fmt.dequantize(q)
    # the 64-column tail is quantized on its own range
    tail = get_format("int4-asym-g64").roundtrip(w[:, 512:].contiguous())
    assert torch.equal(d[:, 512:], tail)
    assert torch.equal(d[:, :512], get_format("int4-asym-g128").roundtrip(w[:, :512].contiguous()))
    assert fmt.storage_bits((3, 576)) == 3 * 576 * 4 + 15 * 16 + 15 * 4 + 4


def test_error_falls_with_bits_and_clipping_helps(smol_weights):
    w = smol_weights["blk.7.ffn_down.weight"]
    errs = [_rel(w, get_format(f"int{b}-asym-g64").roundtrip(w)) for b in (2, 3, 4, 5, 6, 8)]
    assert errs == sorted(errs, reverse=True)
    for b in (2, 3, 4):
        assert _rel(w, get_format(f"int{b}-asym-g64-clip").roundtrip(w)) < _rel(w, get_format(f"int{b}-asym-g64").roundtrip(w))
    # smaller groups, less error
    assert _rel(w, get_format("int4-g32").roundtrip(w)) < _rel(w, get_format("int4-g128").roundtrip(w)) < _rel(
        w, get_format("int4").roundtrip(w)) < _rel(w, get_format("int4-t").roundtrip(w))


def test_symmetric_codes_are_absmax():
    w = torch.tensor([[-1.0, 0.5, 0.25, 0.0] * 8])
    fmt = get_format("int4-g32")
    q = fmt.quantize(w)
    scale = float(torch.tensor(1 / 7).half())  # absmax / 7, stored in FP16
    assert float(q.parts["scale"][0]) == scale
    expect = torch.round(torch.tensor([-1.0, 0.5, 0.25, 0.0]) / scale) * scale
    assert torch.equal(fmt.dequantize(q)[0, :4], expect)


def test_affine_zero_point_represents_range_ends():
    w = torch.linspace(0.1, 1.7, 64).reshape(1, 64)
    fmt = get_format("int4-asym-g64")
    d = fmt.roundtrip(w)
    assert abs(float(d[0, 0]) - 0.1) < 0.11 and abs(float(d[0, -1]) - 1.7) < 0.11
    step = 1.6 / 15
    assert float((d - w).abs().max()) <= step  # half a step, plus at most half a step from rounding the zero


def test_nf4_uses_its_sixteen_levels_and_dq_is_close():
    from lowbit.formats.nf4 import DYNAMIC_MAP, NF4_LEVELS

    assert NF4_LEVELS.numel() == 16 and NF4_LEVELS[7] == 0 and NF4_LEVELS[0] == -1 and NF4_LEVELS[-1] == 1
    assert DYNAMIC_MAP.numel() == 256 and float(DYNAMIC_MAP.max()) == 1.0 and float(DYNAMIC_MAP.min()) < -0.99
    assert torch.unique(DYNAMIC_MAP).numel() == 256 and (DYNAMIC_MAP == 0).sum() == 1
    w = torch.randn(64, 256)
    d = get_format("nf4").roundtrip(w)
    blocks = w.reshape(-1, 64)
    ratio = (d.reshape(-1, 64) / blocks.abs().amax(1, keepdim=True))
    # every dequantized value is absmax times one of the 16 levels
    assert torch.isclose(ratio.unsqueeze(-1), NF4_LEVELS, atol=1e-6).any(-1).all()
    e1, e2 = _rel(w, d), _rel(w, get_format("nf4-dq").roundtrip(w))
    assert e2 < e1 * 1.02


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (5, 77), dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, 77), codes)


def test_fp8_matches_torch_float8_rounding():
    w = torch.randn(16, 64)
    fmt = get_format("fp8-e4m3-ch")
    q = fmt.quantize(w)
    scale = w.abs().amax(1, keepdim=True) / 448
    assert torch.equal(fmt.dequantize(q), (w / scale).to(torch.float8_e4m3fn).float() * scale)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(FormatError, match="unknown format 'q4_9'"):
        get_format("q4_9")
    with pytest.raises(FormatError, match="layer.x: 50 columns are not divisible by the block size 32 of q4_0"):
        get_format("q4_0").quantize(torch.zeros(2, 50), name="layer.x")
    w = torch.zeros(2, 64)
    w[1, 3] = float("nan")
    with pytest.raises(FormatError, match="w.nan: 1 NaN or Inf"):
        get_format("nf4").quantize(w, name="w.nan")
    w[1, 3] = float("inf")
    with pytest.raises(FormatError, match="NaN or Inf"):
        get_format("int4-g32").quantize(w)
    with pytest.raises(FormatError, match="unknown format 'int9-g32'"):
        get_format("int9-g32")
    with pytest.raises(FormatError, match="2 to 8 bits"):
        IntFormat(9, True, 32, False)
    with pytest.raises(FormatError, match="overflow fp16"):
        get_format("fp16").quantize(torch.full((1, 4), 1e6))


def test_calibration_and_evaluation_text_never_overlap():
    from lowbit.eval.data import calibration_text, eval_text

    ev, cal = eval_text(), calibration_text()
    assert len(ev) > 2_000_000 and len(cal) > 100_000
    titles = lambda text: {ln for ln in text.splitlines() if ln.startswith(" = ") and ln.endswith(" = ")}  # noqa: E731
    assert titles(ev) and titles(cal) and not titles(ev) & titles(cal)
    # no long passage of one appears in the other
    for i in range(0, len(cal) - 200, len(cal) // 50):
        assert cal[i : i + 200] not in ev


def test_every_listed_format_resolves():
    for name in list_formats():
        if "<" not in name:
            assert get_format(name).name == name
