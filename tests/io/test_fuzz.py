"""Hostile input: mutated GGUF and safetensors files, and pickles, against every lowbit reader of
untrusted files.  Each case must either open with consistent contents or end in a LowbitError:
any other exception, a hang or a huge allocation fails (lowbit.testing.fuzz.guarded).  The malformed
corpus is generated here from small valid seed files; bench/fuzz.py runs many more inputs."""

from __future__ import annotations

import json
import os
import pickle
import re
from itertools import count
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError, ModelLoadError
from lowbit.model.gguf_file import GGUFFile
from lowbit.model.load import check_bin, check_gguf_file, load_model
from lowbit.model.safetensors_check import ITEMSIZE, check_safetensors
from lowbit.testing import fuzz

MAX_BYTES = 32 << 20  # the seeds are about 1 KB
TIMEOUT_S = 10.0
FUZZ = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TINY_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16,
              "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "vocab_size": 32, "max_position_embeddings": 64, "tie_word_embeddings": True}


class Seeds:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.gguf = fuzz.seed_gguf(work / "seed.gguf")
        self.fields = fuzz.gguf_fields(self.gguf)
        self.st = fuzz.seed_safetensors(work / "seed.safetensors")
        self.st_header, self.st_body = fuzz.split_safetensors(self.st)
        self._n = count()

    def field(self, kind: str, label: str | None = None) -> fuzz.Field:
        return next(f for f in self.fields if f.kind == kind and (label is None or f.label == label))

    def write(self, data: bytes, name: str) -> Path:
        """``data`` at ``work/name``, a fresh inode each time (maps of earlier inputs stay valid)."""
        path = self.work / name
        tmp = self.work / f".{next(self._n)}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    return Seeds(tmp_path_factory.mktemp("fuzz"))


# ---- the properties -----------------------------------------------------------------------------
def open_gguf(path: Path) -> GGUFFile | None:
    """GGUFFile on ``path`` and every tensor read back (the small ones dequantized), or None after a
    LowbitError; anything else propagates and fails the test."""
    try:
        with fuzz.guarded(MAX_BYTES, TIMEOUT_S):
            gf = GGUFFile(path)
            spans = []
            for name, t in gf.tensors.items():
                raw = gf.raw(name)
                assert raw.nbytes == t.n_bytes and raw.shape[:-1] == t.shape[:-1]
                assert 0 < t.offset and t.offset + t.n_bytes <= gf.size
                spans.append((t.offset, t.offset + t.n_bytes))
                if int(np.prod(t.ne)) <= 1 << 16:
                    x = gf.float32(name)
                    assert x.shape == t.shape and x.dtype == np.float32
            spans.sort()
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
            check_gguf_file(path)  # load_model's gate agrees
            return gf
    except LowbitError as exc:
        assert str(path) in str(exc)  # the error names the file
        return None


def open_safetensors(path: Path) -> dict | None:
    """check_safetensors on ``path``; a file it passes must load in the safetensors library with
    the shapes and dtypes it reported."""
    from safetensors import safe_open

    try:
        with fuzz.guarded(MAX_BYTES, TIMEOUT_S):
            entries = check_safetensors(path)
    except LowbitError as exc:
        assert str(path) in str(exc)
        return None
    with safe_open(str(path), framework="pt") as f:  # as lowbit reads them (numpy has no bfloat16)
        assert set(f.keys()) == set(entries)
        for name, e in entries.items():
            x = f.get_tensor(name)
            assert tuple(x.shape) == e.shape and x.element_size() == ITEMSIZE[e.dtype]
    return entries


def test_seeds_are_valid(seeds: Seeds) -> None:
    gf = open_gguf(seeds.write(seeds.gguf, "a.gguf"))
    assert gf is not None and [(n, t.shape, t.type) for n, t in gf.tensors.items()] == list(fuzz.GGUF_TENSORS)
    assert gf.field("fuzz.nested") == [[1, 2], [3]] and gf.field("tokenizer.ggml.tokens")[3] == "déf"
    entries = open_safetensors(seeds.write(seeds.st, "a.safetensors"))
    assert entries is not None and len(entries) == 4


