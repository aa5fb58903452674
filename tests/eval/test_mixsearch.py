"""Sensitivity-driven mixes of llama.cpp types under a size budget, on SmolLM2's first layers."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from lowbit.eval import mixsearch as ms
from lowbit.formats import get_format

# the bundled original sits on Q4_1's grid, so Q4_1 would reproduce it for free: not a candidate
ALLOWED = tuple(t for t in ms.gguf_candidates() if t != "q4_1")


@pytest.fixture(scope="module")
def setup(small):
    from lowbit.eval.data import calibration_text, eval_text
    from lowbit.model.imatrix import compute_imatrix, imatrix_chunks

    im = compute_imatrix(small, calibration_text(), n_ctx=128, max_chunks=4, progress=False).values()
    cal = imatrix_chunks(small, calibration_text(), n_ctx=128, max_chunks=2)
    held = imatrix_chunks(small, eval_text(), n_ctx=256, max_chunks=2)
    sens = ms.measure(small, cal, im, allowed=ALLOWED, progress=False)
    return im, held, sens


def test_sensitivities_cover_every_quantized_tensor(small, setup):
    _, _, sens = setup
    assert len(sens.tensors) == 1 + 3 * 7  # tied embedding + 3 layers x 7 projections
    for s in sens.tensors.values():
        assert "q4_1" not in s.bits and s.alpha > 0 and s.ref_kld > 0
        assert s.ref == ("q4_k" if s.shape[1] % 256 == 0 else "q4_0")
        # more bits, less error (per format family)
        assert s.err["q8_0"] < s.err["q5_0"] < s.err["q4_0"]
        assert all(s.bits[t] == get_format(t).storage_bits(s.shape) for t in s.bits)
    assert sens.n_params == sum(p.numel() for p in small.model.parameters())  # tied weights once


@pytest.mark.parametrize("start", [1, 2])
def test_kld_from_a_cached_layer_equals_the_full_forward(small, start):
    """Sensitivities run only the layers from the perturbed one on; the result equals a full forward."""
    import torch

    from lowbit.eval.data import calibration_text
    from lowbit.model.imatrix import imatrix_chunks

    model = copy.deepcopy(small.model)
    cal = imatrix_chunks(small, calibration_text(), n_ctx=64, max_chunks=2)
    cache = ms.LayerInputCache(model, cal, 64)
    p = model.model.layers[start].mlp.down_proj.weight
    with torch.no_grad():
        p.mul_(1.05)
    fast = cache.kld_from(start, cal)
    full = ms.kld_against(model, cal, cache.ref, 64)
    assert full > 0 and fast == pytest.approx(full, rel=1e-4, abs=1e-9)
    assert all(isinstance(layer, type(small.model.model.layers[0])) for layer in model.model.layers)  # restored


def test_search_fits_the_budget_and_predictions_order_real_mixes(small, setup):
    im, held, sens = setup
    mixes = {}
    for ft in ("q3_k_m", "q4_k_m", "q4_0", "q8_0"):
        mix = ms.mix_of_file_type(small, ft, imatrix=True)
        budget = sens.bits_of(mix)
        found, sol = ms.search(sens, budget)
        assert sol.bits <= budget and sens.bits_of(found) == sol.bits
        assert sens.predict(found) <= sens.predict(mix) + 1e-12
        mixes[ft] = mix
        mixes[f"search@{ft}"] = found
    res = ms.validate(small, sens, {k: mixes[k] for k in ("q3_k_m", "q4_k_m", "q4_0", "q8_0")}, held, im)
    by_pred = sorted(res, key=lambda k: res[k][0])
    by_meas = sorted(res, key=lambda k: res[k][1])
    assert by_pred == by_meas, res
    with pytest.raises(Exception, match="below the smallest choice"):
        ms.search(sens, sens.fixed_bits + 1000)


def test_searched_mix_as_a_gguf_that_llama_cpp_runs(small, setup, tmp_path, llamacpp_vs_torch):
    from lowbit.io.hf_gguf import write_gguf_from_hf
    from lowbit.model.gguf_file import GGUFFile

    im, held, sens = setup
    budget = sens.budget_for_bpw(6.0)
    mix, sol = ms.search(sens, budget)
    assert sol.bits <= budget and len(set(mix.values())) > 1
    path = tmp_path / "mix.gguf"
    report = write_gguf_from_hf(small, path, "q4_k_m", progress=False, imatrix=im, types=dict(mix))
    gf = GGUFFile(path)
    for g, t in mix.items():
        assert gf.tensors[g].type == get_format(t).gguf_type, g
    assert report.total_bits == sol.bits  # the file holds exactly the bits the search counted
    work = dataclasses.replace(small, model=copy.deepcopy(small.model))
    ms.apply_mix(work, mix, im)
    kld, _, _ = llamacpp_vs_torch(path, work.model, held[0])
    assert kld < 0.01, kld


def test_sensitivities_of_a_gemma3_model_keep_its_extra_norms_in_f32():
    """Gemma 3's norms beyond llama's (pre/post feed-forward, q/k norms) have no llama GGUF name:
    they are counted as F32, and every projection and the embedding get sensitivities."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.model.load import LoadedModel

    cfg = AutoConfig.for_model("gemma3_text", vocab_size=256, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               sliding_window=32, max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    loaded = LoadedModel(model, None, "tiny-gemma3", "gemma3_text", False, None, None, [])  # type: ignore[arg-type]
    chunks = torch.randint(0, 256, (2, 32))
    sens = ms.measure(loaded, chunks, allowed=ALLOWED, progress=False)
    assert len(sens.tensors) == 1 + 2 * 7
    norms = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)
    assert sens.fixed_bits == 32 * norms
    assert sens.n_params == sum(p.numel() for p in model.parameters())
    mix, sol = ms.search(sens, sens.bits_of({s.key: "q8_0" for s in sens.tensors.values()}))
    assert sol.bits <= sol.budget and set(mix) == {s.key for s in sens.tensors.values()}


