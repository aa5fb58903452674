"""Benchmark: wall time and peak memory of writing a quantized GGUF with ``lowbit quantize`` and with
llama.cpp's ``llama-quantize`` from the same source, each a fresh process (start-up included), side
by side in one run, and a check that both wrote the same tensors.

    .venv/bin/python bench/quantize_speed.py [--model smollm2] [--types q4_k_m,q3_k_m] [--imatrix]

``--types`` defaults to every llama.cpp file type lowbit writes, plus the GGUF types llama-quantize has
no file type for (NVFP4: timed for lowbit alone).  With ``--imatrix`` each type that reads an
importance matrix is timed again with one (made once by ``lowbit imatrix``, llama-imatrix's file
format, and given to both); Q2_K_S only runs with one, as llama.cpp requires.  Both tools use every
core.  A type llama.cpp refuses on the model (Q1_0 where rows are not a multiple of 128) is listed as
refused by both, or flagged if only one refuses.  Each figure is the best of ``--repeat`` runs; peak
RSS is the child process's maximum resident set.  Prints a table and writes
bench/results/quantize-speed-<model>-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results"


_SAME = """
import sys
import gguf, numpy as np
ta = {t.name: t for t in gguf.GGUFReader(sys.argv[1]).tensors}
tb = {t.name: t for t in gguf.GGUFReader(sys.argv[2]).tensors}
same = ta.keys() == tb.keys() and all(ta[n].tensor_type == tb[n].tensor_type and np.array_equal(ta[n].data, tb[n].data)
                                      for n in tb)
print(int(same))
"""


def same_tensors(a: Path, b: Path) -> bool:
    """Both files hold the same tensors, types and bytes (read in a child process: see _FACTS)."""
    out = subprocess.run([sys.executable, "-c", _SAME, str(a), str(b)], check=True, capture_output=True, text=True)
    return out.stdout.strip() == "1"


def run_measured(cmd: list[str]) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS in MB, exit status, the last line of stderr) of ``cmd`` run as a child
    process (its peak resident set from ``os.wait4``)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        err.seek(0)
        last = (err.read().strip().splitlines() or [""])[-1]
    return wall, usage.ru_maxrss / 1024, p.returncode, last


def best(repeat: int, cmd: list[str]) -> tuple[float, float, int, str]:
    runs = [run_measured(cmd) for _ in range(repeat)]
    ok = [r for r in runs if r[2] == 0]
    return min(ok or runs, key=lambda r: r[0])


#: run in a child process, so that this one stays small (a forked child's peak RSS counts its parent's)
_FACTS = """
import json, sys
from lowbit.formats import get_format
from lowbit.model.gguf_mix import FILE_TYPES
from lowbit.model.load import resolve_model_path
mixed = {f.default for f in FILE_TYPES.values() if not f.pure}
types = {n: {"pure": ft.pure, "default": ft.default, "quantized": ft.quantized, "imatrix_only": bool(ft.imatrix_types) or get_format(ft.default).llama_needs_imatrix,
             "takes_imatrix": get_format(ft.default).uses_imatrix or bool(ft.imatrix_types),
             "llama_cpp_has": not (ft.pure and ft.default == n and n not in mixed)}
         for n, ft in FILE_TYPES.items() if n != "f16"}
