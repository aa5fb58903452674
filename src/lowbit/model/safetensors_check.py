"""A strict validator for safetensors files, run before any other library reads one.

The layout is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON (an object mapping
each tensor's name to ``{"dtype", "shape", "data_offsets"}``, plus an optional ``__metadata__``
object of strings), then the data.  Every field is checked against the file's size before anything
is allocated, with the rules of the safetensors library itself (the tensors cover the data section
exactly: no holes, no overlaps, no trailing bytes), so a file that passes here also opens there; a
file that does not ends in one :class:`~lowbit.errors.ModelLoadError` naming the file and the problem.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import ModelLoadError

#: the safetensors library refuses larger headers
MAX_HEADER_BYTES = 100_000_000
MAX_DIMS = 16
ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


@dataclass(frozen=True)
class SafetensorsEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def _nonneg_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def check_safetensors(path: str | Path) -> dict[str, SafetensorsEntry]:
    """The tensors of a safetensors file, after checking its header against the file; raises
    :class:`ModelLoadError` on any inconsistency."""
    path = Path(path)

    def fail(what: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: invalid safetensors file: {what}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{path}: truncated safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise fail(f"header length {n} for a {size}-byte file")
            raw = fh.read(n)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc})") from None
    if len(raw) != n:
        raise fail("file changed while being read")
    if not raw.startswith(b"{"):
        raise fail("header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise fail(f"header is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise fail("__metadata__ is not an object of strings")
    data_start, data_size = 8 + n, size - 8 - n
    entries: list[SafetensorsEntry] = []
    for name, e in header.items():
        if not isinstance(e, dict):
            raise fail(f"entry {name!r} is not an object")
        dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise fail(f"tensor {name!r} has unknown dtype {str(dtype)[:40]!r}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_nonneg_int(d) for d in shape):
            raise fail(f"tensor {name!r} has an invalid shape {str(shape)[:80]}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_nonneg_int(o) for o in offs)):
            raise fail(f"tensor {name!r} has invalid data_offsets {str(offs)[:80]}")
        begin, end = offs
        if begin > end:
            raise fail(f"tensor {name!r} has data_offsets [{begin}, {end}] with begin after end")
        if end > data_size:
            raise ModelLoadError(f"{path}: truncated: tensor {name!r} ends at data byte {end} "
                                 f"but the data section has {data_size} bytes")
        need = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != need:
            raise fail(f"tensor {name!r} of shape {shape} and dtype {dtype} needs {need} bytes, "
                       f"its data_offsets span {end - begin}")
        entries.append(SafetensorsEntry(name, dtype, tuple(shape), data_start + begin, data_start + end))
    pos = data_start
    for ent in sorted(entries, key=lambda x: (x.begin, x.end)):
        if ent.begin < pos:
            raise fail(f"tensor {ent.name!r} overlaps the tensor before it")
        if ent.begin > pos:
            raise fail(f"unused bytes before tensor {ent.name!r} (data byte {pos - data_start})")
        pos = ent.end
    if pos != size:
        raise fail(f"the tensors cover {pos - data_start} of the {data_size} data bytes")
    return {ent.name: ent for ent in entries}
