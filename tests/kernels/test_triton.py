"""lowbit's Triton kernels (``kernels/gpu/table.py``) against a float64 reference, on fresh random
weights and inputs: the GEMV (batches 1-8, split-K or not) and the GEMM (16 and more), FP16, BF16 and
float32 activations, for int4 per group (symmetric and asymmetric), NF4, Q4_K and Q8_0 and the other
table-coded formats.  Without a GPU (CI) they run on CPU tensors under ``TRITON_INTERPRET=1`` (set in
conftest.py); on a GPU, on the GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.formats import get_format
from lowbit.kernels import build_kernel, get_backend
from lowbit.kernels.affine import table_weight
from lowbit.kernels.cuda_table import TritonTableKernel, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is a dev dependency")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[2]

# 40 rows: not a multiple of the kernels' row tiles; 576 columns: not a multiple of their column
# tiles, and 512 in groups of 128 plus 64 in one group of 64 for the per-group integer formats
CASES = [("int4-g128", 576), ("int4-asym-g128", 576), ("int4-asym-g32", 576), ("nf4", 576), ("q8_0", 576),
         ("q4_0", 576), ("q4_1", 576), ("fp4", 576), ("iq4_nl", 576), ("int8-ch", 576),
         ("q4_k", 768), ("q5_k", 512), ("q6_k", 512)]
#: relative error allowed per activation dtype: float32 rounding; one rounding of the weight (GEMM) and
#: of the output to the dtype, with some room (the interpreter converts to bfloat16 by truncation)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _kernel(name: str, cols: int, seed: int) -> tuple[TritonTableKernel, torch.Tensor]:
    torch.manual_seed(seed)
    fmt = get_format(name)
    w = torch.randn(40, cols) * torch.rand(40, 1)  # rows of different ranges
    qt = fmt.quantize(w)
    tw = table_weight(fmt, qt)
    assert tw is not None, name
    if DEV == "cuda":
        tw = type(tw)(tw.rows, tw.cols, tw.group, tw.bits, tw.codes.cuda(), tw.table.cuda(), tw.scale.cuda(),
                      tw.base.cuda())
    return TritonTableKernel(tw), fmt.dequantize(qt).reshape(40, cols).double()


def _relative(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double().cpu() - ref).norm() / ref.norm())


@pytest.mark.parametrize(("name", "cols"), CASES, ids=[c[0] for c in CASES])
def test_triton_kernels_match_float64_reference(name, cols):
    k, w = _kernel(name, cols, hash(name) % 2**31)
    for dtype in TOL:
        for m in (1, 3, 8, 16, 33):
            x = (torch.randn(m, cols) * 3).to(dtype)
            y = k(x.to(DEV))
            assert y.shape == (m, 40) and y.dtype == dtype and torch.isfinite(y).all()
            ref = x.double() @ w.t()
            assert _relative(y, ref) <= TOL[dtype], (name, dtype, m, _relative(y, ref))
    x = torch.randn(2, 5, cols)  # leading dimensions are kept
    assert _relative(k(x.to(DEV)), x.double() @ w.t()) <= TOL[torch.float32]


def test_the_gemv_splits_columns_and_the_gemm_takes_other_tiles():
    from lowbit.kernels.gpu import table

    k, w = _kernel("q4_k", 768, 7)
    x = torch.randn(4, 768)
    ref = x.double() @ w.t()
    for split in (1, 2, 5):  # 768 columns = 6 slices of 128: 5 leaves one program two of them
        y = table.gemv(x.to(DEV), *k.kernel_args(), split=split)
        assert _relative(y, ref) <= 1e-5, split
    x = torch.randn(40, 768)
    for bm, bn, bk in ((16, 32, 32), (32, 16, 128)):
        y = table.gemm(x.to(DEV), *k.kernel_args(), bm=bm, bn=bn, bk=bk)
        assert _relative(y, x.double() @ w.t()) <= 1e-5, (bm, bn, bk)


def test_the_gpu_backend_takes_cuda_tensors_only():
    b = get_backend("cuda-triton")
    assert b.device == "cuda" and b.exact
    fmt = get_format("int4-g128")
    qt = fmt.quantize(torch.randn(32, 256))
    assert b.build(fmt, qt) is None  # CPU tensors: the CPU backends take them
    assert build_kernel(fmt, qt).backend == "cpu-table"
    if torch.cuda.is_available():
        qg = fmt.quantize(torch.randn(32, 256, device="cuda"))
        assert build_kernel(fmt, qg).backend == "cuda-triton"


def test_importing_lowbit_and_its_backends_does_not_import_triton():
    code = ("import sys, lowbit, lowbit.kernels as k; k.backends(); "
            "print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_gpu_benchmark_runs(tmp_path):
    """bench/gpu_kernels.py end to end on tiny shapes (on CPU tensors under the interpreter without a
    GPU), so that the one device call it is kept for does not fail on the script itself."""
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    dev = ["--device", DEV] if DEV == "cpu" else []
    out = subprocess.run([sys.executable, "gpu_kernels.py", *dev, "--shapes", "48x256", "--batches", "1,16",
                          "--formats", "int4-g128,q8_0", "--iters", "1", "--copy-mb", "4", "--rotate-mb", "1",
                          "--out", str(tmp_path / "k")], cwd=ROOT / "bench", env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    res = json.loads((tmp_path / "k.json").read_text())
    assert {(r["format"], r["batch"], r["path"]) for r in res["rows"]} == {
        ("int4-g128", 1, "gemv"), ("int4-g128", 16, "gemm"), ("q8_0", 1, "gemv"), ("q8_0", 16, "gemm")}
    assert all(r["rel_err_vs_fp16_product"] < 2e-3 and r["kernel_s"] > 0 for r in res["rows"])