print(json.dumps({"src": str(resolve_model_path(sys.argv[1])), "types": types}))
"""


def facts(model: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _FACTS, model], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def default_types(types: dict[str, dict]) -> list[str]:
    """Every llama.cpp mix lowbit writes, then the GGUF types llama.cpp has no file type for."""
    mixes = [n for n, t in types.items() if not t["pure"] and t["quantized"]]
    lowbit_only = [n for n, t in types.items() if not t["llama_cpp_has"]]
    return mixes + lowbit_only


def main() -> int:
    import importlib.util

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--types", help="comma-separated file types (default: every one lowbit writes)")
    ap.add_argument("--imatrix", action="store_true", help="also time each type that takes one with an importance matrix")
    ap.add_argument("--imatrix-chunks", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", help="JSON path (default bench/results/quantize-speed-<model>-cpu.json)")
    args = ap.parse_args()
    info = facts(args.model)
    src, known = Path(info["src"]), info["types"]
    threads = os.cpu_count() or 1
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.origin, "llama-cpp-python is not installed (scripts/install.sh)"
    tool = Path(spec.origin).parent / "lib" / "llama-quantize"
    lowbit = [sys.executable, "-m", "lowbit.cli", "quantize"]
    types = args.types.split(",") if args.types else default_types(known)
    bad = [t for t in types if t not in known]
    if bad:
        ap.error(f"--types: unknown file types {', '.join(bad)}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        im_file = None
        if args.imatrix:
            im_file = Path(d) / "imatrix.gguf"
            subprocess.run([sys.executable, "-m", "lowbit.cli", "imatrix", str(src), "-o", str(im_file), "--chunks",
                            str(args.imatrix_chunks), "--quiet"], check=True, stdout=subprocess.DEVNULL)
        for ft_name in types:
            ft = known[ft_name]
            variants = [None] if not (im_file and ft["takes_imatrix"]) else [None, im_file]
            if ft["imatrix_only"]:
                if not im_file:
                    continue
                variants = [im_file]
            llama_has = ft["llama_cpp_has"]
            for im in variants:
                tag = ft_name + (" +imatrix" if im else "")
                ours, ref = Path(d) / f"lowbit-{ft_name}.gguf", Path(d) / f"llama-{ft_name}.gguf"
                extra = ["--imatrix", str(im)] if im else []
                o = best(args.repeat, [*lowbit, str(src), "-f", ft_name, "-o", str(ours), "--quiet", "--force", *extra])
                row: dict[str, object] = {"type": tag, "lowbit_s": round(o[0], 2), "lowbit_rss_mb": round(o[1]),
                                          "lowbit_ok": o[2] == 0}
                if llama_has:
                    cmd = [str(tool), "--allow-requantize", *(["--pure"] if ft["pure"] else []), *extra, str(src), str(ref),
                           (ft["default"] if ft["pure"] else ft_name).upper(), str(threads)]
                    r = best(args.repeat, cmd)
                    row.update({"llama_cpp_s": round(r[0], 2), "llama_cpp_rss_mb": round(r[1]), "llama_cpp_ok": r[2] == 0})
                    if o[2] == 0 and r[2] == 0:
                        row.update({"ratio": round(o[0] / r[0], 2), "rss_ratio": round(o[1] / r[1], 2),
                                    "identical": same_tensors(ours, ref)})
                    elif o[2] != r[2] and (o[2] == 0 or r[2] == 0):
                        row["identical"] = False  # one refused what the other made
                    else:
                        row["refused_by_both"] = True
                if o[2] != 0:
                    row["lowbit_error"] = o[3]
                rows.append(row)
                ratio = f"{row['ratio']:5.2f}x" if "ratio" in row else "    -"
                ll = (f"{row['llama_cpp_s']:6.2f} s {row['llama_cpp_rss_mb']:5} MB" if "llama_cpp_s" in row
                      else "(no file type)  ")
                verdict = ("identical" if row.get("identical") else "DIFFERENT" if row.get("identical") is False
                           else "refused by both" if row.get("refused_by_both") else "lowbit only")
                print(f"{tag:<18} lowbit {o[0]:6.2f} s {round(o[1]):5} MB   llama.cpp {ll}   {ratio}   {verdict}", flush=True)
                for p in (ours, ref):
                    p.unlink(missing_ok=True)
    doc = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "model": str(src.name), "device_name": platform.processor() or platform.machine(), "cpu_count": threads,
        "llama_cpp_threads": threads, "repeat": args.repeat, "startup_included": True, "rows": rows,
    }
    out = Path(args.out) if args.out else OUT / f"quantize-speed-{Path(args.model).stem}-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(r.get("identical", True) is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