def test_saved_sensitivities_reload_and_restrict(setup, tmp_path):
    """The sensitivity file round-trips exactly, is refused for another key, and a restricted copy
    searches only the types left while predicting the same loss for them."""
    from lowbit.errors import LowbitError

    _, _, sens = setup
    f = tmp_path / "sens.json"
    key = {"model": "m", "sens_chunks": 2}
    ms.save_sensitivities(sens, f, {**key, "device": "cpu"})
    back = ms.load_sensitivities(f, key)
    assert back == sens
    assert ms.load_sensitivities(f, {**key, "sens_chunks": 3}) is None
    no_k = back.restricted({"q4_0", "q5_0", "q8_0"})
    assert all(set(t.bits) == {"q4_0", "q5_0", "q8_0"} for t in no_k.tensors.values())
    mix, sol = ms.search(no_k, sens.budget_for_bpw(6.0))
    assert set(mix.values()) <= {"q4_0", "q5_0", "q8_0"} and sol.bits <= sol.budget
    assert no_k.predict(mix) == pytest.approx(sens.predict(mix))
    with pytest.raises(LowbitError, match="none of the allowed types"):
        back.restricted({"q9_9"})
    f.write_text("{not json")
    with pytest.raises(LowbitError, match="sens.json"):
        ms.load_sensitivities(f, key)


