"""Benchmark: quantize a model (default: the bundled SmolLM2-135M) into every format, evaluate each
against the original on the same Wikipedia chunks, and cross-check Q8_0 / Q4_0 with llama.cpp on
lowbit's own GGUF files.

Prints the table and writes bench/results/<name>.{json,md,png}.

    .venv/bin/python bench/compare_formats.py [--chunks 20]
    .venv/bin/python bench/compare_formats.py --model qwen2.5-coder-1.5b --dither 0.1 --chunks 10 \
        --crosscheck "" --resume --formats f16,q4_k_m+imatrix,... --name compare-qwen2.5-coder-1.5b-cpu

Each finished entry is appended to <name>.partial.jsonl; ``--resume`` keeps the entries a stopped run
with the same settings measured.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import PartialRows, command, machine, write_results
from lowbit.cli import DEFAULT_FORMATS
from lowbit.eval.compare import compare
from lowbit.eval.data import eval_text
from lowbit.eval.llamacpp import LlamaCppModel
from lowbit.eval.report import markdown_table, summary
from lowbit.eval.runner import Evaluation
from lowbit.io.gguf_out import write_gguf
from lowbit.model.calibrate import CalibConfig
from lowbit.model.load import load_model, resolve_model_path
from mixsearch import dither

#: the settings a result depends on: a resumed run keeps earlier entries only when these are the same
RESUME_KEY = ("model", "chunks", "dither", "imatrix_chunks", "calib_samples")


def llama_cpp_crosscheck(loaded, model: str, chunks: int, fmts: list[str]) -> list[dict[str, object]]:
    """PPL/KLD of llama.cpp running lowbit's GGUF files, on the same chunks and reference."""
    from lowbit.eval.runner import torch_logits_fn

    src = resolve_model_path(model)
    ev = Evaluation(loaded, eval_text(), n_ctx=512, max_chunks=chunks, progress=False)
    rows = []
    try:
        ev.run(torch_logits_fn(loaded.model, 512), "original", as_reference=True)
        with tempfile.TemporaryDirectory() as d:
            for f in fmts:
                path = Path(d) / f"model-{f}.gguf"
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
    ap.add_argument("--model", default="smollm2", help="a model name, GGUF file or checkpoint directory")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--formats", default=DEFAULT_FORMATS,
                    help="formats or llama.cpp file types; '+imatrix' uses an importance matrix from the calibration text")
    ap.add_argument("--crosscheck", default="q8_0,q4_0", help="file types also run through llama.cpp ('' for none)")
    ap.add_argument("--dither", type=float, default=0.0,
                    help="add noise of this x row RMS to the weights first (as bench/mixsearch.py does), so that a "
                         "model distributed quantized does not flatter the types that reproduce its grid")
    ap.add_argument("--imatrix-chunks", type=int, default=32, help="calibration chunks of the importance matrix")
    ap.add_argument("--calib-samples", type=int, default=128, help="calibration chunks of GPTQ/AWQ/QuIP entries")
    ap.add_argument("--resume", action="store_true",
                    help="keep the entries a stopped run with the same settings measured (its .partial.jsonl)")
    ap.add_argument("--name", default="compare-smollm2-cpu", help="output file stem under bench/results")
    args = ap.parse_args()
    cross_fmts = [f for f in args.crosscheck.split(",") if f]
    if args.dither and cross_fmts:
        ap.error("--crosscheck runs llama.cpp on files written from the undithered model: give --crosscheck '' with --dither")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    loaded = load_model(args.model, progress=False)
    model_label = loaded.name
    if args.dither:
        n = dither(loaded.model, args.dither)
        model_label += f" dithered by {args.dither:g} x row RMS"
        print(f"dithered {n} tensors with noise of {args.dither:g} x row RMS (seed 0)", flush=True)
    formats = args.formats.split(",")
    partial = PartialRows(args.name, {k: v for k, v in vars(args).items() if k in RESUME_KEY}, args.resume)

    def show(r, base_ppl: float) -> None:  # type: ignore[no-untyped-def]
        row = partial.add(r, base_ppl)
        print(f"done {row['format']}: bpw {row['bpw']:.3f} KLD {row['kld_mean']:.5f} ΔPPL {row['dppl_pct']:+.2f}% "
              f"same-top {row['same_top_pct']:.2f}% in {row['quant_s']:.0f} s", flush=True)

    cmp = compare(loaded, formats, text_name="wiki-eval (gensim Wikipedia, evaluation split)", max_chunks=args.chunks,
                  progress=False, imatrix_chunks=args.imatrix_chunks, calib=CalibConfig(n_samples=args.calib_samples),
                  on_result=show, done=partial.done, done_base_ppl=partial.base_ppl)
    cmp.model = model_label
    cross = llama_cpp_crosscheck(loaded, args.model, args.chunks, cross_fmts) if cross_fmts else []
    rows = {r["format"]: r for r in cmp.rows()}
    print(summary(cmp))
    print(markdown_table(cmp, times=True))
    text = summary(cmp) + "\n\n" + markdown_table(cmp, times=True) + "\n"
    if cross:
        lines = ["", "llama.cpp on lowbit's GGUF files (same chunks, same reference):",
                 "| format | PPL lowbit (torch) | PPL llama.cpp | rel. diff | KLD lowbit | KLD llama.cpp |",
                 "|---|---:|---:|---:|---:|---:|"]
        for c in cross:
            ours = rows[c["format"]]
            lines.append(f"| {c['format']} | {ours['ppl']:.3f} | {c['ppl']:.3f} | {100 * (c['ppl'] / ours['ppl'] - 1):+.2f}% | "
                         f"{ours['kld_mean']:.5f} | {c['kld_mean']:.5f} |")
        print("\n".join(lines))
    meta = {
        "command": command("compare_formats.py"),
        "machine": machine("cpu"),
        "dither": args.dither,
        "imatrix_chunks": args.imatrix_chunks,
        "total_seconds": time.perf_counter() - t0,
        "llama_cpp_crosscheck": cross,
    }
    write_results(cmp, args.name, meta, text, partial)
    return 0


if __name__ == "__main__":
    sys.exit(main())