# ---- GGUF ---------------------------------------------------------------------------------------
def test_gguf_truncated_at_every_byte(seeds: Seeds) -> None:
    data_end = max(t.offset + t.n_bytes for t in GGUFFile(seeds.write(seeds.gguf, "a.gguf")).tensors.values())
    for n in range(len(seeds.gguf)):
        gf = open_gguf(seeds.write(seeds.gguf[:n], "cut.gguf"))
        assert (gf is None) == (n < data_end), n  # only the last tensor's alignment padding may go


edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8)


@FUZZ
@given(data=st.data())
def test_gguf_random_bytes(seeds: Seeds, data: st.DataObject) -> None:
    header_end = max(f.offset + f.width for f in seeds.fields)
    where = data.draw(st.sampled_from([header_end, len(seeds.gguf)]))  # mostly the header
    e = data.draw(edits)
    mutant = fuzz.overwrite(seeds.gguf, [(p % where, v) for p, v in e])
    open_gguf(seeds.write(mutant, "bytes.gguf"))


def field_values(f: fuzz.Field, size: int) -> st.SearchStrategy[int]:
    return st.sampled_from(fuzz.interesting(f.width, size)) | st.integers(0, (1 << (8 * f.width)) - 1)


@FUZZ
@given(data=st.data())
def test_gguf_header_fields(seeds: Seeds, data: st.DataObject) -> None:
    """Counts, string lengths, value and array types, array lengths, dimension counts, dimensions,
    tensor type ids and offsets, general.alignment: one to three set to hostile values."""
    nums = [f for f in seeds.fields if f.kind != "name"]
    mutant = seeds.gguf
    for _ in range(data.draw(st.integers(1, 3))):
        f = data.draw(st.sampled_from(nums))
        mutant = fuzz.set_field(mutant, f, data.draw(field_values(f, len(seeds.gguf))))
    if data.draw(st.booleans()):
        mutant = mutant[: data.draw(st.integers(0, len(mutant)))]
    open_gguf(seeds.write(mutant, "fields.gguf"))


@FUZZ
@given(data=st.data())
def test_gguf_tensor_infos(seeds: Seeds, data: st.DataObject) -> None:
    """The tensor table only: dimension counts 0..2^32, huge dimensions, type ids, offsets past the
    end or misaligned, duplicate names."""
    kinds = ("ndims", "dim", "ttype", "toffset", "name")
    f = data.draw(st.sampled_from([f for f in seeds.fields if f.kind in kinds]))
    if f.kind == "name":
        other = data.draw(st.sampled_from([g for g in seeds.fields if g.kind == "name" and g != f]))
        mutant = fuzz.copy_name(seeds.gguf, other, f)
    else:
        if f.kind == "ndims":
            v = data.draw(st.integers(0, 1 << 32))
        elif f.kind == "ttype":  # every ggml type id, also those of the same size as the original
            v = data.draw(st.integers(0, 47) | field_values(f, len(seeds.gguf)))
        else:
            v = data.draw(field_values(f, len(seeds.gguf)))
        mutant = fuzz.set_field(seeds.gguf, f, v)
    gf = open_gguf(seeds.write(mutant, "tinfo.gguf"))
    if f.kind == "name":
        assert gf is None  # a duplicate name is always refused


def _refused(seeds: Seeds, mutant: bytes, pattern: str) -> None:
    path = seeds.write(mutant, "t.gguf")
    with pytest.raises(ModelLoadError, match=pattern):
        with fuzz.guarded(MAX_BYTES, TIMEOUT_S):
            GGUFFile(path)


