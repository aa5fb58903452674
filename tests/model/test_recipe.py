"""The recipe (scheme + method + imatrix + output, parsed and checked once), the method registry and
the one verb that applies a recipe: the same codes as the entry points it dispatches to."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.model.calibrate import CalibConfig, calibrate_quantize
from lowbit.model.methods import Method, get_method, list_methods, register_method
from lowbit.model.policy import TensorChoice
from lowbit.model.quantize import QuantLinear, quantize_model
from lowbit.model.recipe import Recipe, quantize


def test_parse_gives_scheme_method_imatrix_and_label():
    r = Recipe.parse("Q3_K_M+GPTQ")
    assert r.scheme.file_type is not None and r.scheme.name == "q3_k_m"
    assert r.method.name == "gptq" and r.method.layerwise and not r.imatrix
    assert r.label == "q3_k_m+gptq" and Recipe.parse(r.label) == r
    r = Recipe.parse("q4_k_m+imatrix")
    assert r.method.name == "rtn" and r.imatrix and not r.needs_calibration
    r = Recipe.parse("w8a8+smoothquant=0.8")
    assert r.scheme.act is not None and r.method.name == "smoothquant" and r.alpha == 0.8
    assert r.label == "w8a8+smoothquant=0.8" and r.needs_calibration
    assert Recipe.parse("w8a8-static").needs_calibration and not Recipe.parse("w8a8").needs_calibration
    assert Recipe.parse("int4-g128", method="awq").label == "int4-g128+awq"
    assert Recipe.parse("w4a4+smoothquant=auto").alpha is None


@pytest.mark.parametrize("text, method, imatrix, output, message", [
    ("int4-g128+gtpq", None, False, None, "did you mean 'gptq'"),
    ("int4-g128", "smoothquant", False, None, "SmoothQuant smooths activations"),
    ("w8a8", "gptq", False, None, "its methods are rtn, smoothquant and qat, not gptq"),
    ("q4_k_m+gptq+imatrix", None, False, None, "the importance matrix is for round-to-nearest"),
    ("w8a8", None, True, None, "weight formats that take one"),
    ("w8a8+smoothquant=1.5", None, False, None, "alpha must be a number in [0, 1]"),
    ("nf4", None, False, "gguf", "has no GGUF type"),
    ("w8a8", None, False, "gguf", "GGUF files cannot describe"),
    ("q4_k_m+quip", None, False, "gguf", "rotated layers cannot go into a GGUF file"),
    ("int4-g128+quip", None, False, "gptq", "--out-format gptq writes a directory of a weight-only model"),
    ("nonsense", None, False, None, "unknown format 'nonsense'"),
])
def test_parse_refuses_what_cannot_work_in_one_line(text, method, imatrix, output, message):
    with pytest.raises(LowbitError) as exc:
        Recipe.parse(text, method=method, imatrix=imatrix, output=output)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_the_registry_declares_every_method():
    names = list_methods()
    assert names[0] == "rtn" and set(names) >= {"rtn", "gptq", "awq", "quip", "spqr", "smoothquant", "qat"}
    for n in names:
        m = get_method(n)
        assert m.name == n and m.description and (m.weights or m.activations)
    assert [n for n in names if get_method(n).streams] == ["gptq", "awq"]
    assert not get_method("quip").plain_layers and get_method("rtn").takes_imatrix
    with pytest.raises(LowbitError, match="did you mean 'spqr'"):
        get_method("sqpr")
    with pytest.raises(ValueError):
        register_method(get_method("gptq"))  # names are unique


def test_the_cli_offers_the_registered_methods():
    import subprocess
    import sys

    # a fresh process: tests here register methods of their own after the CLI was imported
    code = ("from lowbit.cli import METHOD_CHOICES; from lowbit.model.methods import list_methods; "
            "print(','.join(METHOD_CHOICES)); print(','.join(list_methods()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1] and out[0].split(",")[:5] == ["rtn", "gptq", "awq", "quip", "spqr"]


def test_check_plan_asks_each_method_what_it_produces():
    plan = {"model.layers.0.self_attn.q_proj.weight": TensorChoice("int3-g16", True),
            "model.embed_tokens.weight": TensorChoice("fp8-e4m3", True)}  # not a linear layer: not asked
    Recipe.parse("int3-g16+gptq").check_plan(plan)
    with pytest.raises(LowbitError, match="spqr format"):
        Recipe.parse("int3-g16+spqr").check_plan(plan)
    with pytest.raises(LowbitError, match="exposes its grid; fp8-e4m3 does not"):
        Recipe.parse("fp8-e4m3+gptq").check_plan({"model.layers.0.mlp.up_proj.weight": TensorChoice("fp8-e4m3", True)})


def test_a_new_method_is_one_registration(small):
    class Halve(Method):  # a toy method: round-to-nearest of half the weight, to see the dispatch reach it
        name = "halve-test"
        description = "test only"
        calibrated = False

        def run(self, model, scheme, inputs):  # type: ignore[no-untyped-def]
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, torch.nn.Linear) and m is not model.lm_head:
                        m.weight.mul_(0.5)
            return quantize_model(model, scheme.name, progress=False), {"halved": True}

    register_method(Halve())
    m = copy.deepcopy(small.model)
    report = quantize(m, Recipe.parse("int8-ch+halve-test"))
    assert report.measured == {"halved": True}
    w = small.model.model.layers[0].mlp.up_proj.weight.detach()
    fmt = get_format("int8-ch")
    assert torch.equal(m.model.layers[0].mlp.up_proj.dequantized_weight(), fmt.roundtrip(0.5 * w))


def test_quantize_gives_the_codes_of_the_entry_points(small, calib_chunks):
    a, b = copy.deepcopy(small.model), copy.deepcopy(small.model)
    ra = quantize(a, "int4-g128", progress=False)
    rb = quantize_model(b, "int4-g128", progress=False)
    assert ra.tensors == rb.tensors
    cfg = CalibConfig(method="gptq", n_samples=4, seq_len=64, batch_size=2)
    a, b = copy.deepcopy(small.model), copy.deepcopy(small.model)
    ra = quantize(a, Recipe.parse("int4-g128+gptq", calib=cfg), chunks=calib_chunks[:4, :64], progress=False)
    rb, logs = calibrate_quantize(b, "int4-g128", calib_chunks[:4, :64], cfg, progress=False)
    assert [t.name for t in ra.tensors] == [t.name for t in rb.tensors] and len(ra.logs) == len(logs) > 0
    # the same codes, up to the rare tie that float32 rounding in two runs of the BLAS resolves apart
    pairs = [(m, dict(b.named_modules())[n]) for n, m in a.named_modules() if isinstance(m, QuantLinear)]
    assert len(pairs) == 21 and all(isinstance(q, QuantLinear) for _, q in pairs)
    differ = sum(int((p.fmt.codes(p.qtensor) != q.fmt.codes(q.qtensor)).sum()) for p, q in pairs)
    assert differ <= 1e-4 * sum(p.in_features * p.out_features for p, _ in pairs)
    with pytest.raises(LowbitError, match="needs calibration text"):
        quantize(copy.deepcopy(small.model), "int4-g128+gptq")


@pytest.fixture(scope="module")
def calib_chunks(smol):
    from lowbit.eval.data import calibration_text
    from lowbit.model.imatrix import imatrix_chunks

    return imatrix_chunks(smol, calibration_text(), n_ctx=256, max_chunks=8)
