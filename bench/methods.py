"""Benchmark: calibration methods (GPTQ, AWQ, SpQR, QuIP) against round-to-nearest at 4, 3 and 2 bits
with groups of 128, and against llama.cpp's Q3_K_M with an importance matrix, all on the same model,
the same evaluation chunks and the same original; with quantization time and peak memory.

    .venv/bin/python bench/methods.py [--model smollm2] [--bits 4,3,2] [--chunks 20] [--calib-samples 64]
    .venv/bin/python bench/methods.py --bits "" --extra e8p,e8p+quip --name NAME   # only the extra entries

Prints a table (KLD, ΔPPL, same-top-token, bits per weight, time, peak RSS) and a method x bits
summary; writes bench/results/methods-<model>-<device>.{json,md,png}.  Calibration uses the
bundled calibration split (disjoint from the evaluation split).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from _common import PartialRows, command, machine, write_results
from lowbit.algorithms.gptq import GPTQConfig
from lowbit.eval.compare import compare
from lowbit.eval.report import markdown_table, summary
from lowbit.model.calibrate import CalibConfig
from lowbit.model.load import load_model

PREFIX = "methods"
METHODS = ("rtn", "gptq", "awq", "quip", "spqr")
#: the settings a result depends on: a resumed run keeps earlier entries only when these are the same
RESUME_KEY = ("model", "chunks", "calib_samples", "calib_len", "device")


def specs_for(bits: list[int], group: int, methods: list[str], extra: list[str]) -> list[str]:
    out = []
    for b in bits:
        for m in methods:
            if m == "spqr":
                out.append(f"spqr{b}-g16+spqr")
            else:
                out.append(f"int{b}-asym-g{group}" + ("" if m == "rtn" else f"+{m}"))
    return out + extra


def pivot(rows: list[dict], bits: list[int], group: int, methods: list[str]) -> str:
    """Method x bits: KLD and ΔPPL % (linear-layer bits per weight in brackets)."""
    by = {r["format"]: r for r in rows}
    head = "| method | " + " | ".join(f"{b}-bit KLD | {b}-bit ΔPPL %" for b in bits) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(bits)]
    for m in methods:
        cells = []
        for b in bits:
            key = f"spqr{b}-g16+spqr" if m == "spqr" else f"int{b}-asym-g{group}" + ("" if m == "rtn" else f"+{m}")
            r = by.get(key)
            if r is None:
                cells += ["", ""]
            else:
                cells += [f"{r['kld_mean']:.4f} ({r['linear_bpw']:.2f} b)", f"{r['dppl_pct']:+.1f}"]
        lines.append(f"| {m.upper() if m != 'rtn' else 'RTN'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--extra", default="q3_k_m+imatrix,q3_k_m+gptq,int4-asym-g32+quip,int4-asym-g32+gptq,"
                                       "int4-asym-g32+awq,e8p,e8p+gptq,e8p+quip",
                    help="more entries, e.g. llama.cpp file types to compare with")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resume", action="store_true",
                    help="keep the entries a stopped run with the same settings measured (its .partial.jsonl)")
    ap.add_argument("--name", help="output file stem (default methods-<model>-<device>)")
    args = ap.parse_args()
    torch.manual_seed(0)
    bits = [int(b) for b in args.bits.split(",") if b]
    methods = [m for m in args.methods.split(",") if m]
    specs = specs_for(bits, args.group, methods, [e for e in args.extra.split(",") if e])
    t0 = time.perf_counter()
    loaded = load_model(args.model, progress=False)
    if args.device != "cpu":
        loaded.model.to(args.device)
    calib = CalibConfig(n_samples=args.calib_samples, seq_len=args.calib_len, gptq=GPTQConfig(), device=args.device)
    stem = args.name or f"{PREFIX}-{Path(args.model).stem}-{args.device.split(':')[0]}"
    partial = PartialRows(stem, {k: v for k, v in vars(args).items() if k in RESUME_KEY}, args.resume)
    gpu = args.device.startswith("cuda")

    def show(r, base_ppl: float) -> None:  # type: ignore[no-untyped-def]
        row = partial.add(r, base_ppl)
        print(f"done {row['format']}: linear bpw {row['linear_bpw']:.3f} KLD {row['kld_mean']:.5f} "
              f"ΔPPL {row['dppl_pct']:+.2f}% same-top {row['same_top_pct']:.2f}% in {row['quant_s']:.0f} s, "
              f"peak RSS {row['peak_rss_mb']:.0f} MB" + (f", peak GPU {row['peak_gpu_mb']:.0f} MB" if gpu else ""), flush=True)

    cmp = compare(loaded, specs, text_name="wiki-eval (gensim Wikipedia, evaluation split)", max_chunks=args.chunks,
                  progress=False, calib=calib, on_result=show,
                  done=partial.done, done_base_ppl=partial.base_ppl)
    rows = cmp.rows()
    table = markdown_table(cmp, times=True)
    mem = "\n".join(f"| {r['format']} | {r['quant_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['extra_rss_mb']:.0f} |"
                    + (f" {r['peak_gpu_mb']:.0f} |" if gpu else "") for r in rows)
    mem = ("| entry | quantize s | peak RSS MB | above start MB |" + (" peak GPU MB |" if gpu else "")
           + "\n|---|---:|---:|---:|" + ("---:|" if gpu else "") + "\n" + mem)
    summ = pivot(rows, bits, args.group, methods) if bits else ""
    print(summary(cmp))
    print(table)
    print()
    print(summ)
    print()
    print(mem)
    meta = {
        "command": command("methods.py"),
        "machine": machine(args.device),
        "calibration": {"samples": args.calib_samples, "tokens_per_sample": args.calib_len,
                        "text": "wiki-calib (gensim Wikipedia, calibration split)"},
        "total_seconds": time.perf_counter() - t0,
        "method_by_bits": summ,
    }
    write_results(cmp, stem, meta, summary(cmp) + "\n\n" + table + "\n\n" + summ + "\n\n" + mem + "\n", partial)
    return 0


if __name__ == "__main__":
    sys.exit(main())
