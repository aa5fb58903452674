"""The command line: one clear error line and exit code 2 on bad input, no partial output; real runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def lowbit(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900, env=None if env is None else {**os.environ, **env})


def _one_error_line(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, r.stderr
    # progress bars may come first (on \r-separated lines); the error is one line, the last one
    lines = [ln for ln in re.split(r"[\r\n]", r.stderr) if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("lowbit: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    assert "Traceback" not in r.stderr


def test_unknown_format(tmp_path):
    r = lowbit("quantize", "smollm2", "--format", "q4_9", "--out", str(tmp_path / "o.gguf"))
    _one_error_line(r, "unknown format 'q4_9'")
    assert not list(tmp_path.iterdir())


def test_missing_and_truncated_model(tmp_path, smol_path):
    r = lowbit("quantize", str(tmp_path / "nope.gguf"), "-f", "q8_0", "-o", str(tmp_path / "o.gguf"))
    _one_error_line(r, "nope.gguf", "no such file")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smol_path.read_bytes()[:40_000_000])
    r = lowbit("quantize", str(cut), "-f", "q8_0", "-o", str(tmp_path / "o.gguf"))
    _one_error_line(r, "cut.gguf", "truncated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]


@pytest.mark.parametrize("tensor", ["blk.3.attn_norm.weight", "blk.5.ffn_up.weight"])
def test_nan_weights_are_refused(tensor, tmp_path, smol_path):
    import gguf

    reader = gguf.GGUFReader(smol_path)
    t = next(t for t in reader.tensors if t.name == tensor)
    data = bytearray(smol_path.read_bytes())
    off = int(t.data_offset)
    if t.tensor_type == gguf.GGMLQuantizationType.F32:
        data[off + 8 : off + 12] = b"\x00\x00\xc0\x7f"  # float32 NaN
    else:
        data[off : off + 2] = b"\x00\x7e"  # the fp16 scale d of the first block: NaN
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(bytes(data))
    r = lowbit("quantize", str(bad), "-f", "q8_0", "-o", str(tmp_path / "o.gguf"))
    _one_error_line(r, "nan.gguf", tensor, "NaN or Inf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.gguf"]


def test_format_without_gguf_type_and_existing_output(tmp_path):
    r = lowbit("quantize", "smollm2", "-f", "nf4", "-o", str(tmp_path / "o.gguf"))
    _one_error_line(r, "nf4 has no GGUF type")
    (tmp_path / "o.gguf").write_text("keep me")
    r = lowbit("quantize", "smollm2", "-f", "q8_0", "-o", str(tmp_path / "o.gguf"))
    _one_error_line(r, "already exists")
    assert (tmp_path / "o.gguf").read_text() == "keep me"


def test_bad_text_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00binary")
    r = lowbit("eval", "smollm2", "--text", str(bad))
    _one_error_line(r, "bad.txt", "not UTF-8")


def test_quantize_writes_a_gguf(tmp_path):
    out = tmp_path / "smol-q5_0.gguf"
    r = lowbit("quantize", "smollm2", "-f", "q5_0", "-o", str(out), "--quiet")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert out.is_file() and "bits/weight" in r.stdout
    # both sizes: the file's, and its weights' (the figure compare reports), which the metadata makes smaller
    m = re.search(r"wrote \S+: ([0-9.]+) MB on disk; weights ([0-9.]+) MB, ([0-9.]+) bits/weight", r.stdout)
    assert m and abs(float(m.group(1)) - out.stat().st_size / 1e6) < 0.06 and 0 < float(m.group(1)) - float(m.group(2)) < 3
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


@pytest.mark.slow
def test_compare_writes_table_json_and_plot(tmp_path):
    r = lowbit("compare", "smollm2", "--formats", "q8_0,int4-asym-g64", "--chunks", "1", "--ctx", "128", "--quiet",
               "--out-dir", str(tmp_path))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "| q8_0 |" in r.stdout and "| int4-asym-g64 |" in r.stdout
    doc = json.loads((tmp_path / "compare.json").read_text())
    rows = {row["format"]: row for row in doc["rows"]}
    assert rows["q8_0"]["kld_mean"] < rows["int4-asym-g64"]["kld_mean"]
    assert rows["q8_0"]["bpw"] > rows["int4-asym-g64"]["bpw"]
    png = (tmp_path / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_imatrix_then_quantize_and_compare_with_it(tmp_path):
    im = tmp_path / "smol.imatrix.gguf"
    r = lowbit("imatrix", "smollm2", "-o", str(im), "--chunks", "2", "--quiet")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "210 tensors, 2 chunks of 512 tokens" in r.stdout
    out = tmp_path / "smol-q4_k_m.gguf"
    r = lowbit("quantize", "smollm2", "-f", "q4_k_m", "--imatrix", str(im), "-o", str(out), "--quiet")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "q4_k 16" in r.stdout and "q6_k 14" in r.stdout, r.stdout
    r = lowbit("compare", "smollm2", "--formats", "q4_k_m,q4_k_m+imatrix", "--imatrix", str(im), "--chunks", "1", "--ctx", "128",
               "--quiet", "--out-dir", str(tmp_path / "cmp"))
    assert r.returncode == 0, r.stderr
    assert "| q4_k_m |" in r.stdout and "| q4_k_m+imatrix |" in r.stdout
    r = lowbit("quantize", "smollm2", "-f", "q2_k_s", "-o", str(tmp_path / "x.gguf"))
    _one_error_line(r, "Q2_K_S needs an importance matrix")
    # with one it is made (the preflight plans the file as it will be written: with the matrix)
    q2 = tmp_path / "q2_k_s.gguf"
    r = lowbit("quantize", "smollm2", "-f", "q2_k_s", "--imatrix", str(im), "-o", str(q2), "--quiet")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "q2_k 27" in r.stdout, r.stdout
    q2.unlink()
    r = lowbit("quantize", "smollm2", "-f", "q4_k_m", "--imatrix", str(out), "-o", str(tmp_path / "y.gguf"))
    _one_error_line(r, "smol-q4_k_m.gguf: not a valid importance matrix file")
    assert {p.name for p in tmp_path.iterdir()} == {"cmp", im.name, out.name}


def _shows_an_eta(stderr: str, bar: str) -> None:
    """The long step's bar shows its remaining time once its first step is done ([elapsed<remaining]),
    and stderr holds nothing but lowbit's bars."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]", stderr) if ln.strip()]
    assert any(ln.startswith(bar) and re.search(r"\[\d\d:\d\d<\d\d:\d\d", ln) for ln in lines), lines[-20:]
    own = ("load ", "quantize ", "eval ", "imatrix", "sensitivity", "gptq ", "calibrate")
    assert all(ln.startswith(own) for ln in lines), [ln for ln in lines if not ln.startswith(own)][:5]


