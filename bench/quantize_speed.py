"""Benchmark: wall time of writing a quantized GGUF with lowbit and with llama.cpp's own quantizer
(llama_model_quantize, the code behind llama-quantize) from the same source, side by side in one
run, and a check that both wrote the same tensor bytes.

    .venv/bin/python bench/quantize_speed.py [--types q4_k_m,q3_k_m,iq4_xs] [--imatrix] [--device cuda]

lowbit runs its quantizers with torch on ``--device`` (cpu, or cuda on a GPU machine); llama.cpp
always runs on the CPU with as many threads as there are cores.  Each figure is the best of
``--repeat`` runs.  Prints a table and writes bench/results/quantize-speed-<model>-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lowbit.eval.llamacpp import llama_quantize
from lowbit.io.gguf_out import write_gguf
from lowbit.model.load import resolve_model_path

OUT = Path(__file__).parent / "results"


def same_tensors(a: Path, b: Path) -> bool:
    import gguf

    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    return ta.keys() == tb.keys() and all(
        ta[n].tensor_type == tb[n].tensor_type and np.array_equal(ta[n].data, tb[n].data) for n in tb)


def best_of(n: int, fn) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--types", default="q4_k_m,q3_k_m,q6_k,iq4_xs")
    ap.add_argument("--imatrix", action="store_true", help="also time each type with an importance matrix")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", help="JSON path (default bench/results/quantize-speed-<model>-<device>.json)")
    args = ap.parse_args()
    src = resolve_model_path(args.model)
    threads = os.cpu_count() or 1
    imatrix = None
    if args.imatrix:
        from lowbit.eval.data import calibration_text
        from lowbit.model.imatrix import compute_imatrix
        from lowbit.model.load import load_model

        imatrix = compute_imatrix(load_model(src, progress=False), calibration_text(), max_chunks=8,
                                  progress=False).values()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for ft in args.types.split(","):
            for im in ([None, imatrix] if imatrix else [None]):
                tag = ft + (" +imatrix" if im else "")
                ours, ref = Path(d) / f"lowbit-{ft}.gguf", Path(d) / f"llama-{ft}.gguf"
                t_ours = best_of(args.repeat, lambda ft=ft, im=im, ours=ours: write_gguf(
                    src, ours, ft, progress=False, imatrix=im, device=args.device))
                t_ref = best_of(args.repeat, lambda ft=ft, im=im, ref=ref: llama_quantize(src, ref, ft, im, threads))
                row = {"type": tag, "lowbit_s": round(t_ours, 3), "llama_cpp_s": round(t_ref, 3),
                       "ratio": round(t_ours / t_ref, 2), "identical": same_tensors(ours, ref)}
                rows.append(row)
                print(f"{tag:<18} lowbit {t_ours:7.2f} s   llama.cpp {t_ref:7.2f} s   ratio {row['ratio']:5.2f}x"
                      f"   identical bytes: {row['identical']}", flush=True)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    doc = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "model": str(src.name), "lowbit_device": args.device, "device_name": dev, "cpu_count": threads,
        "torch_threads": torch.get_num_threads(), "llama_cpp_threads": threads, "repeat": args.repeat,
        "rows": rows,
    }
    out = Path(args.out) if args.out else OUT / f"quantize-speed-{Path(args.model).stem}-{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
