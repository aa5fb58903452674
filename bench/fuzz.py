"""Fuzz lowbit's GGUF and safetensors readers with mutated files and count what happens.

Each input is a small valid seed file (lowbit.testing.fuzz) damaged one way: truncated, random bytes
overwritten, header fields set to hostile values (counts, lengths, dimension counts, dimensions,
type ids, offsets, alignment), duplicate tensor names; for safetensors the header length, dtypes,
shapes, offsets (reversed, overlapping, past the end) and non-JSON headers.  Every reader that opens
untrusted files is run on it under a time limit and an allocation limit:

    gguf:        GGUFFile (open, read every tensor, dequantize), load_model's GGUF gate
                 (check_gguf_file + architecture), and for reference gguf-py's GGUFReader (which
                 lowbit no longer trusts with unchecked files) on every 10th input
    safetensors: check_safetensors (then the safetensors library reads every tensor it passed),
                 load_model's directory gate, load_checkpoint of a lowbit checkpoint directory

An outcome is ``ok``, a LowbitError subclass (a clear refusal), or a crash: any other exception,
a hang, a huge allocation, or a file that passed lowbit's check but that safetensors then refused.

    python bench/fuzz.py --n 20000          # writes bench/results/fuzz-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from _common import OUT, command, machine
from lowbit.errors import LowbitError
from lowbit.testing import fuzz

MAX_BYTES = 32 << 20  # the seeds are about 1 KB; anything near this is a reader sizing from a bad field
TIMEOUT_S = 10.0
#: reference readers: their failures are counted but are not lowbit's crashes; gguf-py's reader
#: takes ~100 ms on a header that claims long arrays, so it sees every REFERENCE_EVERY-th GGUF input
REFERENCE = {"gguf-py GGUFReader (reference)"}
REFERENCE_EVERY = 10


def read_gguf(path: Path) -> None:
    from lowbit.model.gguf_file import GGUFFile

    gf = GGUFFile(path)
    for name, t in gf.tensors.items():
        raw = gf.raw(name)
        assert raw.nbytes == t.n_bytes, (name, raw.nbytes, t.n_bytes)
        if int(np.prod(t.ne)) <= 1 << 16:
            x = gf.float32(name)
            assert x.shape == t.shape and x.dtype == np.float32, (name, x.shape, t.shape)


def gguf_gate(path: Path) -> None:
    from lowbit.model.load import check_gguf_file, gguf_arch

    gguf_arch(check_gguf_file(path))


def gguf_py(path: Path) -> None:
    from gguf import GGUFReader

    r = GGUFReader(path)
    for t in r.tensors:
        _ = t.data.nbytes


def read_safetensors(path: Path) -> None:
    from safetensors import safe_open

    from lowbit.model.safetensors_check import ITEMSIZE, check_safetensors

    entries = check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:  # as lowbit reads them (numpy has no bfloat16)
            for name, e in entries.items():
                x = f.get_tensor(name)
                if tuple(x.shape) != e.shape or x.element_size() != ITEMSIZE[e.dtype]:
                    raise AssertionError(f"{name}: {tuple(x.shape)} {x.dtype} != {e.shape} {e.dtype}")
    except AssertionError:
        raise
    except Exception as exc:  # passed lowbit's check, refused by safetensors: a hole in the check
        raise AssertionError(f"check_safetensors passed a file safetensors refuses: {exc}") from None


def st_dir_gate(path: Path) -> None:
    from lowbit.model.load import check_safetensors_dir

    check_safetensors_dir(path.parent)


def st_checkpoint(path: Path) -> None:
    from lowbit.model.checkpoint import load_checkpoint

    load_checkpoint(path.parent)


TINY_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16,
              "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "vocab_size": 32, "max_position_embeddings": 64, "tie_word_embeddings": True}


def outcome(fn: Callable[[Path], None], path: Path) -> tuple[str, str]:
    """(outcome, message): 'ok', 'LowbitError subclass name', or 'crash:<what>'."""
    try:
        with fuzz.guarded(MAX_BYTES, TIMEOUT_S):
            fn(path)
    except LowbitError as exc:
        return type(exc).__name__, str(exc)
    except (fuzz.Hang, fuzz.HugeAllocation) as exc:
        return f"crash:{type(exc).__name__}", str(exc)
    except Exception as exc:  # noqa: BLE001 - this is what we are counting
        return f"crash:{type(exc).__name__}", str(exc)[:300]
    return "ok", ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="mutated inputs (half GGUF, half safetensors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT / "fuzz-cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="lowbit-fuzz-"))
    gdir, sdir = work / "g", work / "s"
    gdir.mkdir()
    sdir.mkdir()
    gseed = fuzz.seed_gguf(work / "seed.gguf")
    gfields = fuzz.gguf_fields(gseed)
    sseed = fuzz.seed_safetensors(work / "seed.safetensors")
    (sdir / "config.json").write_text(json.dumps(TINY_LLAMA))
    (sdir / "lowbit.json").write_text(json.dumps({"lowbit_checkpoint": 1, "scheme": "x", "method": "rtn", "modules": {}}))
    gpath, spath = gdir / "m.gguf", sdir / "model.safetensors"
    targets: dict[str, list[tuple[str, Callable[[Path], None]]]] = {
        "gguf": [("GGUFFile (open, read, dequantize)", read_gguf), ("load_model GGUF gate", gguf_gate),
                 ("gguf-py GGUFReader (reference)", gguf_py)],
        "safetensors": [("check_safetensors (+ safetensors reads)", read_safetensors),
                        ("load_model directory gate", st_dir_gate), ("load_checkpoint", st_checkpoint)],
    }
    # warm up (imports, the tiny model's first build) outside the allocation guard
    for fmt, path, seed in (("gguf", gpath, gseed), ("safetensors", spath, sseed)):
        path.write_bytes(seed)
        for _, fn in targets[fmt]:
            try:
                fn(path)
            except LowbitError:
                pass
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    kinds: dict[str, Counter[str]] = defaultdict(Counter)
    crashes: list[dict[str, str]] = []
    tried = Counter[str]()
    t0 = time.perf_counter()
    for i in range(args.n):
        fmt = "gguf" if i % 2 == 0 else "safetensors"
        if fmt == "gguf":
            kind, data = fuzz.random_gguf(gseed, gfields, rng)
            path = gpath
        else:
            kind, data = fuzz.random_safetensors(sseed, rng)
            path = spath
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # a new inode: maps of the previous input stay valid
        tried[fmt] += 1
        kinds[fmt][kind] += 1
        for name, fn in targets[fmt]:
            if name in REFERENCE and tried[fmt] % REFERENCE_EVERY:
                continue
            res, msg = outcome(fn, path)
            counts[name][res] += 1
            if res.startswith("crash:") and name not in REFERENCE and len(crashes) < 50:
                crashes.append({"target": name, "mutation": kind, "outcome": res, "message": msg, "input": data.hex()})
                print(f"CRASH {name} {kind}: {res}: {msg[:200]}", file=sys.stderr)
        if (i + 1) % 2000 == 0:
            print(f"{i + 1}/{args.n} inputs, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    seconds = time.perf_counter() - t0
    n_crash = {name: sum(v for k, v in c.items() if k.startswith("crash:")) for name, c in counts.items()}
    lowbit_crashes = sum(v for k, v in n_crash.items() if k not in REFERENCE)
    print(f"\n{args.n} inputs ({tried['gguf']} GGUF, {tried['safetensors']} safetensors) in {seconds:.0f} s; "
          f"lowbit crashes: {lowbit_crashes}\n")
    print(f"| {'reader':42} | {'inputs':>6} | {'ok':>6} | {'LowbitError':>11} | {'crashes':>7} | refusals by class / crashes by kind")
    print(f"|{'-' * 44}|{'-' * 8}|{'-' * 8}|{'-' * 13}|{'-' * 9}|{'-' * 40}")
    for name, c in counts.items():
        total = sum(c.values())
        errs = {k: v for k, v in c.items() if k != "ok" and not k.startswith("crash:")}
        crash = {k[6:]: v for k, v in c.items() if k.startswith("crash:")}
        detail = ", ".join(f"{k} {v}" for k, v in sorted(errs.items())) + ("; " if crash else "") + \
            ", ".join(f"{k} {v}" for k, v in sorted(crash.items()))
        print(f"| {name:42} | {total:6} | {c['ok']:6} | {sum(errs.values()):11} | {n_crash[name]:7} | {detail}")
    print("\nmutations: " + "; ".join(f"{fmt}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                                      for fmt, c in kinds.items()))
    result = {
        "command": command("fuzz.py"), "machine": machine("cpu"), "seconds": round(seconds, 1),
        "inputs": args.n, "inputs_by_format": dict(tried), "lowbit_crashes": lowbit_crashes,
        "limits": {"max_bytes": MAX_BYTES, "timeout_s": TIMEOUT_S}, "reference_every": REFERENCE_EVERY,
        "mutations": {k: dict(v) for k, v in kinds.items()},
        "outcomes": {name: dict(sorted(c.items())) for name, c in counts.items()},
        "crashes_by_reader": n_crash, "reference_readers": sorted(REFERENCE), "crash_examples": crashes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
