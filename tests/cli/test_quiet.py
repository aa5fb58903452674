"""Print only what the user asked for: with --quiet stderr holds errors and nothing else; without it,
only lowbit's own progress bars (with their ETA) and results appear, never other libraries' notices."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

#: how lowbit labels its progress bars
BARS = ("load ", "quantize ", "eval ", "imatrix", "sensitivity", "gptq ", "awq ", "quip ", "spqr ", "QAT", "smoothing",
        "calibrate")
FOREIGN = ("Failed to load", "_pytree", "Converting and de-quantizing", "Warning", "warn", "[transformers]",
           "Loading weights", "Writing model shards")


def lowbit(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900)


# quantize (GGUF and checkpoint), imatrix, eval and compare with --quiet are run by test_cli.py, which
# checks that their stderr is empty; import is checked here
QUIET = {
    "import": ["import", "smollm2", "-o", "hf"],
    "eval-gguf": ["eval", "smollm2", "--chunks", "1", "--ctx", "64"],
}


@pytest.mark.parametrize("name", list(QUIET))
def test_quiet_means_an_empty_stderr(name, tmp_path):
    r = lowbit(*QUIET[name], "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr[-3000:]
    assert r.stdout.strip()  # the results are still there


def test_the_python_api_is_silent_without_progress(tmp_path):
    code = ("import lowbit\n"
            "m = lowbit.load_model('smollm2', progress=False)\n"
            "r = lowbit.quantize_model(m, 'nf4', progress=False)\n"
            f"lowbit.save(m, {str(tmp_path / 'ck')!r})\n"
            "print(round(r.bits_per_weight, 3))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout.strip() == "6.923", (r.stdout, r.stderr[-3000:])


def test_without_quiet_only_lowbits_bars_with_an_eta(tmp_path):
    r = lowbit("imatrix", "smollm2", "-o", "i.gguf", "--calib-chunks", "3", "--calib-ctx", "64", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [ln.strip() for ln in re.split(r"[\r\n]", r.stderr) if ln.strip()]
    assert lines and all(ln.startswith(BARS) for ln in lines), [ln for ln in lines if not ln.startswith(BARS)][:5]
    assert not any(f in r.stderr for f in FOREIGN)
    # the imatrix bar shows its remaining time once the first chunk is done: [elapsed<remaining, rate]
    assert any(ln.startswith("imatrix") and re.search(r"\[\d\d:\d\d<\d\d:\d\d", ln) and "?" not in ln.split("<")[1]
               for ln in lines), lines
