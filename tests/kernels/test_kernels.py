"""Kernels against a float64 reference: every backend, on every format it takes, with fresh random
weights and inputs, multiplies within the bound it states; quantized layers run on them."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import get_format, list_formats
from lowbit.kernels import backends, build_kernel, get_backend

# rows not a multiple of 16 (the int4 kernel pads them); 576 columns = 512 in groups of 128 + 64
ROWS, COLS = 40, 576
BATCHES = (1, 3, 8, 17)  # the GEMV with 4, 2 and 1 weight rows per block, and the tiles


def _takes(fmt_name: str):
    fmt = get_format(fmt_name)
    try:
        w = torch.randn(ROWS, COLS) * torch.rand(ROWS, 1)  # rows of different ranges
        qt = fmt.quantize(w)
    except Exception:  # a format that does not take this shape (its block size) is not a kernel case
        return None
    return fmt, qt


def _relative(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


# the fixed formats, and instances of the families (integer, SpQR)
FORMATS = [n for n in list_formats() if "<" not in n] + [
    "int4-g128", "int4-asym-g128", "int4-g64", "int4-ch", "int3-asym-g64", "int2-g32", "int5-asym-g32",
    "int8-ch", "int8-t", "int8-g128", "int6-g64-clip", "int4-g100"]


def _cases():
    out = []
    for name in FORMATS:
        got = _takes(name)
        if got is None:
            continue
        for b in backends().values():
            if b.device in ("cpu", "any") and b.build(*got) is not None:
                out.append((b.name, name))
    return out


CASES = _cases()


def test_every_cpu_backend_is_exercised():
    used = {b for b, _ in CASES}
    assert used == {b.name for b in backends().values() if b.device in ("cpu", "any")}, used


@pytest.mark.parametrize(("backend", "name"), CASES, ids=[f"{b}-{n}" for b, n in CASES])
def test_kernel_matches_float64_reference(backend, name):
    torch.manual_seed(hash((backend, name)) % 2**31)
    fmt, qt = _takes(name)
    b = get_backend(backend)
    k = b.build(fmt, qt)
    assert k is not None and k.backend.startswith(backend.split("-2")[0])
    w = fmt.dequantize(qt).reshape(ROWS, COLS).double()
    for n in BATCHES:
        x = torch.randn(n, COLS) * 3
        ref = x.double() @ w.t()
        y = k(x)
        assert y.shape == (n, ROWS) and y.dtype == torch.float32
        assert torch.isfinite(y).all()
        assert _relative(y, ref) <= b.tolerance, (backend, name, n, _relative(y, ref))
    x3 = torch.randn(2, 5, COLS)  # leading dimensions are kept
    assert _relative(k(x3), x3.double() @ w.t()) <= b.tolerance


def test_the_fastest_backend_that_takes_a_format_is_chosen():
    """"fast" picks the fastest backend that takes a format; by default only exact ones are chosen."""
    want = {"int4-g128": "cpu-int4pack", "int4-asym-g64": "cpu-int4pack", "q4_0": "cpu-int4pack",
            "q4_1": "cpu-int4pack", "q4_k": "cpu-int4pack", "int3-asym-g64": "cpu-int4pack",
            "int8-ch": "cpu-q8dot", "q8_0": "cpu-q8dot", "q5_k": "cpu-q8dot",
            "nf4": "cpu-table", "q6_k": "cpu-table", "int4-g100": "dequant", "e8p": "cpu-e8p"}
    for name, backend in want.items():
        fmt = get_format(name)
        qt = fmt.quantize(torch.randn(32, 1024))
        assert build_kernel(fmt, qt, "fast").backend == backend, name
        exact = build_kernel(fmt, qt).backend
        assert get_backend(exact).exact, name
        # lowbit's compiled kernel takes every grid format whose scales hold over 16 columns or more
        assert exact == {"int4-g100": "dequant", "e8p": "cpu-e8p"}.get(name, "cpu-table"), (name, exact)


def test_the_compiled_kernels_are_built_and_decode_the_exact_weight():
    """The install builds lowbit's CPU kernels; their decoder gives each format's own weight (to
    float32 rounding of scale * value + base), for integer grids of 4 and 8 bits and code books."""
    from lowbit.kernels.native import cpu_kernels

    assert cpu_kernels() is not None, "lowbit's CPU kernels are not built: run bash scripts/install.sh"
    for name in ("int4-asym-g128", "q4_k", "q6_k", "q8_0", "nf4", "iq4_nl", "int8-ch"):
        fmt = get_format(name)
        w = torch.randn(48, 512) * torch.rand(48, 1)
        qt = fmt.quantize(w)
        k = build_kernel(fmt, qt)
        assert k.backend == "cpu-table", name
        ref = fmt.dequantize(qt).reshape(48, 512)
        assert torch.allclose(k.dequantize(), ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max())), name


def test_the_e8p_kernel_decodes_the_exact_lattice_points():
    """E8P codes decode in the compiled kernel (patterns, sign bits, parity, shift) to exactly the
    format's weight, one stage and two, including codes of every sign and shift pattern."""
    torch.manual_seed(0)
    for name in ("e8p", "e8p4"):
        fmt = get_format(name)
        qt = fmt.quantize(torch.randn(64, 512) * torch.rand(64, 1))
        k = build_kernel(fmt, qt)
        assert k.backend == "cpu-e8p", name
        codes = qt.parts["codes"].to(torch.int64) & 0xFFFF
        assert len(torch.unique(codes >> 8)) == 256  # every high byte (7 signs, the shift) occurs
        assert torch.equal(k.dequantize(), fmt.dequantize(qt).reshape(64, 512)), name