def test_quantize_with_a_method_writes_a_checkpoint_that_evaluates(tmp_path):
    out = tmp_path / "smol-gptq-int4"
    r = lowbit("quantize", "smollm2", "--method", "gptq", "--bits", "4", "--group-size", "128", "--calib-samples", "2",
               "--calib-len", "128", "-o", str(out))
    assert r.returncode == 0, r.stderr
    _shows_an_eta(r.stderr, "gptq ")
    assert "gptq: 2 x 128 calibration tokens" in r.stdout and "int4-asym-g128 210" in r.stdout, r.stdout
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["method"] == "gptq" and manifest["scheme"] == "int4-asym-g128"
    assert len(manifest["modules"]) == 210
    r = lowbit("eval", str(out), "--reference", "smollm2", "--chunks", "1", "--ctx", "128", "--quiet")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    m = re.search(r"KLD mean ([0-9.]+)", r.stdout)
    assert m and 0 < float(m.group(1)) < 1.0, r.stdout
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_method_arguments_are_checked(tmp_path):
    r = lowbit("quantize", "smollm2", "--method", "gptq", "-f", "int4-g128", "-o", str(tmp_path / "o.gguf"))
    _one_error_line(r, "int4-g128 has no GGUF type")
    r = lowbit("quantize", "smollm2", "--method", "gptq", "-f", "q4_0", "--bits", "4", "-o", str(tmp_path / "o"))
    _one_error_line(r, "either --format or --bits")
    r = lowbit("quantize", "smollm2", "--method", "spqr", "-f", "int3-g16", "--calib-samples", "1", "-o", str(tmp_path / "o"))
    _one_error_line(r, "spqr format")
    r = lowbit("quantize", "smollm2", "--method", "quip", "-f", "q4_0", "-o", str(tmp_path / "o.gguf"))
    _one_error_line(r, "cannot go into a GGUF file")
    r = lowbit("compare", "smollm2", "--formats", "int4-g128+gptq+imatrix", "--chunks", "1")
    _one_error_line(r, "drop '+imatrix'")
    r = lowbit("compare", "smollm2", "--formats", "int4-g128+magic", "--chunks", "1")
    _one_error_line(r, "unknown suffix '+magic'")
    assert not list(tmp_path.iterdir())


