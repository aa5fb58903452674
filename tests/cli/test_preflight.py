"""Check before the work: every argument that can be checked without running the model is checked
before the model is loaded, and a bad one ends in one line naming the option or file, exit code 2,
within 5 seconds."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest


def lowbit(*args: str, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, cwd=cwd,
                       timeout=600)
    return r, time.monotonic() - t0


def refused(args: list[str], *needles: str, cwd: Path | None = None, limit: float = 5.0) -> str:
    r, seconds = lowbit(*args, cwd=cwd)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), (args, r.stderr)
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (args, lines[0])
    assert seconds < limit, f"{args}: refused after {seconds:.1f} s"
    return lines[0]


@pytest.fixture()
def texts(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Hello there.")
    return {"tiny": tiny}


CASES = [
    # export compatibility: one format per layer, the formats the layout takes, groups that divide every row
    (["quantize", "smollm2", "--method", "gptq", "-f", "q4_k_m", "--out-format", "gptq", "-o", "x"],
     ["--out-format gptq takes one format for every linear layer", "q4_k_m"]),
    (["quantize", "smollm2", "-f", "int4-g128", "--out-format", "compressed-tensors", "-o", "x"],
     ["576 input features", "group size 128"]),
    (["quantize", "smollm2", "--method", "gptq", "--bits", "4", "--group-size", "7", "--out-format", "gptq", "-o", "x"],
     ["group size 7"]),
    (["quantize", "smollm2", "-f", "nf4", "--out-format", "awq", "-o", "x"], ["nf4", "AWQ"]),
    (["quantize", "smollm2", "-f", "int8", "--out-format", "bitsandbytes", "-o", "x"], ["int8", "bitsandbytes"]),
    # format names, with a suggestion
    (["eval", "smollm2", "-f", "q4_k_x"], ["unknown format 'q4_k_x'", "did you mean", "q4_k_m"]),
    (["compare", "smollm2", "--formats", "q8_0,nf5"], ["unknown format 'nf5'", "'nf4'"]),
    (["quantize", "smollm2", "-f", "q4_9", "-o", "x.gguf"], ["unknown format 'q4_9'"]),
    (["quantize", "smollm2", "--method", "gtpq", "--bits", "4", "-o", "x"], ["--method", "did you mean 'gptq'"]),
    (["compare", "smollm2", "--formats", "int4-g128+gtpq"], ["unknown suffix '+gtpq'", "'gptq'"]),
    (["quantize", "smollm2", "--method", "spqr", "-f", "int3-g16", "-o", "x"], ["spqr format"]),
    # reachable targets and option ranges
    (["quantize", "smollm2", "--target-size", "1KB", "-o", "x.gguf"], ["--target-size 1KB", "below the smallest"]),
    (["quantize", "smollm2", "--target-bpw", "0.5", "-o", "x.gguf"], ["--target-bpw 0.5"]),
    (["eval", "smollm2", "--chunks", "0"], ["--chunks 0: give at least 1"]),
    (["eval", "smollm2", "--chunks", "-1"], ["--chunks -1: give at least 1"]),
    (["eval", "smollm2", "--ctx", "100000"], ["--ctx 100000", "at most 8192"]),
    (["imatrix", "smollm2", "--chunks", "0", "-o", "i.gguf"], ["--calib-chunks 0"]),
    (["quantize", "smollm2", "--method", "gptq", "--bits", "4", "--calib-samples", "0", "-o", "x"], ["--calib-chunks 0"]),
    (["quantize", "smollm2", "--method", "gptq", "--bits", "9", "-o", "x"], ["--bits 9"]),
    (["quantize", "smollm2", "--method", "gptq", "--bits", "4", "--damp", "0", "-o", "x"], ["--damp 0"]),
    (["quantize", "smollm2", "--method", "spqr", "--bits", "3", "--outliers", "0.7", "-o", "x"], ["--outliers 0.7"]),
    (["quantize", "smollm2", "-f", "int4-g128", "--method", "qat", "--qat-steps", "0", "-o", "x"], ["--qat-steps 0"]),
    # the device
    (["quantize", "smollm2", "-f", "q8_0", "-o", "x.gguf", "--device", "gpu"], ["--device gpu: not a device"]),
    # the output: its kind matches the path
    (["quantize", "smollm2", "-f", "q4_k_m", "-o", "ydir"], ["q4_k_m is a llama.cpp file type", "ending in .gguf"]),
    (["quantize", "smollm2", "-f", "nf4", "-o", "x.gguf"], ["nf4 has no GGUF type"]),
    # files that must exist
    (["quantize", "nope.gguf", "-f", "q8_0", "-o", "x.gguf"], ["nope.gguf", "no such file"]),
    (["eval", "smollm2", "--text", "missing.txt"], ["--text", "missing.txt", "no such text file"]),
    (["quantize", "smollm2", "-f", "q4_k_m", "--imatrix", "missing.dat", "-o", "x.gguf"], ["--imatrix", "missing.dat"]),
]


def refused_in_process(args: list[str], needles: list[str], cwd: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """The same check as :func:`refused`, in this process (the start-up of a process is timed by
    :func:`test_whole_commands_return_within_5_seconds`)."""
    import os

    from lowbit.cli import main

    old = os.getcwd()
    os.chdir(cwd)
    t0 = time.monotonic()
    try:
        try:
            code = main(args)
        except SystemExit as e:  # argparse's own refusals (an unknown --method choice)
            code = e.code
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    assert code == 2, (args, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), (args, err)
    for n in needles:
        assert n in lines[0], (args, lines[0])
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("args,needles", CASES, ids=[" ".join(a[:3] + a[3:][-3:]) for a, _ in CASES])
def test_refused_before_any_work(args, needles, tmp_path, capsys):
    refused_in_process(args, needles, tmp_path, capsys)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case", [0, 2, 5, 22])
def test_whole_commands_return_within_5_seconds(case, tmp_path):
    args, needles = CASES[case]
    refused(args, *needles, cwd=tmp_path)
    assert not list(tmp_path.iterdir())


def test_texts_too_short_for_one_context(tmp_path, texts):
    t = str(texts["tiny"])
    refused(["eval", "smollm2", "--text", t], "--text", "tiny.txt", "12 bytes", "fewer than one context of 512")
    refused(["imatrix", "smollm2", "--text", t, "-o", str(tmp_path / "i.gguf")], "--calib-text", "tiny.txt")
    refused(["quantize", "smollm2", "--method", "gptq", "--bits", "4", "--calib-text", t, "-o", str(tmp_path / "x")],
            "--calib-text", "tiny.txt", "fewer than one context")
    # long enough in bytes, not in tokens: refused once the tokenizer is loaded, before the weights
    words = tmp_path / "words.txt"
    words.write_text("lowbit " * 100)
    line = refused(["eval", "smollm2", "--text", str(words)], limit=120)
    assert "words.txt" in line and "tokens, fewer than one context of 512 tokens" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.txt", "words.txt"]


def test_device_cuda_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    refused(["quantize", "smollm2", "-f", "q8_0", "-o", "x.gguf", "--device", "cuda"], "--device cuda", "no CUDA",
            cwd=tmp_path)


def test_a_file_llama_cpp_refuses_is_one_line_before_any_evaluation(tmp_path, smol_path):
    import gguf
    import numpy as np

    bad = tmp_path / "bad.gguf"  # a well-formed GGUF with llama's architecture but none of its tensors
    w = gguf.GGUFWriter(bad, "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    refused(["eval", str(bad), "--engine", "llama.cpp", "--chunks", "1"], "bad.gguf", "llama.cpp could not load")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smol_path.read_bytes()[:1_000_000])
    refused(["eval", str(cut), "--engine", "llama.cpp"], "cut.gguf", "truncated")


def test_dry_run_checks_everything_and_writes_nothing(tmp_path):
    r, seconds = lowbit("quantize", "smollm2", "--method", "gptq", "--bits", "4", "--group-size", "64", "--out-format",
                        "gptq", "-o", "smol-gptq", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "" and seconds < 5, (r.stderr, seconds)
    assert "would quantize SmolLM2-135M-Instruct.Q4_1.gguf to int4-asym-g64 by gptq" in r.stdout
    assert "gptq directory smol-gptq" in r.stdout
    assert not list(tmp_path.iterdir())
