"""AWQ, SpQR and QuIP-style incoherence processing: each beats round-to-nearest on real layers;
rotations are exactly undone; SpQR counts its outliers' bits."""

from __future__ import annotations

import pytest
import torch

from lowbit.algorithms.awq import AWQConfig, search_clip, search_scales
from lowbit.algorithms.gptq import GPTQConfig
from lowbit.algorithms.hessian import InputStats
from lowbit.algorithms.rotation import Rotation, hadamard_factors, paley_hadamard, rotate_hessian, rotate_weight
from lowbit.algorithms.spqr import SpQRConfig, spqr_quantize
from lowbit.errors import FormatError
from lowbit.formats import get_format
from lowbit.model.rotated import RotatedQuantLinear, quip_quantize


def _stats(x: torch.Tensor) -> InputStats:
    st = InputStats(x.shape[1])
    st.add(x)
    return st


def _out_err(x: torch.Tensor, dw: torch.Tensor) -> float:
    return float(((x @ dw.t()) ** 2).sum())


# ---- rotations ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [12, 20, 28, 36, 44, 60, 140])
def test_paley_matrices_are_hadamard(n):
    h = paley_hadamard(n)
    assert h is not None and set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [576, 192, 1536, 4096, 8960, 11008, 100, 7])
def test_rotations_are_orthogonal_and_exactly_undone(n):
    r = Rotation(n, seed=5)
    x = torch.randn(3, 4, n, dtype=torch.float64)
    if n <= 1536:  # the dense matrix of the larger ones costs more than it proves
        R = r.matrix()
        assert torch.allclose(R @ R.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(r.apply(x), x @ R.t(), atol=1e-12)
    y = r.apply(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)  # orthogonal: lengths kept
    assert torch.allclose(r.apply_inverse(y), x, atol=1e-12)
    assert torch.allclose((r.apply(x[0]) * r.apply(x[1])).sum(-1), (x[0] * x[1]).sum(-1), atol=1e-9)  # and angles
    if n in (576, 1536, 8960):  # SmolLM2's and Qwen2.5-1.5B's widths have true Hadamard transforms
        assert r.kind.startswith("Hadamard") and hadamard_factors(n) is not None
    assert Rotation(n, seed=5).signs.equal(r.signs) and not Rotation(n, seed=6).signs.equal(r.signs)


def test_rotated_layer_is_the_original_layer_in_full_precision():
    """With the weight stored in FP32 ('f32' grid, no rounding) the rotated layer computes exactly
    x W^T + b, in float64 to rounding error."""
    torch.manual_seed(0)
    w = torch.randn(192, 576, dtype=torch.float64)
    b = torch.randn(192, dtype=torch.float64)
    r_in, r_out = Rotation(576, 1), Rotation(192, 2)
    wr = rotate_weight(w, r_out, r_in)
    fmt = get_format("f32")
    qt = fmt.quantize(wr.float())
    mod = RotatedQuantLinear(qt, b, 1, 2)
    x = torch.randn(5, 576, dtype=torch.float64)
    # the layer's own input and output rotations around the exact rotated weight (float64)
    y = mod.kernel_output(mod.kernel_input(x) @ wr.t()) + b
    assert torch.allclose(y, x @ w.t() + b, atol=1e-10)
    # and its forward pass, on its kernel with the weight stored in FP32
    assert torch.allclose(mod(x.float()).double(), x @ w.t() + b, atol=1e-3)
    h = x.t() @ x
    hr = rotate_hessian(h, r_in)
    xr = r_in.apply(x)
    assert torch.allclose(hr, xr.t() @ xr, atol=1e-9)


def test_quip_beats_round_to_nearest_on_real_layers(smol_inputs):
    class Cfg:
        gptq = GPTQConfig()

    for key in ("q", "down"):
        w, x_cal, x_held = smol_inputs[key]
        for name in ("int3-asym-g128", "int2-asym-g128"):
            fmt = get_format(name)
            mod, err, rtn, extra = quip_quantize(w, _stats(x_cal).hessian(), fmt, None, Cfg(), seed=3)
            assert err < rtn
            with torch.inference_mode():
                y = mod(x_held)
            e_quip = float(((y - x_held @ w.t()) ** 2).sum())
            # down_proj's 1536 inputs overfit more on these ~10k calibration tokens than q_proj's 576
            assert e_quip < (0.8 if key == "q" else 1.0) * _out_err(x_held, fmt.roundtrip(w) - w), (key, name)


# ---- AWQ ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["int4-asym-g128", "int3-asym-g128", "q4_0"])
def test_awq_scales_and_clipping_beat_round_to_nearest(name, smol_inputs):
    fmt = get_format(name)
    gains = []
    for key in ("q", "down"):
        w, x_cal, x_held = smol_inputs[key]
        st = _stats(x_cal)
        s, alpha, loss, base = search_scales([w], [fmt], st.mean_abs(), st.hessian(), AWQConfig())
        assert loss <= base and s.shape == (w.shape[1],) and bool((s > 0).all())
        ws = w * s
        h_scaled = st.hessian().float() / (s[:, None] * s[None, :])
        qt = fmt.quantize(ws)
        if name.startswith("int"):
            qt = fmt.quantize_clipped(ws, search_clip(ws, fmt, h_scaled))
        # the layer computes (x / s) Q(W s)^T; compare with x W^T on held-out tokens
        err_awq = float(((((x_held / s) @ fmt.dequantize(qt).t()) - x_held @ w.t()) ** 2).sum())
        # where no scale helps on the calibration data AWQ keeps s = 1 (alpha 0): never worse than RTN
        gains.append(err_awq / _out_err(x_held, fmt.roundtrip(w) - w))
        assert gains[-1] <= 1.0 + 1e-6, (key, alpha)
    assert min(gains) < 0.9, gains


def test_clipping_ratios_lie_in_the_searched_range(smol_inputs):
    w, x_cal, _ = smol_inputs["q"]
    fmt = get_format("int4-asym-g128")
    ratio = search_clip(w, fmt, _stats(x_cal).hessian(), AWQConfig())
    assert ratio.shape == (w.shape[0], 5)  # 576 columns: 4 groups of 128 and one of 64
    assert float(ratio.min()) >= 0.55 - 1e-6 and float(ratio.max()) == 1.0 and float(ratio.min()) < 1.0  # 1, 0.95, ..., 0.55


# ---- SpQR ---------------------------------------------------------------------------------
def test_spqr_beats_gptq_free_rounding_and_counts_its_outliers(smol_inputs):
    fmt = get_format("spqr3-g16")
    for key in ("q", "down"):
        w, x_cal, x_held = smol_inputs[key]
        res = spqr_quantize(w, _stats(x_cal).hessian(), fmt, SpQRConfig(outlier_fraction=0.01))
        rows, cols = w.shape
        assert 0.005 * w.numel() < res.outliers < 0.02 * w.numel()
        # bits: codes + statistics + 32 per outlier + a row pointer per row
        assert fmt.tensor_bits(res.qtensor) == fmt.storage_bits((rows, cols)) + 32 * res.outliers + 32 * rows
        dq = fmt.dequantize(res.qtensor)
        idx = res.qtensor.parts["out_idx"].long()
        # outliers decode to their stored FP16 values, which the grid of their group could not hold
        assert torch.equal(dq.reshape(-1)[idx], res.qtensor.parts["out_val"].float())
        grid_vals = fmt.grid(res.qtensor).round(dq).reshape(-1)[idx]
        assert float((grid_vals - dq.reshape(-1)[idx]).abs().mean()) > 0
        assert res.error < res.rtn_error
        assert _out_err(x_held, dq - w) < (0.8 if key == "q" else 1.0) * _out_err(x_held, fmt.roundtrip(w) - w), key


def test_spqr_statistics_are_three_bit_and_bits_per_weight():
    fmt = get_format("spqr3")
    assert fmt.name == "spqr3-g16"
    # 3-bit codes + 2 x 3-bit statistics per 16 weights + 4 FP16 per 16 x 16 block
    assert fmt.bits_per_weight((4096, 4096)) == pytest.approx(3 + 6 / 16 + 64 / 256)
    w = torch.randn(32, 64)
    qt = fmt.quantize(w)
    st = qt.parts["stats"]
    assert st.dtype == torch.float16 and st.shape == (4, 4, 2)
    err = (fmt.dequantize(qt) - w).pow(2).mean() / w.pow(2).mean()
    assert err < 0.05
    with pytest.raises(FormatError, match="spqr"):
        spqr_quantize(w, torch.eye(64), get_format("int3-g16"))
