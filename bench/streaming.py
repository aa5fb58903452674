"""Peak memory and time of ``lowbit quantize <hf_dir> --format ... --out x.gguf`` as the model grows.

Synthetic llama checkpoints with the shapes of Llama-2-7B (hidden 4096, intermediate 11008, 32
heads, vocabulary 32000, FP16 safetensors, one shard per layer, seeded random weights) are written
once under ``--workdir`` with 2, 8 and 32 layers (1x, 4x, 16x; 32 layers is the full 7B shape) and
reused when present.  Each is quantized by ``lowbit quantize`` in a subprocess (the streaming path);
its peak resident memory comes from ``wait4`` (ru_maxrss of that child alone), and /proc is polled
for the peaks of anonymous and file-backed memory.  ``--time-limit`` stops a run after that many
seconds (SIGKILL): the row then records how many tensors it finished and its peak so far, and a
later run with ``--resume`` goes on from there (the output's journal).  ``--in-memory`` runs the
previous path instead (transformers loads the whole model in float32, then the GGUF is written).
``--method gptq`` (or awq) runs the calibrated streaming path (one decoder layer in memory at a
time, plus the calibration hidden states and the layer's Hessians) on checkpoints whose
vocabulary is the tokenizer's (49152), so that the calibration text runs through them.

Rows are merged into ``bench/results/streaming-cpu.json`` (and .md) by (path, format, layers),
so that several invocations build one table:

    python bench/streaming.py --layers 2,8,32 --formats q8_0,q4_k_m --workdir /tmp/lowbit-stream
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _common import OUT, command, machine

STEM = "streaming-cpu"


def _proc_rss(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of a process in bytes, 0 when it is gone."""
    anon = file = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith("RssFile:"):
                file = int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, file


def _journal_progress(out: Path) -> tuple[int, int]:
    try:
        state = json.loads(out.with_name(f".{out.name}.part-resume.json").read_text())
        return int(state["done"]), int(state["n_tensors"])
    except (OSError, ValueError, KeyError):
        return 0, 0


def run_one(model: Path, out: Path, fmt: str, in_memory: bool, time_limit: float | None, resume: bool,
            log: Path, calib: list[str] | None = None) -> dict[str, object]:
    for p in (out, out.with_name(f".{out.name}.part"), out.with_name(f".{out.name}.part-resume.json"),
              out.with_name(f".{out.name}.part-hidden.pt")):
        if p == out or not resume:
            p.unlink(missing_ok=True)
    if in_memory:
        code = ("import sys; from pathlib import Path; from lowbit.model.load import load_model; "
                "from lowbit.io.hf_gguf import write_gguf_from_hf; "
                "write_gguf_from_hf(load_model(sys.argv[1], progress=False), Path(sys.argv[2]), sys.argv[3], "
                "progress=False)")
        cmd = [sys.executable, "-c", code, str(model), str(out), fmt]
    else:
        cmd = [sys.executable, "-m", "lowbit.cli", "quantize", str(model), "--format", fmt, "--out", str(out)]
        cmd += calib or []
    t0 = time.monotonic()
    peak_anon = peak_file = 0
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT)
        killed = False
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            anon, file = _proc_rss(proc.pid)
            peak_anon, peak_file = max(peak_anon, anon), max(peak_file, file)
            if time_limit is not None and time.monotonic() - t0 > time_limit and not killed:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - t0
    done, n = _journal_progress(out)
    complete = proc.returncode == 0 and out.is_file()
    if not complete and not killed:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    text = log.read_text()
    resumed = [ln for ln in text.splitlines() if "resuming after tensor" in ln]
    return {"path": "in-memory" if in_memory else "streaming", "format": fmt, "complete": complete,
            "seconds": round(seconds, 1), "peak_rss_bytes": ru.ru_maxrss * 1024,
            "peak_rss_anon_bytes_polled": peak_anon, "peak_rss_file_bytes_polled": peak_file,
            "tensors_done": n if complete else done, "n_tensors": n if n else None,
            "resumed": resumed[0].strip() if resumed else None,
            "output_bytes": out.stat().st_size if complete else None, "log": str(log), "command": " ".join(cmd)}


