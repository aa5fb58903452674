"""The layer-by-layer calibration pipeline on a real (shortened) SmolLM2, every method end to end,
its checkpoint, and GGUF files whose codes GPTQ chose."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from lowbit.algorithms.gptq import GPTQConfig
from lowbit.model.calibrate import CalibConfig, calibrate_quantize
from lowbit.model.layers import capture_layer_inputs, collect_input_stats, decoder_layers, scale_groups
from lowbit.model.quantize import QuantLinear
from lowbit.model.rotated import RotatedQuantLinear


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
                                                ("gptq", "q4_0"), ("quip", "e8p")])
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
    groups = dict(scale_groups(small.model.model.layers[0]))
    assert groups["input_layernorm"] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert groups["post_attention_layernorm"] == ["mlp.gate_proj", "mlp.up_proj"]
    assert groups["mlp.up_proj"] == ["mlp.down_proj"]
    assert "self_attn.v_proj" not in groups  # grouped-query attention: v (192 rows) cannot feed o (576 inputs)


def test_checkpoint_roundtrip_and_gguf_with_gptq_codes(small, calib_chunks, held_out, tmp_path):
    from lowbit.io.checkpoint import save_checkpoint
    from lowbit.io.hf_gguf import write_gguf_from_hf
    from lowbit.model.checkpoint import load_checkpoint

    for method, scheme in (("quip", "int4-asym-g128"), ("quip", "e8p"), ("gptq", "q8_0")):
        ours = dataclasses.replace(small, model=copy.deepcopy(small.model))
        calibrate_quantize(ours, scheme, calib_chunks[:8], CalibConfig(method=method, batch_size=4), progress=False)
        out = tmp_path / f"ckpt-{method}-{scheme}"
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


def test_llama_cpp_runs_a_gguf_whose_codes_gptq_chose(small, calib_chunks, held_out, tmp_path, llamacpp_vs_torch):
    """A Q4_0 file written from a GPTQ-quantized model: llama.cpp loads it and computes what lowbit does."""
    from lowbit.io.hf_gguf import write_gguf_from_hf

    ours = dataclasses.replace(small, model=copy.deepcopy(small.model))
    calibrate_quantize(ours, "q4_0", calib_chunks[:8], CalibConfig(method="gptq", batch_size=4), progress=False)
    path = tmp_path / "gptq-q4_0.gguf"
    write_gguf_from_hf(ours, path, "q4_0", progress=False)
    kld, theirs, mine = llamacpp_vs_torch(path, ours.model, held_out[0])
    assert kld < 0.01, kld  # llama.cpp's CPU path rounds activations to 8 bits; nothing else differs
    assert float((theirs.argmax(-1) == mine.argmax(-1)).double().mean()) > 0.9


def _tiny(arch: str):
    """A small random model of each supported architecture (no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128)
    if arch == "gemma3_text":
        cfg = AutoConfig.for_model(arch, num_key_value_heads=2, head_dim=16, sliding_window=32, **common)
    elif arch == "qwen2":
        cfg = AutoConfig.for_model(arch, num_key_value_heads=4, **common)  # no GQA: v can feed o
    else:
        cfg = AutoConfig.for_model(arch, num_key_value_heads=2, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.rand_like(p))  # norms away from their initial value, so folding is visible
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3_text"])
def test_awq_scaling_leaves_the_full_precision_model_unchanged(arch):
    """Scales folded into norms (Gemma's 1 + w included), into v (o's input) and up (down's input):
    in float64 the model's logits do not move."""
    model = _tiny(arch).double()
    ids = torch.randint(0, 256, (2, 24))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    layer = model.model.layers[0]
    groups = scale_groups(layer)
    prevs = [p for p, _ in groups]
    assert prevs[0] == "input_layernorm" and "mlp.up_proj" in prevs
    assert ("self_attn.v_proj" in prevs) == (arch == "qwen2")
    for prev, names in groups:
        s = torch.rand(layer.get_submodule(names[0]).in_features, dtype=torch.float64) + 0.5
        from lowbit.model.layers import apply_scale

        apply_scale(layer, prev, names, s)
    with torch.inference_mode():
        after = model(input_ids=ids).logits
    # Gemma's norms compute in float32 whatever the model's dtype: there float32 rounding remains
    tol = 1e-5 if arch.startswith("gemma") else 1e-9
    assert float((after - before).abs().max()) < tol * float(before.abs().max()), float((after - before).abs().max())


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])
def test_methods_run_on_other_architectures(arch):
    """GPTQ, AWQ and QuIP through the whole pipeline on Qwen2 (biases on q/k/v) and Gemma-3 (sliding
    window and global attention, q/k norms, (1 + w) norms)."""
    model = _tiny(arch)
    loaded = type("L", (), {"model": model})()
    chunks = torch.randint(0, 256, (16, 32))
    with torch.inference_mode():
        ref = model(input_ids=chunks[:4]).logits
    errs = {}
    for method in ("rtn", "gptq", "awq", "quip"):
        m = dataclasses.replace(_Loaded(copy.deepcopy(model)))
        report, logs = calibrate_quantize(m, "int4-asym-g32", chunks, CalibConfig(method=method, batch_size=8),
                                          progress=False)
        with torch.inference_mode():
            out = m.model(input_ids=chunks[:4]).logits
        assert torch.isfinite(out).all()
        errs[method] = float(((out - ref) ** 2).mean() / (ref**2).mean())
        if method != "rtn":
            assert sum(1 for lg in logs if not lg.name.startswith("awq:")) == 2 * 7
    assert all(errs[m] < errs["rtn"] for m in ("gptq", "awq", "quip")), errs
    del loaded


@dataclasses.dataclass
class _Loaded:
    model: torch.nn.Module


def test_layers_fed_the_same_input_share_one_hessian(small, calib_chunks):
    """q/k/v (after the input norm) and gate/up (after the feed-forward norm) get one InputStats,
    accumulated once and equal to X^T X of that input; o and down have their own."""

    model = copy.deepcopy(small.model)
    layer = decoder_layers(model)[0]
    batches = capture_layer_inputs(model, calib_chunks[:4], batch_size=2)
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    stats = collect_input_stats(layer, linears, batches)
    a = stats["self_attn.q_proj"]
    assert a is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert len({id(s) for s in stats.values()}) == 4  # qkv, o, gate/up, down
    x = torch.cat([layer.input_layernorm(hs).reshape(-1, hs.shape[-1]) for hs, _ in batches]).double()
    assert a.tokens == x.shape[0]
    torch.testing.assert_close(a.hessian(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
