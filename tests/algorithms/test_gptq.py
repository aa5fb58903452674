"""GPTQ: equal to a plain unblocked reference, better than round-to-nearest on real layers."""

from __future__ import annotations

import pytest
import torch

from lowbit.algorithms.gptq import GPTQConfig, gptq_quantize, inverse_hessian_factor
from lowbit.algorithms.hessian import InputStats
from lowbit.errors import LowbitError
from lowbit.formats import get_format


def _hessian(x: torch.Tensor) -> torch.Tensor:
    st = InputStats(x.shape[1])
    st.add(x)
    return st.hessian()


def _reference_gptq(w: torch.Tensor, h: torch.Tensor, fmt, damp: float, act_order: bool) -> torch.Tensor:
    """The textbook form, in float64: quantize one column, move the not yet quantized ones by the
    optimal (OBS) update, then remove that column from the inverse Hessian by one step of Gaussian
    elimination.  Scales are those of round-to-nearest on the original weights (static groups);
    with ``act_order`` the columns go by decreasing Hessian diagonal."""
    grid = fmt.grid(fmt.quantize(w))
    W = w.double().clone()
    n = w.shape[1]
    order = torch.argsort(torch.diagonal(h), descending=True).tolist() if act_order else list(range(n))
    hd = h.double() + damp * float(torch.diagonal(h).mean()) * torch.eye(n, dtype=torch.float64)
    hinv = torch.linalg.inv(hd)
    codes = torch.empty(w.shape, dtype=torch.int64)
    for k, i in enumerate(order):
        q = grid[i].nearest(W[:, i : i + 1].float())
        codes[:, i] = q[:, 0]
        v = grid[i].values(q)[:, 0].double()
        err = (W[:, i] - v) / hinv[i, i]
        rest = order[k:]
        W[:, rest] -= err[:, None] * hinv[i, rest][None, :]
        hinv = hinv - hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return codes


@pytest.mark.parametrize(("name", "act_order"), [("int4-asym-g32", False), ("q4_0", False), ("int3-g16", False),
                                                  ("int4-asym-g32", True), ("q4_k", True)])
def test_blocked_gptq_equals_unblocked_reference(name, act_order):
    torch.manual_seed(0)
    rows, cols = 24, 256
    x = torch.randn(1000, cols) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols))  # correlated inputs
    h = _hessian(x)
    w = torch.randn(rows, cols) * 0.05
    fmt = get_format(name)
    ours = gptq_quantize(w, h, fmt, GPTQConfig(block_size=32, static_groups=True, use_imatrix=False, act_order=act_order))
    ref_codes = _reference_gptq(w, h, fmt, damp=0.01, act_order=act_order)
    ours_codes = fmt.grid(ours.qtensor).nearest(fmt.dequantize(ours.qtensor))
    same = (ours_codes == ref_codes).double().mean().item()
    assert same > 0.995, same  # float32 against float64: a rare near-tie may round the other way
    ref_dq = fmt.grid(fmt.quantize(w)).values(ref_codes)
    assert torch.allclose(fmt.dequantize(ours.qtensor), ref_dq, atol=float(ref_dq.abs().max()) * 0.3, rtol=0)


@pytest.mark.parametrize(("name", "act_order"), [("int4-asym-g128", False), ("int3-asym-g128", False), ("q4_0", False),
                                                  ("iq4_nl", False), ("nf4", False), ("int4-asym-g128", True),
                                                  ("int3-g128", True)])
def test_gptq_beats_round_to_nearest_on_real_layers(name, act_order, smol_inputs):
    fmt = get_format(name)
    for key in ("q", "down"):
        w, x_cal, x_held = smol_inputs[key]
        res = gptq_quantize(w, _hessian(x_cal), fmt, GPTQConfig(act_order=act_order))
        assert res.error < res.rtn_error
        # and on held-out activations, the layer's actual output error is lower than RTN's
        err_gptq = ((x_held @ (fmt.dequantize(res.qtensor) - w).t()) ** 2).sum()
        err_rtn = ((x_held @ (fmt.roundtrip(w) - w).t()) ** 2).sum()
        assert err_gptq < err_rtn, (key, float(err_gptq / err_rtn))


def test_gptq_on_k_quants_with_the_hessian_as_importance(smol_inputs):
    w, x_cal, x_held = smol_inputs["down"]  # 1536 columns: K-quant super-blocks fit
    for name in ("q4_k", "q3_k", "q6_k"):
        fmt = get_format(name)
        res = gptq_quantize(w, _hessian(x_cal), fmt)
        assert res.error < res.rtn_error
        dq = fmt.dequantize(res.qtensor)
        # llama.cpp reads the stored blocks: they decode (gguf-py) to what lowbit computes
        import gguf

        blocks = res.qtensor.parts["blocks"].numpy()
        ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(fmt.gguf_type))
        assert torch.equal(torch.from_numpy(ref.reshape(dq.shape)), dq)


def test_damping_is_raised_until_the_factorization_succeeds():
    h = torch.zeros(8, 8, dtype=torch.float64)
    h[0, 0] = 1.0
    h[:, 1] = h[1, :] = -1e6  # indefinite
    u, d = inverse_hessian_factor(h, 0.01, max_damp=1e12)
    assert d > 0.01 and torch.isfinite(u).all()
    with pytest.raises(LowbitError, match="singular"):
        inverse_hessian_factor(h, 0.01, max_damp=0.05)


def test_dead_inputs_and_bad_shapes():
    w = torch.randn(4, 64)
    x = torch.randn(100, 64)
    x[:, 5] = 0.0  # an input that is always zero
    res = gptq_quantize(w, _hessian(x), get_format("int4-asym-g32"))
    assert torch.isfinite(get_format("int4-asym-g32").dequantize(res.qtensor)).all()
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize(w, torch.eye(32), get_format("int4-asym-g32"))
