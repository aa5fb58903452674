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


#: the families a plot colours formats by, in legend order
FAMILIES = ("llama.cpp legacy", "llama.cpp K", "llama.cpp IQ", "integer", "float / codebook", "activations",
            "calibrated", "searched", "other")


def family_of(label: str) -> str:
    """The family of a comparison row's format label (``q4_k_m+imatrix``, ``int4-g128+gptq``, ``w8a8``...)."""
    from lowbit.model.recipe import Recipe

    if label.startswith(("mix", "searched")) or "@" in label:
        return "searched"
    try:
        r = Recipe.parse(label)
    except LowbitError:
        return "other"
    if r.method.name != "rtn":
        return "calibrated"
    if r.scheme.act is not None:
        return "activations"
    name = r.scheme.file_type.default if r.scheme.file_type is not None else r.scheme.name
    if name.startswith("iq"):
        return "llama.cpp IQ"
    if name.endswith("_k"):
        return "llama.cpp K"
    if name.startswith("int"):
        return "integer"
    if name.startswith("spqr"):
        return "calibrated"
    if name[:1] in ("q", "t") and name[1:2].isdigit() or name.startswith("tq"):
        return "llama.cpp legacy"
    return "float / codebook"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none with at most their bits has less loss
    (sorted by bits)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best = float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


#: where a label may sit, in points from its marker (right first, then around it, then further out)
_OFFSETS = [(5, 3), (5, -10), (-5, 3), (-5, -10), (0, 8), (0, -15)] + [
    (round(r * dx), round(r * dy) - (8 if dy < 0 else 0))
    for r in (14, 24, 36, 50, 66, 84) for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))]


def place_labels(ax, xs: list[float], ys: list[float], texts: list[str], fontsize: float = 7) -> list:  # type: ignore[no-untyped-def]
    """Annotate each point with its text where it overlaps no other label and no marker, trying the
    offsets of ``_OFFSETS`` in turn (a leader line joins a label set further out to its point); where
    none is free, the least crowded one.  Returns the annotations."""
    from matplotlib.text import Text

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    centres = ax.transData.transform(list(zip(xs, ys, strict=True))) if xs else []
    pad = 3.0 * fig.dpi / 72  # a marker's half width, in pixels
    gap = 1.0 * fig.dpi / 72  # labels keep this far apart
    markers = [(cx - pad, cy - pad, cx + pad, cy + pad) for cx, cy in centres]
    placed: list[tuple[float, float, float, float]] = []

    def overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    out = []
    for k in sorted(range(len(xs)), key=lambda i: (xs[i], ys[i])):
        best = None
        for dx, dy in _OFFSETS:
            far = abs(dx) > 6 or dy > 4 or dy < -11
            ann = ax.annotate(texts[k], (xs[k], ys[k]), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                              ha="left" if dx >= 0 else "right",
                              arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5} if far else None)
            ann.update_positions(renderer)
            e = Text.get_window_extent(ann, renderer)  # the text alone, not its leader line
            box = (e.x0 - gap, e.y0 - gap, e.x1 + gap, e.y1 + gap)
            cost = sum(overlap(box, b) for b in placed) + sum(overlap(box, m) for j, m in enumerate(markers) if j != k)
            if box[0] < frame.x0 or box[2] > frame.x1 or box[1] < frame.y0 or box[3] > frame.y1:
                cost += (box[2] - box[0]) * (box[3] - box[1])  # outside the axes: as bad as covering a label
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        assert best is not None
        placed.append(best[2])
        out.append(best[1])
    return out


def plot(cmp: Comparison, path: Path, owned: bool = False) -> None:
    """Two panels against whole-model bits per weight: mean KLD and perplexity (both log scale, the
    original's perplexity drawn as a line).  Formats are coloured by family, the Pareto front (the
    least loss at each size) is drawn, and labels are set where they overlap nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = cmp.rows()
    fams = [family_of(str(r["format"])) for r in rows]
    colours = {f: plt.get_cmap("tab10")(i) for i, f in enumerate(FAMILIES)}
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for ax, key, label in ((axes[0], "kld_mean", "mean KL divergence vs original"),
                           (axes[1], "ppl", "perplexity (original: dotted line)")):
        xs = [float(r["bpw"]) for r in rows]  # type: ignore[arg-type]
        ys = [max(float(r[key]), 1e-7) for r in rows]  # type: ignore[arg-type]
        for fam in FAMILIES:
            idx = [i for i, f in enumerate(fams) if f == fam]
            if idx:
                ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], s=30, zorder=3, color=colours[fam], label=fam)
        front = pareto_front(list(zip(xs, ys, strict=True)))
        if len(front) > 1:
            ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="0.35", linestyle="--",
                    linewidth=1, zorder=2, label="Pareto front")
        ax.set_yscale("log")
        if key == "ppl":
            ax.axhline(cmp.base["ppl"], color="grey", linestyle=":", linewidth=1)
            if ys and max(ys) / min(ys) < 20:  # a narrow range: plain numbers, not powers of ten
                plain = FuncFormatter(lambda v, _: f"{v:g}")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("bits per weight (whole model)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.08, y=0.12)
    axes[0].legend(fontsize=8, loc="upper right", framealpha=0.85)
    fig.suptitle(f"{cmp.model}: loss against size ({cmp.tokens} tokens of {cmp.text})", fontsize=10)
    fig.tight_layout()
    for ax, key in ((axes[0], "kld_mean"), (axes[1], "ppl")):  # once the layout is final
        place_labels(ax, [float(r["bpw"]) for r in rows], [max(float(r[key]), 1e-7) for r in rows],  # type: ignore[arg-type]
                     [str(r["format"]) for r in rows])
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