def test_the_integer_kernel_is_the_exact_product_of_the_input_rounded_to_int8():
    """cpu-q8dot's only approximation is the input rounded to int8 per 32 columns (scale max|x|/127):
    its product equals, to float32 rounding, the float64 product of the weight's centred codes
    ``u - levels/2`` with that rounded input plus the bases' term (shifted to match) on the exact sums,
    for 4-bit and 8-bit codes; batches above 8 rows are the exact product."""
    from lowbit.kernels.affine import table_weight

    for name in ("int4-asym-g128", "q4_k", "q5_k", "q8_0", "int8-ch", "int3-asym-g64"):
        fmt = get_format(name)
        qt = fmt.quantize(torch.randn(48, 512) * torch.rand(48, 1))
        k = get_backend("cpu-q8dot").build(fmt, qt)
        assert k is not None, name
        tw = table_weight(fmt, qt)
        w = fmt.dequantize(qt).reshape(48, 512).double()
        assert torch.allclose(k.dequantize().double(), w, rtol=1e-6, atol=1e-6 * float(w.abs().max())), name
        x = torch.randn(3, 512) * 3
        xb = x.reshape(3, 16, 32)
        d = xb.abs().amax(-1, keepdim=True) / 127
        q = torch.round(xb * torch.where(d > 0, 1 / d, torch.zeros_like(d)))
        xh = (q * d).reshape(3, 512).double()
        o = tw.levels // 2
        u, sc, bs = tw.codes.double() - o, tw.scale.double(), tw.base.double() + o * tw.scale.double()
        g = tw.group
        ref = (torch.einsum("mgc,rgc,rg->mr", xh.reshape(3, -1, g), u.reshape(48, -1, g), sc)
               + torch.einsum("mg,rg->mr", x.double().reshape(3, -1, g).sum(-1), bs))
        assert _relative(k(x), ref) < 1e-5, (name, _relative(k(x), ref))
        assert _relative(k(x), x.double() @ w.t()) > 1e-5  # it does round the input
        x17 = torch.randn(17, 512)
        assert _relative(k(x17), x17.double() @ w.t()) < 1e-5, name


def test_an_unknown_or_unfit_backend_is_one_clear_error():
    fmt = get_format("nf4")
    qt = fmt.quantize(torch.randn(32, 256))
    with pytest.raises(LowbitError, match="did you mean 'cpu-int4pack'"):
        build_kernel(fmt, qt, "cpu-int4pak")
    with pytest.raises(LowbitError, match="cpu-int4pack does not take nf4"):
        build_kernel(fmt, qt, "cpu-int4pack")


