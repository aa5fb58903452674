"""The grids formats expose to calibration methods: the values a tensor's stored scales allow."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats import get_format

GRID_FORMATS = ["int4-g128", "int4-asym-g128", "int3-asym-g64", "int8-ch", "int4-asym-t", "int2-asym-g32",
                "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
                "iq4_nl", "iq4_xs", "nf4", "nf4-dq", "fp4"]


def _weights(smol_weights, name: str) -> torch.Tensor:
    w = smol_weights["blk.7.ffn_down.weight"]  # 576 x 1536: every block size divides 1536
    return w[:64].clone()


@pytest.mark.parametrize("name", GRID_FORMATS)
def test_grid_reproduces_dequantize_and_codes_roundtrip(name, smol_weights):
    fmt = get_format(name)
    w = _weights(smol_weights, name)
    w[3, :256] = 0.0  # a zero block (scale 0)
    qt = fmt.quantize(w)
    dq = fmt.dequantize(qt)
    grid = fmt.grid(qt)
    codes = grid.nearest(dq)
    # the grid's values are exactly what dequantize computes, and storing the codes changes nothing
    assert torch.equal(grid.values(codes), dq)
    assert torch.equal(fmt.dequantize(fmt.with_codes(qt, codes)), dq)
    if name == "fp4":
        return  # FP4's code book holds both +0 and -0: its codes are not unique
    # on weights without zero blocks the codes are unique: the same bytes come back
    qt = fmt.quantize(_weights(smol_weights, name))
    grid = fmt.grid(qt)
    assert bool((grid.scale != 0).all())
    again = fmt.with_codes(qt, grid.nearest(fmt.dequantize(qt)))
    for k, v in qt.parts.items():
        assert torch.equal(again.parts[k], v), k


@pytest.mark.parametrize("name", GRID_FORMATS)
def test_nearest_is_never_worse_than_the_formats_own_rounding(name, smol_weights):
    fmt = get_format(name)
    w = _weights(smol_weights, name)
    qt = fmt.quantize(w)
    grid = fmt.grid(qt)
    err_own = (fmt.dequantize(qt) - w).abs()
    err_nearest = (grid.round(w) - w).abs()
    assert bool((err_nearest <= err_own + 1e-6 * w.abs().max()).all())
    # and a column slice of the grid is the grid of those columns
    assert torch.equal(grid[5:9].round(w[:, 5:9]), grid.round(w)[:, 5:9])


def test_codes_outside_the_range_are_clamped():
    fmt = get_format("int4-asym-g32")
    w = torch.randn(4, 64)
    qt = fmt.quantize(w)
    grid = fmt.grid(qt)
    q = grid.nearest(w * 10)
    assert int(q.min()) >= grid.qmin and int(q.max()) <= grid.qmax


@pytest.mark.parametrize("name", ["int4-asym-g128", "int3-g64", "q4_0", "q5_1", "q4_k", "q6_k", "iq4_xs", "nf4"])
def test_join_columns_equals_quantizing_the_whole(name, smol_weights):
    """Formats whose scales come from each group alone give the same tensor quantized in slices."""
    fmt = get_format(name)
    w = smol_weights["blk.0.attn_q.weight"][:, :512].clone()  # 576 x 512
    assert fmt.joinable
    step = max(fmt.scale_group, 128)
    pieces = [fmt.quantize(w[:, a : a + step]) for a in range(0, 512, step)]
    whole = fmt.quantize(w)
    joined = fmt.join_columns(pieces)
    assert joined.shape == whole.shape
    assert torch.equal(fmt.dequantize(joined), fmt.dequantize(whole))


def test_ragged_int_groups_join():
    fmt = get_format("int4-asym-g128")
    w = torch.randn(8, 576)
    pieces = [fmt.quantize(w[:, a : min(576, a + 128)]) for a in range(0, 576, 128)]
    assert torch.equal(fmt.dequantize(fmt.join_columns(pieces)), fmt.dequantize(fmt.quantize(w)))


@pytest.mark.parametrize("name", ["int4-asym-g128", "int4-g64", "int8", "int3-asym-g32"])
def test_int_codes_read_back_what_with_codes_stored(name, smol_weights):
    fmt = get_format(name)
    qt = fmt.quantize(_weights(smol_weights, name))
    grid = fmt.grid(qt)
    codes = fmt.codes(qt)
    assert int(codes.min()) >= grid.qmin and int(codes.max()) <= grid.qmax
    assert torch.equal(grid.values(codes), fmt.dequantize(qt))
    shifted = (codes + 1).clamp(grid.qmin, grid.qmax)
    assert torch.equal(fmt.codes(fmt.with_codes(qt, shifted)), shifted)
