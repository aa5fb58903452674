"""lowbit's GPU kernels (Triton) against cuBLAS FP16, in one run on one device.

For each weight shape (out x in) and format, the weight is quantized on the device, and the
product ``x @ W^T`` is timed at each batch size for lowbit's kernel and for ``F.linear`` on the
FP16 weight.  Both rotate through copies of their weights totalling more than ``--rotate-mb`` MB, so
that the GPU's L2 cache does not flatter either.  Reported per row: time, achieved bandwidth (bytes of
weight, scales and activations moved, over time) as a fraction of the device's measured copy
bandwidth, speedup over FP16, and the kernel's relative error against the FP16 product.

    python bench/gpu_kernels.py                                   # the issue's shapes, batches 1,4,16,64
    python bench/gpu_kernels.py --formats int4-g128,q4_k --dtype bf16
    TRITON_INTERPRET=1 python bench/gpu_kernels.py --device cpu --shapes 64x128 --batches 1,16 --iters 1
        # (a smoke run of the script itself on CPU tensors; its times mean nothing)

Prints a table and writes bench/results/kernels-<device>.{json,md} (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from _common import OUT, command, machine

FORMATS = ["int4-g128", "int4-asym-g128", "nf4", "q4_k", "q8_0"]
SHAPES = "4096x4096,4096x11008,11008x4096,8192x28672"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, dev: torch.device, iters: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds per call of ``fn(i)`` (``i`` the call's index, to rotate weights), after warm-up."""
    for i in range(min(3, iters)):
        fn(i)
    _sync(dev)
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            fn(i)
        end.record()
        torch.cuda.synchronize(dev)
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for i in range(iters):
        fn(i)
    return (time.perf_counter() - t0) / iters


