"""llama.cpp's file types (Q4_K_M, Q3_K_M, IQ4_XS, ...): lowbit picks the same type for every tensor
as llama.cpp's own quantizer (llama_model_quantize through llama-cpp-python) and writes the same
bytes, from the same original, with and without an importance matrix."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lowbit.io.gguf_out import write_gguf
from lowbit.model.gguf_mix import FILE_TYPES, ModelInfo, file_type, plan


@pytest.fixture(scope="module")
def outdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mixes")


@pytest.fixture(scope="module")
def smol_imatrix(smol):
    """A real importance matrix of SmolLM2, computed by lowbit on 4 chunks of calibration text."""
    from lowbit.eval.data import calibration_text
    from lowbit.model.imatrix import compute_imatrix

    return compute_imatrix(smol, calibration_text(), n_ctx=512, max_chunks=4, progress=False).values()


def llama_quantize(src: Path, dst: Path, ftype_name: str, imatrix: dict[str, np.ndarray] | None = None) -> None:
    """llama.cpp's quantizer, as llama-quantize calls it (requantizing the bundled Q4_1 file)."""
    from lowbit.eval.llamacpp import llama_quantize as quantize

    quantize(src, dst, ftype_name, imatrix, threads=2)


def assert_same_tensors(ours: Path, ref: Path) -> Counter:
    import gguf

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys()
    wrong_type = [n for n in tb if ta[n].tensor_type != tb[n].tensor_type]
    assert not wrong_type, [(n, ta[n].tensor_type.name, tb[n].tensor_type.name) for n in wrong_type[:5]]
    wrong_bytes = [n for n in tb if not np.array_equal(ta[n].data, tb[n].data)]
    assert not wrong_bytes, wrong_bytes[:5]
    assert int(a.fields["general.file_type"].contents()) == int(b.fields["general.file_type"].contents())
    return Counter(t.tensor_type.name for t in b.tensors)


