"""Pieces the comparison benchmarks share: rows written as they finish, machine metadata, and the
JSON / markdown / PNG results (imported by the scripts beside it)."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results"


class PartialRows:
    """Each finished entry of a comparison appended to ``<stem>.partial.jsonl``, so that a run cut
    short still leaves what it measured; removed once the full results are written.

    The file's first line is ``key`` (what the run measures: model, chunks, calibration, ...).  With
    ``resume``, the entries of an earlier file with the same key are kept (``done``, by label, and the
    original's perplexity they were measured against, ``base_ppl``) for ``compare(done=...)`` to skip;
    a file with another key, or none, starts over."""

    def __init__(self, stem: str, key: dict | None = None, resume: bool = False) -> None:
        from lowbit.eval.compare import FormatResult

        OUT.mkdir(parents=True, exist_ok=True)
        self.path = OUT / f"{stem}.partial.jsonl"
        self.key = {"key": key or {}}
        self.done: dict[str, FormatResult] = {}
        self.base_ppl: float | None = None
        kept: list[str] = []
        if resume and self.path.is_file():
            lines = self.path.read_text().splitlines()
            if lines and json.loads(lines[0]) == self.key:
                for line in lines[1:]:
                    doc = json.loads(line)
                    if "result" in doc:
                        self.done[doc["format"]] = FormatResult(**doc["result"])
                        self.base_ppl = doc["original_ppl"]
                        kept.append(line)
                print(f"resuming: {len(self.done)} entries already measured in {self.path.name}", flush=True)
            else:
                print(f"starting over: {self.path.name} was written by a run with other settings", flush=True)
        self.path.write_text("".join(x + "\n" for x in [json.dumps(self.key), *kept]))

    def add(self, r, base_ppl: float) -> dict:  # type: ignore[no-untyped-def]
        from dataclasses import asdict

        row = r.row(base_ppl)
        if r.format in self.done:
            return row
        with self.path.open("a") as fh:
            fh.write(json.dumps({**row, "description": r.description, "original_ppl": base_ppl,
                                 "result": asdict(r)}) + "\n")
        return row


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else the platform's machine: ratios against float32 depend
    on it (a BLAS's float32 path differs between vendors more than lowbit's kernels do)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict[str, object]:
    dev = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name()
    return {"platform": platform.platform(), "device": dev, "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def command(script: str) -> str:
    return f"python bench/{script} " + " ".join(sys.argv[1:])


def write_results(cmp, stem: str, meta: dict, markdown: str, partial: PartialRows) -> None:  # type: ignore[no-untyped-def]
    from lowbit.eval.report import plot, write_json

    write_json(cmp, OUT / f"{stem}.json", extra=meta, owned=True)
    plot(cmp, OUT / f"{stem}.png", owned=True)
    (OUT / f"{stem}.md").write_text(markdown)
    partial.path.unlink(missing_ok=True)
    print(f"\nwrote {OUT}/{stem}.{{json,md,png}} in {meta['total_seconds']:.0f} s")
