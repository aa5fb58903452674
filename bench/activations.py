"""Benchmark: activation quantization (W8A8 naive and with SmoothQuant, static observers, FP8,
LLM.int8(), W4A8, W4A4) and quantization-aware training at 4 and 3 bits, against the original and
against weight-only formats of the same bits, all on the same evaluation chunks.

    .venv/bin/python bench/activations.py [--model smollm2] [--chunks 20] [--calib-samples 64] [--qat-steps 100]

Prints a table (W/A bits, KLD, ΔPPL, same-top-token, time, peak RSS) and, for LLM.int8(), the
fraction of input features sent to FP16 per layer; writes bench/results/activations-<model>-<device>.{json,md,png}.
Calibration (static ranges, smoothing factors, QAT's training text) uses the bundled calibration
split, disjoint from the evaluation text.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from _common import PartialRows, command, machine, write_results
from lowbit.eval.compare import compare
from lowbit.eval.report import markdown_table, summary
from lowbit.model.calibrate import CalibConfig
from lowbit.model.load import load_model
from lowbit.model.qat import QATConfig
from lowbit.model.recipe import parse_alpha

PREFIX = "activations"
DEFAULT = ("w8a8,w8a8+smoothquant,w8a8+smoothquant=auto,"
           "w8a8-static,w8a8-static-pct,w8a8-static-mse,w8a8-static-mse+smoothquant,w8a8-static-mse+smoothquant=auto,"
           "w8a8-fp8,w8a8-fp8+smoothquant=auto,llm-int8,int8,w4a8,w4a8+smoothquant=auto,w4a4,w4a4+smoothquant=auto,"
           "int4-asym-g128,int4-asym-g128+qat,int3-asym-g128,int3-asym-g128+qat")

#: the settings a result depends on: a resumed run keeps earlier entries only when these are the same
RESUME_KEY = ("model", "chunks", "calib_samples", "calib_len", "alpha", "qat_steps", "qat_lr", "qat_batch", "device")

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--formats", default=DEFAULT)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--alpha", default="0.5", help="SmoothQuant alpha for '+smoothquant' entries: a number or 'auto'")
    ap.add_argument("--qat-steps", type=int, default=100)
    ap.add_argument("--qat-lr", type=float, default=5e-5)
    ap.add_argument("--qat-batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resume", action="store_true",
                    help="keep the entries a stopped run with the same settings measured (its .partial.jsonl)")
    ap.add_argument("--name", help="output file stem (default activations-<model>-<device>)")
    args = ap.parse_args()
    torch.manual_seed(0)
    specs = [s for s in args.formats.split(",") if s]
    t0 = time.perf_counter()
    loaded = load_model(args.model, progress=False)
    if args.device != "cpu":
        loaded.model.to(args.device)
    calib = CalibConfig(n_samples=args.calib_samples, seq_len=args.calib_len, smooth_alpha=parse_alpha(args.alpha),
                        device=args.device)
    qat = QATConfig(steps=args.qat_steps, lr=args.qat_lr, batch_size=args.qat_batch)

    stem = args.name or f"{PREFIX}-{Path(args.model).stem}-{args.device.split(':')[0]}"
    partial = PartialRows(stem, {k: v for k, v in vars(args).items() if k in RESUME_KEY}, args.resume)

    def show(r, base_ppl: float) -> None:  # type: ignore[no-untyped-def]
        row = partial.add(r, base_ppl)
        print(f"done {row['format']} ({row['wa']}): KLD {row['kld_mean']:.5f} ΔPPL {row['dppl_pct']:+.2f}% "
              f"same-top {row['same_top_pct']:.2f}% in {row['quant_s']:.0f} s, peak RSS {row['peak_rss_mb']:.0f} MB",
              flush=True)

    cmp = compare(loaded, specs, text_name="wiki-eval (gensim Wikipedia, evaluation split)", max_chunks=args.chunks,
                  progress=False, calib=calib, qat=qat, on_result=show,
                  done=partial.done, done_base_ppl=partial.base_ppl)
    table = markdown_table(cmp, times=True)
    outl = ""
    for r in cmp.results:
        frac = r.details.get("outlier_fraction") if r.details else None
        if isinstance(frac, dict) and frac:
            by_role: dict[str, list[float]] = {}
            for name, v in frac.items():
                by_role.setdefault(name.rsplit(".", 1)[-1], []).append(float(v))
            outl += f"\n{r.format}: input features sent to FP16 per call, by projection (mean / max over layers)\n\n"
            outl += "| projection | mean % | max % |\n|---|---:|---:|\n"
            outl += "\n".join(f"| {k} | {100 * sum(v) / len(v):.3f} | {100 * max(v):.3f} |" for k, v in sorted(by_role.items()))
            outl += "\n"
    print(summary(cmp))
    print(table)
    print(outl)
    meta = {
        "command": command("activations.py"),
        "machine": machine(args.device),
        "calibration": {"samples": args.calib_samples, "tokens_per_sample": args.calib_len,
                        "text": "wiki-calib (gensim Wikipedia, calibration split)", "smoothquant_alpha": args.alpha,
                        "qat": {"steps": args.qat_steps, "lr": args.qat_lr, "batch": args.qat_batch}},
        "total_seconds": time.perf_counter() - t0,
    }
    write_results(cmp, stem, meta, summary(cmp) + "\n\n" + table + "\n" + outl, partial)
    return 0


if __name__ == "__main__":
    sys.exit(main())
