"""CONTRIBUTING.md's two examples, a new format and a new method, each one file: they run as written,
register themselves, and work through the public entry points without edits anywhere else."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from lowbit.formats import get_format, list_formats
from lowbit.model.methods import get_method, list_methods
from lowbit.model.recipe import Recipe, quantize

DOC = Path(__file__).resolve().parents[2] / "CONTRIBUTING.md"


@pytest.fixture(scope="module")
def registered():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 2
    for b in blocks:
        exec(compile(b, str(DOC), "exec"), {})
    return get_format("int5-rows"), get_method("obq-diag")


def test_the_new_format_registers_and_round_trips(registered):
    fmt, _ = registered
    assert "int5-rows" in list_formats()
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(0))
    qt = fmt.quantize(w)
    assert qt.nbytes() * 8 == fmt.storage_bits(tuple(w.shape))
    rel = float((fmt.dequantize(qt) - w).pow(2).sum() / w.pow(2).sum())
    assert 0 < rel < 0.01
    assert Recipe.parse("int5-rows").scheme.format is fmt


def test_the_new_method_registers_and_runs_layer_by_layer(registered, small):
    from lowbit.eval.data import calibration_text
    from lowbit.model.calibrate import CalibConfig
    from lowbit.model.imatrix import imatrix_chunks

    _, method = registered
    assert "obq-diag" in list_methods()
    chunks = imatrix_chunks(small, calibration_text(), n_ctx=64, max_chunks=4)
    model = copy.deepcopy(small.model)
    cfg = CalibConfig(n_samples=4, seq_len=64, batch_size=2)
    report = quantize(model, Recipe.parse("q4_0+obq-diag", calib=cfg), chunks=chunks, progress=False)
    assert report.logs and all(lg.error <= lg.rtn_error * (1 + 1e-6) for lg in report.logs)
    assert report.format == "q4_0+obq-diag"


NEW_GGUF_TYPE = """
import contextlib, io, json
from lowbit.formats import get_format, register
from lowbit.formats.kquants import Q6K

# what a new file in lowbit/formats does: register a GGUF block type with its fallback
fmt = Q6K("q6_k", 6, "a second Q6_K, registered under a new name", fallback="q5_0")
fmt.name = "demo6_k"
register(fmt)

from lowbit.cli import main
from lowbit.eval.mixsearch import gguf_candidates
from lowbit.model.gguf_mix import FILE_TYPES, ModelInfo, file_type, plan

out = io.StringIO()
with contextlib.redirect_stdout(out):
    main(["formats"])
listing = out.getvalue().split("llama.cpp file types")
ft = file_type("demo6_k")
shapes = [("blk.0.attn_q.weight", (256, 512)), ("blk.0.ffn_down.weight", (512, 576)), ("blk.0.attn_norm.weight", (512,))]
print(json.dumps({
    "file_type": [ft.name, ft.default, ft.pure, ft.ftype] if ft else None,
    "in_table": "demo6_k" in FILE_TYPES,
    "candidate": "demo6_k" in gguf_candidates(),
    "listed_as_format": "demo6_k" in listing[0],
    "listed_as_file_type": "demo6_k" in listing[1],
    "plan": plan(shapes, ft, ModelInfo("llama", 1)),
}))
"""


def test_a_new_gguf_type_is_one_file(tmp_path):
    """A GGUF block type registered by one file is a file type, a search candidate and a row of
    `lowbit formats`, with its own fallback, without an edit anywhere else (in a fresh process, so
    that the demo type does not reach the other tests)."""
    import json
    import subprocess
    import sys

    from gguf import LlamaFileType

    script = tmp_path / "new_type.py"
    script.write_text(NEW_GGUF_TYPE)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["file_type"] == ["demo6_k", "demo6_k", True, int(LlamaFileType.GUESSED)]
    assert got["in_table"] and got["candidate"] and got["listed_as_format"] and got["listed_as_file_type"]
    # rows of 512 fit its 256-blocks; rows of 576 fall back to its own fallback; norms stay F32
    assert got["plan"] == {"blk.0.attn_q.weight": "demo6_k", "blk.0.ffn_down.weight": "q5_0",
                           "blk.0.attn_norm.weight": None}