def test_activation_schemes_on_the_command_line(tmp_path):
    """W8A8 with SmoothQuant as a checkpoint that reloads with its integer layers; compare shows
    W/A bits and LLM.int8()'s outliers; activation schemes refuse GGUF output and weight methods."""
    out = tmp_path / "smol-w8a8-sq"
    r = lowbit("quantize", "smollm2", "-f", "w8a8-static-mse", "--method", "smoothquant", "--calib-samples", "2",
               "--calib-len", "128", "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "lowbit.json").read_text())
    acts = [m["act"] for m in manifest["modules"].values()]
    assert len(acts) == 210 and all(a["kind"] == "int" and a["static"] for a in acts)
    r = lowbit("eval", str(out), "--reference", "smollm2", "--chunks", "1", "--ctx", "128", "--quiet")
    assert r.returncode == 0, r.stderr
    m = re.search(r"KLD mean ([0-9.]+)", r.stdout)
    assert m and 0 < float(m.group(1)) < 0.5, r.stdout
    r = lowbit("compare", "smollm2", "--formats", "w8a8,llm-int8", "--chunks", "1", "--ctx", "128", "--quiet",
               "--out-dir", str(tmp_path / "cmp"))
    assert r.returncode == 0, r.stderr
    assert "| w8a8 | W8A8 |" in r.stdout and "| llm-int8 | W8A8 |" in r.stdout, r.stdout
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    llm = next(x for x in doc["comparison"]["results"] if x["format"] == "llm-int8")
    assert len(llm["details"]["outlier_fraction"]) == 210
    assert {p.name for p in tmp_path.iterdir()} == {out.name, "cmp"}


def test_activation_scheme_arguments_are_checked(tmp_path):
    r = lowbit("quantize", "smollm2", "-f", "w8a8", "-o", str(tmp_path / "o.gguf"))
    _one_error_line(r, "GGUF files cannot describe")
    r = lowbit("quantize", "smollm2", "-f", "w8a8", "--method", "gptq", "-o", str(tmp_path / "o"))
    _one_error_line(r, "its methods are rtn, smoothquant and qat")
    r = lowbit("quantize", "smollm2", "-f", "int4-g128", "--method", "smoothquant", "-o", str(tmp_path / "o"))
    _one_error_line(r, "smooths activations")
    r = lowbit("compare", "smollm2", "--formats", "q4_0+smoothquant", "--chunks", "1")
    _one_error_line(r, "SmoothQuant smooths activations")
    assert not list(tmp_path.iterdir())


def test_target_bpw_writes_a_searched_gguf(tmp_path):
    out = tmp_path / "smol-4.5.gguf"
    # a few candidates keep the sensitivity pass short (every candidate quantizes every tensor); one of
    # them excluded; without --quiet, the sensitivity bar shows its remaining time
    r = lowbit("quantize", "smollm2", "--target-bpw", "6.0", "--sens-chunks", "1", "--calib-len", "64", "--calib-samples", "4",
               "--types", "q4_0,q4_1,q5_0,q6_k,q8_0", "--exclude-types", "q4_1", "-o", str(out),
               env={"LOWBIT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    _shows_an_eta(r.stderr, "sensitivity")
    m = re.search(r"chose ([0-9.]+) MB \(([0-9.]+) bits/weight\); predicted KLD ([0-9.]+), measured ([0-9.]+)", r.stdout)
    assert m, r.stdout
    assert float(m.group(2)) <= 6.0 and float(m.group(3)) > 0 and float(m.group(4)) > 0
    from lowbit.model.gguf_file import GGUFFile

    gf = GGUFFile(out)
    types = {t.type for t in gf.tensors.values()}
    assert len(types) > 2 and 3 not in types  # several types, never Q4_1 (ggml type 3)
    r = lowbit("quantize", "smollm2", "--target-bpw", "4", "-f", "q4_0", "-o", str(tmp_path / "x.gguf"))
    _one_error_line(r, "drop --format")
    r = lowbit("quantize", "smollm2", "--target-size", "lots", "-o", str(tmp_path / "x.gguf"))
    _one_error_line(r, "give a size such as")
    r = lowbit("quantize", "smollm2", "--target-bpw", "4", "--types", "nf4,q4_0", "-o", str(tmp_path / "x.gguf"))
    _one_error_line(r, "nf4: not a type the search can write into a GGUF file")
    r = lowbit("quantize", "smollm2", "--target-bpw", "4", "--out-format", "gptq", "-o", str(tmp_path / "x"))
    _one_error_line(r, "takes one format for every layer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", out.name]


def test_target_bpw_writes_a_checkpoint_of_lowbit_formats(tmp_path):
    out = tmp_path / "smol-mix"
    cache = {"LOWBIT_CACHE": str(tmp_path / "cache")}
    # 7 bits per weight over the whole model leave the linear layers about 4.6 (the FP16 embedding takes 3.4)
    search = ("quantize", "smollm2", "--target-bpw", "7.0", "--types", "int3-asym-g64,int4-asym-g64,nf4,int8-ch",
              "--sens-chunks", "1", "--calib-ctx", "64", "--quiet")
    r = lowbit(*search, "-o", str(out), env=cache)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "(cached for later runs)" in r.stdout, r.stdout
    # the sensitivities are measured once: a second search with the same model, text and settings reuses them
    r2 = lowbit(*search, "-o", str(tmp_path / "again"), env=cache)
    assert r2.returncode == 0 and re.search(r"sensitivities of 210 tensors on \d+ calibration tokens reused from",
                                            r2.stdout), r2.stdout
    assert r2.stdout.splitlines()[1] == r.stdout.splitlines()[1]  # the same budget, mix, predicted and measured KLD
    from safetensors.torch import load_file

    first, again = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == again.keys()
    differ = [k for k in first if not torch.equal(first[k], again[k])]
    assert not differ, f"{len(differ)} tensors differ between the measured and the reused run: {differ[:5]}"
    m = re.search(r"chose ([0-9.]+) MB \(([0-9.]+) bits/weight\); predicted KLD ([0-9.]+)", r.stdout)
    assert m and float(m.group(2)) <= 7.0, r.stdout
    manifest = json.loads((out / "lowbit.json").read_text())
    formats = {e["format"] for e in manifest["modules"].values()}
    assert len(manifest["modules"]) == 30 * 7 and len(formats) > 1
    assert formats <= {"int3-asym-g64", "int4-asym-g64", "nf4", "int8-ch"}
    assert (out / "model.safetensors").stat().st_size <= float(m.group(1)) * 1e6 * 1.01
    r = lowbit("eval", str(out), "--reference", "smollm2", "--chunks", "1", "--ctx", "128")
    assert r.returncode == 0, r.stderr
    kld = re.search(r"KLD mean ([0-9.]+)", r.stdout)
    assert kld and 0 < float(kld.group(1)) < 1.0, r.stdout


def test_export_to_compressed_tensors_from_the_command_line(tmp_path):
    out = tmp_path / "smol-ct"
    r = lowbit("quantize", "smollm2", "-f", "int4-g64", "--out-format", "compressed-tensors", "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["config_groups"]["group_0"]["weights"]["group_size"] == 64
    r = lowbit("quantize", "smollm2", "-f", "w8a8", "--out-format", "compressed-tensors", "-o", str(tmp_path / "x"))
    _one_error_line(r, "writes a directory of a weight-only model")
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_export_to_awq_from_the_command_line(tmp_path):
    out = tmp_path / "smol-awq"
    r = lowbit("quantize", "smollm2", "-f", "int4-asym-g64", "--out-format", "awq", "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (cfg["quant_method"], cfg["version"], cfg["group_size"]) == ("awq", "gemm", 64)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