def test_earlier_sensitivities_gain_types_without_running_the_model(small, setup, monkeypatch):
    """A saved measurement restricted to two types, given back as ``previous``, is completed to every
    allowed type by quantizing alone: no forward pass, and the same numbers as measuring from scratch."""
    im, _, sens = setup
    part = sens.restricted({"q4_0", "q8_0"})

    def no_forward(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("the model ran again")

    monkeypatch.setattr(ms, "LayerInputCache", no_forward)
    from lowbit.eval.data import calibration_text
    from lowbit.model.imatrix import imatrix_chunks

    cal = imatrix_chunks(small, calibration_text(), n_ctx=128, max_chunks=2)
    full = ms.measure(small, cal, im, allowed=ALLOWED, progress=False, previous=part)
    assert full.tensors == sens.tensors
    # the same measurements serve a search for a lowbit checkpoint: its tensors keep their sensitivities
    ck = ms.measure(small, cal, im, allowed=("int4-asym-g64", "nf4"), progress=False, previous=part, target="lowbit")
    assert ck.target == "lowbit" and set(ck.tensors) < set(sens.tensors)
    for n, t in ck.tensors.items():
        assert (t.alpha, t.ref, t.ref_kld) == (sens.tensors[n].alpha, sens.tensors[n].ref, sens.tensors[n].ref_kld)
        assert set(t.bits) == {"int4-asym-g64", "nf4"}


def test_version_1_sensitivity_files_still_load(setup, tmp_path):
    import json

    _, _, sens = setup
    f = tmp_path / "sens.json"
    ms.save_sensitivities(sens, f, {"model": "m"})
    doc = json.loads(f.read_text())
    doc["version"] = 1
    del doc["sensitivities"]["target"]
    for t in doc["sensitivities"]["tensors"].values():
        t["gguf"] = t.pop("key")
    f.write_text(json.dumps(doc))
    assert ms.load_sensitivities(f, {"model": "m"}) == sens


LOWBIT_POOL = ("int3-asym-g64", "int4-asym-g128", "nf4", "int8-ch", "fp16")


def test_lowbit_target_mixes_any_formats_into_a_checkpoint(small, setup, tmp_path):
    """For a lowbit checkpoint the search chooses among lowbit's own formats for the decoder's linear
    layers (the rest FP16); the checkpoint holds exactly the searched bits and reloads to the same model."""
    import torch

    from lowbit.eval.data import calibration_text
    from lowbit.eval.runner import torch_logits_fn
    from lowbit.io.checkpoint import save_checkpoint
    from lowbit.model.checkpoint import load_checkpoint
    from lowbit.model.imatrix import imatrix_chunks

    im, held, _ = setup
    cal = imatrix_chunks(small, calibration_text(), n_ctx=128, max_chunks=2)
    sens = ms.measure(small, cal, im, allowed=LOWBIT_POOL, progress=False, target="lowbit")
    names = {n for n, p in small.model.named_parameters() if p.dim() == 2 and ".layers." in n}
    assert set(sens.tensors) == names and all(s.key == s.name for s in sens.tensors.values())
    rest = sum(p.numel() for n, p in small.model.named_parameters() if n not in names)  # tied head not listed
    assert sens.fixed_bits == 16 * rest and sens.target == "lowbit"
    for s in sens.tensors.values():
        assert s.ref == "nf4" and s.alpha > 0  # the candidate nearest 4.5 bits
        assert s.err["int8-ch"] < s.err["nf4"] < s.err["int3-asym-g64"]
    n_lin = sum(s.shape[0] * s.shape[1] for s in sens.tensors.values())
    budget = sens.fixed_bits + 5 * n_lin  # 5 bits per linear weight (the FP16 embedding dominates 3 layers)
    mix, sol = ms.search(sens, budget)
    assert sol.bits <= budget and len(set(mix.values())) > 1
    work = dataclasses.replace(small, model=copy.deepcopy(small.model))
    report = ms.apply_mix(work, mix, im, target="lowbit")
    assert report.total_bits == sol.bits
    res = ms.validate(small, sens, {"searched": mix}, held, im)
    assert 0 < res["searched"][1] < 1.0
    out = save_checkpoint(work, tmp_path / "ck", "mix", "rtn", extra={"mix": mix})
    size = (out / "model.safetensors").stat().st_size
    assert sol.bits / 8 <= size < sol.bits / 8 * 1.01 + 100_000  # FP16 where kept, codes as counted, a header
    back, manifest = load_checkpoint(out)
    assert {m: e["format"] for m, e in manifest["modules"].items()} == {n.removesuffix(".weight"): f for n, f in mix.items()}
    chunk = held[0]
    with torch.no_grad():
        assert torch.equal(torch_logits_fn(back, 256)(chunk), torch_logits_fn(work.model, 256)(chunk))


def test_candidate_types_are_checked_for_the_target():
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="not a type the search can write into a GGUF file"):
        ms.check_types(("nf4",), "gguf")
    with pytest.raises(Exception, match="q9_9"):
        ms.check_types(("q9_9",), "lowbit")
    assert ms.check_types(("int4-asym-g64", "q4_k", "int4-asym-g64"), "lowbit") == ("int4-asym-g64", "q4_k")
    with pytest.raises(LowbitError, match="unknown search target"):
        ms.default_types("onnx")


