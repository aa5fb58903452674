"""Hostile-input testing of lowbit's file readers: small valid seed files, a map of every numeric
field of a GGUF header, mutations of both formats, and a guard that turns a hang or a huge
allocation into an error (used by ``tests/test_fuzz.py`` and ``bench/fuzz.py``).

A mutated file must either open with consistent contents or end in a
:class:`~lowbit.errors.LowbitError`; any other exception, a hang, or an allocation far beyond the
file's size is a bug of the reader.
"""

from __future__ import annotations

import json
import random
import signal
import struct
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType as T
from gguf.constants import GGUFValueType as V

from lowbit.io.gguf_write import ARRAY, STRING, GGUFStreamWriter, encode_value
from lowbit.model.gguf_file import VALUE_ENCODING

# ---- seeds ----------------------------------------------------------------------------------------
#: tensors of the seed GGUF: name (all of one length, so that one can overwrite another), rows-first
#: shape, ggml type (F32, F16, Q8_0, Q4_K)
GGUF_TENSORS = (("t.f32", (3, 8), int(T.F32)), ("t.f16", (2, 32), int(T.F16)), ("t.q80", (2, 64), int(T.Q8_0)),
                ("t.q4k", (1, 256), int(T.Q4_K)))


def seed_gguf(path: Path) -> bytes:
    """Write a small valid GGUF file (metadata of every kind, four tensor types) and return its bytes."""
    rng = np.random.default_rng(0)
    w = GGUFStreamWriter(path)
    w.add("general.architecture", V.STRING, "llama")
    w.add("general.alignment", V.UINT32, 32)
    w.add("general.name", V.STRING, "fuzz seed")
    w.add("llama.block_count", V.UINT32, 1)
    w.add("llama.rope.freq_base", V.FLOAT32, 10000.0)
    w.add("tokenizer.ggml.add_bos_token", V.BOOL, True)
    w.add("tokenizer.ggml.tokens", V.ARRAY, ["<s>", "a", "bc", "déf"], sub_type=V.STRING)
    w.add("tokenizer.ggml.scores", V.ARRAY, [0.0, -1.0, -2.0, -3.0], sub_type=V.FLOAT32)
    inner = [encode_value(V.ARRAY, [1, 2], V.UINT32)[4:], encode_value(V.ARRAY, [3], V.UINT32)[4:]]
    w.add_raw("fuzz.nested", struct.pack("<IIQ", V.ARRAY, V.ARRAY, len(inner)) + b"".join(inner))
    data = {}
    for name, shape, gtype in GGUF_TENSORS:
        w.add_tensor_info(name, shape, gtype)
        x = rng.standard_normal(shape).astype(np.float32)
        if gtype == T.F32:
            data[name] = x
        elif gtype == T.F16:
            data[name] = x.astype(np.float16)
        elif gtype == T.Q8_0:
            data[name] = gguf.quants.quantize(x, T.Q8_0)
        else:  # Q4_K: d and dmin of 0.01, random scales and codes
            blk = rng.integers(0, 256, size=(shape[0], 144), dtype=np.uint8)
            blk[:, 0:4] = np.frombuffer(np.array([0.01, 0.01], dtype=np.float16).tobytes(), dtype=np.uint8)
            data[name] = blk
    w.begin()
    for name, _, _ in GGUF_TENSORS:
        w.write_tensor(name, data[name])
    w.close()
    return path.read_bytes()


