"""Exports that other loaders read: compressed-tensors pack-quantized, loaded by transformers with
the compressed-tensors package, computes what lowbit computes."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.io.export_ct import export_compressed_tensors, pack_int32
from lowbit.model.quantize import quantize_model


@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_matches_the_consumers_layout(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    g = torch.Generator().manual_seed(bits)
    for shape in [(5, 64), (7, 100), (3, 32)]:
        codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, generator=g, dtype=torch.int8)
        assert torch.equal(unpack_from_int32(pack_int32(codes, bits), bits, torch.Size(shape)), codes)
        assert torch.equal(unpack_from_int32(pack_int32(codes, bits, dim=0), bits, torch.Size(shape), packed_dim=0),
                           codes)


@pytest.mark.parametrize("fmt", ["int4-g64", "int8", "int4-asym-g64"])
def test_transformers_loads_the_export_and_computes_the_same(fmt, small, tmp_path):
    import transformers
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    transformers.logging.set_verbosity_error()
    model = copy.deepcopy(small.model)
    quantize_model(model, fmt, progress=False)
    out = export_compressed_tensors(dataclasses.replace(small, model=model), tmp_path / "ct")
    kwargs = {}
    if "asym" in fmt:
        # transformers 5 + compressed-tensors 0.20 build the compressed layer with an unpacked zero
        # point and refuse packed ones (llm-compressor issue #1618); dequantizing at load works
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kwargs)
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, theirs(input_ids=ids).logits
    w_ours = model.model.layers[2].mlp.down_proj.dequantized_weight()
    w_theirs = theirs.model.layers[2].mlp.down_proj.weight.float()
    if kwargs:  # dequantized in FP16 at load time
        assert torch.allclose(w_theirs, w_ours, rtol=2**-10, atol=1e-7)
        pa, lb = torch.softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
        assert float((pa * (torch.log(pa) - lb)).sum(-1).mean()) < 1e-5
    else:
        assert torch.equal(w_theirs, w_ours)
        assert torch.allclose(a, b, atol=1e-4)


def test_export_refusals(small, tmp_path):
    model = copy.deepcopy(small.model)
    with pytest.raises(LowbitError, match="no quantized linear layers"):
        export_compressed_tensors(dataclasses.replace(small, model=model), tmp_path / "a")
    quantize_model(model, "int4-asym-g128", progress=False)  # 576 columns: a last group of 64
    with pytest.raises(LowbitError, match="not a multiple of the group size 128"):
        export_compressed_tensors(dataclasses.replace(small, model=model), tmp_path / "b")
    m2 = copy.deepcopy(small.model)
    quantize_model(m2, "nf4", progress=False)
    with pytest.raises(LowbitError, match="4- or 8-bit integer formats"):
        export_compressed_tensors(dataclasses.replace(small, model=m2), tmp_path / "c")
    assert not list(tmp_path.iterdir())


def test_gguf_imports_into_a_hugging_face_directory(smol, smol_path, tmp_path):
    from lowbit.io.hf_import import import_gguf
    from lowbit.model.load import load_model

    out = import_gguf(smol_path, tmp_path / "hf", dtype="float32", progress=False)
    back = load_model(out, progress=False)
    assert back.arch == smol.arch and back.add_bos == smol.add_bos and back.n_params == smol.n_params
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back.model(input_ids=ids).logits, smol.model(input_ids=ids).logits)
    with pytest.raises(LowbitError, match="already exists"):
        import_gguf(smol_path, out, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


@pytest.mark.parametrize("fmt", ["nf4", "nf4-dq", "fp4"])
def test_bitsandbytes_loads_the_nf4_export(fmt, small, tmp_path):
    """transformers with bitsandbytes (CPU backend) loads lowbit's NF4/FP4 as Linear4bit layers whose
    weights bitsandbytes itself dequantizes to exactly lowbit's values."""
    import bitsandbytes.functional as bnbf
    import transformers
    from transformers import AutoModelForCausalLM

    from lowbit.io.export_bnb import export_bitsandbytes

    transformers.logging.set_verbosity_error()
    model = copy.deepcopy(small.model)
    quantize_model(model, fmt, progress=False)
    out = export_bitsandbytes(dataclasses.replace(small, model=model), tmp_path / "bnb")
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for i in range(3):
        lin = theirs.model.layers[i].mlp.down_proj
        assert type(lin).__name__ == "Linear4bit"
        w = bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
        assert torch.equal(w, model.model.layers[i].mlp.down_proj.dequantized_weight())
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, theirs(input_ids=ids).logits
    # bitsandbytes' CPU path multiplies in bfloat16: close, not equal
    pa, lb = torch.softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    assert float((pa * (torch.log(pa) - lb)).sum(-1).mean()) < 1e-3


