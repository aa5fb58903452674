"""Benchmark: quantize the bundled SmolLM2-135M into every format, evaluate each against the original
on the same Wikipedia chunks, and cross-check Q8_0 / Q4_0 with llama.cpp on lowbit's own GGUF files.

Prints the table and writes bench/results/compare-smollm2-cpu.{json,md,png}.

    .venv/bin/python bench/compare_formats.py [--chunks 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from lowbit.cli import DEFAULT_FORMATS
from lowbit.eval.compare import compare
from lowbit.eval.data import eval_text
from lowbit.eval.llamacpp import LlamaCppModel
from lowbit.eval.report import markdown_table, plot, summary, write_json
from lowbit.eval.runner import Evaluation
from lowbit.io.gguf_out import write_gguf
from lowbit.model.load import load_model, resolve_model_path

OUT = Path(__file__).parent / "results"


def llama_cpp_crosscheck(loaded, chunks: int, fmts: list[str]) -> list[dict[str, object]]:
    """PPL/KLD of llama.cpp running lowbit's GGUF files, on the same chunks and reference."""
    from lowbit.eval.runner import torch_logits_fn

    src = resolve_model_path("smollm2")
    ev = Evaluation(loaded, eval_text(), n_ctx=512, max_chunks=chunks, progress=False)
    rows = []
    try:
        ev.run(torch_logits_fn(loaded.model, 512), "original", as_reference=True)
        with tempfile.TemporaryDirectory() as d:
            for f in fmts:
                path = Path(d) / f"smol-{f}.gguf"
                t0 = time.perf_counter()
                write_gguf(src, path, f, progress=False)
                tq = time.perf_counter() - t0
                llm = LlamaCppModel(path, n_ctx=512)
                res = ev.run(llm.logits_fn(), f"{f} llama.cpp")
                llm.close()
                rows.append({"format": f, "engine": "llama.cpp", "file_bytes": path.stat().st_size,
                             "write_seconds": tq, **res})
    finally:
        ev.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--formats", default=DEFAULT_FORMATS,
                    help="formats or llama.cpp file types; '+imatrix' uses an importance matrix from the calibration text")
    ap.add_argument("--crosscheck", default="q8_0,q4_0", help="file types also run through llama.cpp ('' for none)")
    ap.add_argument("--name", default="compare-smollm2-cpu", help="output file stem under bench/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    loaded = load_model("smollm2", progress=False)
    formats = args.formats.split(",")
    cmp = compare(loaded, formats, text_name="wiki-eval (gensim Wikipedia, evaluation split)", max_chunks=args.chunks,
                  progress=False)
    cross = llama_cpp_crosscheck(loaded, args.chunks, [f for f in args.crosscheck.split(",") if f])
    rows = {r["format"]: r for r in cmp.rows()}
    print(summary(cmp))
    print(markdown_table(cmp, times=True))
    print("\nllama.cpp on lowbit's GGUF files (same chunks, same reference):")
    print("| format | PPL lowbit (torch) | PPL llama.cpp | rel. diff | KLD lowbit | KLD llama.cpp |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in cross:
        ours = rows[c["format"]]
        print(f"| {c['format']} | {ours['ppl']:.3f} | {c['ppl']:.3f} | {100 * (c['ppl'] / ours['ppl'] - 1):+.2f}% | "
              f"{ours['kld_mean']:.5f} | {c['kld_mean']:.5f} |")
    meta = {
        "command": "python bench/compare_formats.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "total_seconds": time.perf_counter() - t0,
        "llama_cpp_crosscheck": cross,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(cmp, OUT / f"{args.name}.json", extra=meta, owned=True)
    plot(cmp, OUT / f"{args.name}.png", owned=True)
    (OUT / f"{args.name}.md").write_text(summary(cmp) + "\n\n" + markdown_table(cmp, times=True) + "\n")
    print(f"\nwrote {OUT}/{args.name}.{{json,md,png}} in {meta['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