def test_quantized_layers_run_on_kernels_and_follow_their_parts(small):
    import lowbit
    from lowbit.model.quantize import QuantLinear, set_backend

    work = dataclasses.replace(small, model=copy.deepcopy(small.model))
    lowbit.quantize_model(work, "int4-g64", progress=False)
    layers = [m for m in work.model.modules() if isinstance(m, QuantLinear)]
    set_backend(work, "fast")
    x = torch.randint(0, 1000, (1, 24))
    with torch.inference_mode():
        fast = work.model(x).logits
        assert {m.kernel.backend for m in layers} == {"cpu-int4pack"}
        assert set_backend(work, "dequant") == len(layers)
        exact = work.model(x).logits
        assert {m.kernel.backend for m in layers} == {"dequant"}
    assert _relative(fast, exact.double()) < 2e-2
    assert (fast.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9
    with pytest.raises(LowbitError, match="unknown kernel backend"):
        set_backend(work, "nope")
    # new codes (what calibration methods write) reach the kernel: it is rebuilt for them
    m = layers[0]
    m.backend = "fast"
    xin = torch.randn(2, m.in_features)
    before = m(xin)
    m.q_codes = torch.zeros_like(m.q_codes)
    assert not torch.allclose(m(xin), before)


def test_gradients_flow_through_the_float_product(small):
    import lowbit
    from lowbit.model.quantize import QuantLinear

    work = dataclasses.replace(small, model=copy.deepcopy(small.model))
    lowbit.quantize_model(work, "q4_0", progress=False)
    m = next(x for x in work.model.modules() if isinstance(x, QuantLinear))
    x = torch.randn(3, m.in_features, requires_grad=True)
    m(x).sum().backward()
    ref = m.stored_weight().double().sum(0)
    assert torch.allclose(x.grad.double()[0], ref, rtol=1e-5, atol=1e-6)


def test_a_tied_output_head_runs_on_the_embeddings_codes(small):
    """Under a GGUF mix the tied token embedding is quantized: the output head keeps sharing its
    (dequantized) weight and multiplies on a kernel of its codes, within float32 rounding of the
    float product; once the weight is changed in place it takes the float product again."""
    import lowbit
    from lowbit.model.quantize import TiedQuantHead

    work = dataclasses.replace(small, model=copy.deepcopy(small.model))
    lowbit.quantize_model(work, "q8_0", progress=False)
    head, emb = work.model.get_output_embeddings(), work.model.get_input_embeddings()
    assert isinstance(head, TiedQuantHead) and head.weight is emb.weight
    x = torch.randn(3, head.in_features)
    with torch.no_grad():
        ref = x.double() @ head.weight.double().t()
        y = head(x)
    assert head.tied_kernel is not None and head.tied_kernel.backend == "cpu-table"
    assert 0 < _relative(y, ref) <= 1e-5
    assert "lm_head.weight" not in dict(work.model.named_parameters())  # still one tied parameter
    with torch.no_grad():
        emb.weight.mul_(2)
        assert torch.equal(head(x), torch.nn.functional.linear(x, emb.weight))


def test_a_head_tied_to_a_kept_fp16_embedding_reads_its_16_bits(small, tmp_path):
    """Under an integer format the tied embedding is kept, rounded to FP16: the head multiplies on the
    cpu-half kernel of those 16 bits (exact: float32 rounding of the float product), and a saved
    checkpoint loads with the same head, so both give the same logits."""
    import lowbit
    from lowbit.model.quantize import TiedQuantHead

    work = dataclasses.replace(small, model=copy.deepcopy(small.model))
    lowbit.quantize_model(work, "int4-g32", progress=False)
    head, emb = work.model.get_output_embeddings(), work.model.get_input_embeddings()
    assert isinstance(head, TiedQuantHead) and head.weight is emb.weight
    assert head.tied_kernel is not None and head.tied_kernel.backend == "cpu-half"
    x = torch.randn(3, head.in_features)
    with torch.no_grad():
        ref = x.double() @ head.weight.double().t()
        y = head(x)
    assert 0 < _relative(y, ref) <= 1e-5
    lowbit.save(work, tmp_path / "ck")
    loaded = lowbit.load_model(tmp_path / "ck")
    lhead = loaded.model.get_output_embeddings()
    assert isinstance(lhead, TiedQuantHead) and lhead.tied_kernel.backend == "cpu-half"
    ids = torch.randint(0, head.out_features, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, work.model(ids).logits)


def test_a_model_that_ran_on_its_kernels_deep_copies_and_pickles(small):
    """Built kernels (the layers' and the tied head's) go along with copy.deepcopy and pickle
    (torch.save of a whole model), and the copy computes the same logits."""
    import io

    import lowbit

    work = dataclasses.replace(small, model=copy.deepcopy(small.model))
    lowbit.quantize_model(work, "q4_0", progress=False)
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = work.model(input_ids=ids).logits
        twin = copy.deepcopy(work.model)
        buf = io.BytesIO()
        torch.save(work.model, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
        assert torch.equal(twin(input_ids=ids).logits, ref) and torch.equal(back(input_ids=ids).logits, ref)
