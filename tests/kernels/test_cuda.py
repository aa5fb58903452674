"""The calibration methods and the format round trips on a CUDA GPU: same pipeline, same results
as on the CPU up to float rounding, everything left on the device.  Skipped without a GPU (CI has
none); run on the lent H100 with ``pytest tests/kernels/test_cuda.py``."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@dataclasses.dataclass
class _Loaded:
    model: torch.nn.Module


def _tiny_llama() -> torch.nn.Module:
    """A random Llama whose rows fit every format (256 columns: K-quant super-blocks included)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.rand_like(p))
    return model


def _run(model: torch.nn.Module, scheme: str, method: str, chunks: torch.Tensor, device: str) -> torch.nn.Module:
    from lowbit.model.calibrate import CalibConfig, calibrate_quantize

    m = _Loaded(copy.deepcopy(model).to(device))
    calibrate_quantize(m, scheme, chunks, CalibConfig(method=method, batch_size=8, device=device), progress=False)
    return m.model


@pytest.mark.parametrize(("method", "scheme"), [("gptq", "int4-asym-g32"), ("awq", "int4-asym-g32"),
                                                ("quip", "int3-asym-g32"), ("spqr", "spqr3-g16"),
                                                ("gptq", "q4_k"), ("quip", "e8p")])
def test_methods_on_cuda_match_the_cpu_and_beat_rtn(method, scheme):
    model = _tiny_llama()
    chunks = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(1))
    ids = chunks[:4]
    with torch.inference_mode():
        ref = model(input_ids=ids).logits.double()

    def err(m: torch.nn.Module) -> float:
        with torch.inference_mode():
            out = m(input_ids=ids.to(next(m.parameters()).device)).logits.double().cpu()
        assert torch.isfinite(out).all()
        return float(((out - ref) ** 2).mean() / (ref**2).mean())

    gpu = _run(model, scheme, method, chunks, "cuda")
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    assert all(b.device.type == "cuda" for b in gpu.buffers())
    gpu_rtn = _run(model, scheme, "rtn", chunks, "cuda")
    cpu = _run(model, scheme, method, chunks, "cpu")
    e_gpu, e_rtn, e_cpu = err(gpu), err(gpu_rtn), err(cpu)
    assert e_gpu < e_rtn, (e_gpu, e_rtn)
    # float32 sums in another order flip a few codes; the error itself must agree closely
    assert abs(e_gpu - e_cpu) < 0.15 * e_cpu, (e_gpu, e_cpu)


@pytest.mark.parametrize("fmt", ["int4-asym-g128", "int8-sym-ch", "nf4-dq", "fp8-e4m3", "q4_0", "q4_k", "q6_k",
                                 "q3_k", "iq4_nl", "spqr3-g16", "e8p"])
def test_format_round_trip_on_cuda_equals_the_cpu(fmt):
    from lowbit.formats import get_format

    f = get_format(fmt)
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(2)) * 0.02
    cpu = f.dequantize(f.quantize(w))
    gpu = f.dequantize(f.quantize(w.cuda()))
    assert gpu.device.type == "cuda"
    rel = float((gpu.cpu() - cpu).abs().mean() / cpu.abs().mean())
    assert rel < 1e-3, rel
