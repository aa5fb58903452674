"""Run quantized models: decode and prefill tokens/s and peak memory of every format in lowbit's
runtime and in llama.cpp on the same GGUF files, side by side in one run; then the quantized
layers' products against float32 and bfloat16 ``F.linear`` on the layer shapes of a 1.5B model.

Each generation is its own ``lowbit generate ... --json`` process (so peak RSS is that run's own):
greedy, ``--new`` tokens after a prompt of ``--prompt-tokens`` tokens of the evaluation text.

    python bench/runtime.py                          # SmolLM2, every format, 2 threads
    python bench/runtime.py --model qwen2.5-coder-1.5b --formats float32,int4-g128,q4_k_m
    python bench/runtime.py --skip-models            # the layer table only

Prints a table and writes bench/results/runtime-<model>-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import OUT, command, machine

ROOT = Path(__file__).resolve().parents[1]
LOWBIT = [sys.executable, "-m", "lowbit.cli"]
FORMATS = ["float32", "bf16", "int8-ch", "int4-g128", "int4-asym-g128", "nf4", "q4_0", "q4_k_m", "q8_0", "e8p"]
#: formats llama.cpp also runs (lowbit writes the GGUF file it loads)
GGUF = {"q4_0", "q4_k_m", "q8_0"}
#: the layer shapes of Qwen2.5-Coder-1.5B (out, in): q/o, k/v, gate/up, down
SHAPES = [(1536, 1536), (256, 1536), (8960, 1536), (1536, 8960)]
LAYER_FORMATS = ["int4-g128", "int4-asym-g128", "nf4", "q4_0", "q4_k", "q8_0", "int8-ch"]


def _prompt(model: str, n: int) -> str:
    from lowbit.eval.data import eval_text
    from lowbit.model.load import load_tokenizer

    tok = load_tokenizer(model).tokenizer
    ids = tok(eval_text()[:20000])["input_ids"][:n]
    return tok.decode(ids)


def _generate(args: argparse.Namespace, model: str, fmt: str | None, engine: str, prompt: str,
              backend: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as d:
        js = Path(d) / "g.json"
        cmd = [*LOWBIT, "generate", model, "-n", str(args.new), "--prompt", prompt, "--threads", str(args.threads),
               "--engine", engine, "--json", str(js), "--quiet"]
        if fmt is not None:
            cmd += ["-f", fmt]
        if backend is not None:
            cmd += ["--backend", backend]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:6])} ... failed: {r.stderr.strip()[-400:]}")
        return json.loads(js.read_text())


def _write_gguf(model: str, fmt: str, path: Path) -> None:
    r = subprocess.run([*LOWBIT, "quantize", model, "-f", fmt, "-o", str(path), "--quiet"], capture_output=True,
                       text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"lowbit quantize {model} -f {fmt} failed: {r.stderr.strip()[-400:]}")


def models_table(args: argparse.Namespace) -> list[dict]:
    prompt = _prompt(args.model, args.prompt_tokens)
    rows: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="lowbit-runtime-"))
    for fmt in args.formats:
        runs = [("lowbit", None if fmt == "float32" else fmt, args.model)]
        if fmt in args.fast:
            runs.append(("lowbit fast", fmt, args.model))
        if fmt in GGUF and not args.no_llamacpp:
            path = work / f"{fmt}.gguf"
            _write_gguf(args.model, fmt, path)
            runs.append(("llama.cpp", None, str(path)))
        for engine, f, model in runs:
            g = _generate(args, model, f, "llama.cpp" if engine == "llama.cpp" else "torch", prompt,
                          "fast" if engine == "lowbit fast" else None)
            row = {"format": fmt, "engine": engine, "decode_tokens_per_s": g["decode_tokens_per_s"],
                   "prefill_tokens_per_s": g["prefill_tokens_per_s"], "peak_rss_mb": g["peak_rss_mb"],
                   "n_new_tokens": g["n_new_tokens"]}
            rows.append(row)
            print(f"{fmt:>15} {engine:>11}  decode {row['decode_tokens_per_s']:7.2f} tok/s  prefill "
                  f"{row['prefill_tokens_per_s']:8.1f} tok/s  peak {row['peak_rss_mb']:7.0f} MB", flush=True)
    base = next((r for r in rows if r["format"] == "float32"), None)
    for r in rows:
        if base is not None:
            r["decode_vs_float32"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            r["prefill_vs_float32"] = r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
    for r in rows:
        ref = next((x for x in rows if x["format"] == r["format"] and x["engine"] == "llama.cpp"), None)
        if ref is not None and r["engine"] != "llama.cpp":
            r["decode_vs_llamacpp"] = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
    for p in work.iterdir():  # the GGUF files this run wrote
        p.unlink()
    work.rmdir()
    return rows


def _time(fn, min_s: float = 0.3) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def _rotated(fn, copies: int) -> float:
    """Seconds per call of ``fn(i)``, ``i`` cycling through the copies."""
    it = iter(range(1 << 62))
    return _time(lambda: fn(next(it) % copies))


def layers_table(args: argparse.Namespace) -> list[dict]:
    """Per layer shape and batch: ms of float32 and bf16 F.linear and of each format's kernel, with
    enough copies of the weights (over 256 MB in float32) that the caches do not hold them."""
    from torch.nn import functional as F

    from lowbit.formats import get_format
    from lowbit.kernels import build_kernel

    rows = []
    torch.manual_seed(0)
    for out_f, in_f in SHAPES:
        copies = max(2, (256 << 20) // (out_f * in_f * 4) + 1)
        ws = [torch.randn(out_f, in_f) * 0.02 for _ in range(min(copies, 4))]
        ws = [ws[i % len(ws)].clone() for i in range(copies)]  # distinct storage for every copy
        bs = [w.to(torch.bfloat16) for w in ws]
        kernels = {}
        for name in LAYER_FORMATS:
            fmt = get_format(name)
            qts = [fmt.quantize(w) for w in ws[: min(copies, 4)]]
            kernels[name] = [build_kernel(fmt, qts[i % len(qts)]) for i in range(copies)]
        for m in args.batches:
            x = torch.randn(m, in_f)
            xb = x.to(torch.bfloat16)
            row = {"shape": f"{out_f}x{in_f}", "batch": m,
                   "float32_ms": 1e3 * _rotated(lambda i, x=x, ws=ws: F.linear(x, ws[i]), copies),
                   "bf16_ms": 1e3 * _rotated(lambda i, xb=xb, bs=bs: F.linear(xb, bs[i]), copies)}
            for name, ks in kernels.items():
                row[f"{name}_ms"] = 1e3 * _rotated(lambda i, x=x, ks=ks: ks[i](x), copies)
                row[f"{name}_backend"] = ks[0].backend
            rows.append(row)
            print(f"{row['shape']:>10} m={m:<3} f32 {row['float32_ms']:7.3f}  bf16 {row['bf16_ms']:7.3f}  " + "  ".join(
                f"{n} {row[n + '_ms']:7.3f}" for n in LAYER_FORMATS), flush=True)
        del ws, bs, kernels
    return rows


def markdown(meta: dict, models: list[dict], layers: list[dict]) -> str:
    out = [f"`{meta['command']}` on {meta['machine']['device']} ({meta['threads']} threads), {meta['model']}: "
           f"{meta['new_tokens']} new tokens after {meta['prompt_tokens']}, greedy\n"]
    if models:
        out += ["| format | engine | decode tok/s | × float32 | × llama.cpp | prefill tok/s | × float32 | peak RSS MB |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in models:
            vs = f"{r['decode_vs_llamacpp']:.2f}" if "decode_vs_llamacpp" in r else ""
            out.append(f"| {r['format']} | {r['engine']} | {r['decode_tokens_per_s']:.2f} | "
                       f"{r.get('decode_vs_float32', float('nan')):.2f} | {vs} | {r['prefill_tokens_per_s']:.1f} | "
                       f"{r.get('prefill_vs_float32', float('nan')):.2f} | {r['peak_rss_mb']:.0f} |")
    if layers:
        out += ["", "Layer products, ms per call (weights rotated through more than 256 MB of float32 copies):", "",
                "| shape | batch | float32 | bf16 | " + " | ".join(LAYER_FORMATS) + " |",
                "|---|---:|---:|---:|" + "---:|" * len(LAYER_FORMATS)]
        for r in layers:
            out.append(f"| {r['shape']} | {r['batch']} | {r['float32_ms']:.3f} | {r['bf16_ms']:.3f} | "
                       + " | ".join(f"{r[n + '_ms']:.3f}" for n in LAYER_FORMATS) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--fast", default="", help="formats also run with --backend fast (kernels that round)")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--tag", default="", help="appended to the results' file name")
    args = ap.parse_args()
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.fast = [f.strip() for f in args.fast.split(",") if f.strip()]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.time()
    models = [] if args.skip_models else models_table(args)
    layers = [] if args.skip_layers else layers_table(args)
    meta = {"command": command("runtime.py"), "machine": machine("cpu"), "model": args.model, "threads": args.threads,
            "new_tokens": args.new, "prompt_tokens": args.prompt_tokens, "total_seconds": time.time() - t0}
    OUT.mkdir(parents=True, exist_ok=True)
    stem = f"runtime-{args.model}-cpu" + ("-layers" if args.skip_models else "") + (f"-{args.tag}" if args.tag else "")
    (OUT / f"{stem}.json").write_text(json.dumps({**meta, "models": models, "layers": layers}, indent=1) + "\n")
    md = markdown(meta, models, layers)
    (OUT / f"{stem}.md").write_text(md)
    print("\n" + md + f"\nwrote {OUT}/{stem}.{{json,md}} in {meta['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
