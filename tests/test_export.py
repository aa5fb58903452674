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
