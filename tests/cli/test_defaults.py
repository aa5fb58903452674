"""Honest defaults and a discoverable command line: every default in --help, one default chunk count,
a warning where a model would be compared with itself, a listing of every name --format takes,
suggestions for misspelt names, --version, old spellings kept as aliases, llama-quantize's
``IN OUT TYPE`` and ``--pure``."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from lowbit.cli import DEFAULT_CHUNKS, build_parser


def lowbit(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900)


def _subparsers():  # type: ignore[no-untyped-def]
    p = build_parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


@pytest.mark.parametrize("cmd", ["quantize", "imatrix", "eval", "compare", "import"])
def test_every_default_is_in_help(cmd):
    sp = _subparsers()[cmd]
    text = sp.format_help()
    for a in sp._actions:
        if a.help == "==SUPPRESS==" or not a.option_strings or a.default in (None, False, "==SUPPRESS=="):
            continue
        shown = str(a.default)
        assert f"(default:{shown})".replace(" ", "") in re.sub(r"\s+", "", text), (cmd, a.option_strings, shown)


def test_eval_and_compare_evaluate_the_same_chunks_by_default():
    subs = _subparsers()
    ev = subs["eval"].parse_args(["smollm2"])
    cmp = subs["compare"].parse_args([])
    assert ev.chunks == cmp.chunks == DEFAULT_CHUNKS == 20


def test_eval_warns_when_the_model_has_nothing_to_be_compared_with(tmp_path):
    r = lowbit("eval", "smollm2", "--chunks", "1", "--ctx", "64")
    assert r.returncode == 0, r.stderr
    assert "warning:" in r.stderr and "compared with no other model" in r.stderr
    assert "PPL" in r.stdout and "KLD" not in r.stdout  # a KLD against itself would mean nothing


def test_formats_lists_every_name_format_takes():
    r = lowbit("formats")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for name in ("q4_k_m", "q3_k_s", "iq4_xs", "q2_k_s", "w8a8", "w4a4", "w8a8-fp8", "llm-int8", "nf4", "e8p",
                 "int4-asym-g128", "spqr3-g16", "compressed-tensors", "gptq", "awq", "bitsandbytes", "smoothquant"):
        assert re.search(rf"^\s+{re.escape(name)}\s", out, re.M), name
    spqr = next(ln for ln in out.splitlines() if ln.strip().startswith("spqr<"))
    assert "SpQR" in spqr and "integer codes" not in spqr
    assert re.search(r"^\s+w8a8\s+W8A8\s", out, re.M)


def test_version_and_suggestions():
    from lowbit import __version__

    r = lowbit("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"lowbit {__version__}"
    r = lowbit("quantise", "smollm2")
    assert r.returncode == 2 and "did you mean 'quantize'?" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [
    ["imatrix", "smollm2", "-o", "i.dat", "--text", "t.txt", "--chunks", "2", "--ctx", "64", "--output-format", "dat"],
    ["quantize", "smollm2", "--method", "gptq", "--bits", "4", "--calib-text", "t.txt", "--calib-samples", "2",
     "--calib-len", "64", "-o", "ck"],
    ["compare", "smollm2", "--formats", "q8_0", "--out-dir", "cmp", "--calib-samples", "2", "--calib-len", "64"],
])
def test_old_spellings_are_aliases(args, tmp_path):
    (tmp_path / "t.txt").write_text("text " * 200)
    r = lowbit(*args, "--dry-run", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("dry run"), r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name != "t.txt"]
    p = _subparsers()[args[0]]
    ns = p.parse_args(args[1:])
    if args[0] == "imatrix":
        assert (ns.calib_text, ns.calib_chunks, ns.calib_ctx, ns.out_format) == ("t.txt", 2, 64, "dat")
    elif args[0] == "quantize":
        assert (ns.calib_chunks, ns.calib_ctx) == (2, 64)
    else:
        assert (ns.out, ns.calib_chunks) == ("cmp", 2)


def test_llama_quantize_positional_form_and_pure(tmp_path, smol_path):
    """``lowbit quantize IN OUT TYPE`` as llama-quantize takes them; --pure as llama-quantize --pure: the
    tied embedding gets Q4_0 too instead of llama.cpp's Q8_0, byte for byte as llama.cpp writes it."""
    import gguf
    import numpy as np

    from lowbit.eval.llamacpp import llama_quantize

    out = tmp_path / "pure.gguf"
    r = lowbit("quantize", "smollm2", str(out), "Q4_0", "--pure", "--quiet")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "(f32 61, q4_0 211)" in r.stdout, r.stdout
    ref = tmp_path / "llama.gguf"
    llama_quantize(smol_path, ref, "q4_0-pure")
    ours, theirs = gguf.GGUFReader(out), gguf.GGUFReader(ref)
    by_name = {t.name: t for t in theirs.tensors}
    assert len(ours.tensors) == len(by_name)
    for t in ours.tensors:
        assert t.tensor_type == by_name[t.name].tensor_type and np.array_equal(t.data, by_name[t.name].data), t.name
    r = lowbit("quantize", "smollm2", str(tmp_path / "x.gguf"), "int4-g128", "--pure")
    assert r.returncode == 2 and "--pure takes a llama.cpp file type" in r.stderr