def test_a_mix_of_iq4_and_f16_tensors_runs_in_llama_cpp(small, setup, tmp_path, llamacpp_vs_torch):
    """The types GGUF searches gained (IQ4_NL, IQ4_XS, F16) written per tensor into one file: llama.cpp
    loads it and computes what lowbit computes."""
    from lowbit.io.hf_gguf import write_gguf_from_hf
    from lowbit.model.gguf_file import GGUFFile

    im, held, sens = setup
    cycle = ("iq4_nl", "fp16", "q4_k")
    mix = {}
    for i, s in enumerate(sorted(sens.tensors.values(), key=lambda s: s.key)):
        t = "iq4_xs" if "iq4_xs" in s.bits and i % 2 else cycle[i % 3]
        mix[s.key] = t if t in s.bits else "iq4_nl"
    assert {"iq4_nl", "iq4_xs", "fp16"} <= set(mix.values())
    path = tmp_path / "iq.gguf"
    report = write_gguf_from_hf(small, path, "q4_k_m", progress=False, imatrix=im, types=dict(mix))
    gf = GGUFFile(path)
    assert all(gf.tensors[g].type == get_format(t).gguf_type for g, t in mix.items())
    assert report.total_bits == sens.bits_of(mix)
    work = dataclasses.replace(small, model=copy.deepcopy(small.model))
    ms.apply_mix(work, mix, im)
    kld, _, _ = llamacpp_vs_torch(path, work.model, held[0])
    assert kld < 0.01, kld


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.7.ffn_down.weight"])
def test_dither_takes_the_weights_off_the_grid_they_were_distributed_on(smol_weights, name, monkeypatch):
    """What bench/mixsearch.py --dither 0.1 relies on: the bundled SmolLM2 weights sit on Q4_1's grid, so
    Q4_1 and Q5_1 with an importance matrix reproduce them exactly; after noise of 0.1 x row RMS their
    error is within 15% of what it is on the same weights dithered twice as much (no free lunch left)."""
    from pathlib import Path

    import torch

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))
    from mixsearch import dither

    w = smol_weights[name]
    gen = torch.Generator().manual_seed(1)
    imp = torch.rand(w.shape[1], generator=gen) + 0.1
    rms = w.pow(2).mean(1, keepdim=True).sqrt()
    holder = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        holder.weight.copy_(w)
    model = torch.nn.Module()
    model.add_module("model", torch.nn.Module())
    model.model.add_module("layers", torch.nn.ModuleList([torch.nn.Module()]))
    role = "self_attn.q_proj" if "attn_q" in name else "mlp.down_proj"
    parent, child = role.split(".")
    model.model.layers[0].add_module(parent, torch.nn.Module())
    getattr(model.model.layers[0], parent).add_module(child, holder)
    assert dither(model, 0.1) == 1
    dithered = holder.weight.detach().clone()
    twice = w + torch.randn(w.shape, generator=gen) * rms * 0.2

    def rel(fmt_name: str, x: torch.Tensor) -> float:
        f = get_format(fmt_name)
        dq = f.dequantize(f.quantize(x, name=name, imatrix=imp))
        return float((((dq - x) ** 2).mean(0) * imp).sum() / ((x**2).mean(0) * imp).sum())

    for t in ("q4_1", "q5_1"):
        assert rel(t, w) < 1e-9  # the grid found again: free
        assert rel(t, dithered) > (0.85 if t == "q4_1" else 0.97) * rel(t, twice)
    assert float(((dithered - w) ** 2).sum() / (w**2).sum()) == pytest.approx(0.01, rel=0.05)  # the noise asked for
