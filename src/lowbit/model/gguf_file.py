"""A fast, strict GGUF reader: metadata parsed in one pass, tensor data memory-mapped.

gguf-py's ``GGUFReader`` builds a numpy view for every array item of the metadata, which takes
seconds for a tokenizer of 50k tokens; this reader parses the same header with ``struct`` in a
fraction of that and checks every count, length, type and offset against the file's size before
using it, so a damaged file ends in one clear :class:`~lowbit.errors.ModelLoadError` naming the
file and the problem, never a huge allocation or a crash.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from lowbit.errors import ModelLoadError

#: per GGUF value type (gguf-py's ids), the one table the reader, the writer (lowbit.io.gguf_write)
#: and the fuzzer share: the struct format of one value, and the numpy dtype of an array's items
VALUE_ENCODING: dict[int, tuple[str, str]] = {int(t): enc for t, enc in {
    GGUFValueType.UINT8: ("<B", "<u1"), GGUFValueType.INT8: ("<b", "<i1"),
    GGUFValueType.UINT16: ("<H", "<u2"), GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"), GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.UINT64: ("<Q", "<u8"), GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT32: ("<f", "<f4"), GGUFValueType.FLOAT64: ("<d", "<f8"),
    GGUFValueType.BOOL: ("<?", "<u1"),
}.items()}  # fmt: skip
_SCALAR = {t: fmt for t, (fmt, _) in VALUE_ENCODING.items()}
_NP = {t: dt for t, (_, dt) in VALUE_ENCODING.items()}
STRING, ARRAY, BOOL = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY), int(GGUFValueType.BOOL)
MAX_DIMS = 4


#: parsed headers by (path, size): the SHA-1 and length of the header bytes, its entries and tensors
_PARSED: dict[tuple[str, int], tuple[bytes, int, dict, dict]] = {}


@dataclass(frozen=True)
class KV:
    vtype: int
    value: object
    sub_type: int | None = None  # item type of an array
    raw: bytes = b""  # the encoded type id and value, as stored


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    type: int
    offset: int  # absolute offset in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Rows first (numpy order)."""
        return tuple(reversed(self.ne))


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{self.path}: cannot read ({exc})") from None
        self._buf = memoryview(self._mm)
        self.size = len(self._mm)
        self._pos = 0
        self.kv: dict[str, KV] = {}
        self.tensors: dict[str, TensorInfo] = {}
        key = (str(self.path.resolve()), self.size)
        hit = _PARSED.get(key)
        if hit is not None and hit[1] <= self.size and hashlib.sha1(self._buf[: hit[1]]).digest() == hit[0]:
            # the same header bytes parse to the same entries (a file is often opened several times
            # in one command, and a tokenizer's strings take most of a parse)
            self.kv, self.tensors, self._pos = dict(hit[2]), dict(hit[3]), hit[1]
            return
        self._parse()
        _PARSED.pop(key, None)
        _PARSED[key] = (hashlib.sha1(self._buf[: self._pos]).digest(), self._pos, dict(self.kv), dict(self.tensors))
        while len(_PARSED) > 4:
            _PARSED.pop(next(iter(_PARSED)))

    # ---- primitive reads, every one bounds-checked ----------------------------------
    def _fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: damaged or truncated GGUF file: {what} (at byte {self._pos})")

    def _take(self, n: int, what: str) -> memoryview:
        if n < 0 or self._pos + n > self.size:
            raise self._fail(f"{what} runs past the end of the file ({self.size} bytes)")
        b = self._buf[self._pos : self._pos + n]
        self._pos += n
        return b

    def _u32(self, what: str) -> int:
        return struct.unpack("<I", self._take(4, what))[0]

    def _u64(self, what: str) -> int:
        return struct.unpack("<Q", self._take(8, what))[0]

    def _str(self, what: str) -> str:
        n = self._u64(f"length of {what}")
        if n > self.size - self._pos:
            raise self._fail(f"{what} claims {n} bytes")
        return bytes(self._take(n, what)).decode("utf-8", errors="replace")

    def _value(self, vtype: int, what: str, depth: int = 0) -> tuple[object, int | None]:
        if vtype in _SCALAR:
            fmt = _SCALAR[vtype]
            return struct.unpack(fmt, self._take(struct.calcsize(fmt), what))[0], None
        if vtype == STRING:
            return self._str(what), None
        if vtype == ARRAY:
            if depth > 2:
                raise self._fail(f"{what}: arrays nested too deep")
            sub = self._u32(f"item type of {what}")
            n = self._u64(f"length of {what}")
            if sub in _NP:
                item = np.dtype(_NP[sub]).itemsize
                if n > (self.size - self._pos) // item:
                    raise self._fail(f"{what} claims {n} items")
                arr = np.frombuffer(self._take(n * item, what), dtype=_NP[sub])
                return (arr.astype(bool) if sub == BOOL else arr).tolist(), sub
            if sub == STRING:
                if n > (self.size - self._pos) // 8:
                    raise self._fail(f"{what} claims {n} strings")
                buf, pos, size, out = self._buf, self._pos, self.size, []
                unpack = struct.unpack_from
                for _ in range(n):
                    if pos + 8 > size:
                        self._pos = pos
                        raise self._fail(f"{what} runs past the end of the file")
                    (ln,) = unpack("<Q", buf, pos)
                    pos += 8
                    if ln > size - pos:
                        self._pos = pos
                        raise self._fail(f"a string of {what} claims {ln} bytes")
                    out.append(bytes(buf[pos : pos + ln]).decode("utf-8", errors="replace"))
                    pos += ln
                self._pos = pos
                return out, sub
            if sub == ARRAY:
                if n > (self.size - self._pos) // 12:
                    raise self._fail(f"{what} claims {n} nested arrays")
                return [self._value(ARRAY, what, depth + 1)[0] for _ in range(n)], sub
            raise self._fail(f"{what}: unknown array item type {sub}")
        raise self._fail(f"{what}: unknown value type {vtype}")

    # ---- the file -------------------------------------------------------------------
    def _parse(self) -> None:

        if bytes(self._buf[:4]) != b"GGUF":
            raise ModelLoadError(f"{self.path}: not a GGUF file (magic {bytes(self._buf[:4])!r})")
        self._pos = 4
        version = self._u32("version")
        if version not in (2, 3):
            raise self._fail(f"unsupported GGUF version {version} (lowbit reads versions 2 and 3)")
        n_tensors = self._u64("tensor count")
        n_kv = self._u64("metadata count")
        if n_tensors > self.size // 24 or n_kv > self.size // 12:
            raise self._fail(f"implausible counts: {n_tensors} tensors, {n_kv} metadata entries")
        for _ in range(n_kv):
            key = self._str("a metadata key")
            start = self._pos
            vtype = self._u32(f"type of {key}")
            value, sub = self._value(vtype, key)
            if key in self.kv:
                raise self._fail(f"metadata key {key} appears twice")
            self.kv[key] = KV(vtype, value, sub, bytes(self._buf[start : self._pos]))
        infos = []
        for _ in range(n_tensors):
            name = self._str("a tensor name")
            n_dims = self._u32(f"dimension count of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self._fail(f"tensor {name} has {n_dims} dimensions")
            ne = tuple(self._u64(f"dimensions of {name}") for _ in range(n_dims))
            gtype = self._u32(f"type of {name}")
            rel = self._u64(f"offset of {name}")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
            except (ValueError, KeyError):
                raise self._fail(f"tensor {name} has unknown type id {gtype}") from None
            if any(d == 0 or d > self.size * 8 for d in ne) or ne[0] % block:
                raise self._fail(f"tensor {name} has impossible dimensions {list(ne)} for its type")
            n_el = int(np.prod(ne, dtype=object))
            infos.append((name, ne, gtype, rel, n_el // block * type_size))
        align = self.kv.get("general.alignment")
        alignment = 32
        if align is not None:
            if align.vtype != 4:  # llama.cpp reads it as a uint32 only
                raise self._fail(f"general.alignment has value type {align.vtype}, not uint32")
            alignment = int(align.value)  # type: ignore[call-overload]
        if alignment <= 0 or alignment & (alignment - 1):
            raise self._fail(f"general.alignment {alignment} is not a power of two")
        data_start = -(-self._pos // alignment) * alignment
        for name, ne, gtype, rel, n_bytes in infos:
            if name in self.tensors:
                raise self._fail(f"tensor {name} appears twice")
            if rel % alignment:
                raise self._fail(f"tensor {name} has offset {rel}, not a multiple of the alignment {alignment}")
            off = data_start + rel
            if off + n_bytes > self.size:
                raise ModelLoadError(
                    f"{self.path}: truncated: tensor {name} ends at byte {off + n_bytes} but the file has {self.size} bytes")
            self.tensors[name] = TensorInfo(name, ne, gtype, off, n_bytes)
        prev: TensorInfo | None = None
        for t in sorted(self.tensors.values(), key=lambda t: (t.offset, t.n_bytes)):
            if prev is not None and t.offset < prev.offset + prev.n_bytes:
                raise self._fail(f"the data of tensors {prev.name} and {t.name} overlap")
            prev = t

    def field(self, key: str, default: object = None) -> object:
        kv = self.kv.get(key)
        return default if kv is None else kv.value

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident memory (the mapping stays valid: a later
        read loads them from the file again).  Streaming a file tensor by tensor keeps the resident
        set at what one tensor needs rather than the whole file."""
        import mmap

        t = self.tensors[name]
        mm = getattr(self._mm, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = t.offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(self.size, t.offset + t.n_bytes)
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes, rows first: [rows..., bytes per row] (memory-mapped)."""
        t = self.tensors[name]

        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.type)]
        row_bytes = t.ne[0] // block * type_size
        return self._mm[t.offset : t.offset + t.n_bytes].reshape(*t.shape[:-1], row_bytes)

    def float32(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, rows first."""
        import gguf

        t = self.tensors[name]
        gtype = gguf.GGMLQuantizationType(t.type)
        try:
            out = gguf.quants.dequantize(self.raw(name), gtype)
        except NotImplementedError:
            raise ModelLoadError(f"{self.path}: tensor {name}: cannot dequantize type {gtype.name}") from None
        return out.astype(np.float32, copy=False)