def test_gguf_targeted_refusals(seeds: Seeds) -> None:
    g, f = seeds.gguf, seeds.field
    _refused(seeds, fuzz.set_field(g, f("n_tensors"), 1 << 62), "implausible counts")
    _refused(seeds, fuzz.set_field(g, f("n_kv"), (1 << 64) - 1), "implausible counts")
    _refused(seeds, fuzz.set_field(g, f("version"), 4), "unsupported GGUF version 4")
    _refused(seeds, fuzz.set_field(g, f("arrlen", "tokenizer.ggml.tokens"), 1 << 40), "claims 1099511627776 strings")
    _refused(seeds, fuzz.set_field(g, f("arrlen", "tokenizer.ggml.scores"), 1 << 60), "claims .* items")
    _refused(seeds, fuzz.set_field(g, f("strlen", "general.name"), 1 << 63), "claims 9223372036854775808 bytes")
    _refused(seeds, fuzz.set_field(g, f("vtype", "general.name"), 13), "unknown value type 13")
    _refused(seeds, fuzz.set_field(g, f("arrtype", "tokenizer.ggml.scores"), 99), "unknown array item type 99")
    _refused(seeds, fuzz.set_field(g, f("ndims", "t.f32"), 0), "t.f32 has 0 dimensions")
    _refused(seeds, fuzz.set_field(g, f("ndims", "t.f32"), (1 << 32) - 1), "t.f32 has 4294967295 dimensions")
    _refused(seeds, fuzz.set_field(g, f("dim", "t.f16"), 1 << 40), "impossible dimensions")
    _refused(seeds, fuzz.set_field(g, f("dim", "t.q80"), 33), "impossible dimensions")  # not whole Q8_0 blocks
    _refused(seeds, fuzz.set_field(g, f("ttype", "t.f32"), 1000), "unknown type id 1000")
    _refused(seeds, fuzz.set_field(g, f("ttype", "t.f32"), 4), "unknown type id 4")  # a removed type
    # the same bytes as I32 (a type gguf-py cannot dequantize): opens, and says so when dequantized
    gf = GGUFFile(seeds.write(fuzz.set_field(g, f("ttype", "t.f32"), 26), "i32.gguf"))
    assert gf.raw("t.f32").shape == (3, 32)
    with pytest.raises(ModelLoadError, match="t.f32: cannot dequantize type I32"):
        gf.float32("t.f32")
    _refused(seeds, fuzz.set_field(g, f("toffset", "t.q4k"), 1 << 63), "truncated: tensor t.q4k ends at byte")
    _refused(seeds, fuzz.set_field(g, f("toffset", "t.q4k"), 8), "not a multiple of the alignment 32")
    _refused(seeds, fuzz.set_field(g, f("toffset", "t.q4k"), 0), "t.f32 and t.q4k overlap")
    _refused(seeds, fuzz.set_field(g, f("scalar", "general.alignment"), 48), "48 is not a power of two")
    _refused(seeds, fuzz.set_field(g, f("scalar", "general.alignment"), 0), "0 is not a power of two")
    _refused(seeds, fuzz.set_field(g, f("vtype", "general.alignment"), 5), "not uint32")
    _refused(seeds, fuzz.copy_name(g, f("name", "t.f32"), f("name", "t.q4k")), "tensor t.f32 appears twice")
    _refused(seeds, g[: len(g) - 17], "truncated: tensor t.q4k ends at byte")  # 16 bytes of padding
    _refused(seeds, b"GGUF", "runs past the end")
    _refused(seeds, b"", "cannot read")
    _refused(seeds, b"PK\x03\x04" + g[4:], "not a GGUF file")


