"""`lowbit generate` and the generation engines: greedy output equals a plain reference loop on the
same quantized weights; timings, peak memory and the JSON; llama.cpp on the same prompt ids."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import torch


def lowbit(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900)


def _greedy_reference(model, ids: list[int], n: int) -> list[int]:  # type: ignore[no-untyped-def]
    """Greedy decoding the plainest way: the whole sequence through the model at every step, no cache."""
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids):]


def test_greedy_generation_equals_the_reference_path(smol):
    fmt = "q4_0"
    import lowbit
    from lowbit.eval.generate import generate_torch, prompt_ids
    from lowbit.model.quantize import set_backend

    work = dataclasses.replace(smol, model=copy.deepcopy(smol.model))
    lowbit.quantize_model(work, fmt, progress=False)
    ids = prompt_ids(work, "Once upon a time, in a small village by the sea,", chat=False)
    shown: list[str] = []
    gen = generate_torch(work, ids, 5, on_text=shown.append, label=fmt)
    set_backend(work, "dequant")
    assert gen.new_ids == _greedy_reference(work.model, ids, len(gen.new_ids))
    assert len(gen.new_ids) == 5 and gen.text and "".join(shown) == gen.text
    assert gen.prefill_s > 0 and gen.decode_s > 0 and gen.decode_tokens_per_s > 0 and gen.peak_rss_mb > 100
    # the rounding kernels: the same first token on this prompt, and text
    set_backend(work, "fast")
    fast = generate_torch(work, ids, 4, label=fmt)
    assert fast.new_ids[0] == gen.new_ids[0] and fast.text


def test_chat_prompts_go_through_the_template(smol):
    from lowbit.eval.generate import prompt_ids

    plain = prompt_ids(smol, "Hi", chat=False)
    chat = prompt_ids(smol, "Hi", chat=True)
    assert len(chat) > len(plain) + 3
    assert "assistant" in smol.tokenizer.decode(chat)


def test_generate_command_streams_times_and_writes_json(tmp_path):
    out = tmp_path / "g.json"
    r = lowbit("generate", "smollm2", "-f", "q4_0", "-n", "6", "--backend", "fast", "--json", str(out), "--quiet")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    doc = json.loads(out.read_text())
    for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "peak_rss_mb", "n_new_tokens", "text", "engine", "format"):
        assert k in doc, k
    assert doc["engine"] == "torch" and doc["format"] == "q4_0" and doc["n_new_tokens"] == 6
    assert doc["backends"] == "cpu-int4pack" and doc["decode_tokens_per_s"] > 0
    assert doc["text"] and doc["text"] in r.stdout
    assert "tokens/s; peak RSS" in r.stdout.splitlines()[-1]


def test_generate_with_llamacpp_on_the_same_prompt(tmp_path):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "l.json"
    r = lowbit("generate", "smollm2", "--engine", "llama.cpp", "-n", "6", "--chat", "--json", str(out), "--quiet")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    doc = json.loads(out.read_text())
    assert doc["engine"] == "llama.cpp" and doc["n_new_tokens"] >= 1 and doc["decode_tokens_per_s"] > 0
    assert doc["text"] in r.stdout


@pytest.mark.parametrize(("args", "needle"), [
    (["-n", "0"], "-n 0: give at least 1"),
    (["--top-p", "0"], "--top-p 0.0: give a number in (0, 1]"),
    (["--backend", "cpu-int4pak"], "did you mean 'cpu-int4pack'"),
    (["-f", "q4_k_x"], "did you mean"),
    (["--device", "gpu"], "--device gpu: not a device"),
    (["--engine", "llama.cpp", "-f", "q4_0"], "drop --format"),
])
def test_generate_arguments_are_checked_first(args, needle):
    r = lowbit("generate", "smollm2", *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