# ---- GPTQ and AWQ GEMM layouts -------------------------------------------------------------------
# The unpackers below are written from the layouts' description (not from lowbit's packer): GPTQ
# packs each output column's codes as one little-endian bit stream of 32-bit words along the inputs,
# qzeros likewise along the outputs, stored "v1" (zero minus one: the word minus a 1 in every field
# for 2/4/8 bits, per field for 3 bits); AWQ interleaves eight output columns per word.  lowbit's
# integer formats keep their scales in FP16, so the FP16 scales of both layouts are exact and the
# decoded weights must equal lowbit's dequantized weights bit for bit.


def _words_u64(w: torch.Tensor) -> torch.Tensor:
    return w.to(torch.int64) & 0xFFFFFFFF


def _stream_fields(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """[n_words, cols] uint32 words (as int64) -> [n, cols]: field i at bit i*bits of the column's stream."""
    out = []
    for i in range(n):
        p = i * bits
        w, off = p // 32, p % 32
        v = words[w] >> off
        if off + bits > 32:
            v = v | (words[w + 1] << (32 - off))
        out.append(v & ((1 << bits) - 1))
    return torch.stack(out)


def _gptq_decode(t: dict[str, torch.Tensor], name: str, bits: int) -> torch.Tensor:
    qweight, qzeros, scales, g_idx = (t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
    n_in, n_out = g_idx.numel(), scales.shape[1]
    assert qweight.dtype == qzeros.dtype == g_idx.dtype == torch.int32 and scales.dtype == torch.float16
    assert qweight.shape == (-(-n_in * bits // 32), n_out)
    q = _stream_fields(_words_u64(qweight), bits, n_in)  # [in, out]
    if bits == 3:
        z = (_stream_fields(_words_u64(qzeros).t(), bits, n_out).t() + 1) % 8
    else:
        ones = sum(1 << (k * bits) for k in range(32 // bits))
        z = _stream_fields(((_words_u64(qzeros) + ones) & 0xFFFFFFFF).t(), bits, n_out).t()  # [groups, out]
    gi = g_idx.long()
    return ((q - z[gi]).float() * scales.float()[gi]).t()  # [out, in]


def _awq_decode(t: dict[str, torch.Tensor], name: str, group: int) -> torch.Tensor:
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def unpack(w: torch.Tensor) -> torch.Tensor:
        w = _words_u64(w)
        out = torch.empty(w.shape[0], w.shape[1] * 8, dtype=torch.int64)
        for k in range(8):  # nibble k holds column order[k] of each eight
            out[:, order[k] :: 8] = (w >> (4 * k)) & 15
        return out

    q, z, s = unpack(t[f"{name}.qweight"]), unpack(t[f"{name}.qzeros"]), t[f"{name}.scales"]
    assert s.dtype == torch.float16
    gi = torch.arange(q.shape[0]) // group
    return ((q - z[gi]).float() * s.float()[gi]).t()


def _load_dir(out):  # type: ignore[no-untyped-def]
    import json

    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors")), json.loads((out / "config.json").read_text())


def _check_decoded(model, tensors, decode) -> int:  # type: ignore[no-untyped-def]
    from lowbit.model.quantize import QuantLinear

    n = 0
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(decode(tensors, name), m.dequantized_weight()), name
            n += 1
    return n


def _one_layer(small):  # type: ignore[no-untyped-def]
    """A copy of ``small`` cut to its first decoder layer (calibration on 2 shared cores is slow)."""
    model = copy.deepcopy(small.model)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    return dataclasses.replace(small, model=model)


@pytest.mark.parametrize("fmt", ["int4-g64", "int4-asym-g64", "int8-ch", "int8-asym-g64", "int3-asym-g64",
                                 "int2-g32"])
def test_gptq_export_decodes_to_lowbits_weights(fmt, small, tmp_path):
    import json

    from lowbit.formats import get_format
    from lowbit.io.export_gptq import export_gptq

    f = get_format(fmt)
    model = copy.deepcopy(small.model)
    quantize_model(model, fmt, progress=False)
    out = export_gptq(dataclasses.replace(small, model=model), tmp_path / "gptq")
    tensors, config = _load_dir(out)
    qc = config["quantization_config"]
    assert qc == json.loads((out / "quantize_config.json").read_text())
    assert (qc["quant_method"], qc["checkpoint_format"], qc["bits"], qc["sym"], qc["desc_act"]) == (
        "gptq", "gptq", f.bits, f.symmetric, False)
    assert qc["group_size"] == (f.group if f.group > 0 else -1)
    assert _check_decoded(model, tensors, lambda t, n: _gptq_decode(t, n, f.bits)) == 21
    assert "model.layers.0.mlp.down_proj.weight" not in tensors and "model.norm.weight" in tensors
    if fmt == "int4-asym-g64":
        assert tensors["model.layers.0.self_attn.q_proj.scales"].shape == (9, 576)
        assert tensors["model.layers.0.self_attn.q_proj.qzeros"].shape == (9, 576 * 4 // 32)


def test_gptq_export_of_an_act_order_gptq_model(small, tmp_path):
    """lowbit's GPTQ with act-order keeps the columns in their original order with static groups:
    the export's g_idx is i // group_size, desc_act false, and the weights decode exactly."""
    from lowbit.algorithms.gptq import GPTQConfig
    from lowbit.io.export_gptq import export_gptq
    from lowbit.model.calibrate import CalibConfig, calibrate_quantize

    ids = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(3))
    loaded = _one_layer(small)
    cfg = CalibConfig(method="gptq", batch_size=4, gptq=GPTQConfig(act_order=True, damp=0.05))
    calibrate_quantize(loaded, "int4-asym-g64", ids, cfg, progress=False)
    out = export_gptq(loaded, tmp_path / "gptq")
    tensors, config = _load_dir(out)
    assert config["quantization_config"]["desc_act"] is False
    assert torch.equal(tensors["model.layers.0.mlp.down_proj.g_idx"], torch.arange(1536, dtype=torch.int32) // 64)
    assert _check_decoded(loaded.model, tensors, lambda t, n: _gptq_decode(t, n, 4)) == 7
    # a plain transformers model with the decoded weights computes what lowbit's model computes
    plain = copy.deepcopy(_one_layer(small).model)
    with torch.no_grad():
        for name, m in plain.named_modules():
            if f"{name}.qweight" in tensors:
                m.weight.copy_(_gptq_decode(tensors, name, 4))
            elif isinstance(m, torch.nn.Embedding | torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
                m.weight.copy_(tensors[f"{name}.weight"].float())
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = loaded.model(input_ids=ids).logits, plain(input_ids=ids).logits
    # the export keeps the embedding and norms in FP16
    pa, lb = torch.softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    assert float((pa * (torch.log(pa) - lb)).sum(-1).mean()) < 1e-4


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_awq_export_decodes_to_lowbits_weights(method, small, tmp_path):
    from lowbit.io.export_awq import export_awq
    from lowbit.model.calibrate import CalibConfig, calibrate_quantize

    loaded = _one_layer(small)
    ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(4))
    calibrate_quantize(loaded, "int4-asym-g64", ids, CalibConfig(method=method, batch_size=2), progress=False)
    out = export_awq(loaded, tmp_path / "awq")
    tensors, config = _load_dir(out)
    assert config["quantization_config"] == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 64,
                                             "zero_point": True, "modules_to_not_convert": None}
    assert tensors["model.layers.0.mlp.down_proj.qweight"].shape == (1536, 576 // 8)
    assert tensors["model.layers.0.mlp.down_proj.qzeros"].shape == (1536 // 64, 576 // 8)
    assert _check_decoded(loaded.model, tensors, lambda t, n: _awq_decode(t, n, 64)) == 7
    # AWQ's folded scales live in the norms: the export carries the calibrated ones
    assert torch.equal(tensors["model.layers.0.input_layernorm.weight"],
                       loaded.model.model.layers[0].input_layernorm.weight.detach().half())


def test_gptq_and_awq_export_refusals(small, tmp_path):
    from lowbit.io.export_awq import export_awq
    from lowbit.io.export_gptq import export_gptq

    def quantized(fmt: str):  # type: ignore[no-untyped-def]
        one = _one_layer(small)
        quantize_model(one.model, fmt, progress=False)
        return one

    with pytest.raises(LowbitError, match="no quantized linear layers"):
        export_gptq(dataclasses.replace(small, model=copy.deepcopy(small.model)), tmp_path / "a")
    with pytest.raises(LowbitError, match="not 5-7 bits or one scale per tensor"):
        export_gptq(quantized("int5-g64"), tmp_path / "b")
    with pytest.raises(LowbitError, match="not 5-7 bits or one scale per tensor"):
        export_gptq(quantized("int8-t"), tmp_path / "b")
    with pytest.raises(LowbitError, match="integer formats"):
        export_gptq(quantized("nf4"), tmp_path / "c")
    q4 = quantized("int4-asym-g128")  # 576 input features: a last group of 64
    with pytest.raises(LowbitError, match="not a multiple of the group size 128"):
        export_awq(q4, tmp_path / "d")
    with pytest.raises(LowbitError, match="not a multiple of the group size 128"):
        export_gptq(q4, tmp_path / "d")
    with pytest.raises(LowbitError, match="4-bit zero-point formats with groups"):
        export_awq(quantized("int4-g64"), tmp_path / "e")
    with pytest.raises(LowbitError, match="4-bit zero-point formats with groups"):
        export_awq(quantized("int8-asym-g64"), tmp_path / "f")
    assert not list(tmp_path.iterdir())
    q4 = quantized("int4-asym-g64")
    export_gptq(q4, tmp_path / "g")
    with pytest.raises(LowbitError, match="already exists"):
        export_gptq(q4, tmp_path / "g")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_v1_zero_points_at_the_edges_of_the_range(bits):
    """A zero point of 0 stored as "minus one" borrows from the field above (2/4/8 bits) or wraps in
    its field (3 bits); decoding as GPTQModel does gives every zero point back."""
    from lowbit.io.export_gptq import gptq_zeros_v1

    g = torch.Generator().manual_seed(bits)
    zeros = torch.randint(0, 1 << bits, (6, 96), generator=g)
    zeros[0] = 0
    zeros[1] = (1 << bits) - 1
    zeros[2, ::2] = 0
    t = {"m.qzeros": gptq_zeros_v1(zeros, bits), "m.scales": torch.ones(6, 96, dtype=torch.float16),
         "m.g_idx": torch.arange(6, dtype=torch.int32), "m.qweight": torch.zeros(-(-6 * bits // 32), 96,
                                                                                dtype=torch.int32)}
    # all codes 0: the decoded weight is -zero
    assert torch.equal(_gptq_decode(t, "m", bits), -zeros.t().float())


@pytest.mark.parametrize(("out_format", "fmt"), [("gptq", "int4-g64"), ("gptq", "int4-asym-g64"), ("gptq", "int8-ch"),
                                                 ("awq", "int4-asym-g64")])
def test_gptqmodel_loads_the_gptq_and_awq_exports(out_format, fmt, small, tmp_path):
    """transformers + optimum hand both layouts to GPTQModel (its CPU torch kernels), which decodes
    lowbit's files to lowbit's weights and computes what lowbit's layers compute."""
    pytest.importorskip("gptqmodel", reason="GPTQModel (the dev extra pins 7.6.0, the last for torch 2.13)")
    import transformers
    from transformers import AutoModelForCausalLM

    from lowbit.io.export_awq import export_awq
    from lowbit.io.export_gptq import export_gptq

    transformers.logging.set_verbosity_error()
    loaded = _one_layer(small)
    quantize_model(loaded.model, fmt, progress=False)
    out = (export_gptq if out_format == "gptq" else export_awq)(loaded, tmp_path / out_format)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, device_map="cpu")
    x = torch.randn(8, 1536, generator=torch.Generator().manual_seed(2))
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj"):
        lin, ours = theirs.model.layers[0].get_submodule(name), loaded.model.model.layers[0].get_submodule(name)
        assert type(lin).__module__.startswith("gptqmodel."), type(lin)
        w = ours.dequantized_weight()
        if hasattr(lin, "dequantize_weight"):  # GPTQ kernels: (q - z) * s in FP16, i.e. lowbit's weight rounded once
            assert torch.equal(lin.dequantize_weight().float().t(), w.half().float()), name
        xi = x[:, : w.shape[1]]
        with torch.no_grad():
            a, b = ours(xi), lin(xi.half()).float()
        assert torch.allclose(a, b, rtol=1e-2, atol=2e-2 * float(a.abs().max())), name
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = loaded.model(input_ids=ids).logits, theirs(input_ids=ids).logits.float()
    pa, lb = torch.softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    assert float((pa * (torch.log(pa) - lb)).sum(-1).mean()) < 1e-3  # an FP16 model against lowbit's FP32 one
