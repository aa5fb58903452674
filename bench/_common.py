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
    short still leaves what it measured; removed once the full results are written."""

    def __init__(self, stem: str) -> None:
        OUT.mkdir(parents=True, exist_ok=True)
        self.path = OUT / f"{stem}.partial.jsonl"
        self.path.write_text("")

    def add(self, r, base_ppl: float) -> dict:  # type: ignore[no-untyped-def]
        row = r.row(base_ppl)
        with self.path.open("a") as fh:
            fh.write(json.dumps({**row, "description": r.description, "original_ppl": base_ppl}) + "\n")
        return row


def machine(device: str) -> dict[str, object]:
    dev = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or platform.machine())
    return {"platform": platform.platform(), "device": dev, "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def command(script: str) -> str:
    return f"python bench/{script} " + " ".join(sys.argv[1:])


def write_results(cmp, stem: str, meta: dict, markdown: str, partial: PartialRows) -> None:  # type: ignore[no-untyped-def]
    from lowbit.eval.report import plot, write_json

    write_json(cmp, OUT / f"{stem}.json", extra=meta)
    plot(cmp, OUT / f"{stem}.png")
    (OUT / f"{stem}.md").write_text(markdown)
    partial.path.unlink(missing_ok=True)
    print(f"\nwrote {OUT}/{stem}.{{json,md,png}} in {meta['total_seconds']:.0f} s")
