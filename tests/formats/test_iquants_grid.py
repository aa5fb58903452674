"""llama.cpp's 1-3-bit i-quants (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S): the bytes
ggml_quantize_chunk writes, on real SmolLM2 tensors and on random weights that trip the searches
(blocks at the types' zero thresholds, ties, one weight alone, all one sign), without and with an
importance matrix where ggml allows each; the grids' neighbour lists are those iq2xs_init_impl /
iq3xs_init_impl build, made once per process.  tests/formats/test_ggml_registry.py compares two
more shapes for every GGUF type, and test_conformance.py the decoding with libggml's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.errors import FormatError
from lowbit.formats import get_format
from lowbit.formats.lattice_ggml import lattice
from lowbit.testing.synthetic import importance_like

BPW = {"iq1_s": 1.5625, "iq1_m": 1.75, "iq2_xxs": 2.0625, "iq2_xs": 2.3125, "iq2_s": 2.5625, "iq3_xxs": 3.0625,
       "iq3_s": 3.4375}
TYPES = list(BPW)


def cases(fmt, cols: int, seed: int) -> list[np.ndarray | None]:
    """The importance matrices to test with: none (where ggml quantizes without one) and one."""
    im = importance_like(cols, seed)
    return [im] if fmt.requires_imatrix else [None, im]


def awkward(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Random rows of several scales, and blocks at what each search treats specially."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.002, 0.2, (shape[0], 1))).astype(np.float32)
    f = w.reshape(-1)
    f[0:16] = 3e-9  # below IQ2_S's and IQ3_XXS's 1e-8 and IQ1_M's 1e-7, above ggml's 1e-15
    f[16:32] = 2e-15
    f[32:64] = 0.0
    f[64:96] = np.float32(0.03125)  # ties everywhere: IQ1's sort, the neighbour search
    f[96:128] = -np.abs(f[96:128])  # one sign only
    f[128:160] = 0.0
    f[150] = 0.5  # one weight alone in its block
    f[160:168] = [1, -1, 1, -1, 1, -1, 1, 1]  # an odd number of minus signs in a run of 8
    f[256:512] = np.round(f[256:512] * 64) / 64  # many equal values in one super-block
    return w


def test_bits_per_weight():
    for name, bpw in BPW.items():
        assert get_format(name).bits_per_weight((8, 1024)) == bpw


@pytest.mark.parametrize("name", TYPES)
def test_random_weights_match_libggml(name, ggml):
    fmt = get_format(name)
    for shape, seed in (((4, 1024), 1), ((2, 3072), 2)):
        w = awkward(shape, seed)
        for im in cases(fmt, shape[1], seed):
            qt = fmt.quantize(torch.from_numpy(w), imatrix=None if im is None else torch.from_numpy(im))
            ref = ggml.quantize(int(fmt.gguf_type), w, im)
            assert np.array_equal(qt.parts["blocks"].numpy().reshape(ref.shape), ref), (shape, im is not None)
            assert np.array_equal(fmt.dequantize(qt).numpy().reshape(-1), ggml.dequantize(int(fmt.gguf_type), ref, w.size))


@pytest.mark.parametrize("name", TYPES)
def test_real_weights_match_libggml(name, smol_weights, ggml):
    """SmolLM2's ffn_down (rows of 1536, whole super-blocks) and a 512-column slice of attn_q."""
    fmt = get_format(name)
    for tname, w in (("blk.7.ffn_down.weight", smol_weights["blk.7.ffn_down.weight"]),
                     ("blk.0.attn_q.weight[:, :512]", smol_weights["blk.0.attn_q.weight"][:, :512].contiguous())):
        for im in cases(fmt, w.shape[1], 7):
            qt = fmt.quantize(w, imatrix=None if im is None else torch.from_numpy(im))
            ref = ggml.quantize(int(fmt.gguf_type), w.numpy(), im)
            assert np.array_equal(qt.parts["blocks"].numpy().reshape(ref.shape), ref), (tname, im is not None)


@pytest.mark.parametrize("name", ["iq1_s", "iq2_xxs", "iq2_xs"])
def test_types_ggml_asserts_an_imatrix_for_are_refused_without_one(name):
    with pytest.raises(FormatError, match="needs an importance matrix"):
        get_format(name).quantize(torch.randn(2, 256))


def test_error_falls_with_bits():
    """On Gaussian weights with an importance matrix, within each family more bits lose less, every
    2-bit type loses more than every 3-bit one, and IQ3_S beats Q3_K at the same 3.44 bits.  (IQ1_M
    beats IQ2_XXS here, as libggml's own bytes do: these grids are made for real weights.)"""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 2048, generator=g) * 0.02
    im = torch.from_numpy(importance_like(2048, 3))

    def err(name: str) -> float:
        d = get_format(name).dequantize(get_format(name).quantize(w, imatrix=im))
        return float((((d - w) ** 2).sum(0) * im).sum() / ((w**2).sum(0) * im).sum())

    e = {n: err(n) for n in [*TYPES, "q3_k"]}
    assert e["iq1_s"] > e["iq1_m"] and e["iq2_xxs"] > e["iq2_xs"] > e["iq2_s"] and e["iq3_xxs"] > e["iq3_s"], e
    assert min(e["iq2_xxs"], e["iq2_xs"], e["iq2_s"]) > max(e["iq3_xxs"], e["iq3_s"]), e
    assert e["iq3_s"] < e["q3_k"] and max(e.values()) < 0.2, e


@pytest.mark.parametrize("qtype,bits,nwant,top", [("iq2_xxs", 2, 2, 2), ("iq2_s", 2, 1, 2), ("iq1_s", 2, 3, 2),
                                                 ("iq3_s", 3, 3, 7)])
def test_neighbour_lists_are_the_nearest_grid_points(qtype, bits, nwant, top):
    """For sampled off-grid points: the list holds exactly the grid points whose squared distance is
    among the ``nwant`` smallest, in (distance, index) order; and the table is built once."""
    lat = lattice(qtype, bits, nwant, top)
    assert lattice(qtype, bits, nwant, top) is lat
    pos = lat.pos.numpy().astype(np.int64)
    off = np.nonzero(lat.row.numpy() >= 0)[0]
    rng = np.random.default_rng(0)
    for u in rng.choice(off, 50, replace=False):
        levels = (u >> (bits * np.arange(lat.dim))) & ((1 << bits) - 1)
        d2 = ((pos - (2 * levels + 1)) ** 2).sum(axis=1)
        keep = np.nonzero(d2 <= np.unique(d2)[nwant - 1])[0]
        want = keep[np.lexsort((keep, d2[keep]))]
        p = int(lat.row[u])
        got = lat.flat[int(lat.start[p]) : int(lat.start[p]) + int(lat.count[p])].numpy()
        assert np.array_equal(got, want), u
    # every point the quantizers can round to is on the grid or has a list
    u_all = np.arange(len(lat.kmap))
    lv = (u_all[:, None] >> (bits * np.arange(lat.dim))) & ((1 << bits) - 1)
    reachable = (lv <= top).all(axis=1) & ((u_all >> (bits * lat.dim)) == 0)
    assert ((lat.kmap.numpy() >= 0) | (lat.row.numpy() >= 0))[reachable].all()