def test_load_model_refuses_damaged_gguf_before_transformers(seeds: Seeds, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def never(*a: object, **k: object) -> None:
        raise AssertionError("transformers was given a damaged file")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", never)
    bad = fuzz.set_field(seeds.gguf, seeds.field("dim", "t.f16"), 1 << 40)
    with pytest.raises(ModelLoadError, match="bad.gguf: damaged or truncated GGUF file"):
        load_model(seeds.write(bad, "bad.gguf"), progress=False)
    arch = seeds.field("strlen", "general.architecture")
    no_str = fuzz.set_field(seeds.gguf, fuzz.Field(arch.offset - 4, 4, "vtype", ""), 4)  # a uint32 instead
    no_str = no_str[: arch.offset] + no_str[arch.offset + 4:]  # ... of 4 bytes, so the rest still parses
    with pytest.raises(ModelLoadError, match="(no general.architecture string|damaged)"):
        load_model(seeds.write(no_str, "arch.gguf"), progress=False)


# ---- safetensors --------------------------------------------------------------------------------
def test_safetensors_truncated_at_every_byte(seeds: Seeds) -> None:
    for n in range(len(seeds.st)):
        assert open_safetensors(seeds.write(seeds.st[:n], "cut.safetensors")) is None, n


@FUZZ
@given(e=edits, in_header=st.booleans())
def test_safetensors_random_bytes(seeds: Seeds, e: list[tuple[int, int]], in_header: bool) -> None:
    where = 8 + int.from_bytes(seeds.st[:8], "little") if in_header else len(seeds.st)
    open_safetensors(seeds.write(fuzz.overwrite(seeds.st, [(p % where, v) for p, v in e]), "bytes.safetensors"))


@FUZZ
@given(data=st.data())
def test_safetensors_header_edits(seeds: Seeds, data: st.DataObject) -> None:
    """dtype, shape, data_offsets (reversed, off by one, past the end, another tensor's: overlap),
    entries removed, added or replaced, __metadata__, non-JSON headers, the stored header length."""
    header, body = seeds.st_header, seeds.st_body
    h = json.loads(json.dumps(header))
    names = [k for k in h if k != "__metadata__"]
    for _ in range(data.draw(st.integers(1, 2))):
        name = data.draw(st.sampled_from([k for k in names if isinstance(h[k], dict)]))
        e = h[name]
        what = data.draw(st.sampled_from(["dtype", "shape", "offsets", "overlap", "entry", "metadata"]))
        if what == "dtype":
            e["dtype"] = data.draw(st.sampled_from(fuzz.ST_BAD_DTYPES) | st.text(max_size=8))
        elif what == "shape":
            e["shape"] = data.draw(st.sampled_from(fuzz.ST_BAD_SHAPES)
                                   | st.lists(st.integers(-2, 1 << 64), max_size=5))
        elif what == "offsets":
            b, end = header[name]["data_offsets"]
            e["data_offsets"] = data.draw(st.sampled_from(fuzz.st_bad_offsets(b, end, len(body)))
                                          | st.lists(st.integers(-1, 1 << 65), max_size=3))
        elif what == "overlap":
            e["data_offsets"] = list(header[data.draw(st.sampled_from(names))]["data_offsets"])
        elif what == "entry":
            h[name] = data.draw(st.sampled_from([[], "x", 3, None, {}, {"dtype": "F32"}]))
        else:
            h["__metadata__"] = data.draw(st.sampled_from([{"a": 1}, [], "x", None, {"a": "b"}]))
    raw = json.dumps(h).encode()
    if data.draw(st.booleans()):
        raw = data.draw(st.sampled_from([raw[: len(raw) // 2], b"[1, 2]", b"null", b"\xff{}", b'{"a": 1, "a": 2}',
                                         b"[" * 100_000 + b"]" * 100_000, b"{" + raw]))
    length = data.draw(st.none() | st.sampled_from(fuzz.interesting(8, len(seeds.st))))
    open_safetensors(seeds.write(fuzz.join_safetensors(raw, body, length), "hdr.safetensors"))


@pytest.mark.parametrize("dtype", sorted(ITEMSIZE))
def test_safetensors_every_known_dtype_opens(seeds: Seeds, dtype: str) -> None:
    n = ITEMSIZE[dtype]
    header = {"a": {"dtype": dtype, "shape": [3, 2], "data_offsets": [0, 6 * n]}, "__metadata__": {"k": "v"}}
    entries = open_safetensors(seeds.write(fuzz.join_safetensors(header, bytes(6 * n)), f"{dtype}.safetensors"))
    assert entries is not None and entries["a"].shape == (3, 2)


def test_safetensors_targeted_refusals(seeds: Seeds) -> None:
    h, body = seeds.st_header, seeds.st_body

    def refused(header: dict | bytes, pattern: str, tail: bytes = b"", length: int | None = None) -> None:
        path = seeds.write(fuzz.join_safetensors(header, body + tail, length), "t.safetensors")
        with pytest.raises(ModelLoadError, match=f"t.safetensors: .*{pattern}"):
            check_safetensors(path)

    def edit(name: str, **kv: object) -> dict:
        out = json.loads(json.dumps(h))
        out[name].update(kv)
        return out

    b, e = h["w.f32"]["data_offsets"]
    refused(h, "header length 18446744073709551615", length=(1 << 64) - 1)
    refused(h, "header is not valid JSON", length=len(json.dumps(h)) - 1)
    refused(b"[1]", "not a JSON object")
    refused(b'{"w": 1, "w": 2}', "appears twice")
    refused(edit("w.f32", dtype="F4"), "unknown dtype 'F4'")
    refused(edit("w.f32", shape=[3, -5]), "invalid shape")
    refused(edit("w.f32", shape=[5, 4]), "needs 80 bytes, its data_offsets span 60")
    refused(edit("w.f32", data_offsets=[e, b]), "begin after end")
    refused(edit("w.f32", data_offsets=[b, 1 << 70]), "truncated: tensor 'w.f32' ends at data byte")
    refused(edit("w.u8", data_offsets=h["w.i64"]["data_offsets"], shape=[24]), "overlaps")
    refused(h, "cover 107 of the 108 data bytes", tail=b"\0")
    refused({**h, "__metadata__": {"a": 1}}, "__metadata__ is not an object of strings")


def _tiny_dir(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return path


def test_load_model_and_checkpoint_refuse_damaged_safetensors(seeds: Seeds, tmp_path: Path) -> None:
    from lowbit.model.checkpoint import MANIFEST, load_checkpoint

    d = _tiny_dir(tmp_path / "hf")
    bad = seeds.st[:8] + b"[" + seeds.st[9:]
    (d / "model.safetensors").write_bytes(bad)
    with pytest.raises(ModelLoadError, match="hf/model.safetensors: invalid safetensors file"):
        load_model(d, progress=False)
    (d / MANIFEST).write_text(json.dumps({"lowbit_checkpoint": 1, "modules": {}}))
    with pytest.raises(ModelLoadError, match="hf/model.safetensors: invalid safetensors file"):
        load_checkpoint(d)
    (d / MANIFEST).write_text(json.dumps({"lowbit_checkpoint": 1, "modules": []}))
    with pytest.raises(ModelLoadError, match="not a lowbit manifest"):
        load_checkpoint(d)


# ---- pickles ------------------------------------------------------------------------------------
class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]  # unpickling this would create the marker file
        return (Path.touch, (Path(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_malicious_pickle_bin_is_refused_unexecuted(tmp_path: Path, how: str) -> None:
    d = _tiny_dir(tmp_path / "evil")
    marker = tmp_path / "pwned"
    state = {"model.embed_tokens.weight": _Exploit(marker)}
    if how == "pickle":
        with open(d / "pytorch_model.bin", "wb") as fh:
            pickle.dump(state, fh)
    else:
        torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin: refused: not a weights-only PyTorch checkpoint"):
        load_model(d, progress=False)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_weights_only_bin_passes_the_check(tmp_path: Path) -> None:
    d = _tiny_dir(tmp_path / "ok")
    torch.save({"w": torch.ones(3)}, d / "pytorch_model.bin")
    check_bin(d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(ModelLoadError, match="refused"):
        check_bin(d)


def test_no_unsafe_unpickling_in_src() -> None:
    src = Path(__file__).parents[2] / "src" / "lowbit"
    for f in sorted(src.rglob("*.py")):
        text = f.read_text()
        assert not re.search(r"\bpickle\.loads?\(|\bUnpickler\(|allow_pickle\s*=\s*True|\bdill\b|\bjoblib\.load", text), f
        for call in re.finditer(r"torch\.load\(", text):
            args = text[call.end(): text.find("\n\n", call.end())]
            assert "weights_only=True" in args.split(")")[0] + args[:200], f"{f}: torch.load without weights_only=True"
