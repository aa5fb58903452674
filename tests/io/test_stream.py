"""Streaming Hugging Face -> GGUF: the bytes of the in-memory path, the same bytes run after run,
atomic output, and resumption after a real ``lowbit quantize`` process is killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.io.gguf_out import Journal, resumable_part
from lowbit.io.hf_stream import can_stream, write_gguf_streaming
from lowbit.testing.synthetic import bundled_tokenizer_dir, write_synthetic_llama

SMALL = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 8192, "max_position_embeddings": 2048}
#: big enough that q8_0 takes a few seconds: 12 layers of 512 (113 tensors)
KILLABLE = {**SMALL, "hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8}


@pytest.fixture(scope="module")
def killable_reference(models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted q8_0 run over the killable model."""
    out = tmp_path_factory.mktemp("ref") / "reference.gguf"
    write_gguf_streaming(models["killable"], out, "q8_0", progress=False, resume=False)
    return out


@pytest.fixture(scope="session")
def tok_dir() -> Path:
    from lowbit.env import cache_dir

    return bundled_tokenizer_dir(cache_dir() / "tokenizers" / "smollm2")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "untied": write_synthetic_llama(root / "untied", 2, tok_dir, seed=1, **SMALL),
        "tied": write_synthetic_llama(root / "tied", 2, tok_dir, seed=2, tied=True, layers_per_shard=2, **SMALL),
        "killable": write_synthetic_llama(root / "killable", 12, tok_dir, seed=3, layers_per_shard=4, **KILLABLE),
        # the tokenizer's full vocabulary, so that calibration text runs through it
        "calib": write_synthetic_llama(root / "calib", 2, tok_dir, seed=4, **{**SMALL, "vocab_size": 49152}),
    }


def _journal(out: Path) -> Path:
    return out.with_name(f".{out.name}.part-resume.json")


@pytest.mark.parametrize(("kind", "fmt"), [("untied", "q4_k_m"), ("tied", "q8_0")])
def test_streaming_gives_the_bytes_of_the_in_memory_path(models, tmp_path, kind, fmt):
    from lowbit.io.hf_gguf import write_gguf_from_hf
    from lowbit.model.load import load_model

    d = models[kind]
    assert can_stream(d)
    streamed, in_memory = tmp_path / "streamed.gguf", tmp_path / "in-memory.gguf"
    report = write_gguf_streaming(d, streamed, fmt, progress=False)
    write_gguf_from_hf(load_model(d, progress=False), in_memory, fmt, progress=False)
    assert streamed.read_bytes() == in_memory.read_bytes()
    assert not _journal(streamed).exists() and not resumable_part(streamed).exists()
    assert len(report.tensors) == 2 * 9 + (2 if kind == "tied" else 3)


