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
