"""Every GGUF block type in the format registry writes the bytes libggml writes.

The types are read from the registry (``gguf_types()``: each registered format with a GGML type and
blocks), so a new GGUF type is compared with ``ggml_quantize_chunk`` here without anyone editing a
list: on random weights of random scale with what trips block quantizers (an all-zero block, a
constant run, an outlier), without and with an importance matrix (without one only where llama.cpp
allows it).  tests/formats/test_kquants.py and test_gguf_llamacpp.py add real tensors, more shapes
and whole files for the types they name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.formats import get_format
from lowbit.model.gguf_mix import gguf_types
from lowbit.testing.synthetic import importance_like

TYPES = gguf_types()
SHAPES = [(3, 512), (8, 1536)]


def weights(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.001, 0.3)).astype(np.float32)
    flat = w.reshape(-1)
    flat[:256] = 0.0  # a whole super-block of zeros (any block size up to 256)
    flat[256:288] = 0.0625  # a constant run
    flat[300] = 25.0 * float(np.abs(flat).max()) + 0.1  # an outlier
    flat[320:352] = np.abs(flat[320:352])  # a run with no negative values
    return w


importance = importance_like


def test_the_registry_has_the_gguf_types_lowbit_writes():
    assert {"q4_0", "q8_0", "q2_k", "q4_k", "q6_k", "iq4_xs"} <= set(TYPES)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bytes_equal_libggml(name, shape, ggml):
    fmt = get_format(name)
    assert fmt.gguf_type is not None
    for seed in range(2):
        w = weights(shape, seed + 7 * shape[0])
        cases = [importance(shape[1], seed)] if fmt.requires_imatrix else [None, importance(shape[1], seed)]
        for im in cases:
            qt = fmt.quantize(torch.from_numpy(w), imatrix=None if im is None else torch.from_numpy(im))
            ours = qt.parts["blocks"].numpy().reshape(shape[0], -1)
            ref = ggml.quantize(int(fmt.gguf_type), w, im)
            assert ours.shape == ref.shape and np.array_equal(ours, ref), (name, shape, seed, im is not None)
