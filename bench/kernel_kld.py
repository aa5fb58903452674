"""What each CPU kernel backend's rounding costs: KLD of a quantized model run on its kernels
against the same quantized weights run exactly (dequantized, float32), and against the original.

    .venv/bin/python bench/kernel_kld.py [--chunks 20] [--ctx 512] [--formats int4-g128,q4_k_m,...]

Prints a table and writes bench/results/kernel_kld.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from _common import OUT, machine  # noqa: E402

FORMATS = "int4-g128,int4-asym-g128,q4_0,q4_k_m,int8-ch,q8_0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--backend", default="fast", help="the kernels measured: a backend's name or 'fast'")
    args = ap.parse_args()

    import lowbit
    from lowbit.errors import LowbitError
    from lowbit.eval.data import eval_text
    from lowbit.eval.runner import Evaluation, torch_logits_fn
    from lowbit.kernels import cpu_q8dot
    from lowbit.model.quantize import QuantLinear, set_backend

    # cpu-q8dot rounds the input of batches of up to GEMV_MAX_M rows (a decode step's) and multiplies
    # larger ones exactly; its rounding is per row, so every row of the evaluation takes that path here
    # and sees what a decode step sees
    cpu_q8dot.GEMV_MAX_M = 1 << 30

    torch.manual_seed(0)
    base = lowbit.load_model(args.model, progress=False)
    text = eval_text()
    ev = Evaluation(base, text, args.ctx, args.chunks, progress=False)
    orig = ev.run(torch_logits_fn(base.model, args.ctx), "original", as_reference=True)
    rows = []
    for name in args.formats.split(","):
        m = copy.deepcopy(base.model)
        lowbit.quantize_model(m, name, progress=False)
        set_backend(m, "dequant")
        exact_vs_orig = ev.run(torch_logits_fn(m, args.ctx), f"{name} exact")
        ref = Evaluation(base, text, args.ctx, args.chunks, progress=False)  # the exact run as the reference
        ref.run(torch_logits_fn(m, args.ctx), f"{name} exact", as_reference=True)
        set_backend(m, args.backend)
        try:
            used = sorted({mod.kernel.backend for mod in m.modules() if isinstance(mod, QuantLinear)})
        except LowbitError as exc:  # a backend named that does not take every layer of this format
            print(f"{name:16s} skipped: {exc}", flush=True)
            ref.close()
            continue
        fast_vs_exact = ref.run(torch_logits_fn(m, args.ctx), f"{name} kernels")
        fast_vs_orig = ev.run(torch_logits_fn(m, args.ctx), f"{name} kernels")
        ref.close()
        row = {"format": name, "backends": used, "kld_kernels_vs_exact": fast_vs_exact["kld_mean"],
               "kld_exact_vs_original": exact_vs_orig["kld_mean"], "kld_kernels_vs_original": fast_vs_orig["kld_mean"],
               "ppl_exact": exact_vs_orig["ppl"], "ppl_kernels": fast_vs_orig["ppl"]}
        rows.append(row)
        print(f"{name:16s} {','.join(used):28s} KLD kernels/exact {row['kld_kernels_vs_exact']:.2e}  "
              f"exact/original {row['kld_exact_vs_original']:.4f}  kernels/original {row['kld_kernels_vs_original']:.4f}",
              flush=True)
    doc = {"model": args.model, "backend": args.backend, "chunks": args.chunks, "ctx": args.ctx, "original_ppl": orig["ppl"],
           "machine": machine("cpu"), "rows": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ("kernel_kld.json" if args.backend == "fast" else f"kernel_kld-{args.backend}.json")).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
