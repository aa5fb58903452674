"""A streaming GGUF writer: the header (metadata and every tensor's name, shape, type and offset)
first, then each tensor's bytes as soon as it is quantized, so memory holds one tensor at a time.

Metadata copied from a source GGUF keeps its bytes as read (:class:`~lowbit.model.gguf_file.KV`
``raw``); new entries are encoded here.  The layout is GGUF version 3 with 32-byte alignment,
what llama.cpp writes and reads.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from lowbit.errors import LowbitError
from lowbit.model.gguf_file import VALUE_ENCODING

ALIGNMENT = 32
_SCALAR = {t: fmt for t, (fmt, _) in VALUE_ENCODING.items()}
_NP = {t: dt for t, (_, dt) in VALUE_ENCODING.items()}
STRING, ARRAY = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY)


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def encode_value(vtype: int, value: object, sub_type: int | None = None) -> bytes:
    """The bytes of a value of GGUF type ``vtype`` (the type id itself included)."""
    head = struct.pack("<I", vtype)
    if vtype in _SCALAR:
        return head + struct.pack(_SCALAR[vtype], value)
    if vtype == STRING:
        return head + _str(str(value))
    if vtype == ARRAY:
        items = list(value)  # type: ignore[call-overload]
        if sub_type is None:
            raise ValueError("an array needs its item type")
        out = head + struct.pack("<IQ", sub_type, len(items))
        if sub_type in _NP:
            return out + np.asarray(items).astype(_NP[sub_type]).tobytes()
        if sub_type == STRING:
            return out + b"".join(_str(str(s)) for s in items)
        raise ValueError(f"arrays of type {sub_type} are not written")
    raise ValueError(f"unknown GGUF value type {vtype}")


class GGUFStreamWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._kv: list[tuple[str, bytes]] = []
        self._keys: set[str] = set()
        self._tensors: list[tuple[str, tuple[int, ...], int, int]] = []  # name, ne, type, n_bytes
        self._fh: BinaryIO | None = None
        self._next = 0

    # ---- header -------------------------------------------------------------------------
    def add_raw(self, key: str, raw: bytes) -> None:
        """A metadata entry from its encoded bytes (type id and value), e.g. copied from a source file."""
        if key in self._keys:
            raise LowbitError(f"{self.path}: metadata key {key} written twice")
        self._keys.add(key)
        self._kv.append((key, bytes(raw)))

    def add(self, key: str, vtype: int, value: object, sub_type: int | None = None) -> None:
        self.add_raw(key, encode_value(vtype, value, sub_type))

    def add_tensor_info(self, name: str, shape: tuple[int, ...], gtype: int) -> None:
        """Declare a tensor (shape rows first, as numpy) before :meth:`begin`."""

        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
        ne = tuple(int(d) for d in reversed(shape))
        if ne[0] % block:
            raise LowbitError(f"{name}: rows of {ne[0]} do not fit blocks of {block}")
        n_bytes = int(np.prod(ne, dtype=np.int64)) // block * type_size
        self._tensors.append((name, ne, int(gtype), n_bytes))

    def header_bytes(self) -> bytes:
        """The header as :meth:`begin` writes it (magic, metadata, tensor infos, padding)."""
        parts = [b"GGUF", struct.pack("<IQQ", 3, len(self._tensors), len(self._kv))]
        parts += [_str(k) + raw for k, raw in self._kv]
        offset = 0
        for name, ne, gtype, n_bytes in self._tensors:
            parts.append(_str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
                         + struct.pack("<IQ", gtype, offset))
            offset += -(-n_bytes // ALIGNMENT) * ALIGNMENT
        head = b"".join(parts)
        return head + b"\0" * (-len(head) % ALIGNMENT)

    @property
    def n_tensors(self) -> int:
        return len(self._tensors)

    def end_of(self, k: int) -> int:
        """The file length once the first ``k`` declared tensors are written."""
        data = sum(-(-n_bytes // ALIGNMENT) * ALIGNMENT for _, _, _, n_bytes in self._tensors[:k])
        return len(self.header_bytes()) + data

    def begin(self, resume_after: int = 0) -> None:
        """Write the header; then :meth:`write_tensor` each declared tensor in order.  With
        ``resume_after`` = k > 0 the file already holds this header and the first k tensors: it is
        truncated to their end (dropping a tensor written only in part) and writing goes on from
        tensor k."""
        if resume_after:
            end = self.end_of(resume_after)
            fh = open(self.path, "r+b")
            if fh.seek(0, 2) < end:
                fh.close()
                raise LowbitError(f"{self.path}: shorter than the {resume_after} tensors it should hold")
            fh.truncate(end)
            fh.seek(end)
            self._fh = fh
            self._next = resume_after
            return
        self._fh = open(self.path, "wb")
        self._fh.write(self.header_bytes())

    def sync(self) -> int:
        """Flush what is written to the disk (fsync); returns the file length."""
        if self._fh is None:
            raise RuntimeError("begin() first")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return self._fh.tell()

    def write_tensor(self, name: str, data: np.ndarray) -> None:
        self.write_tensor_parts(name, [data])

    def write_tensor_parts(self, name: str, parts: Iterable[np.ndarray]) -> None:
        """Write the next declared tensor from consecutive pieces of its bytes (row chunks quantized
        one after another), each written as it comes; their total must be the declared size."""
        if self._fh is None:
            raise RuntimeError("begin() first")
        if self._next >= len(self._tensors):
            raise LowbitError(f"{self.path}: tensor {name} was not declared")
        want, _, _, n_bytes = self._tensors[self._next]
        if name != want:
            raise LowbitError(f"{self.path}: tensor {name} written where {want} was declared")
        written = 0
        for data in parts:
            buf = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
            written += buf.size
            if written > n_bytes:
                break
            self._fh.write(memoryview(buf))
        if written != n_bytes:
            raise LowbitError(f"{self.path}: tensor {name} has {'more than ' if written > n_bytes else ''}{written} bytes, "
                              f"{n_bytes} were declared")
        self._fh.write(b"\0" * (-n_bytes % ALIGNMENT))
        self._next += 1

    def close(self) -> None:
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        complete = self._next == len(self._tensors)
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        if not complete:
            raise LowbitError(f"{self.path}: closed after {self._next} of {len(self._tensors)} tensors")

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
