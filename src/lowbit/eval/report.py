"""Tables, JSON and plots of comparison results."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.eval.compare import Comparison, FormatResult
from lowbit.io.outputs import MD_MARKER, PNG_SOFTWARE, REPORT, temp_beside, writing_file

COLUMNS = [
    ("format", "format", "{}"),
    ("wa", "W/A", "{}"),
    ("bpw", "bits/weight", "{:.3f}"),
    ("linear_bpw", "linear bpw", "{:.3f}"),
    ("size_mb", "size MB", "{:.1f}"),
    ("ppl", "PPL", "{:.3f}"),
    ("dppl_pct", "ΔPPL %", "{:+.2f}"),
    ("kld_mean", "KLD", "{:.5f}"),
    ("kld_p99", "KLD p99", "{:.4f}"),
    ("same_top_pct", "same top %", "{:.2f}"),
]
TIMES = [("quant_s", "quantize s", "{:.1f}"), ("eval_s", "eval s", "{:.1f}")]


def markdown_table(cmp: Comparison, times: bool = False) -> str:
    cols = COLUMNS + (TIMES if times else [])
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|"
    lines = [head, sep]
    base = {"format": "original (f32)", "wa": "W32A32", "bpw": 32.0, "linear_bpw": 32.0, "size_mb": cmp.n_params * 4 / 1e6,
            "ppl": cmp.base["ppl"], "dppl_pct": 0.0, "kld_mean": 0.0, "kld_p99": 0.0, "same_top_pct": 100.0,
            "quant_s": 0.0, "eval_s": cmp.base["eval_seconds"]}
    for row in [base, *cmp.rows()]:
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in cols) + " |")
    return "\n".join(lines)


def summary(cmp: Comparison) -> str:
    return (
        f"{cmp.model} ({cmp.arch}, {cmp.n_params / 1e6:.1f}M parameters) on {cmp.text} "
        f"(sha256 {cmp.text_sha}): {cmp.chunks} chunks of {cmp.n_ctx} tokens, {cmp.tokens} scored tokens, "
        f"second half of each chunk scored (llama-perplexity's method). Original PPL "
        f"{cmp.base['ppl']:.3f} ± {cmp.base['ppl_err']:.3f}."
    )


@contextmanager
def _report_file(path: Path, owned: bool) -> Iterator[Path]:
    """A temporary file to write a report into, renamed to ``path`` at the end.  It replaces an earlier
    report of lowbit's (every run rewrites its reports) but never a file lowbit did not write
    (:mod:`lowbit.io.outputs`); ``owned``: the caller owns ``path`` (the project's benchmark results)."""
    if not owned:
        with writing_file(path, REPORT, replace_own=True) as tmp:
            yield tmp
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(path: Path, data: bytes | str, owned: bool = False) -> None:
    """Write a report file atomically (see :func:`_report_file`)."""
    with _report_file(Path(path), owned) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_report_json(path: Path, doc: dict[str, object], owned: bool = False) -> None:
    """A JSON report, marked as lowbit's (a top-level ``lowbit_output`` key)."""
    write_report(path, json.dumps({"lowbit_output": REPORT, **doc}, indent=2) + "\n", owned)


def write_markdown(path: Path, text: str, owned: bool = False) -> None:
    """A Markdown report, marked as lowbit's by its first line (a comment Markdown does not show)."""
    write_report(path, f"{MD_MARKER}\n{text}", owned)


def write_json(cmp: Comparison, path: Path, extra: dict[str, object] | None = None, owned: bool = False) -> None:
    doc = {"summary": summary(cmp), "rows": cmp.rows(), "comparison": asdict(cmp)}
    if extra:
        doc.update(extra)
    write_report_json(path, doc, owned)


def plot(cmp: Comparison, path: Path, owned: bool = False) -> None:
    """Two panels against whole-model bits per weight: mean KLD and perplexity (both log scale, the
    original's perplexity drawn as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = cmp.rows()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label, log in ((axes[0], "kld_mean", "mean KL divergence vs original", True),
                                (axes[1], "ppl", "perplexity (original: dashed line)", True)):
        xs = [r["bpw"] for r in rows]
        ys = [max(float(r[key]), 1e-7) if log else float(r[key]) for r in rows]
        ax.scatter(xs, ys, s=28, zorder=3)
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(str(r["format"]), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        if log:
            ax.set_yscale("log")
        if key == "ppl":
            ax.axhline(cmp.base["ppl"], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("bits per weight (whole model)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{cmp.model}: loss against size ({cmp.tokens} tokens of {cmp.text})", fontsize=10)
    fig.tight_layout()
    save_png(fig, path, owned)


def save_png(fig, path: Path, owned: bool = False) -> None:  # type: ignore[no-untyped-def]
    """Save a matplotlib figure as a PNG report (marked as lowbit's by its Software text chunk) and close it."""
    import matplotlib.pyplot as plt

    try:
        with _report_file(Path(path), owned) as tmp:
            fig.savefig(tmp, dpi=120, format="png", metadata={"Software": PNG_SOFTWARE})
    finally:
        plt.close(fig)


def read_json(path: Path) -> Comparison:
    """A Comparison back from a file written by :func:`write_json` (to re-plot or re-tabulate it)."""
    try:
        doc = json.loads(Path(path).read_text())
        c = dict(doc["comparison"])
        c["results"] = [FormatResult(**r) for r in c["results"]]
        return Comparison(**c)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LowbitError(f"{path}: not a lowbit comparison JSON file ({e})") from e
