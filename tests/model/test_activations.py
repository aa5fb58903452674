"""Activation quantization: integer and FP8 products against float64 references, static observers,
LLM.int8()'s outlier path, SmoothQuant's exact folding, and quantization-aware training."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.algorithms.observers import Observer
from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.formats.activations import (
    quantize_per_token,
    quantize_per_token_fp8,
    quantize_static,
    static_params,
)
from lowbit.model.actquant import (
    ActConfig,
    FP8ActLinear,
    IntActLinear,
    LLMInt8Linear,
    int_matmul,
    outlier_report,
    quantize_act_model,
    smooth_model,
)
from lowbit.model.actscheme import parse_act_scheme

EPS32 = torch.finfo(torch.float32).eps


def _layer(out_f: int, in_f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[:, 3] *= 8  # an input column with large weights
    b = torch.randn(out_f, generator=g) * 0.1
    return w, b


def _inputs(tokens: int, in_f: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_f, generator=g)
    x[:, 5] *= 20  # an outlier feature, as LLM activations have
    return x


@pytest.mark.parametrize(("bits", "shape", "tokens"), [(8, (96, 160), 37), (4, (64, 256), 5), (8, (200, 576), 1)])
def test_integer_products_equal_a_float64_reference(bits, shape, tokens):
    w, b = _layer(*shape, seed=bits + tokens)
    x = _inputs(tokens, shape[1], seed=tokens)
    qt = get_format(f"int{bits}-ch").quantize(w)
    layer = IntActLinear(qt, b, a_bits=bits)
    ac = quantize_per_token(x, bits)
    qmax = 2 ** (bits - 1) - 1
    assert int(ac.codes.abs().max()) == qmax  # each row's absmax lands on the grid's end
    wc = layer.w_codes_t.to(torch.float64)
    acc = int_matmul(ac.codes, layer.w_codes_t)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.to(torch.float64), ac.codes.to(torch.float64) @ wc)  # integer products are exact
    y = layer(x)
    sx, sw = ac.scale.to(torch.float64), layer.w_scale.to(torch.float64)[None, :]
    ref = sx * sw * (ac.codes.to(torch.float64) @ wc) + b.to(torch.float64)
    # float32 conversion of the int32 sum, two scalings and the bias: at most 2 roundings' worth each
    bound = 2 * EPS32 * (sx * sw * (ac.codes.to(torch.float64).abs() @ wc.abs()) + b.abs().to(torch.float64))
    assert bool(((y.to(torch.float64) - ref).abs() <= bound).all())
    # and the layer approximates the full-precision product
    full = x.double() @ w.double().t() + b.double()
    rel = float((y.double() - full).norm() / full.norm())
    assert rel < (0.05 if bits == 8 else 0.6), rel  # coarse: feature 5 is a 20x outlier


def test_static_zero_point_arithmetic_matches_the_reference():
    w, b = _layer(48, 128, seed=1)
    x = _inputs(33, 128, seed=2) + 0.7  # not centred: the zero point matters
    lo, hi = float(x.min()), float(x.max())
    scale, zero = static_params(lo, hi, 8)
    assert zero != 0
    assert float(quantize_static(torch.zeros(1, 1), scale, zero).dequantize()) == 0.0  # zero is exact
    layer = IntActLinear(get_format("int8-ch").quantize(w), b, 8, static=(scale, zero))
    ac = quantize_static(x, scale, zero, 8)
    wc = layer.w_codes_t.to(torch.float64)
    centred = ac.codes.to(torch.float64) - zero
    ref = scale * layer.w_scale.to(torch.float64)[None, :] * (centred @ wc) + b.to(torch.float64)
    bound = 2 * EPS32 * (scale * layer.w_scale.to(torch.float64)[None, :] * (centred.abs() @ wc.abs()) + b.abs().double())
    y = layer(x).to(torch.float64)
    assert bool(((y - ref).abs() <= bound).all())


def test_fp8_products_within_float32_accumulation_bound():
    w, b = _layer(64, 320, seed=3)
    x = _inputs(19, 320, seed=4)
    qt = get_format("fp8-e4m3-ch").quantize(w)
    layer = FP8ActLinear(qt, b)
    ac = quantize_per_token_fp8(x, "e4m3")
    a64 = ac.codes.to(torch.float64)
    w64 = layer.w_dec_t.to(torch.float64)
    sx, sw = ac.scale.to(torch.float64), layer.w_scale.to(torch.float64)[None, :]
    ref = sx * sw * (a64 @ w64) + b.double()
    k = x.shape[1]
    bound = (k + 3) * EPS32 * (sx * sw * (a64.abs() @ w64.abs()) + b.abs().double())
    y = layer(x).to(torch.float64)
    assert bool(((y - ref).abs() <= bound).all())
    rel = float((y - (x.double() @ w.double().t() + b.double())).norm() / (x.double() @ w.double().t()).norm())
    assert rel < 0.08, rel


def test_llm_int8_routes_exactly_the_features_over_the_threshold():
    w, b = _layer(40, 64, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 64, generator=g).clamp(-4, 4)
    x[5, 3] = 7.0
    x[0, 17] = -6.5
    x[2, 9] = 6.0  # at the threshold, not over it: stays in int8
    x[4, 40] = 6.0001
    layer = LLMInt8Linear(get_format("int8-ch").quantize(w), b, threshold=6.0)
    y = layer(x)
    assert layer.last_outliers.tolist() == [3, 17, 40]
    assert layer.outlier_fraction == pytest.approx(3 / 64)
    # reference decomposition: int8 part without the outlier columns, FP16 part with them
    cols = torch.tensor([3, 17, 40])
    reg = x.clone()
    reg[:, cols] = 0
    ac = quantize_per_token(reg, 8)
    int_part = ac.scale.double() * layer.w_scale.double()[None, :] * (ac.codes.double() @ layer.w_codes_t.double())
    w16 = get_format("int8-ch").roundtrip(w).to(torch.float16).double()
    fp_part = x[:, cols].to(torch.float16).double() @ w16[:, cols].t()
    ref = int_part + fp_part + b.double()
    assert float((y.double() - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    # without outliers it is exactly W8A8 with dynamic per-token activations
    x2 = x.clamp(-5, 5)
    plain = IntActLinear(get_format("int8-ch").quantize(w), b, 8)
    assert torch.equal(layer(x2), plain(x2)) and layer.last_outliers.numel() == 0
    assert layer.calls == 2 and layer.outlier_fraction == pytest.approx(3 / 128)
    assert layer.ever.sum() == 3


def test_observers_choose_ranges_as_documented():
    g = torch.Generator().manual_seed(7)
    data = [torch.randn(1000, 16, generator=g) for _ in range(5)]
    data[2][10, 4] = 80.0  # one outlier
    mm, pct, mse = Observer("minmax"), Observer("pct", percentile=99.9), Observer("mse")
    for d in data:
        for o in (mm, pct, mse):
            o.add(d)
    allv = torch.cat([d.reshape(-1) for d in data])
    assert mm.range() == (float(allv.min()), float(allv.max()))
    lo, hi = pct.range()
    assert hi < 10 and lo > -10  # the outlier is clipped away
    v = allv
    errs = {}
    for name, o in (("minmax", mm), ("mse", mse)):
        s, z = o.params()
        errs[name] = float(((quantize_static(v, s, z).dequantize() - v) ** 2).mean())
    assert errs["mse"] < errs["minmax"]
    with pytest.raises(LowbitError):
        Observer("minmax").params()
    with pytest.raises(LowbitError):
        Observer("median")


def test_observer_sample_stays_bounded_and_uniform():
    o = Observer("pct", sample=1000)
    for i in range(50):
        o.add(torch.full((4000,), float(i)))
    kept = torch.cat(o._kept)
    assert kept.numel() <= 2000
    # every batch equally likely: the sample's mean is near the mean of 0..49
    assert abs(float(kept.mean()) - 24.5) < 3


def test_scheme_names():
    s = parse_act_scheme("w8a8-static-mse")
    assert s is not None and s.static and s.observer == "mse" and s.wa == "W8A8"
    assert parse_act_scheme("w4a4").weight_format == "int4-ch"
    assert parse_act_scheme("w8a8-fp8").kind == "fp8"
    assert parse_act_scheme("llm-int8-t4.5").threshold == 4.5
    assert parse_act_scheme("int4-g128") is None and parse_act_scheme("q4_k_m") is None
    for bad in ("w9a8", "w4a4-fp8", "w8a8-fp8-static"):
        with pytest.raises(LowbitError):
            parse_act_scheme(bad)


def _tiny(arch: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128)
    if arch == "gemma3_text":
        cfg = AutoConfig.for_model(arch, num_key_value_heads=2, head_dim=16, sliding_window=32, **common)
    else:
        cfg = AutoConfig.for_model(arch, num_key_value_heads=4 if arch == "qwen2" else 2, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.rand_like(p))
    return model


@pytest.mark.parametrize("arch,alpha", [("llama", 0.5), ("qwen2", 0.5), ("gemma3_text", 0.5), ("llama", None),
                                        ("gemma3_text", None)])
def test_smoothing_leaves_the_full_precision_model_unchanged(arch, alpha):
    model = _tiny(arch).double()
    ids = torch.randint(0, 256, (2, 24))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    from lowbit.model.actquant import input_absmax

    factors = smooth_model(model, ids, alpha=alpha, sample_tokens=32)
    assert factors and all(v["max_factor"] > 0 for v in factors.values())
    if alpha is None:  # searched: each group's loss is its best, never worse than leaving it alone
        assert all(v["loss"] <= v["base_loss"] for v in factors.values())
    with torch.inference_mode():
        after = model(input_ids=ids).logits
    tol = 1e-5 if arch.startswith("gemma") else 1e-9
    assert float((after - before).abs().max()) < tol * float(before.abs().max())
    if arch != "qwen2":  # grouped-query attention: o's columns of the query heads sharing a value head share a factor
        from lowbit.model.actquant import gqa_value_tie

        tie = gqa_value_tie(model.model.layers[0])
        assert tie is not None and tie.shape == (64,) and int(tie.max()) == 31
        # smoothed only where the search may decline it
        assert ("model.layers.0.self_attn.o_proj" in factors) == (alpha is None)
    if alpha is None:
        return
    # the activations' and weights' per-channel ranges are now balanced: max|x_j| = max|w_j| (alpha 0.5);
    # checked on down_proj, whose columns no later fold touches (v -> o and up -> down rescale the rows
    # of v and up after q/k/v and gate/up were balanced)
    a1 = input_absmax(model, ["model.layers.0.mlp.down_proj"], ids)["model.layers.0.mlp.down_proj"]
    wmax = model.model.layers[0].mlp.down_proj.weight.detach().abs().amax(0)
    assert torch.allclose(a1.double(), wmax.double(), rtol=1e-4)


@pytest.fixture(scope="module")
def chunks(smol):
    from lowbit.eval.data import calibration_text, eval_text
    from lowbit.model.imatrix import imatrix_chunks

    return (imatrix_chunks(smol, calibration_text(), n_ctx=256, max_chunks=16),
            imatrix_chunks(smol, eval_text(), n_ctx=256, max_chunks=4))


def _hidden(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model.model(input_ids=ids, use_cache=False).last_hidden_state


def test_activation_schemes_on_real_layers(small, chunks):
    """SmolLM2's first three layers: every scheme runs with its integer or FP8 layers; SmoothQuant
    lowers W8A8's and W4A4's output error; static observers need calibration; LLM.int8() counts
    its outliers (SmolLM2's down_proj inputs have some, its attention inputs none)."""
    cal, held = chunks
    ref = _hidden(small.model, held)
    den = float((ref**2).mean())
    errs = {}
    for scheme, sq in [("w8a8", False), ("w8a8", True), ("w4a4", False), ("w4a4", True), ("w8a8-static-pct", False),
                       ("w8a8-fp8", False), ("llm-int8", False)]:
        m = copy.deepcopy(small.model)
        report = quantize_act_model(m, scheme, cal, ActConfig(smoothquant=sq), progress=False)
        assert len([t for t in report.tensors if t.quantized]) == 21
        kind = {"w8a8-fp8": FP8ActLinear, "llm-int8": LLMInt8Linear}.get(scheme, IntActLinear)
        assert sum(isinstance(x, kind) for x in m.modules()) == 21
        out = _hidden(m, held)
        assert torch.isfinite(out).all()
        errs[scheme + ("+sq" if sq else "")] = float(((out - ref) ** 2).mean()) / den
        if scheme == "llm-int8":
            rep = outlier_report(m)
            assert len(rep) == 21
            assert any(v["mean_fraction"] > 0 for k, v in rep.items() if "down_proj" in k)
    assert errs["w8a8+sq"] < errs["w8a8"] < 0.01
    assert errs["w4a4+sq"] < errs["w4a4"]
    assert errs["llm-int8"] < errs["w8a8"]
    with pytest.raises(LowbitError, match="calibration"):
        quantize_act_model(copy.deepcopy(small.model), "w8a8-static", None, progress=False)


def test_qat_gradients_flow_and_a_step_lowers_the_loss():
    from lowbit.model.qat import FakeQuantLinear, QATConfig, kd_loss, train, unwrap, wrap

    teacher = _tiny("llama")
    student = copy.deepcopy(teacher)
    wrap(student, "int3-asym-g32")
    fq = [m for m in student.modules() if isinstance(m, FakeQuantLinear)]
    assert len(fq) == 14
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    # straight-through: the gradient reaching the weight is that of the quantized weight
    lin = fq[0]
    x = torch.randn(5, lin.in_features)
    wq = lin.quantized_weight().clone().requires_grad_(True)
    (torch.nn.functional.linear(x, wq, lin.bias) ** 2).sum().backward()
    lin.weight.requires_grad_(True)
    (lin(x) ** 2).sum().backward()
    assert torch.allclose(lin.weight.grad, wq.grad) and float(lin.weight.grad.abs().sum()) > 0
    lin.weight.grad = None
    lin.weight.requires_grad_(False)

    def loss() -> float:
        with torch.no_grad():
            return float(kd_loss(student(input_ids=ids).logits, t_logits))

    before = loss()
    res = train(student, teacher, ids, QATConfig(steps=1, lr=1e-4, batch_size=2, warmup=0.0), progress=False)
    assert res.losses[0] == pytest.approx(before, rel=1e-5)
    after = loss()
    assert after < before, (before, after)
    # back to plain layers holding the trained weights; real quantization stores what training saw
    seen = {n: m.quantized_weight() for n, m in student.named_modules() if isinstance(m, FakeQuantLinear)}
    unwrap(student)
    assert not any(isinstance(m, FakeQuantLinear) for m in student.modules())
    from lowbit.model.quantize import QuantLinear, quantize_model

    quantize_model(student, "int3-asym-g32", progress=False)
    stored = {n: m.dequantized_weight() for n, m in student.named_modules() if isinstance(m, QuantLinear)}
    assert stored.keys() == seen.keys()
    assert all(torch.equal(stored[n], seen[n]) for n in seen)


def test_qat_lowers_held_out_error_on_real_layers(small, chunks):
    """A short distillation run at 3 bits on SmolLM2's first layers: the hidden states on held-out
    text move closer to the original than round-to-nearest's."""
    from lowbit.model.qat import QATConfig, qat_quantize
    from lowbit.model.quantize import QuantLinear, quantize_model

    cal, held = chunks
    ref = _hidden(small.model, held)
    rtn = copy.deepcopy(small.model)
    quantize_model(rtn, "int3-asym-g128", progress=False)
    ours = copy.deepcopy(small.model)
    report, res = qat_quantize(ours, small.model, "int3-asym-g128", cal,
                               QATConfig(steps=12, lr=2e-5, batch_size=2), progress=False)
    assert report.format == "int3-asym-g128+qat"
    assert sum(isinstance(m, QuantLinear) for m in ours.modules()) == 21
    assert res.losses[-1] < res.losses[0]
    e_rtn = float(((_hidden(rtn, held) - ref) ** 2).mean())
    e_qat = float(((_hidden(ours, held) - ref) ** 2).mean())
    assert e_qat < e_rtn, (e_qat, e_rtn)


def test_alpha_search_beats_no_smoothing_and_fixed_alphas_on_outlier_channels():
    """Inputs with a few huge channels: per-token int8 loses the small channels; the searched alpha's
    output error is the least over the grid, and well below no smoothing."""
    from lowbit.algorithms.smoothquant import search_alpha, smoothing_factors

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, :3] *= 60.0
    w = torch.randn(32, 64, generator=g) * 0.05
    a_fq = lambda t: quantize_per_token(t, 8).dequantize()  # noqa: E731
    wf = get_format("int8-ch")
    w_fq = lambda t: wf.dequantize(wf.quantize(t))  # noqa: E731
    s, alpha, loss, base = search_alpha(x, x.abs().amax(0), [w], a_fq, w_fq, grid=10)
    assert alpha is not None and loss < 0.5 * base
    ref = x @ w.t()
    for a in (0.0, 0.3, 0.5, 0.8, 1.0):
        sa = smoothing_factors(x.abs().amax(0), [w], a)
        err = float(((a_fq(x / sa) @ w_fq(w * sa).t() - ref) ** 2).sum())
        assert loss <= err * (1 + 1e-6)
    got = float(((a_fq(x / s) @ w_fq(w * s).t() - ref) ** 2).sum())
    assert got == pytest.approx(loss, rel=1e-5)
