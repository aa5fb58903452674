"""The comparison plot: formats coloured by family, the Pareto front, and labels that overlap nothing."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from lowbit.eval.report import FAMILIES, family_of, pareto_front, place_labels  # noqa: E402


def test_families_of_the_labels_compare_writes():
    want = {
        "q4_0": "llama.cpp legacy", "q8_0": "llama.cpp legacy", "tq2_0": "llama.cpp legacy", "q1_0-pure": "llama.cpp legacy",
        "q4_k_m": "llama.cpp K", "q6_k": "llama.cpp K", "q2_k_s+imatrix": "llama.cpp K",
        "iq4_xs": "llama.cpp IQ", "iq4_nl-pure": "llama.cpp IQ",
        "int4-g128": "integer", "int8-ch": "integer",
        "nf4": "float / codebook", "fp8-e4m3": "float / codebook", "nvfp4": "float / codebook", "e8p": "float / codebook",
        "int4-asym-g128+gptq": "calibrated", "q4_k_m+awq": "calibrated", "spqr3-g16": "calibrated",
        "w8a8": "activations", "mix@4.5": "searched", "no-such-format": "other",
    }  # fmt: skip
    got = {label: family_of(label) for label in want}
    assert got == want
    assert set(got.values()) <= set(FAMILIES)


def test_pareto_front_keeps_what_nothing_smaller_beats():
    pts = [(4.5, 0.1), (4.5, 0.05), (5.0, 0.2), (6.0, 0.01), (3.0, 1.0), (8.0, 0.01), (8.5, 0.001)]
    assert pareto_front(pts) == [4, 1, 3, 6]
    assert pareto_front([]) == []


def _text_boxes(fig, anns):
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    out = []
    for a in anns:
        a.update_positions(r)
        out.append(Text.get_window_extent(a, r))
    return out


def test_labels_of_a_crowded_cluster_do_not_overlap():
    rng = np.random.default_rng(0)
    xs = list(4.4 + 0.5 * rng.random(14)) + [8.5, 16.0]
    ys = list(np.exp(rng.normal(-2, 0.6, 14))) + [1e-3, 1e-6]
    texts = [f"int4-asym-g{32 * (i + 1)}-clip" if i % 3 == 0 else f"q{i}_k_m" for i in range(len(xs))]
    fig, ax = plt.subplots(figsize=(12, 6))
    ax.scatter(xs, ys)
    ax.set_yscale("log")
    ax.margins(x=0.08, y=0.12)
    fig.tight_layout()
    anns = place_labels(ax, xs, ys, texts)
    boxes = _text_boxes(fig, anns)
    assert [a.get_text() for a in anns] and sorted(a.get_text() for a in anns) == sorted(texts)
    bad = [(anns[i].get_text(), anns[j].get_text()) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
           if boxes[i].overlaps(boxes[j])]
    assert bad == []
    frame = ax.get_window_extent(fig.canvas.get_renderer())
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    # a point with room around it keeps its label beside it, with no leader line
    lone = next(a for a in anns if a.get_text() == texts[-1])
    assert lone.arrow_patch is None
    plt.close(fig)