@pytest.mark.parametrize("ft", ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k", "q4_k"])
def test_mix_matches_llama_quantize(ft, smol_path, outdir):
    ours, ref = outdir / f"lowbit-{ft}.gguf", outdir / f"llama-{ft}.gguf"
    report = write_gguf(smol_path, ours, ft, progress=False)
    llama_quantize(smol_path, ref, ft)
    types = assert_same_tensors(ours, ref)
    assert report.total_bits == 8 * sum(t.n_bytes for t in __import__("gguf").GGUFReader(ours).tensors)
    # SmolLM2's 576-column rows do not fit 256-weight super-blocks: only ffn_down (1536 columns)
    # keeps a K-quant, everything else falls back, as llama.cpp does
    assert sum(n for k, n in types.items() if k.endswith("_K")) == 30
    assert types["F32"] == 61  # the norms
    if not FILE_TYPES[ft].pure:  # the tied embedding / output (576 columns) gets Q8_0 in every mix
        assert types["Q8_0"] >= 1


# the 1-3-bit i-quant mixes here are one per family of rules (IQ1_M: attn_output IQ2_XXS; IQ2_M:
# IQ3_S for attn_v/attn_output/first ffn_down; IQ3_XS: IQ3_XXS attn_q/k and middle ffn_gate/up), at 1-2
# minutes each; the per-tensor types of every mix are checked against llama-quantize --dry-run below,
# and the bytes of every type in tests/formats/test_iquants_grid.py
@pytest.mark.parametrize("ft", ["q4_k_m", "q3_k_m", "q2_k_s", "q4_0", "iq4_xs", "iq1_m", "iq2_m", "iq3_xs"])
def test_mix_with_imatrix_matches_llama_quantize(ft, smol_path, smol_imatrix, outdir):
    ours, ref = outdir / f"lowbit-im-{ft}.gguf", outdir / f"llama-im-{ft}.gguf"
    write_gguf(smol_path, ours, ft, progress=False, imatrix=smol_imatrix)
    llama_quantize(smol_path, ref, ft, smol_imatrix)
    types = assert_same_tensors(ours, ref)
    if ft == "q4_0":  # with an imatrix the first n/8 ffn_down tensors get Q4_1, as in llama.cpp
        assert types["Q4_1"] == 30 // 8


def test_imatrix_changes_the_bytes(smol_path, smol_imatrix, outdir):
    """An importance matrix must matter: the same file type with and without one differs."""
    import gguf

    a, b = outdir / "plain-q3_k_m.gguf", outdir / "im-q3_k_m.gguf"
    write_gguf(smol_path, a, "q3_k_m", progress=False)
    write_gguf(smol_path, b, "q3_k_m", progress=False, imatrix=smol_imatrix)
    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    changed = [n for n in ta if ta[n].tensor_type == tb[n].tensor_type and not np.array_equal(ta[n].data, tb[n].data)]
    assert len(changed) > 150


def _dims(n_layer: int, cols: int = 4096, ffn: int = 11008) -> list[tuple[str, tuple[int, int]]]:
    out = [("token_embd.weight", (32000, cols)), ("output.weight", (32000, cols)), ("output_norm.weight", (cols,))]
    for i in range(n_layer):
        for t, s in [("attn_q", (cols, cols)), ("attn_k", (cols // 4, cols)), ("attn_v", (cols // 4, cols)),
                     ("attn_output", (cols, cols)), ("ffn_gate", (ffn, cols)), ("ffn_up", (ffn, cols)),
                     ("ffn_down", (cols, ffn)), ("attn_norm", (cols,)), ("ffn_norm", (cols,))]:
            out.append((f"blk.{i}.{t}.weight", s))
    return out


def test_mix_rules_on_a_7b_shape():
    """On a Llama-7B-shaped model (every row a multiple of 256) the mixes follow llama.cpp's published
    rules: Q4_K_M gives Q6_K to attn_v and ffn_down in the first and last eighth and every third
    layer between, and to the output; Q3_K_M gives attn_v Q5_K in the first two layers."""
    info = ModelInfo("llama", 32, 32, 8)
    t = plan(_dims(32), file_type("q4_k_m"), info)
    more = [i for i in range(32) if t[f"blk.{i}.attn_v.weight"] == "q6_k"]
    assert more == [i for i in range(32) if i < 4 or i >= 28 or (i - 4) % 3 == 2]
    assert [i for i in range(32) if t[f"blk.{i}.ffn_down.weight"] == "q6_k"] == more
    assert t["output.weight"] == "q6_k" and t["token_embd.weight"] == "q4_k" and t["blk.0.attn_norm.weight"] is None
    assert {t[f"blk.{i}.attn_q.weight"] for i in range(32)} == {"q4_k"}
    t3 = plan(_dims(32), file_type("q3_k_m"), info)
    assert [t3[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["q5_k", "q5_k", "q4_k", "q4_k"]
    assert [t3[f"blk.{i}.ffn_down.weight"] for i in (0, 1, 2, 31)] == ["q5_k", "q5_k", "q4_k", "q4_k"]
    assert t3["blk.5.attn_output.weight"] == "q4_k" and t3["blk.5.ffn_up.weight"] == "q3_k"


def test_q2_k_s_without_imatrix_is_refused(smol_path, tmp_path):
    from lowbit.errors import FormatError

    with pytest.raises(FormatError, match="needs an importance matrix"):
        write_gguf(smol_path, tmp_path / "x.gguf", "q2_k_s", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_in_memory_mix_holds_what_the_file_holds(smol, smol_path, smol_imatrix, outdir):
    """What `lowbit compare` evaluates for q4_k_m+imatrix (quantize_model in memory) is exactly what
    the GGUF file stores: the same type for every tensor and the same dequantized values (attn_q and
    attn_k rows are stored in llama.cpp's interleaved rotary order, so compare after reordering)."""
    import copy

    import gguf

    from lowbit.io.gguf_out import dequantize_raw
    from lowbit.io.hf_gguf import interleave_rotary_rows
    from lowbit.model.gguf_mix import gguf_name
    from lowbit.model.quantize import quantize_model

    path = outdir / "mem-q4_k_m.gguf"
    write_gguf(smol_path, path, "q4_k_m", progress=False, imatrix=smol_imatrix)
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    model = copy.deepcopy(smol.model)
    report = quantize_model(model, "q4_k_m", progress=False, imatrix=smol_imatrix)
    cfg = model.config
    state = model.state_dict()
    for rec in report.tensors:
        g = gguf_name(rec.name)
        t = stored[g]
        assert rec.format == (t.tensor_type.name.lower() if rec.quantized else rec.format), rec.name
        if not rec.quantized:
            continue
        mod = rec.name.rsplit(".", 1)[0]
        w = dict(model.named_modules())[mod].dequantized_weight() if mod != "model.embed_tokens" else state[rec.name]
        w = w.detach().float().numpy()
        if g.endswith("attn_q.weight"):
            w = interleave_rotary_rows(w, cfg.num_attention_heads)
        elif g.endswith("attn_k.weight"):
            w = interleave_rotary_rows(w, cfg.num_key_value_heads)
        ref = dequantize_raw(int(t.tensor_type), np.asarray(t.data))
        assert np.array_equal(w, ref.reshape(w.shape)), rec.name


def test_fast_dequantize_equals_gguf_py(smol_path):
    """The source tensors are read with lowbit's own dequantizers: equal to gguf-py's."""
    import gguf

    from lowbit.io.gguf_out import dequantize_raw

    r = gguf.GGUFReader(smol_path)
    for t in r.tensors[:40]:
        ours = dequantize_raw(int(t.tensor_type), np.asarray(t.data))
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(ours.reshape(ref.shape), ref), t.name


# ---- per-tensor types against llama-quantize --dry-run, on every model at hand -------------
IQ_MIXES = ["iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m"]


def _dry_run_types(src: Path, ft_name: str, imatrix_file: Path | None) -> dict[str, str] | None:
    """llama-quantize --dry-run's type for every tensor of ``src`` under ``ft_name`` (the file type's
    id, --pure for the pure ones; an importance matrix only sets what the rules see), or None where
    it fails."""
    import re
    import subprocess

    import llama_cpp

    ft = FILE_TYPES[ft_name]
    exe = Path(llama_cpp.__file__).parent / "lib" / "llama-quantize"
    args = [str(exe), "--dry-run", "--allow-requantize", *(["--pure"] if ft.pure else []),
            *(["--imatrix", str(imatrix_file)] if imatrix_file else []), str(src), str(ft.ftype)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return None
    types = {}
    for m in re.finditer(r"\] (\S+)\s+- \[[^]]*\], type =\s*(\S+), size =[^\n(]*(?:\((\S+)\))?", out.stdout + out.stderr):
        types[m.group(1)] = (m.group(3) or m.group(2)).lower()
    return types


@functools.cache
def _model_facts(src: Path) -> tuple[ModelInfo, dict[str, tuple[int, ...]], dict[str, str]]:
    """(what llama.cpp's rules read, each tensor's shape, each tensor's stored type) of a GGUF file."""
    import gguf

    from lowbit.model.gguf_mix import info_from_gguf

    r = gguf.GGUFReader(src)
    fields = {k: f.contents() for k, f in r.fields.items() if k.count(".") >= 1 and not k.startswith("tokenizer")}
    info = info_from_gguf(fields, str(r.fields["general.architecture"].contents()))
    shapes = {t.name: tuple(int(s) for s in reversed(t.shape)) for t in r.tensors}
    return info, shapes, {t.name: t.tensor_type.name.lower() for t in r.tensors}


def _our_types(src: Path, ft_name: str, has_imatrix: bool) -> dict[str, str]:
    from lowbit.formats import get_format

    info, shapes, kept = _model_facts(src)
    types = plan(list(shapes.items()), file_type(ft_name), info, has_imatrix=has_imatrix)
    names = {}
    for name, t in types.items():
        if t is None:
            names[name] = kept[name]
        else:
            from gguf import GGMLQuantizationType

            names[name] = GGMLQuantizationType(get_format(t).gguf_type).name.lower()
    return names


def _llama_refuses(types: dict[str, str], ft: str) -> bool:
    """Whether llama-quantize refuses to make these types without an importance matrix
    (llama-quant.cpp's tensor_requires_imatrix: the embedding and output excepted)."""
    need = {"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs"} | ({"q2_k"} if ft.startswith("q2_k_s") else set())
    return any(t in need for n, t in types.items() if n not in ("token_embd.weight", "output.weight"))


@pytest.fixture(scope="module")
def models_at_hand(smol_path) -> list[Path]:
    """SmolLM2 (bundled), and the optional models of scripts/get_models.sh where installed: Qwen2.5-
    Coder-1.5B is the one whose every row fits 256-weight super-blocks."""
    from lowbit.errors import LowbitError
    from lowbit.model.load import resolve_model_path

    paths = [smol_path]
    for name in ("qwen2.5-coder-1.5b", "gemma3-270m"):
        try:
            paths.append(Path(resolve_model_path(name)))
        except LowbitError:
            pass
    return paths


@pytest.fixture(scope="module")
def flat_imatrix_files(models_at_hand, tmp_path_factory) -> dict[Path, Path]:
    """An importance-matrix file per model (flat values: the dry run reads only that there is one)."""
    import gguf

    from lowbit.io.imatrix import write_imatrix
    from lowbit.model.imatrix_collect import Imatrix, ImatrixEntry

    out = {}
    d = tmp_path_factory.mktemp("imatrix")
    for src in models_at_hand:
        r = gguf.GGUFReader(src)
        entries = {t.name: ImatrixEntry(np.ones((1, int(t.shape[0])), np.float32), np.ones(1, np.float32))
                   for t in r.tensors if len(t.shape) >= 2 and t.name.endswith(".weight")}
        out[src] = d / f"{src.stem}.imatrix.gguf"
        write_imatrix(Imatrix(entries, ["flat"], 1, 512), out[src])
    return out


#: file types llama-quantize does not have (NVFP4 on every tensor: tests/formats/test_gguf_llamacpp.py
#: has llama.cpp run lowbit's file instead)
LOWBIT_ONLY = {"nvfp4"}


@pytest.mark.parametrize("ft", [f for f in FILE_TYPES if FILE_TYPES[f].quantized and f != "f16" and f not in LOWBIT_ONLY])
def test_every_file_type_plans_what_llama_quantize_plans(ft, models_at_hand, flat_imatrix_files):
    """Every file type's type per tensor equals llama-quantize --dry-run's (same binary, same rules),
    with and without an importance matrix, on SmolLM2, and on Qwen2.5-Coder-1.5B and Gemma-3-270M
    where scripts/get_models.sh installed them.  lowbit refuses where llama.cpp would refuse to
    quantize (a 1-3-bit i-quant without an importance matrix, which the dry run does not check), and
    where llama.cpp fails (Q1_0 on rows its blocks do not fit)."""
    from lowbit.errors import FormatError

    for src in models_at_hand:
        for im in (None, flat_imatrix_files[src]):
            theirs = _dry_run_types(src, ft, im)
            try:
                ours = _our_types(src, ft, im is not None)
            except FormatError as exc:
                assert theirs is None or (im is None and "importance matrix" in str(exc) and _llama_refuses(theirs, ft)), \
                    (src.name, exc)
                continue
            assert theirs is not None, (src.name, "llama-quantize refused what lowbit plans")
            assert ours.keys() == theirs.keys()
            wrong = {n: (ours[n], theirs[n]) for n in ours if ours[n] != theirs[n]}
            assert not wrong, (src.name, im is not None, list(wrong.items())[:6])