def _table(rows: list[dict]) -> str:
    lines = ["| path | format | layers | params | checkpoint GB | peak RSS GB | anon / file GB (polled) | time s | "
             "done | output GB |", "|---|---|---:|---:|---:|---:|---|---:|---|---:|"]
    for r in sorted(rows, key=lambda r: (r["path"], r["format"], r["layers"])):
        done = "complete" if r["complete"] else f"stopped: {r['tensors_done']} of {r['n_tensors']} tensors"
        if r.get("runs", 1) > 1:
            done += f" ({r['runs']} runs, resumed)"
        outb = f"{r['output_bytes'] / 1e9:.2f}" if r["output_bytes"] else "-"
        lines.append(f"| {r['path']} | {r['format']} | {r['layers']} | {r['params'] / 1e9:.2f} B | "
                     f"{r['checkpoint_bytes'] / 1e9:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} | "
                     f"{r['peak_rss_anon_bytes_polled'] / 1e9:.2f} / {r['peak_rss_file_bytes_polled'] / 1e9:.2f} | "
                     f"{r['seconds']:.0f} | {done} | {outb} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,8,32", help="layer counts (default 2,8,32: 1x, 4x, 16x)")
    ap.add_argument("--formats", default="q4_k_m", help="GGUF file types, comma-separated (default q4_k_m)")
    ap.add_argument("--workdir", default="/tmp/lowbit-stream-bench", help="where checkpoints and outputs go")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds after which a run is stopped")
    ap.add_argument("--resume", action="store_true", help="go on from a stopped run's partial output")
    ap.add_argument("--in-memory", action="store_true", help="measure the in-memory path instead")
    ap.add_argument("--method", default="rtn", choices=["rtn", "gptq", "awq"],
                    help="gptq/awq: calibrated, one decoder layer in memory at a time (vocabulary 49152)")
    ap.add_argument("--calib-samples", type=int, default=16, help="calibration chunks for --method (default 16)")
    ap.add_argument("--calib-len", type=int, default=512, help="tokens per calibration chunk (default 512)")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the GGUF files (default: deleted)")
    args = ap.parse_args()

    from lowbit.testing.synthetic import LLAMA_7B, bundled_tokenizer_dir, write_synthetic_llama

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tok = bundled_tokenizer_dir(work / "tokenizer")
    results = OUT / f"{STEM}.json"
    OUT.mkdir(parents=True, exist_ok=True)
    doc = json.loads(results.read_text()) if results.is_file() else {"rows": []}
    calib = None
    vocab = LLAMA_7B["vocab_size"]
    if args.method != "rtn":
        # calibration text runs through the model: its vocabulary must hold every token id
        calib = ["--method", args.method, "--calib-samples", str(args.calib_samples), "--calib-len", str(args.calib_len)]
        vocab = 49152
    for n_layers in [int(x) for x in args.layers.split(",")]:
        model = work / (f"llama7b-shape-{n_layers}L" + ("" if calib is None else "-v49152"))
        t0 = time.monotonic()
        existed = (model / "model.safetensors.index.json").is_file()
        write_synthetic_llama(model, n_layers, tok, seed=n_layers, vocab_size=vocab)
        ck_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        print(f"{model}: {ck_bytes / 1e9:.2f} GB" + ("" if existed else f", written in {time.monotonic() - t0:.0f} s"),
              flush=True)
        h, f, v = LLAMA_7B["hidden_size"], LLAMA_7B["intermediate_size"], vocab
        params = n_layers * (4 * h * h + 3 * h * f + 2 * h) + 2 * v * h + h
        for ftype in args.formats.split(","):
            fmt = ftype if calib is None else f"{ftype}+{args.method}"
            out = work / f"out-{n_layers}L-{fmt}{'-inmem' if args.in_memory else ''}.gguf"
            log = work / f"log-{n_layers}L-{fmt}{'-inmem' if args.in_memory else ''}.txt"
            print(f"quantize {n_layers} layers to {fmt} ({'in memory' if args.in_memory else 'streaming'}) ...",
                  flush=True)
            row = run_one(model, out, ftype, args.in_memory, args.time_limit, args.resume, log, calib)
            row["format"] = fmt
            row.update(layers=n_layers, params=params, checkpoint_bytes=ck_bytes)
            if row["complete"]:  # the journal is gone once complete: 9 tensors a layer, embeddings, head, norm
                row["tensors_done"] = row["n_tensors"] = 9 * n_layers + 3
            print(json.dumps(row), flush=True)
            if row["complete"] and not args.keep_outputs:
                out.unlink()
            key = (row["path"], fmt, n_layers)
            prev = [r for r in doc["rows"] if (r["path"], r["format"], r["layers"]) == key]
            if args.resume and prev and not prev[0]["complete"] and row["resumed"]:
                # one measurement in several runs: the times add up, the peak is the largest
                row["seconds"] = round(row["seconds"] + prev[0]["seconds"], 1)
                for k in ("peak_rss_bytes", "peak_rss_anon_bytes_polled", "peak_rss_file_bytes_polled"):
                    row[k] = max(row[k], prev[0][k])
                row["runs"] = prev[0].get("runs", 1) + 1
            doc["rows"] = [r for r in doc["rows"] if (r["path"], r["format"], r["layers"]) != key] + [row]
            doc["machine"] = machine("cpu")
            doc.setdefault("commands", [])
            if command("streaming.py") not in doc["commands"]:
                doc["commands"].append(command("streaming.py"))
            doc["note"] = ("peak_rss_bytes: ru_maxrss of the quantizing process (wait4); random FP16 weights with "
                           "Llama-2-7B shapes; the tokenizer is SmolLM2's (49152 tokens), so the files are for "
                           "measuring, not for llama.cpp")
            results.write_text(json.dumps(doc, indent=1) + "\n")
            (OUT / f"{STEM}.md").write_text(
                "# Streaming quantization: peak memory and time as the model grows\n\n" + _table(doc["rows"])
                + f"\nMachine: {doc['machine']}\n\nCommands:\n\n" + "".join(f"    {c}\n" for c in doc["commands"]))
    print(_table(doc["rows"]))


if __name__ == "__main__":
    main()
