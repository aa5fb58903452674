"""Quantize one model into several formats and evaluate each against the original, the same way."""

from __future__ import annotations

import copy
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.eval.data import eval_text, text_digest
from lowbit.eval.runner import Evaluation, torch_logits_fn
from lowbit.formats import get_format
from lowbit.model.load import LoadedModel
from lowbit.model.quantize import quantize_model


@dataclass
class FormatResult:
    format: str
    description: str
    bits_per_weight: float  # whole model: every stored bit over every weight
    linear_bpw: float  # the quantized linear layers alone
    size_bytes: int
    quant_seconds: float
    metrics: dict[str, float]
    tensor_formats: dict[str, int] = field(default_factory=dict)

    def row(self, base_ppl: float) -> dict[str, object]:
        m = self.metrics
        return {
            "format": self.format,
            "bpw": self.bits_per_weight,
            "linear_bpw": self.linear_bpw,
            "size_mb": self.size_bytes / 1e6,
            "ppl": m["ppl"],
            "dppl_pct": 100.0 * (m["ppl"] / base_ppl - 1.0),
            "kld_mean": m.get("kld_mean", 0.0),
            "kld_p99": m.get("kld_p99", 0.0),
            "same_top_pct": 100.0 * m.get("same_top", 1.0),
            "quant_s": self.quant_seconds,
            "eval_s": m["eval_seconds"],
        }


@dataclass
class Comparison:
    model: str
    arch: str
    n_params: int
    text: str
    text_sha: str
    n_ctx: int
    chunks: int
    tokens: int
    base: dict[str, float]
    results: list[FormatResult]
    notes: list[str]

    def rows(self) -> list[dict[str, object]]:
        return [r.row(self.base["ppl"]) for r in self.results]


def compare(loaded: LoadedModel, formats: list[str], text: str | None = None, text_name: str = "wiki-eval",
            n_ctx: int = 512, max_chunks: int | None = 20, progress: bool = True) -> Comparison:
    for f in formats:
        get_format(f)  # unknown names fail before any work
    text = eval_text() if text is None else text
    ev = Evaluation(loaded, text, n_ctx=n_ctx, max_chunks=max_chunks, progress=progress)
    try:
        base = ev.run(torch_logits_fn(loaded.model, n_ctx), "original", as_reference=True)
        results = []
        for f in formats:
            model = copy.deepcopy(loaded.model)
            t0 = time.perf_counter()
            report = quantize_model(model, f, progress=progress)
            tq = time.perf_counter() - t0
            metrics = ev.run(torch_logits_fn(model, n_ctx), f)
            lin = [t for t in report.tensors if t.quantized and t.format == get_format(f).name]
            lin_bpw = sum(t.bits for t in lin) / max(1, sum(torch.Size(t.shape).numel() for t in lin))
            results.append(FormatResult(get_format(f).name, get_format(f).description, report.bits_per_weight,
                                        lin_bpw, report.size_bytes, tq, metrics, report.counts()))
            del model
            gc.collect()
    finally:
        ev.close()
    notes = list(loaded.notes)
    return Comparison(loaded.name, loaded.arch, loaded.n_params, text_name, text_digest(text), n_ctx,
                      len(ev.chunks), int(base["tokens"]), base, results, notes)


def default_out_dir(model_name: str) -> Path:
    return Path("runs") / Path(model_name).stem
