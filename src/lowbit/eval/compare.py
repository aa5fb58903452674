"""Quantize one model into several formats and evaluate each against the original, the same way."""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.eval.data import calibration_text, eval_text, text_digest
from lowbit.eval.runner import Evaluation, torch_logits_fn
from lowbit.formats import get_format
from lowbit.model.actquant import describe_smoothing, outlier_report
from lowbit.model.actscheme import parse_act_scheme
from lowbit.model.calibrate import CalibConfig
from lowbit.model.gguf_mix import file_type
from lowbit.model.imatrix import compute_imatrix
from lowbit.model.imatrix import imatrix_chunks as calib_chunks
from lowbit.model.load import LoadedModel
from lowbit.model.qat import QATConfig
from lowbit.model.quantize import QuantReport
from lowbit.model.recipe import Recipe, quantize


class PeakMemory:
    """Peak resident memory of this process while the block runs, sampled every 20 ms (Linux
    /proc; elsewhere the process's lifetime peak from getrusage).  ``peak_mb`` is the peak,
    ``delta_mb`` its excess over the memory in use when the block started."""

    def __enter__(self) -> PeakMemory:
        import threading

        self.start = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def peak_mb(self) -> float:
        return self.peak

    @property
    def delta_mb(self) -> float:
        return self.peak - self.start


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            import os

            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    peak_rss_mb: float = 0.0  # the process's peak resident memory while quantizing
    extra_rss_mb: float = 0.0  # of which above what was in use when quantization started
    wa: str = ""  # bits of weights and activations: W8A8, W4A4, W4.17A16 (weight-only)
    details: dict[str, object] = field(default_factory=dict)  # per-entry extras (LLM.int8()'s outliers)
    peak_gpu_mb: float = 0.0  # peak CUDA memory allocated while quantizing (0 for a model on the CPU)

    def row(self, base_ppl: float) -> dict[str, object]:
        m = self.metrics
        return {
            "format": self.format,
            "wa": self.wa,
            "bpw": self.bits_per_weight,
            "linear_bpw": self.linear_bpw,
            "size_mb": self.size_bytes / 1e6,
            "ppl": m["ppl"],
            "dppl_pct": 100.0 * (m["ppl"] / base_ppl - 1.0),
            "kld_mean": m.get("kld_mean", 0.0),
            "kld_p99": m.get("kld_p99", 0.0),
            "same_top_pct": 100.0 * m.get("same_top", 1.0),
            "quant_s": self.quant_seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "extra_rss_mb": self.extra_rss_mb,
            "peak_gpu_mb": self.peak_gpu_mb,
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


def parse_spec(spec: str) -> Recipe:
    """One entry of a comparison: ``scheme[+method][+imatrix]`` (``int4-asym-g128+gptq``,
    ``q4_k_m+imatrix``, ``q3_k_m+gptq``), as a :class:`~lowbit.model.recipe.Recipe`."""
    return Recipe.parse(spec)


def describe(scheme: str) -> tuple[str, str]:
    """(display name, description) of a lowbit format, an activation scheme or a llama.cpp file type."""
    act = parse_act_scheme(scheme)
    if act is not None:
        return act.name, act.description
    ft = file_type(scheme)
    if ft is not None and ft.description:
        return ft.name, ft.description
    f = get_format(scheme)
    return f.name, f.description


def compare(loaded: LoadedModel, formats: list[str], text: str | None = None, text_name: str = "wiki-eval",
            n_ctx: int = 512, max_chunks: int | None = 20, progress: bool = True,
            imatrix: dict[str, np.ndarray] | None = None, imatrix_chunks: int = 32,
            calib: CalibConfig | None = None, calib_text: str | None = None, qat: QATConfig | None = None,
            on_result: Callable[[FormatResult, float], None] | None = None,
            done: dict[str, FormatResult] | None = None, done_base_ppl: float | None = None) -> Comparison:
    """Evaluate every entry of ``formats`` (lowbit formats or llama.cpp file types, with an optional
    method suffix such as ``+gptq`` and/or ``+imatrix``; see :func:`parse_spec`) against the original
    on the same chunks.  ``+imatrix`` quantizes with the importance matrix ``imatrix`` (computed from
    the calibration text when not given); methods calibrate on ``calib_text`` (default: the bundled
    calibration split, which never overlaps the evaluation text) with the settings of ``calib``
    (and QAT's training settings ``qat``).

    ``done`` holds results of entries already measured (by label, e.g. from a run that was cut short)
    that are taken as they are instead of being measured again; ``done_base_ppl`` is the original's
    perplexity they were measured against, checked against this run's before any of them is used."""
    specs = [parse_spec(f) for f in formats]  # unknown names fail before any work
    calib = calib or CalibConfig()
    qat = qat or QATConfig()
    if imatrix is None and any(s.imatrix for s in specs):
        imatrix = compute_imatrix(loaded, calibration_text(), max_chunks=imatrix_chunks, progress=progress).values()
    chunks = None
    if any(s.needs_calibration for s in specs):
        chunks = calib_chunks(loaded, calib_text if calib_text is not None else calibration_text(),
                              n_ctx=calib.seq_len, max_chunks=calib.n_samples)
    text = eval_text() if text is None else text
    ev = Evaluation(loaded, text, n_ctx=n_ctx, max_chunks=max_chunks, progress=progress)
    notes = list(loaded.notes)
    try:
        base = ev.run(torch_logits_fn(loaded.model, n_ctx), "original", as_reference=True)
        done = done or {}
        if done and (done_base_ppl is None or not np.isclose(done_base_ppl, base["ppl"], rtol=1e-9, atol=0.0)):
            raise LowbitError(f"the results to resume were measured against an original of perplexity {done_base_ppl}, "
                              f"this run's original has {base['ppl']}: not the same model, text or chunks")
        results = []
        for recipe in specs:
            label = recipe.label
            desc = describe(recipe.scheme.name)[1]
            if label in done:
                results.append(done[label])
                continue
            model = copy.deepcopy(loaded.model)
            on_gpu = any(p.is_cuda for p in model.parameters())
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with PeakMemory() as mem:
                work = recipe.with_settings(calib, qat)
                report = quantize(model, work, chunks=chunks if recipe.needs_calibration else None,
                                  imatrix=imatrix if recipe.imatrix else None, teacher=loaded.model, progress=progress)
                desc += _method_note(work, report, chunks)
            if on_gpu:
                torch.cuda.synchronize()  # kernels still queued belong to the quantization time
            tq = time.perf_counter() - t0
            peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else 0.0
            metrics = ev.run(torch_logits_fn(model, n_ctx), label)
            details: dict[str, object] = {}
            act = recipe.scheme.act
            if act is not None and act.kind == "llm-int8":
                rep = outlier_report(model)
                details["outlier_fraction"] = {k: v["mean_fraction"] for k, v in rep.items()}
                mean = sum(v["mean_fraction"] for v in rep.values()) / max(1, len(rep))
                worst = max(rep, key=lambda k: rep[k]["mean_fraction"])
                desc += (f"; FP16 outlier features per call: {100 * mean:.3f}% on average, most in {worst} "
                         f"({100 * rep[worst]['mean_fraction']:.2f}%)")
            # the quantized weights inside the transformer blocks (not embeddings, head or norms)
            lin = [t for t in report.tensors if t.quantized and ".layers." in t.name]
            lin_bpw = sum(t.bits for t in lin) / max(1, sum(torch.Size(t.shape).numel() for t in lin))
            results.append(FormatResult(label, desc + (", importance matrix" if recipe.imatrix else ""),
                                        report.bits_per_weight, lin_bpw, report.size_bytes, tq, metrics,
                                        report.counts(), mem.peak_mb, mem.delta_mb, wa_label(recipe.scheme.name, lin_bpw),
                                        details, peak_gpu))
            if on_result is not None:
                on_result(results[-1], base["ppl"])
            del model
            gc.collect()
    finally:
        ev.close()
    return Comparison(loaded.name, loaded.arch, loaded.n_params, text_name, text_digest(text), n_ctx,
                      len(ev.chunks), int(base["tokens"]), base, results, notes)


def _method_note(recipe: Recipe, report: QuantReport, chunks: torch.Tensor | None) -> str:
    """What the method did, for the row's description."""
    m, calib = recipe.method.name, recipe.calib
    if m == "qat":
        res, qcfg = report.measured["training"], report.measured["qat"]
        return (f", QAT: {len(res.losses)} steps of {qcfg.batch_size} x {calib.seq_len} calibration "  # type: ignore[attr-defined]
                f"tokens, distillation loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}")  # type: ignore[attr-defined]
    if m == "smoothquant":
        return ", " + describe_smoothing(report.details["smoothing"])  # type: ignore[arg-type]
    if recipe.method.layerwise:
        return f", {m.upper()} on {len(chunks)} x {calib.seq_len} calibration tokens"  # type: ignore[arg-type]
    return ""


def wa_label(scheme: str, linear_bpw: float) -> str:
    """Bits of weights and activations (``W8A8``; ``W4.17A16`` for a weight-only format)."""
    act = parse_act_scheme(scheme)
    if act is not None:
        return act.wa
    return f"W{linear_bpw:.3g}A16"


def default_out_dir(model_name: str) -> Path:
    return Path("runs") / Path(model_name).stem