def seed_safetensors(path: Path) -> bytes:
    """Write a small valid safetensors file (four dtypes, metadata) and return its bytes."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file({"w.f32": rng.standard_normal((3, 5)).astype(np.float32),
               "w.f16": rng.standard_normal((4, 2)).astype(np.float16),
               "w.i64": np.arange(3, dtype=np.int64),
               "w.u8": np.arange(7, dtype=np.uint8)}, str(path), metadata={"format": "np"})
    return path.read_bytes()


# ---- GGUF header map -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    offset: int
    width: int  # bytes: 4 or 8 (little-endian unsigned), or the length of a name
    kind: str  # version, n_tensors, n_kv, strlen, vtype, arrtype, arrlen, scalar, ndims, dim, ttype, toffset, name
    label: str


def gguf_fields(data: bytes) -> list[Field]:
    """Every count, length, type id, dimension and offset of a valid GGUF header, with its position."""
    out: list[Field] = []
    pos = 4

    def u(width: int, kind: str, label: str) -> int:
        nonlocal pos
        out.append(Field(pos, width, kind, label))
        v = int.from_bytes(data[pos:pos + width], "little")
        pos += width
        return v

    def string(label: str) -> str:
        nonlocal pos
        n = u(8, "strlen", label)
        s = data[pos:pos + n].decode()
        pos += n
        return s

    def value(vtype: int, label: str) -> None:
        nonlocal pos
        if vtype == STRING:
            string(label)
        elif vtype == ARRAY:
            sub = u(4, "arrtype", label)
            n = u(8, "arrlen", label)
            for i in range(n):
                value(sub, f"{label}[{i}]")
        else:
            width = struct.calcsize(VALUE_ENCODING[vtype][0])
            out.append(Field(pos, width, "scalar", label))
            pos += width

    u(4, "version", "version")
    n_t = u(8, "n_tensors", "tensor count")
    n_kv = u(8, "n_kv", "metadata count")
    for _ in range(n_kv):
        key = string("key")
        value(u(4, "vtype", key), key)
    for _ in range(n_t):
        start = pos + 8
        name = string("tensor name")
        out.append(Field(start, len(name.encode()), "name", name))
        for _ in range(u(4, "ndims", name)):
            u(8, "dim", name)
        u(4, "ttype", name)
        u(8, "toffset", name)
    return out


def interesting(width: int, size: int) -> list[int]:
    """Values that break readers: 0, 1, small type ids, powers of two around 2^31 / 2^32 / 2^63,
    the largest values, and the file's size and its neighbours."""
    top = (1 << (8 * width)) - 1
    vals = [0, 1, 2, 3, 4, 5, 7, 13, 31, 33, 39, 40, 64, 255, 256, size - 1, size, size + 1, size * 8,
            (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, top - 1, top]
    return sorted({v & top for v in vals})


def set_field(data: bytes, f: Field, value: int) -> bytes:
    b = bytearray(data)
    if f.kind == "name":
        raise ValueError("names are overwritten with copy_name")
    b[f.offset:f.offset + f.width] = (value & ((1 << (8 * f.width)) - 1)).to_bytes(f.width, "little")
    return bytes(b)


def copy_name(data: bytes, src: Field, dst: Field) -> bytes:
    """Give tensor ``dst`` the name of ``src`` (same length): a duplicate name."""
    b = bytearray(data)
    b[dst.offset:dst.offset + dst.width] = data[src.offset:src.offset + src.width][:dst.width].ljust(dst.width, b"x")
    return bytes(b)


def overwrite(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    """``data`` with byte ``pos % len`` set to ``val`` for each (pos, val)."""
    b = bytearray(data)
    for p, v in edits:
        if b:
            b[p % len(b)] = v & 0xFF
    return bytes(b)


# ---- safetensors ------------------------------------------------------------------------------------
def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: dict | bytes, body: bytes, length: int | None = None) -> bytes:
    """A safetensors file from a header (a dict, or raw bytes for non-JSON) and a data section;
    ``length`` overrides the stored header length."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    return (n & (2**64 - 1)).to_bytes(8, "little") + raw + body


ST_BAD_DTYPES: list[object] = ["F32", "F16", "I64", "U8", "BOOL", "F64", "BF16", "F4", "Q4", "", 4, None, ["F32"]]
ST_BAD_SHAPES: list[object] = [[], [0], [1], [3, 5], [5, 3], [15], [-1], [2**63], [2**64 + 1], [1.5], [True], ["3"],
                               "3", None, [1] * 40, [2**32, 2**32], [0, 2**62]]


def st_bad_offsets(begin: int, end: int, body: int) -> list[object]:
    return [[end, begin], [begin, end + 1], [begin - 1, end], [begin + 1, end], [0, body], [0, body + 1],
            [begin, 2**64], [-1, end], [begin], [begin, end, end], None, "0,1", [1.0, 2.0], [0, 0], [body, body]]


def mutate_safetensors_header(header: dict, body: int, rng: random.Random) -> dict | bytes:
    """One targeted edit of a safetensors header (a new dict, or bytes that are not a valid header)."""
    h = json.loads(json.dumps(header))
    names = [k for k in h if k != "__metadata__"]
    name = rng.choice(names)
    e = h[name]
    op = rng.randrange(9)
    if op == 0:
        e["dtype"] = rng.choice(ST_BAD_DTYPES)
    elif op == 1:
        e["shape"] = rng.choice(ST_BAD_SHAPES)
    elif op == 2:
        e["data_offsets"] = rng.choice(st_bad_offsets(*e["data_offsets"], body))
    elif op == 3:  # overlap: another tensor's offsets
        e["data_offsets"] = list(h[rng.choice(names)]["data_offsets"])
    elif op == 4:
        del h[name]
    elif op == 5:
        h[name + "x"] = dict(e)
    elif op == 6:
        h["__metadata__"] = rng.choice([{"a": 1}, [], "x", None, {"a": "b"}])
    elif op == 7:
        h[name] = rng.choice([[], "x", 3, None, {}, {"dtype": "F32"}])
    else:
        raw = json.dumps(h).encode()
        return rng.choice([raw[: rng.randrange(len(raw))], b"[" * 100_000 + b"]" * 100_000, b"[1, 2]", b"\xff\xfe{}",
                           b'{"a": 1, "a": 2}', b"{" + raw, b"null", raw.replace(b"{", b"{ ", 1)])
    return h


# ---- random mutations (the benchmark; the tests use hypothesis strategies of the same edits) ---------
def _cut_or_overwrite(seed: bytes, op: int, rng: random.Random) -> tuple[str, bytes]:
    """The mutations every format shares: a truncation (op 0) or random byte overwrites (op 1)."""
    if op == 0:
        return "truncate", seed[: rng.randrange(len(seed))]
    edits = [(rng.randrange(len(seed)), rng.randrange(256)) for _ in range(rng.randint(1, 8))]
    return "bytes", overwrite(seed, edits)


def random_gguf(seed: bytes, fields: list[Field], rng: random.Random) -> tuple[str, bytes]:
    """A mutated GGUF file and the name of the mutation."""
    op = rng.randrange(5)
    if op < 2:
        return _cut_or_overwrite(seed, op, rng)
    header_end = max(f.offset + f.width for f in fields)
    if op == 2:
        edits = [(rng.randrange(header_end), rng.randrange(256)) for _ in range(rng.randint(1, 4))]
        return "header-bytes", overwrite(seed, edits)
    nums = [f for f in fields if f.kind != "name"]
    if op == 3:
        data = seed
        for _ in range(rng.randint(1, 2)):
            f = rng.choice(nums)
            v = rng.choice(interesting(f.width, len(seed))) if rng.random() < 0.8 else rng.getrandbits(8 * f.width)
            if f.kind == "ttype" and rng.random() < 0.5:
                v = rng.randrange(48)  # every ggml type id, also those of the same size as the original
            data = set_field(data, f, v)
        return "field", data
    names = [f for f in fields if f.kind == "name"]
    a, b = rng.sample(names, 2)
    return "duplicate-name", copy_name(seed, a, b)


def random_safetensors(seed: bytes, rng: random.Random) -> tuple[str, bytes]:
    op = rng.randrange(5)
    if op < 2:
        return _cut_or_overwrite(seed, op, rng)
    header, body = split_safetensors(seed)
    n = int.from_bytes(seed[:8], "little")
    if op == 2:
        v = rng.choice(interesting(8, len(seed)) + [n - 1, n + 1, n + 8, 100_000_001])
        return "header-length", v.to_bytes(8, "little") + seed[8:]
    h = mutate_safetensors_header(header, len(body), rng)
    keep_length = op == 3 and rng.random() < 0.3
    return "header", join_safetensors(h, body, n if keep_length else None)


# ---- the guard -------------------------------------------------------------------------------------
class Hang(Exception):
    """A reader ran past its time limit."""


class HugeAllocation(Exception):
    """A reader allocated far more memory than the file could justify."""


@contextmanager
def guarded(max_bytes: int, timeout_s: float) -> Iterator[None]:
    """Raise :class:`Hang` after ``timeout_s`` seconds and :class:`HugeAllocation` when the traced
    peak allocation (Python objects and numpy arrays) exceeds ``max_bytes``; main thread only."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"still running after {timeout_s} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        peak = tracemalloc.get_traced_memory()[1] - base
        if started:
            tracemalloc.stop()
        if peak > max_bytes:
            raise HugeAllocation(f"peak allocation {peak} bytes (limit {max_bytes})")
