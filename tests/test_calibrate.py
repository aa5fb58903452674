"""The layer-by-layer calibration pipeline on a real (shortened) SmolLM2, every method end to end,
its checkpoint, and GGUF files whose codes GPTQ chose."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from lowbit.algorithms.gptq import GPTQConfig
from lowbit.model.calibrate import CalibConfig, awq_groups, calibrate_quantize, capture_layer_inputs
from lowbit.model.quantize import QuantLinear
from lowbit.model.rotated import RotatedQuantLinear


@pytest.fixture(scope="module")
def small(smol):
    """SmolLM2 cut to its first 3 decoder layers (real weights, real architecture)."""
    model = copy.deepcopy(smol.model)
    model.model.layers = model.model.layers[:3]
    model.config.num_hidden_layers = 3
    return dataclasses.replace(smol, model=model)


@pytest.fixture(scope="module")
def calib_chunks(smol):
    from lowbit.eval.data import calibration_text
    from lowbit.model.imatrix import imatrix_chunks

    return imatrix_chunks(smol, calibration_text(), n_ctx=256, max_chunks=16)


@pytest.fixture(scope="module")
def held_out(smol):
    from lowbit.eval.data import eval_text
    from lowbit.model.imatrix import imatrix_chunks

    return imatrix_chunks(smol, eval_text(), n_ctx=256, max_chunks=4)


def _hidden(model, chunks) -> torch.Tensor:
    with torch.inference_mode():
        return model.model(input_ids=chunks, use_cache=False).last_hidden_state


def test_captured_inputs_reproduce_the_model(small, calib_chunks):
    """Running the decoder layers on the captured inputs gives the model's own hidden states."""
    batches = capture_layer_inputs(small.model, calib_chunks[:4], batch_size=2)
    assert len(batches) == 2 and batches[0][0].shape == (2, 256, 576)
    hs = [b[0] for b in batches]
    with torch.inference_mode():
        for layer in small.model.model.layers:
            hs = [layer(h, **kw) for h, (_, kw) in zip(hs, batches, strict=True)]
        out = small.model.model.norm(torch.cat(hs))
    assert torch.allclose(out, _hidden(small.model, calib_chunks[:4]), atol=1e-4)


@pytest.mark.parametrize(("method", "scheme"), [("gptq", "int3-asym-g128"), ("awq", "int3-asym-g128"),
                                                ("quip", "int3-asym-g128"), ("spqr", "spqr3-g16"),
                                                ("gptq", "q4_0")])
def test_every_method_beats_round_to_nearest_end_to_end(method, scheme, small, calib_chunks, held_out):
    ref = _hidden(small.model, held_out)
    rtn = dataclasses.replace(small, model=copy.deepcopy(small.model))
    calibrate_quantize(rtn, scheme, calib_chunks, CalibConfig(method="rtn"), progress=False)
    ours = dataclasses.replace(small, model=copy.deepcopy(small.model))
    cfg = CalibConfig(method=method, batch_size=4, gptq=GPTQConfig(damp=0.05))
    report, logs = calibrate_quantize(ours, scheme, calib_chunks, cfg, progress=False)
    kinds = {type(m) for m in ours.model.modules()}
    assert (RotatedQuantLinear if method == "quip" else QuantLinear) in kinds
    n_lin = 3 * 7
    assert len([t for t in report.tensors if ".layers." in t.name and t.quantized and t.name.endswith("proj.weight")]) == n_lin
    assert len([lg for lg in logs if not lg.name.startswith("awq:")]) == n_lin
    err_rtn = float(((_hidden(rtn.model, held_out) - ref) ** 2).mean())
    err_ours = float(((_hidden(ours.model, held_out) - ref) ** 2).mean())
    assert err_ours < err_rtn, (err_ours, err_rtn)
    if method == "awq":
        assert any(lg.name.startswith("awq:") and lg.extra["alpha"] > 0 for lg in logs)


def test_awq_groups_follow_the_architecture(small):
    groups = dict(awq_groups(small.model.model.layers[0]))
    assert groups["input_layernorm"] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert groups["post_attention_layernorm"] == ["mlp.gate_proj", "mlp.up_proj"]
    assert groups["mlp.up_proj"] == ["mlp.down_proj"]
    assert "self_attn.v_proj" not in groups  # grouped-query attention: v (192 rows) cannot feed o (576 inputs)


def test_checkpoint_roundtrip_and_gguf_with_gptq_codes(small, calib_chunks, held_out, tmp_path):
    from lowbit.io.hf_gguf import write_gguf_from_hf
    from lowbit.model.checkpoint import load_checkpoint, save_checkpoint

    for method, scheme in (("quip", "int4-asym-g128"), ("gptq", "q8_0")):
        ours = dataclasses.replace(small, model=copy.deepcopy(small.model))
        calibrate_quantize(ours, scheme, calib_chunks[:8], CalibConfig(method=method, batch_size=4), progress=False)
        out = tmp_path / f"ckpt-{method}"
        save_checkpoint(ours, out, scheme, method)
        model, manifest = load_checkpoint(out)
        assert manifest["method"] == method and manifest["scheme"] == scheme
        assert torch.equal(_hidden(model, held_out), _hidden(ours.model, held_out))
    # the q8_0 model as a GGUF: its tensors hold GPTQ's codes, and gguf-py decodes them to our weights
    import gguf
    import numpy as np

    path = tmp_path / "gptq-q8_0.gguf"
    write_gguf_from_hf(ours, path, "q8_0", progress=False)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    mod = ours.model.model.layers[1].mlp.down_proj
    t = tensors["blk.1.ffn_down.weight"]
    assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), mod.dequantized_weight().numpy())


def test_llama_cpp_runs_a_gguf_whose_codes_gptq_chose(small, calib_chunks, held_out, tmp_path):
    """A Q4_0 file written from a GPTQ-quantized model: llama.cpp loads it and computes what lowbit does."""
    from lowbit.eval.llamacpp import LlamaCppModel
    from lowbit.eval.runner import torch_logits_fn
    from lowbit.io.hf_gguf import write_gguf_from_hf

    ours = dataclasses.replace(small, model=copy.deepcopy(small.model))
    calibrate_quantize(ours, "q4_0", calib_chunks[:8], CalibConfig(method="gptq", batch_size=4), progress=False)
    path = tmp_path / "gptq-q4_0.gguf"
    write_gguf_from_hf(ours, path, "q4_0", progress=False)
    llm = LlamaCppModel(path, n_ctx=256)
    try:
        theirs = llm.logits_fn()(held_out[0])
    finally:
        llm.close()
    mine = torch_logits_fn(ours.model, 256)(held_out[0])
    p_theirs, p_mine = torch.softmax(theirs.double(), -1), torch.log_softmax(mine.double(), -1)
    kld = float((p_theirs * (torch.log(p_theirs) - p_mine)).sum(-1).mean())
    assert kld < 0.01, kld  # llama.cpp's CPU path rounds activations to 8 bits; nothing else differs
    assert float((theirs.argmax(-1) == mine.argmax(-1)).double().mean()) > 0.9
