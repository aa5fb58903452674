"""Benchmark: lowbit's searched mixes of llama.cpp types against llama.cpp's own mixes (Q3_K_M,
Q4_K_M, Q5_K_M, ...) at the same bits per weight, the same importance matrix for both, evaluated
on the same held-out text; plus how well the predicted KLD matches the measured one.  With
``--target lowbit``: searched mixes of lowbit's formats (a lowbit checkpoint) against each of the
``--baselines`` formats used for every layer, at that format's bits.

    .venv/bin/python bench/mixsearch.py [--model smollm2] [--mixes q3_k_m,q4_k_m,q5_k_m] [--chunks 20]
                                        [--sens-chunks 8] [--imatrix-chunks 64] [--exclude q4_1]
                                        [--device cpu] [--sens-cache FILE] [--dither 0.1]
                                        [--target lowbit --baselines int3-asym-g64,nf4,...]

The sensitivities are measured for every llama.cpp type and saved to ``--sens-cache`` (default
bench/results/mixsearch-<model>-sens.json); a later run on the same model, text and chunk counts
reuses them, so searching again with other ``--exclude`` types costs only the evaluation.

``--exclude`` removes types from the search: the bundled models were distributed quantized, and
re-quantizing a tensor into the type it came in reproduces it for free (SmolLM2's Q4_1).  llama.cpp's
mixes keep whatever types their rules give.  Writes bench/results/mixsearch-<model>-<device>.{json,md,png}
(mixsearch-<model>-lowbit-<device> for ``--target lowbit``, whose sensitivities come from the same file:
a tensor's sensitivity does not depend on the file format, so only the new formats' errors are computed).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from lowbit.eval import mixsearch as ms
from lowbit.eval.data import calibration_text, eval_text
from lowbit.eval.runner import Evaluation, torch_logits_fn
from lowbit.model.imatrix import compute_imatrix, imatrix_chunks
from lowbit.model.layers import unique_params
from lowbit.model.load import load_model

OUT = Path(__file__).parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--mixes", default="q3_k_m,q4_k_m,q5_k_m")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--sens-chunks", type=int, default=8)
    ap.add_argument("--imatrix-chunks", type=int, default=64)
    ap.add_argument("--exclude", default="q4_1", help="types the search may not use (comma-separated)")
    ap.add_argument("--target", choices=ms.TARGETS, default="gguf",
                    help="gguf: against llama.cpp's mixes; lowbit: against lowbit formats used for every layer")
    ap.add_argument("--baselines", default="int3-asym-g64,int4-asym-g128,int4-asym-g64,nf4,int4-asym-g32,int8-ch",
                    help="--target lowbit: the single formats to compare with (each at its own bits)")
    ap.add_argument("--name")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sens-cache", help="sensitivity file to reuse or write (default bench/results/mixsearch-<model>-sens.json)")
    ap.add_argument("--dither", type=float, default=0.0,
                    help="add Gaussian noise of this fraction of each row's RMS to every weight llama.cpp quantizes, "
                         "so that the 'original' no longer sits on the grid it was distributed in (0: off)")
    ap.add_argument("--combine", help="no run: draw these results (comma-separated JSON files of this script) side by "
                                      "side into --name's PNG")
    args = ap.parse_args()
    if args.combine:
        docs = [json.loads(Path(f).read_text()) for f in args.combine.split(",") if f]
        path = OUT / f"{args.name or 'mixsearch-combined'}.png"
        _plot_many(docs, path)
        print(f"wrote {path}")
        return 0
    t0 = time.perf_counter()
    loaded = load_model(args.model, progress=False)
    tag = Path(args.model).stem + (f"-dither{args.dither:g}" if args.dither else "")
    if args.dither:
        n = dither(loaded.model, args.dither)
        print(f"dithered {n} tensors with noise of {args.dither:g} x row RMS (seed 0)", flush=True)
    if args.device != "cpu":
        loaded.model.to(args.device)
    excluded = {t for t in args.exclude.split(",") if t}
    allowed = tuple(t for t in ms.gguf_candidates() if t not in excluded)
    im = compute_imatrix(loaded, calibration_text(), max_chunks=args.imatrix_chunks, progress=False).values()
    cal = imatrix_chunks(loaded, calibration_text(), n_ctx=512, max_chunks=args.sens_chunks)
    cache = Path(args.sens_cache) if args.sens_cache else OUT / f"mixsearch-{tag}-sens.json"
    key = {"model": loaded.name, "calibration_sha256": hashlib.sha256(calibration_text().encode()).hexdigest(),
           "n_ctx": 512, "sens_chunks": args.sens_chunks, "imatrix_chunks": args.imatrix_chunks, "dither": args.dither}
    saved = ms.load_sensitivities(cache, key) if cache.is_file() else None
    # every type lowbit writes into GGUF files is measured (the search then drops the excluded ones); types
    # missing from a saved file are added to it without running the model again
    every = ms.measure(loaded, cal, im, allowed=None, progress=True, previous=saved)
    if saved is None or every.tensors != saved.tensors:
        OUT.mkdir(parents=True, exist_ok=True)
        ms.save_sensitivities(every, cache, {**key, "device": args.device})
        print(f"sensitivities: {len(every.tensors)} tensors, {every.tokens} tokens, {every.seconds:.0f} s -> {cache}"
              + (" (added types to the saved ones)" if saved is not None else ""), flush=True)
    else:
        print(f"sensitivities reused from {cache} (measured in {every.seconds:.0f} s)", flush=True)
    if args.target == "gguf":
        sens = every.restricted(allowed)
        pairs = [(ft, f"llama.cpp {ft}+imatrix", ms.mix_of_file_type(loaded, ft, imatrix=True))
                 for ft in args.mixes.split(",") if ft]
    else:
        baselines = [b for b in args.baselines.split(",") if b]
        pool = tuple(dict.fromkeys(ms.LOWBIT_TYPES + tuple(baselines)))
        full = ms.measure(loaded, cal, im, allowed=pool, progress=True, target="lowbit", previous=every)
        sens = full.restricted(tuple(t for t in pool if t not in excluded))
        pairs = []
        for b in baselines:
            if any(b not in t.bits for t in full.tensors.values()):
                raise SystemExit(f"baseline {b} does not fit every linear layer of {loaded.name}")
            pairs.append((b, f"uniform {b}", {t.key: b for t in full.tensors.values()}))
    ev = Evaluation(loaded, eval_text(), n_ctx=512, max_chunks=args.chunks, progress=False)
    rows = []
    try:
        base = ev.run(torch_logits_fn(loaded.model, 512), "original", as_reference=True)
        for ft, their_label, theirs in pairs:
            budget = sens.bits_of(theirs) if args.target == "gguf" else full.bits_of(theirs)
            ours, sol = ms.search(sens, budget)
            for side, label, mix in (("fixed", their_label, theirs), ("searched", f"lowbit search @ {ft}", ours)):
                work = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
                ts = time.perf_counter()
                ms.apply_mix(work, mix, im, target=args.target)
                met = ev.run(torch_logits_fn(work.model, 512), label)
                measured_on = sens if side == "searched" or args.target == "gguf" else full
                bits = measured_on.bits_of(mix)
                counts: dict[str, int] = {}
                for t in mix.values():
                    counts[t] = counts.get(t, 0) + 1
                row = {"mix": label, "side": side, "target": ft, "bpw": bits / sens.n_params, "size_mb": bits / 8e6,
                       "predicted_kld": measured_on.predict(mix), "kld_mean": met["kld_mean"], "ppl": met["ppl"],
                       "dppl_pct": 100 * (met["ppl"] / base["ppl"] - 1), "same_top_pct": 100 * met["same_top"],
                       "types": counts, "seconds": time.perf_counter() - ts}
                rows.append(row)
                print(f"{label}: {row['bpw']:.3f} bpw, predicted KLD {row['predicted_kld']:.5f}, measured "
                      f"{row['kld_mean']:.5f}, ΔPPL {row['dppl_pct']:+.2f}%  {counts}", flush=True)
                del work
    finally:
        ev.close()
    head = "| mix | bits/weight | predicted KLD | measured KLD | ΔPPL % | same top % |\n|---|---:|---:|---:|---:|---:|\n"
    table = head + "\n".join(f"| {r['mix']} | {r['bpw']:.3f} | {r['predicted_kld']:.5f} | {r['kld_mean']:.5f} | "
                             f"{r['dppl_pct']:+.2f} | {r['same_top_pct']:.2f} |" for r in rows)
    print(table)
    name = args.name or f"mixsearch-{tag}{'-lowbit' if args.target == 'lowbit' else ''}-{args.device.split(':')[0]}"
    doc = {"command": "python bench/mixsearch.py " + " ".join(sys.argv[1:]), "model": loaded.name,
           "original_ppl": base["ppl"], "eval_chunks": args.chunks, "sens_chunks": args.sens_chunks,
           "imatrix_chunks": args.imatrix_chunks, "excluded_types": sorted(excluded), "dither": args.dither,
           "target": args.target, "candidates": sorted({t for s_ in sens.tensors.values() for t in s_.bits}), "rows": rows,
           "sensitivity_seconds": sens.seconds, "total_seconds": time.perf_counter() - t0,
           "sensitivity_file": str(cache.relative_to(Path.cwd()) if cache.is_relative_to(Path.cwd()) else cache),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}}
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / f".{name}.json.part"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(OUT / f"{name}.json")
    model_label = loaded.name + (f" dithered by {args.dither:g} x row RMS" if args.dither else "")
    (OUT / f"{name}.md").write_text(f"{model_label}, original PPL {base['ppl']:.3f}, {args.chunks} chunks x 512 tokens, "
                                    f"search without {', '.join(sorted(excluded)) or 'no type'}\n\n" + table + "\n")
    _plot(rows, OUT / f"{name}.png", model_label, args.target)
    print(f"wrote {OUT}/{name}.{{json,md,png}}")
    return 0


def dither(model: torch.nn.Module, rel: float, seed: int = 0) -> int:
    """Add Gaussian noise of ``rel`` x each row's RMS to every 2-D tensor llama.cpp would quantize
    (tied tensors once); returns how many.  The bundled models were distributed quantized, so their
    weights sit on a grid that some types reproduce for free.  Noise of 0.1 x RMS, about a third of
    Q4_1's step, leaves no trace of that grid in any type's error (each type's error then matches the
    one it has on Gaussian weights), but it is a real change to the model (SmolLM2's perplexity on
    the evaluation text goes from 22.3 to 40.7): the dithered model is the 'original' of such a run."""
    from lowbit.model.gguf_mix import gguf_name

    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for pname, p in unique_params(model):
            if p.dim() != 2 or gguf_name(pname) is None:
                continue
            rms = p.float().pow(2).mean(1, keepdim=True).sqrt()
            p.add_((torch.randn(p.shape, generator=gen) * rms.cpu() * rel).to(p.device, p.dtype))
            n += 1
    return n


def _label(doc: dict) -> str:
    return doc["model"] + (f" dithered by {doc['dither']:g} x row RMS" if doc.get("dither") else "")


def _plot_many(docs: list[dict], path: Path) -> None:
    """Several results of this script side by side, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(docs), figsize=(6.5 * len(docs), 4.5), squeeze=False)
    for ax, doc in zip(axes[0], docs, strict=True):
        _draw(ax, doc["rows"], _label(doc), doc.get("target", "gguf"))
    fig.tight_layout()
    _save(fig, path)


def _plot(rows: list[dict], path: Path, model: str, target: str = "gguf") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw(ax, rows, model, target)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:  # type: ignore[no-untyped-def]
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.part.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _draw(ax, rows: list[dict], model: str, target: str) -> None:  # type: ignore[no-untyped-def]
    fixed = "llama.cpp's mixes" if target == "gguf" else "one lowbit format for every layer"
    for side, label, style in (("fixed", fixed, "o-"), ("searched", "lowbit's searched mixes", "s-")):
        pts = sorted((r["bpw"], r["kld_mean"]) for r in rows
                     if r.get("side", "fixed" if r["mix"].startswith("llama.cpp") else "searched") == side)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    for r in rows:
        ax.annotate(r["target"], (r["bpw"], r["kld_mean"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (whole model)")
    ax.set_ylabel("mean KL divergence vs original")
    what = "llama.cpp's at the same size (same imatrix)" if target == "gguf" else "single formats at the same size"
    ax.set_title(f"{model}\nlowbit's searched mixes vs {what}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()


if __name__ == "__main__":
    sys.exit(main())
