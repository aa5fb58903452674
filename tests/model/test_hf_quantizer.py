"""With lowbit imported, transformers' own ``from_pretrained`` loads a lowbit checkpoint as the
quantized model lowbit computes with: the same layers, codes and logits as ``lowbit.load_model``."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys

import pytest

CODE = """
import sys, torch
import lowbit
from lowbit.model.quantize import QuantLinear
from transformers import AutoModelForCausalLM

ref = lowbit.load_model(sys.argv[1], progress=False).model
hf = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
mine = {n: m for n, m in ref.named_modules() if isinstance(m, QuantLinear)}
theirs = {n: m for n, m in hf.named_modules() if isinstance(m, QuantLinear)}
assert mine.keys() == theirs.keys() and mine, (len(mine), len(theirs))
for n, m in mine.items():
    a, b = m.qtensor.parts, theirs[n].qtensor.parts
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), n
x = torch.randint(0, 4000, (1, 24))
with torch.inference_mode():
    diff = (ref(x).logits - hf(x).logits).abs().max().item()
print("max-diff", diff, "layers", len(theirs))
"""


@pytest.mark.parametrize("fmt", ["q4_0", "int4-asym-g128", "nf4-dq"])
def test_transformers_loads_a_lowbit_checkpoint_as_lowbits_quantized_model(small, tmp_path, fmt):
    import lowbit

    work = dataclasses.replace(small, model=copy.deepcopy(small.model))
    lowbit.quantize_model(work, fmt, progress=False)
    out = lowbit.save(work, tmp_path / "ck")
    r = subprocess.run([sys.executable, "-c", CODE, str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    words = r.stdout.split()
    assert words[0] == "max-diff" and float(words[1]) == 0.0 and int(words[3]) == 3 * 7, r.stdout