def test_the_same_arguments_give_the_same_bytes(models, tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_gguf_streaming(models["untied"], a, "q8_0", progress=False)
    write_gguf_streaming(models["untied"], b, "q8_0", progress=False)
    assert a.read_bytes() == b.read_bytes()


def _start(model: Path, out: Path, fmt: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", str(model), "--format", fmt, "--out", str(out), "--quiet"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_mid_run(model: Path, out: Path, fmt: str) -> int:
    """Start ``lowbit quantize``, SIGKILL it once its journal records a few finished tensors; returns how many."""
    proc = _start(model, out, fmt)
    journal, done, n = _journal(out), 0, 0
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                state = Journal.read(journal)
                done, n = state["done"], state["n_tensors"]
            except (OSError, ValueError):
                pass
            if 3 <= done:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 0 < done < n
    return done


def test_a_killed_run_leaves_no_output_and_resumes_to_the_same_bytes(models, killable_reference, tmp_path):
    model = models["killable"]

    out = tmp_path / "out.gguf"
    done = _kill_mid_run(model, out, "q8_0")
    assert not out.exists()  # nothing that looks complete at the final path
    assert resumable_part(out).exists()

    proc = _start(model, out, "q8_0")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert stderr == "", stderr  # --quiet: the note on the resumed run is among the results
    resumed = [ln for ln in stdout.splitlines() if "resuming after tensor" in ln]
    assert resumed, stdout
    k = int(resumed[0].split("resuming after tensor ")[1].split()[0])
    assert k >= done
    assert "wrote" in stdout
    assert out.read_bytes() == killable_reference.read_bytes()
    assert not _journal(out).exists() and not resumable_part(out).exists()


def test_changed_input_after_a_kill_starts_over(models, killable_reference, tmp_path):
    import shutil

    model = tmp_path / "copy" / "killable"  # the directory's name goes into the file (general.name)
    shutil.copytree(models["killable"], model)
    out = tmp_path / "out.gguf"
    _kill_mid_run(model, out, "q8_0")
    shard = sorted(model.glob("*.safetensors"))[-1]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the input looks changed
    proc = _start(model, out, "q8_0")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0 and stderr == "", stderr
    assert "starting over: the inputs or arguments changed (files)" in stdout and "resuming" not in stdout
    assert out.read_bytes() == killable_reference.read_bytes()


def test_changed_format_is_a_different_fingerprint(models, tmp_path):
    from lowbit.io.gguf_out import array_digest, fingerprint

    files = sorted(models["tied"].glob("*.safetensors"))
    a = fingerprint(files, format="q8_0", imatrix=None)
    assert a == fingerprint(files, format="q8_0", imatrix=None)
    assert a != fingerprint(files, format="q4_k_m", imatrix=None)
    assert a != fingerprint(files, format="q8_0", imatrix=array_digest({"blk.0.attn_q.weight": np.ones(4)}))


def _interrupt_after(n: int, monkeypatch, run) -> None:  # type: ignore[no-untyped-def]
    """Run ``run`` with a KeyboardInterrupt raised as the writer checks its tensor ``n + 1``."""
    import lowbit.io.gguf_out as gguf_out

    real = gguf_out._check_finite
    seen: set[str] = set()  # a tensor read in several row chunks is checked once per chunk

    def interrupt(w, source, name):  # type: ignore[no-untyped-def]
        seen.add(name)
        if len(seen) > n:
            raise KeyboardInterrupt
        real(w, source, name)

    monkeypatch.setattr(gguf_out, "_check_finite", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(gguf_out, "_check_finite", real)


def test_an_interrupted_write_resumes_in_process_and_a_damaged_part_starts_over(models, tmp_path, monkeypatch,
                                                                               capsys):

    model = models["untied"]
    reference = tmp_path / "reference.gguf"
    write_gguf_streaming(model, reference, "q8_0", progress=False, resume=False)
    out = tmp_path / "out.gguf"
    _interrupt_after(5, monkeypatch, lambda: write_gguf_streaming(model, out, "q8_0", progress=False))
    state = Journal.read(_journal(out))
    assert state["done"] == 5 and not out.exists()

    # a partial file shorter than the journal says: start over, same bytes in the end
    part = resumable_part(out)
    with open(part, "r+b") as fh:
        fh.truncate(state["offset"] - 1)
    report = write_gguf_streaming(model, out, "q8_0", progress=False)
    assert "starting over" in report.details["journal"]
    assert out.read_bytes() == reference.read_bytes()


def test_two_runs_cannot_write_the_same_output(models, tmp_path):
    import fcntl

    out = tmp_path / "out.gguf"
    with open(resumable_part(out), "ab") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        with pytest.raises(LowbitError, match="another lowbit run"):
            write_gguf_streaming(models["untied"], out, "q8_0", progress=False)
    assert not out.exists()


def test_journal_rejects_a_different_fingerprint(tmp_path):
    out = tmp_path / "x.gguf"
    j = Journal(out, {"format": "q8_0"})
    assert j.part.name == ".x.gguf.part" and j.path.name == ".x.gguf.part-resume.json"
    assert json.loads(json.dumps(j.fingerprint)) == {"format": "q8_0"}


def test_streaming_names_the_file_of_a_truncated_shard(models, tmp_path):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(models["tied"], d)
    shard = sorted(d.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(LowbitError, match=shard.name):
        write_gguf_streaming(d, tmp_path / "x.gguf", "q8_0", progress=False)
    assert np.all([not p.name.startswith(".x.gguf") for p in tmp_path.iterdir()])


def test_device_plan_keeps_layers_whole_and_in_order(models):
    from lowbit.model.devices import device_for, plan_devices

    # two pretend GPUs of 40 MB each (the layers have 7 MB) and the CPU: cuda:0 fills first, then cuda:1
    dmap = plan_devices(models["killable"], max_memory={0: 40_000_000, 1: 40_000_000, "cpu": 10**10})
    layers = [dmap[f"model.layers.{i}"] for i in range(12)]
    assert layers == sorted(layers, key=["cuda:0", "cuda:1", "cpu"].index)
    assert {"cuda:0", "cuda:1"} <= set(layers)
    assert device_for("model.layers.3.mlp.up_proj.weight", dmap) == dmap["model.layers.3"]
    assert device_for("model.embed_tokens.weight", dmap) == dmap["model.embed_tokens"]
    assert device_for("anything", {"": "cpu"}) == "cpu"


def test_cli_device_auto_runs_here_with_the_same_bytes(models, tmp_path):
    from lowbit.cli import main

    ref = tmp_path / "ref.gguf"
    write_gguf_streaming(models["tied"], ref, "q8_0", progress=False)
    out = tmp_path / "auto.gguf"
    assert main(["quantize", str(models["tied"]), "--format", "q8_0", "--out", str(out), "--device", "auto",
                 "--quiet"]) == 0
    assert out.read_bytes() == ref.read_bytes()
    with_map = tmp_path / "map.gguf"
    write_gguf_streaming(models["tied"], with_map, "q8_0", progress=False, device_map={"": "cpu"})
    assert with_map.read_bytes() == ref.read_bytes()


def test_gguf_to_gguf_resumes_to_the_same_bytes(models, tmp_path, monkeypatch, capsys):
    import lowbit.io.gguf_out as gguf_out

    src = tmp_path / "src-q8_0.gguf"
    write_gguf_streaming(models["untied"], src, "q8_0", progress=False)
    reference, out = tmp_path / "reference.gguf", tmp_path / "out.gguf"
    gguf_out.write_gguf(src, reference, "q4_0", progress=False)
    _interrupt_after(7, monkeypatch, lambda: gguf_out.write_gguf(src, out, "q4_0", progress=False, resume=True))
    assert not out.exists() and Journal.read(_journal(out))["done"] == 7
    capsys.readouterr()
    report = gguf_out.write_gguf(src, out, "q4_0", progress=False, resume=True)
    assert "resuming after tensor 7 of 21" in report.details["journal"]
    assert capsys.readouterr().err == ""  # no progress asked for: nothing on stderr
    assert out.read_bytes() == reference.read_bytes()
    assert len(report.tensors) == 21 and not _journal(out).exists()


def test_an_error_in_the_input_keeps_nothing(models, tmp_path, monkeypatch):
    import lowbit.io.gguf_out as gguf_out

    real = gguf_out._check_finite
    calls = {"n": 0}

    def nan_after_four(w, source, name):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        real(w * np.nan if calls["n"] > 4 else w, source, name)

    monkeypatch.setattr(gguf_out, "_check_finite", nan_after_four)
    with pytest.raises(LowbitError, match="NaN or Inf"):
        write_gguf_streaming(models["untied"], tmp_path / "x.gguf", "q8_0", progress=False)
    assert list(tmp_path.iterdir()) == []  # rerunning would fail the same way: no partial file, no journal


def test_changed_arguments_after_a_kill_start_over(models, tmp_path):
    model = models["killable"]
    out = tmp_path / "out.gguf"
    _kill_mid_run(model, out, "q8_0")
    proc = _start(model, out, "f16")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0 and stderr == "", stderr
    assert "starting over: the inputs or arguments changed (format)" in stdout and "resuming" not in stdout
    reference = tmp_path / "reference.gguf"
    write_gguf_streaming(model, reference, "f16", progress=False, resume=False)
    assert out.read_bytes() == reference.read_bytes()


# ---- GPTQ and AWQ streamed one decoder layer at a time -----------------------------------------
def _calib(method: str):  # type: ignore[no-untyped-def]
    from lowbit.algorithms.awq import AWQConfig
    from lowbit.model.calibrate import CalibConfig

    return CalibConfig(method=method, n_samples=4, seq_len=64, batch_size=2, awq=AWQConfig(n_grid=5, n_clip_grid=5))


def _tensors(path: Path) -> dict[str, bytes]:
    from lowbit.model.gguf_file import GGUFFile

    f = GGUFFile(path)
    return {n: f.raw(n).tobytes() for n in f.tensors}


@pytest.mark.parametrize(("method", "fmt"), [("gptq", "q4_k_m"), ("awq", "q4_0")])
def test_streamed_calibration_gives_the_in_memory_tensors(models, tmp_path, method, fmt):
    """GPTQ/AWQ streamed layer by layer write the decoder layers the in-memory path writes, byte for
    byte; the embeddings are round-to-nearest of the original (the in-memory path re-quantizes the
    dequantized values it evaluated with, so its token_embd may differ by rounding)."""
    from lowbit.eval.data import calibration_text
    from lowbit.io.hf_gguf import write_gguf_from_hf
    from lowbit.io.hf_stream import write_gguf_calibrated_streaming
    from lowbit.model.calibrate import calibrate_quantize
    from lowbit.model.imatrix import imatrix_chunks
    from lowbit.model.load import load_model

    d, cfg, text = models["calib"], _calib(method), calibration_text()
    streamed, in_memory, rtn = tmp_path / "s.gguf", tmp_path / "m.gguf", tmp_path / "rtn.gguf"
    report, logs = write_gguf_calibrated_streaming(d, streamed, fmt, cfg, text, progress=False)
    assert {lg.layer for lg in logs} == {0, 1}
    assert not list(tmp_path.glob(".*")), "journal, part file or saved hidden states left behind"
    loaded = load_model(d, progress=False)
    chunks = imatrix_chunks(loaded, text, n_ctx=cfg.seq_len, max_chunks=cfg.n_samples)
    calibrate_quantize(loaded, fmt, chunks, cfg, progress=False)
    write_gguf_from_hf(loaded, in_memory, fmt, progress=False)
    write_gguf_streaming(d, rtn, fmt, progress=False)
    s, m, r = _tensors(streamed), _tensors(in_memory), _tensors(rtn)
    assert s.keys() == m.keys() and len(report.tensors) == len(s)
    layer_tensors = [n for n in s if n.startswith("blk.")]
    assert len(layer_tensors) == 18
    assert all(s[n] == m[n] for n in layer_tensors)
    assert s["token_embd.weight"] == r["token_embd.weight"] and s["output.weight"] == m["output.weight"]
    # calibration changed the layers: not round-to-nearest
    assert s["blk.1.ffn_down.weight"] != r["blk.1.ffn_down.weight"]


def test_streamed_calibration_resumes_from_the_saved_hidden_states(models, tmp_path, monkeypatch, capsys):
    """Interrupted inside layer 1, the rerun takes layer 1's inputs from the hidden states saved
    beside the part file (layer 0 is not calibrated again) and writes the uninterrupted bytes."""
    from lowbit.eval.data import calibration_text
    from lowbit.io.hf_stream import write_gguf_calibrated_streaming

    d, cfg, text = models["calib"], _calib("gptq"), calibration_text()
    reference = tmp_path / "reference.gguf"
    write_gguf_calibrated_streaming(d, reference, "q4_0", cfg, text, progress=False, resume=False)
    out = tmp_path / "out.gguf"
    # the interruption comes at the 6th tensor read as floats (calibrated ones are not read): in
    # llama.cpp's order the 3 outside the layers, layer 0's 2 norms, then layer 1's attn_norm, after
    # its attn_k was written
    _interrupt_after(5, monkeypatch,
                     lambda: write_gguf_calibrated_streaming(d, out, "q4_0", cfg, text, progress=False))
    hidden = out.with_name(f".{out.name}.part-hidden.pt")
    assert hidden.is_file() and not out.exists()
    import torch

    assert torch.load(hidden, weights_only=True)["layer"] == 1
    report, logs = write_gguf_calibrated_streaming(d, out, "q4_0", cfg, text, progress=False)
    assert "resuming after tensor" in report.details["journal"]
    assert {lg.layer for lg in logs} == {1}
    assert out.read_bytes() == reference.read_bytes()
    assert not hidden.exists()


def test_streamed_calibration_refuses_text_outside_the_vocabulary(models, tmp_path):
    from lowbit.io.hf_stream import write_gguf_calibrated_streaming

    with pytest.raises(LowbitError, match="vocabulary has 8192"):
        write_gguf_calibrated_streaming(models["untied"], tmp_path / "x.gguf", "q4_k_m", _calib("gptq"),
                                        "some text " * 400, progress=False)
    assert not list(tmp_path.iterdir())


def test_cli_streams_gptq_to_gguf(models, tmp_path):
    out = tmp_path / "x.gguf"
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", str(models["calib"]), "--format", "q4_k_m", "--method",
           "gptq", "--calib-samples", "2", "--calib-len", "64", "--out", str(out), "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "gptq: up to 2 x 64 calibration tokens" in res.stdout and out.is_file()
    assert len(_tensors(out)) == 2 * 9 + 3


def test_cli_streamed_gptq_takes_one_device_not_auto(models, tmp_path, capsys):
    from lowbit.cli import main

    assert main(["quantize", str(models["calib"]), "--format", "q4_0", "--method", "gptq", "--out",
                 str(tmp_path / "x.gguf"), "--device", "auto", "--quiet"]) != 0
    assert "one device, not auto" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_streamed_gptq_runs_on_the_gpu(models, tmp_path):
    """The whole layer loop on cuda: a complete file whose layers GPTQ changed, like the CPU run's."""
    from lowbit.eval.data import calibration_text
    from lowbit.io.hf_stream import write_gguf_calibrated_streaming

    cfg = _calib("gptq")
    cfg.device = "cuda"
    out, cpu, rtn = tmp_path / "gpu.gguf", tmp_path / "cpu.gguf", tmp_path / "rtn.gguf"
    _, logs = write_gguf_calibrated_streaming(models["calib"], out, "q4_0", cfg, calibration_text(), progress=False)
    cfg.device = "cpu"
    _, cpu_logs = write_gguf_calibrated_streaming(models["calib"], cpu, "q4_0", cfg, calibration_text(), progress=False)
    write_gguf_streaming(models["calib"], rtn, "q4_0", progress=False)
    g, r = _tensors(out), _tensors(rtn)
    assert len(g) == 2 * 9 + 3 and g["blk.1.ffn_down.weight"] != r["blk.1.ffn_down.weight"]
    for a, b in zip(logs, cpu_logs, strict=True):  # the same gain over round-to-nearest, up to float rounding
        assert a.error == pytest.approx(b.error, rel=0.05)


def test_journal_reads_up_to_its_last_complete_line(tmp_path):
    """Each finished tensor appends a line; a line cut short by a crash is dropped with nothing before it."""
    from lowbit.model.quantize import QuantReport, TensorRecord

    j = Journal(tmp_path / "x.gguf", {"format": "q8_0"})
    j.n = 3
    rep = QuantReport("q8_0")
    for i, name in enumerate(["a", "b"]):
        rep.tensors.append(TensorRecord(name, (2, 32), "q8_0", True, 272 * (i + 1), 0.01 * (i + 1)))
        j.save(i + 1, 100 * (i + 1), rep)
    assert len(j.path.read_text().splitlines()) == 2  # the whole state once, then one line per tensor
    with open(j.path, "a") as fh:
        fh.write('{"done": 3, "offs')
    state = Journal.read(j.path)
    assert (state["done"], state["offset"], state["n_tensors"]) == (2, 200, 3)
    assert state["records"] == [["a", [2, 32], "q8_0", True, 272, 0.01], ["b", [2, 32], "q8_0", True, 544, 0.02]]