def copy_bandwidth(dev: torch.device, mb: int) -> float:
    """Bytes per second of a device-to-device copy (read plus write) of ``mb`` MB."""
    a = torch.empty(mb << 20, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    t = _time(lambda i: b.copy_(a), dev, 10)
    return 2 * a.numel() / t


def table_kernel(fmt_name: str, w: torch.Tensor, chunk_rows: int = 2048):  # type: ignore[no-untyped-def]
    """lowbit's Triton kernel for ``w`` in ``fmt_name``, quantized ``chunk_rows`` rows at a time (the
    format's search over a large weight would otherwise need many times its size in temporaries)."""
    from lowbit.formats import get_format
    from lowbit.kernels.affine import TableWeight, table_weight
    from lowbit.kernels.cuda_table import TritonTableKernel

    fmt = get_format(fmt_name)
    parts = []
    for r0 in range(0, w.shape[0], chunk_rows):
        tw = table_weight(fmt, fmt.quantize(w[r0 : r0 + chunk_rows].contiguous()))
        if tw is None:
            raise SystemExit(f"bench/gpu_kernels.py: {fmt_name} on {tuple(w.shape)} is not a table-coded weight")
        parts.append(tw)
    t0 = parts[0]
    tw = TableWeight(w.shape[0], w.shape[1], t0.group, t0.bits, torch.cat([p.codes.long() for p in parts]), t0.table,
                     torch.cat([p.scale for p in parts]), torch.cat([p.base for p in parts]))
    weight = torch.cat([p.scale.repeat_interleave(tw.group, 1) * p.table[p.codes.long()] +
                        p.base.repeat_interleave(tw.group, 1) for p in parts])
    return TritonTableKernel(tw), weight


def _copies(k, n: int) -> list:  # type: ignore[no-untyped-def]
    out = [k]
    for _ in range(n - 1):
        c = copy.copy(k)
        c.codes, c.scale, c.base = k.codes.clone(), k.scale.clone(), k.base.clone()
        out.append(c)
    return out


def _shape(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", s.strip())
    if m is None:
        raise SystemExit(f"bench/gpu_kernels.py: --shapes: '{s}' is not OUTxIN")
    return int(m.group(1)), int(m.group(2))


def run(args: argparse.Namespace) -> dict:
    dev = torch.device(args.device)
    dt = DTYPES[args.dtype]
    rotate = args.rotate_mb << 20
    copy_bw = copy_bandwidth(dev, args.copy_mb)
    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for shape in args.shapes:
        n, k = shape
        w = torch.randn(n, k, device=dev, generator=gen) * 0.02
        w16 = w.to(dt)
        dense = [w16] + [w16.clone() for _ in range(max(1, math.ceil(rotate / (w16.numel() * 2))) - 1)]
        for fmt_name in args.formats:
            kern, weight = table_kernel(fmt_name, w)
            kerns = _copies(kern, max(1, math.ceil(rotate / kern.nbytes)))
            wq16 = weight.to(dt)
            for m in args.batches:
                x = torch.randn(m, k, device=dev, generator=gen).to(dt)
                ours = _time(lambda i, ks=kerns, x=x: ks[i % len(ks)](x), dev, args.iters)
                base = _time(lambda i, ds=dense, x=x: F.linear(x, ds[i % len(ds)]), dev, args.iters)
                y = kern(x).double()
                ref = F.linear(x.double(), wq16.double())
                err = float((y - ref).norm() / ref.norm())
                moved = kern.nbytes + x.numel() * x.element_size() + m * n * x.element_size()
                row = {"format": fmt_name, "out": n, "in": k, "batch": m, "dtype": args.dtype,
                       "kernel_s": ours, "fp16_s": base, "speedup_vs_fp16": base / ours,
                       "bandwidth_gbps": moved / ours / 1e9, "bandwidth_of_copy": moved / ours / copy_bw,
                       "kernel_bytes": kern.nbytes, "rel_err_vs_fp16_product": err,
                       "path": "gemv" if m <= 8 else "gemm"}
                rows.append(row)
                print(f"{fmt_name:>15} {n:>6}x{k:<6} batch {m:>3}: {ours * 1e6:9.1f} us  "
                      f"{row['bandwidth_of_copy'] * 100:5.1f}% of copy  {row['speedup_vs_fp16']:5.2f}x fp16  "
                      f"err {err:.1e}", flush=True)
            del kerns, kern, weight, wq16
        del dense, w, w16
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    import triton

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (TRITON_INTERPRET: times mean nothing)"
    return {"command": command("gpu_kernels.py"), "machine": machine(args.device), "device_name": name,
            "triton": triton.__version__, "copy_bandwidth_gbps": copy_bw / 1e9, "rotate_mb": args.rotate_mb,
            "iters": args.iters, "rows": rows}


def markdown(res: dict) -> str:
    lines = [f"Device: {res['device_name']}; copy bandwidth {res['copy_bandwidth_gbps']:.0f} GB/s; "
             f"weights rotated over > {res['rotate_mb']} MB.", "",
             "| format | out x in | batch | path | time (us) | bandwidth (% of copy) | vs cuBLAS FP16 | rel. error |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['format']} | {r['out']}x{r['in']} | {r['batch']} | {r['path']} | {r['kernel_s'] * 1e6:.1f} "
                     f"| {r['bandwidth_of_copy'] * 100:.0f}% | {r['speedup_vs_fp16']:.2f}x | {r['rel_err_vs_fp16_product']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--shapes", default=SHAPES, help="weights as OUTxIN, comma-separated")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--rotate-mb", type=int, default=128, help="each side's weights rotate over at least this much")
    ap.add_argument("--copy-mb", type=int, default=1024, help="size of the copy that measures bandwidth")
    ap.add_argument("--out", type=Path, default=None, help="results stem (default bench/results/kernels-<device>)")
    args = ap.parse_args(argv)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    args.shapes = [_shape(s) for s in args.shapes.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_kernels.py: no CUDA GPU here (for a smoke run on CPU: TRITON_INTERPRET=1 ... --device cpu)")
    res = run(args)
    stem = args.out or OUT / ("kernels-" + re.sub(r"[^a-z0-9]+", "-", res["device_name"].lower()).strip("-")[:40])
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    Path(f"{stem}.md").write_text(md)
    print("\n" + md + f"\nwrote {stem}.{{json,md}}")


if __name__ == "__main__":
    main(sys.argv[1:])
