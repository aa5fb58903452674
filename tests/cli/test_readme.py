"""The README's usage block is runnable as written: every command line runs, in order, in an empty
directory with --dry-run, which checks every argument against the real model and files; a line
whose output a later line reads is then also run for real, in a tiny form (a short calibration;
GPTQ's checkpoint made by round to nearest in the same format, which is all the later line's check
reads), so that the later line is checked against a real file.  The Python example runs as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
#: what a real run of a producer line adds to keep it short
TINY = {"imatrix": ["--calib-chunks", "1", "--calib-ctx", "64"]}


def _block(lang: str) -> str:
    text = README.read_text()
    use = text[text.index("## Use"):]
    m = re.search(rf"```{lang}\n(.*?)```", use, re.S)
    assert m, f"no {lang} block in the README's usage section"
    return m.group(1)


def usage_lines() -> list[list[str]]:
    out = []
    for line in _block("bash").splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        assert words[0] == ".venv/bin/lowbit", line
        out.append(words[1:])
    return out


def _inputs(args: list[str]) -> set[str]:
    """The files a command line reads: MODEL, --reference, --imatrix."""
    found = {args[1]} if len(args) > 1 else set()
    for opt in ("--reference", "--imatrix"):
        if opt in args:
            found.add(args[args.index(opt) + 1])
    return found


def _outputs(args: list[str]) -> set[str]:
    found = set()
    for opt in ("-o", "--out"):
        if opt in args:
            found.add(args[args.index(opt) + 1])
    return found


def test_the_usage_block_is_runnable_as_written(tmp_path, monkeypatch, capsys):
    from lowbit.cli import main

    monkeypatch.chdir(tmp_path)
    lines = usage_lines()
    assert len(lines) > 20
    read_later = [set().union(*(_inputs(a) for a in lines[i + 1:])) for i in range(len(lines))]
    real = 0
    for i, args in enumerate(lines):
        dry = args if args[0] == "formats" else [*args, "--dry-run"]
        code = main(dry)
        out, err = capsys.readouterr()
        assert code == 0, (" ".join(args), err)
        if args[0] != "formats":
            assert out.startswith("dry run: all arguments checked; would ") and err == "", (args, out, err)
        if _outputs(args) & read_later[i]:
            cmd = list(args)
            if "gptq" in cmd:
                cmd[cmd.index("gptq")] = "rtn"
            cmd += [*TINY.get(args[0], []), "--quiet"]
            r = subprocess.run([sys.executable, "-m", "lowbit.cli", *cmd], capture_output=True, text=True,
                               timeout=900)
            assert r.returncode == 0 and r.stderr == "", (" ".join(cmd), r.stderr[-2000:])
            real += 1
    assert real == 3  # smol-q4_0.gguf, smol.imatrix.gguf and smol-gptq-w4g128 are read by later lines
    assert {p.name for p in tmp_path.iterdir()} == {"smol-q4_0.gguf", "smol.imatrix.gguf", "smol-gptq-w4g128"}


@pytest.mark.parametrize("line", [shlex.join(a) for a in usage_lines()])
def test_each_usage_line_parses(line):
    """Every option of every line exists (argparse would refuse an unknown one)."""
    from lowbit.cli import build_parser

    build_parser().parse_args(shlex.split(line))


def test_the_python_example_runs(tmp_path):
    code = _block("python")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    bpw, size = r.stdout.split()
    assert 6.0 < float(bpw) < 7.5 and int(size) > 1e7
    assert {p.name for p in tmp_path.iterdir()} == {"smol-nf4", "smol-nf4-bnb"}
