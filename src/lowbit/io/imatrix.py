"""Importance matrices in llama.cpp's two file formats.

An importance matrix holds, for every weight matrix and every input column, the sum of the
squared activations that reached that column over the calibration tokens, and how many tokens
that was; the quantizers weigh errors by the mean (``sum / count``).

* **GGUF** (what ``llama-imatrix`` writes by default): ``general.type = "imatrix"``, keys
  ``imatrix.datasets`` (strings), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32), and per
  weight ``NAME.in_sum2`` (F32, ``[n_mat, cols]``), ``NAME.counts`` (F32, ``[n_mat, 1]``) and,
  optionally, ``NAME.in_sum`` (the plain sums of the activations), in sorted name order.
* **legacy .dat** (``--output-format dat``): int32 entry count; per entry an int32-prefixed name,
  int32 ``ncall``, int32 value count and the float32 values ``mean * ncall``; then int32 chunk count
  and an int32-prefixed dataset name.

:func:`read_imatrix` accepts both (and says clearly what is wrong with a bad file);
:func:`write_imatrix` writes either, atomically.  The mean each quantizer sees is computed as
llama-quantize does, in float32, so both tools quantize with the same numbers.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.io.outputs import DAT_TRAILER, IMATRIX, writing_file
from lowbit.model.gguf_file import GGUFFile
from lowbit.model.imatrix_collect import Imatrix, ImatrixEntry

__all__ = ["Imatrix", "ImatrixEntry", "read_imatrix", "write_imatrix"]


def _fail(path: Path, what: str) -> LowbitError:
    return LowbitError(f"{path}: not a valid importance matrix file: {what}")


# ---- GGUF ---------------------------------------------------------------------------------
def _read_gguf(path: Path) -> Imatrix:
    import gguf

    try:  # the strict check first: gguf-py's reader trusts the header's counts and offsets
        GGUFFile(path)
    except LowbitError as e:
        raise _fail(path, str(e).removeprefix(f"{path}: ")) from None
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf raises many kinds of errors on bad files
        raise _fail(path, f"unreadable GGUF ({e})") from None

    def val(key: str) -> object:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    im = Imatrix()
    gtype = val("general.type")
    if gtype not in (None, "imatrix"):
        raise _fail(path, f"general.type is {gtype!r}, not 'imatrix' (is this a model file?)")
    ds = val("imatrix.datasets")
    im.datasets = [str(s) for s in ds] if isinstance(ds, list) else []
    im.chunk_count = int(val("imatrix.chunk_count") or 0)  # type: ignore[call-overload]
    im.chunk_size = int(val("imatrix.chunk_size") or 0)  # type: ignore[call-overload]
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        for suffix in (".in_sum2", ".counts", ".in_sum"):
            if t.name.endswith(suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise _fail(path, f"tensor {t.name} is {t.tensor_type.name}, not F32")
                shape = tuple(int(x) for x in reversed(t.shape))  # rows first
                parts.setdefault(t.name[: -len(suffix)], {})[suffix] = np.asarray(t.data, np.float32).reshape(shape)
                break
    if not parts:
        raise _fail(path, "it has no NAME.in_sum2 / NAME.counts tensors")
    for name, p in sorted(parts.items()):
        if ".in_sum2" not in p or ".counts" not in p:
            raise _fail(path, f"entry {name} lacks its {'.in_sum2' if '.in_sum2' not in p else '.counts'} tensor")
        s2 = p[".in_sum2"].reshape(-1, p[".in_sum2"].shape[-1])
        counts = p[".counts"].reshape(-1)
        if counts.size != s2.shape[0]:
            raise _fail(path, f"entry {name} has {counts.size} counts for {s2.shape[0]} matrices")
        sums = p.get(".in_sum")
        if sums is not None:
            sums = sums.reshape(s2.shape) if sums.size == s2.size else None
        if not (np.isfinite(s2).all() and np.isfinite(counts).all()) or (s2 < 0).any() or (counts < 0).any():
            raise _fail(path, f"entry {name} has NaN, Inf or negative values")
        im.entries[name] = ImatrixEntry(s2.copy(), counts.copy(), None if sums is None else sums.copy())
    return im


def _write_gguf(im: Imatrix, path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(path, arch="imatrix", endianess=gguf.GGUFEndian.LITTLE)
    # llama-imatrix writes no general.architecture, only general.type
    w.kv_data[0].pop("general.architecture", None)
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(im.datasets))
    w.add_uint32("imatrix.chunk_count", int(im.chunk_count))
    w.add_uint32("imatrix.chunk_size", int(im.chunk_size))
    w.add_string("lowbit.output", "imatrix")  # lowbit's marker (lowbit.io.outputs); llama.cpp ignores it
    for name in sorted(im.entries):
        e = im.entries[name]
        s2 = np.ascontiguousarray(e.sum2, np.float32).reshape(-1, e.sum2.shape[-1])
        w.add_tensor(f"{name}.in_sum2", s2)
        w.add_tensor(f"{name}.counts", np.ascontiguousarray(e.counts, np.float32).reshape(-1, 1))
        if e.sums is not None:
            w.add_tensor(f"{name}.in_sum", np.ascontiguousarray(e.sums, np.float32).reshape(s2.shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- legacy .dat --------------------------------------------------------------------------
class _Buf:
    def __init__(self, path: Path, data: bytes) -> None:
        self.path, self.data, self.pos = path, data, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _fail(self.path, f"truncated while reading {what} at byte {self.pos}")
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _read_dat(path: Path, data: bytes) -> Imatrix:
    b = _Buf(path, data)
    n = b.i32("the entry count")
    if n < 1 or n > len(data) // 12:
        raise _fail(path, f"implausible entry count {n}")
    im = Imatrix()
    for i in range(n):
        ln = b.i32(f"the name length of entry {i}")
        if ln < 1 or ln > 4096:
            raise _fail(path, f"entry {i} has a name length of {ln}")
        name = b.take(ln, f"the name of entry {i}").decode("utf-8", "replace")
        ncall = b.i32(f"the call count of {name}")
        nval = b.i32(f"the value count of {name}")
        if nval < 1 or nval * 4 > len(data):
            raise _fail(path, f"entry {name} claims {nval} values")
        vals = np.frombuffer(b.take(4 * nval, f"the values of {name}"), dtype="<f4").astype(np.float32)
        if not np.isfinite(vals).all() or (vals < 0).any():
            raise _fail(path, f"entry {name} has NaN, Inf or negative values")
        im.entries[name] = ImatrixEntry(vals.reshape(1, -1).copy(), np.array([max(ncall, 0)], np.float32))
        im.legacy_ncall[name] = ncall
    if b.pos < len(data):
        im.chunk_count = b.i32("the chunk count")
        if b.pos < len(data):
            ln = b.i32("the dataset name length")
            if ln > 0:
                im.datasets.append(b.take(ln, "the dataset name").decode("utf-8", "replace"))
    return im


def _write_dat(im: Imatrix, path: Path) -> None:
    out = bytearray(struct.pack("<i", len(im.entries)))
    for name in sorted(im.entries):
        e = im.entries[name]
        if name in im.legacy_ncall:
            ncall, vals = im.legacy_ncall[name], e.sum2.reshape(-1).astype(np.float32)
        else:
            # llama-imatrix: ncall = ceil(max tokens / chunk size), values = (sum / count) * ncall
            cs = max(im.chunk_size, 1)
            ncall = int((int(e.counts.max()) + cs - 1) // cs)
            c = e.counts.astype(np.float32)[:, None]
            s2 = np.where(c > 0, e.sum2.astype(np.float32), np.float32(1))
            vals = ((s2 / np.where(c > 0, c, np.float32(1))) * np.float32(ncall)).astype(np.float32).reshape(-1)
        nb = name.encode()
        out += struct.pack("<i", len(nb)) + nb + struct.pack("<ii", ncall, vals.size) + vals.astype("<f4").tobytes()
    ds = (im.datasets[-1] if im.datasets else "").encode()
    out += struct.pack("<i", int(im.chunk_count)) + struct.pack("<i", len(ds)) + ds
    out += DAT_TRAILER  # lowbit's marker: llama.cpp's reader stops after the dataset name
    path.write_bytes(bytes(out))


# ---- public -------------------------------------------------------------------------------
def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read an importance matrix written by llama-imatrix (GGUF or legacy .dat) or by lowbit."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path}: importance matrix file not found")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"GGUF":
        return _read_gguf(path)
    return _read_dat(path, path.read_bytes())


def write_imatrix(im: Imatrix, path: str | os.PathLike[str], legacy: bool | None = None, force: bool = False) -> None:
    """Write ``im`` to ``path`` atomically; the legacy .dat format when ``legacy`` (by default when
    the name ends in .dat), llama.cpp's GGUF format otherwise.  An existing file is replaced only with
    ``force`` and only when it is an importance matrix lowbit wrote (:mod:`lowbit.io.outputs`)."""
    path = Path(path)
    if legacy is None:
        legacy = path.suffix.lower() == ".dat"
    with writing_file(path, IMATRIX, force) as tmp:
        (_write_dat if legacy else _write_gguf)(im, tmp)
