"""Write a GGUF file that llama.cpp loads, re-quantizing every tensor of a source GGUF.

The source's metadata (architecture, hyper-parameters, tokenizer, chat template) is copied as it
is; each tensor is dequantized to float32, given a format by :mod:`lowbit.model.policy` (llama.cpp's
rules) and quantized by lowbit's own formats.  The output is written to a temporary file beside the
target and renamed only once complete, so an interrupted run never leaves a file that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lowbit.env import __version__
from lowbit.errors import FormatError, LowbitError
from lowbit.formats import get_format
from lowbit.formats.base import Format, QTensor
from lowbit.io.gguf_write import STRING, GGUFStreamWriter, encode_value
from lowbit.io.outputs import GGUF, GGUF_KEY, SEAL_PLACEHOLDER, check_output, commit_file, seal_gguf, temp_beside
from lowbit.model.gguf_file import GGUFFile
from lowbit.model.gguf_mix import FILE_TYPES, ModelInfo, file_type, info_from_gguf, llama_order, plan
from lowbit.model.quantize import QuantReport, TensorRecord

#: values per row chunk of a tensor being quantized (16 MiB of float32): big enough that torch's
#: vectorized work dominates, small enough that the largest tensor's temporaries stay bounded
CHUNK_VALUES = 1 << 22

_SKIP_KEYS = {"general.architecture", "general.file_type", "general.quantization_version", "general.quantized_by",
              "lowbit.output"}


def atomic_target(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return temp_beside(out)


def _as_array(fmt_name: str, parts: dict[str, torch.Tensor]) -> np.ndarray:
    if "blocks" in parts:
        return parts["blocks"].numpy()
    values = parts["values"]
    if values.dtype == torch.bfloat16:
        return values.view(torch.uint8).numpy()
    return values.numpy()


def _check_finite(w: np.ndarray, source: str, name: str) -> None:
    if not np.isfinite(w).all():
        bad = int((~np.isfinite(w)).sum())
        raise FormatError(f"{source}: tensor {name} has {bad} NaN or Inf values; refusing to quantize")


def dequantize_raw(gtype: int, data: np.ndarray) -> np.ndarray:
    """float32 values of a tensor's stored bytes ``[rows..., row bytes]``: lowbit's own (vectorized,
    checked equal to gguf-py's) for the types it has, gguf-py's for the rest."""
    import gguf

    data = np.asarray(data)
    if gtype == gguf.GGMLQuantizationType.F32:
        return data.view(np.float32)
    if gtype == gguf.GGMLQuantizationType.F16:
        return data.view(np.float16).astype(np.float32)
    fmt = _FORMAT_OF_TYPE.get(gtype)
    if fmt is not None and data.ndim == 2:
        rows = data.shape[0]
        cols = data.shape[1] // fmt_type_size(fmt) * fmt.block_size
        qt = QTensor(fmt.name, (rows, cols), {"blocks": torch.from_numpy(np.array(data, copy=True))})
        return fmt.dequantize(qt).numpy()
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType(gtype)).astype(np.float32, copy=False)


#: byte offsets of the float16 fields (block scales, minimums) in one block of each type whose values
#: are finite exactly when those fields are: every other field is a small integer, so a value is a
#: finite float32 product of them (at most 65504 x 63 x 127)
HALF_FIELDS: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "IQ4_NL": (0,), "IQ4_XS": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ1_S": (0,),
    "TQ1_0": (52,), "TQ2_0": (64,),
}


def finite_rows(gtype: int, data: np.ndarray) -> np.ndarray | None:
    """Whether each row of stored bytes ``[rows, row bytes]`` dequantizes to finite values, read from
    the float16 fields alone (:data:`HALF_FIELDS`) without dequantizing; None for a type not there."""
    import gguf

    qtype = gguf.GGMLQuantizationType(gtype)
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.isfinite(np.asarray(data).view(np.float32)).all(axis=-1)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.isfinite(np.asarray(data).view(np.float16)).all(axis=-1)
    offsets = HALF_FIELDS.get(qtype.name)
    if offsets is None:
        return None
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = np.asarray(data).reshape(data.shape[0], -1, type_size)
    ok = np.ones(data.shape[0], dtype=bool)
    for off in offsets:
        half = np.ascontiguousarray(blocks[:, :, off : off + 2]).view(np.float16)
        ok &= np.isfinite(half).reshape(data.shape[0], -1).all(axis=1)
    return ok


def fmt_type_size(fmt: Format) -> int:
    return fmt.storage_bits((1, fmt.block_size)) // 8


_FORMAT_OF_TYPE: dict[int, Format] = {}
for _n in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"):
    _f = get_format(_n)
    if _f.gguf_type is not None:
        _FORMAT_OF_TYPE[int(_f.gguf_type)] = _f


def write_gguf(src: Path, out: Path, fmt_name: str, progress: bool = True,
               imatrix: dict[str, np.ndarray] | None = None, device: str | torch.device = "cpu",
               resume: bool = False, force: bool = False, chunk_values: int = CHUNK_VALUES) -> QuantReport:
    """Quantize the GGUF file ``src`` to ``fmt_name`` (a llama.cpp file type such as ``q4_k_m``)
    and write ``out``; metadata copied byte for byte.  A tensor whose source type already is its
    target type is copied byte for byte, as llama.cpp does.  With ``resume`` an interrupted run
    goes on from its last finished tensor (:class:`Journal`).  An existing ``out`` is replaced only
    with ``force`` and only when it is lowbit's own GGUF file (:mod:`lowbit.io.outputs`)."""
    if file_type(fmt_name) is None:  # refuse before reading anything
        get_format(fmt_name)
        raise LowbitError(f"format {fmt_name} has no GGUF type; GGUF output takes {', '.join(sorted(FILE_TYPES))}")
    gf = GGUFFile(src)
    arch = gf.field("general.architecture")
    if not isinstance(arch, str):
        raise LowbitError(f"{src}: GGUF file has no general.architecture")
    info = info_from_gguf({k: kv.value for k, kv in gf.kv.items() if not k.startswith("tokenizer.")}, arch)
    raw_kv = [(k, kv.raw) for k, kv in gf.kv.items() if k not in _SKIP_KEYS]
    entries = [(t.name, t.shape) for t in gf.tensors.values()]

    def load(name: str) -> np.ndarray:
        return dequantize_raw(gf.tensors[name].type, gf.raw(name))

    def raw(name: str) -> tuple[int, np.ndarray]:
        return gf.tensors[name].type, gf.raw(name)

    def load_rows(name: str, r0: int, r1: int) -> np.ndarray:
        return dequantize_raw(gf.tensors[name].type, gf.raw(name)[r0:r1])

    fp = fingerprint([src], format=fmt_name, imatrix=array_digest(imatrix)) if resume else None
    return write_tensors(out, arch, None, entries, load, fmt_name, info, str(src), progress, imatrix, raw, device,
                         raw_kv=raw_kv, fingerprint=fp, force=force, load_rows=load_rows, release=gf.release,
                         chunk_values=chunk_values)


def _collected_kv(arch: str, metadata: Callable[[Any], None]) -> list[tuple[str, bytes]]:
    """Run ``metadata`` on a gguf-py writer (used only to collect key-value pairs) and encode them."""
    import gguf

    col = gguf.GGUFWriter(None, arch)
    metadata(col)
    out = []
    for key, v in col.kv_data[0].items():
        if key in _SKIP_KEYS:
            continue
        vtype, sub = int(v.type), v.sub_type
        if vtype == gguf.GGUFValueType.ARRAY and sub is None:
            items = list(v.value)
            sub = gguf.GGUFValueType.get_type(items[0]) if items else gguf.GGUFValueType.INT32
        out.append((key, encode_value(vtype, v.value, None if sub is None else int(sub))))
    return out


def write_tensors(out: Path, arch: str, metadata: Callable[[Any], None] | None,
                  entries: list[tuple[str, tuple[int, ...]]], load: Callable[[str], np.ndarray], fmt_name: str,
                  info: ModelInfo, source: str, progress: bool = True, imatrix: dict[str, np.ndarray] | None = None,
                  raw: Callable[[str], tuple[int, np.ndarray]] | None = None,
                  device: str | torch.device | Callable[[str], str | torch.device] = "cpu", raw_kv: list[tuple[str, bytes]] | None = None, measure_error: bool = False,
                  prequantized: dict[str, QTensor] | None = None,
                  types: dict[str, str | None] | None = None,
                  fingerprint: dict[str, Any] | None = None, force: bool = False,
                  load_rows: Callable[[str, int, int], np.ndarray] | None = None,
                  release: Callable[[str], None] | None = None,
                  chunk_values: int = CHUNK_VALUES) -> QuantReport:
    """Write a GGUF file, streaming: metadata first (``raw_kv``, encoded entries as copied from a
    source file, and/or what ``metadata(writer)`` adds to a gguf-py writer), then every tensor of
    ``entries`` (GGUF name, shape rows first), loaded as float32 by ``load``, in the type llama.cpp's
    rules give it under file type ``fmt_name``, in llama.cpp's tensor order, one tensor in memory at
    a time.  ``raw(name)`` gives a source tensor's type and bytes, for tensors copied unchanged;
    ``load_rows(name, r0, r1)``, where given, reads rows r0:r1 alone (as float32), and ``release(name)``
    is called once a tensor is written (to drop its source pages from memory).  A tensor is quantized
    in chunks of whole rows of about ``chunk_values`` values each, so that peak memory is one chunk's
    values and temporaries, not the largest tensor's (the bytes are the same: every GGUF type
    quantizes each row on its own).
    ``prequantized`` holds tensors already quantized (by GPTQ, AWQ ...) in their planned type, rows in
    GGUF order, written as they are.
    ``imatrix`` maps GGUF tensor names to importance vectors (one weight per column).  The
    quantizers run with torch on ``device`` (the bytes are the same on any device), or on
    ``device(name)`` for each tensor (layers placed across GPUs: :mod:`lowbit.model.devices`).  With
    ``measure_error`` each tensor's relative squared error goes into the report (one more
    dequantization per tensor).  ``types`` (GGUF name -> lowbit format, None for F32) replaces
    llama.cpp's rules with a chosen mix (``fmt_name`` then only labels the file).
    With a ``fingerprint`` (what identifies the inputs and arguments, JSON-able) the write can be
    resumed: see :class:`Journal`.  ``out`` is checked first and again at the end
    (:func:`lowbit.io.outputs.check_output`): an existing file is replaced only with ``force`` and only
    when it is lowbit's own GGUF file."""
    import gguf

    check_output(out, GGUF, force, option="")

    ft = file_type(fmt_name)
    if ft is None:
        get_format(fmt_name)  # unknown names get the list of known formats
        writable = ", ".join(sorted(FILE_TYPES))
        raise LowbitError(f"format {fmt_name} has no GGUF type; GGUF output takes {writable}")
    imatrix = imatrix or {}
    for name, v in imatrix.items():
        if not np.isfinite(np.asarray(v)).all():
            raise FormatError(f"importance matrix entry {name} has NaN or Inf values")
    shapes = dict(entries)
    if types is None:
        types = plan(entries, ft, info, has_imatrix=bool(imatrix))
    else:
        missing = [n for n in shapes if n not in types]
        if missing:
            raise LowbitError(f"the chosen mix has no type for {', '.join(missing[:5])}")
        for n, t in types.items():
            if t is None:
                continue
            f = get_format(t)
            if f.gguf_type is None:
                raise LowbitError(f"{n}: {t} is not a type llama.cpp can load")
            if n in shapes and f.block_size and shapes[n][-1] % f.block_size:
                raise LowbitError(f"{n}: rows of {shapes[n][-1]} values do not fit {t}'s blocks of {f.block_size}")
    order = llama_order(shapes)

    # what each tensor becomes: copied from the source (its type unchanged) or quantized
    copied: dict[str, int] = {}
    out_type: dict[str, int] = {}
    for name in order:
        target = types[name]
        if raw is not None:
            src_type = raw(name)[0]
            if target is None or src_type == get_format(target).gguf_type:
                copied[name] = out_type[name] = src_type
                continue
        out_type[name] = int(gguf.GGMLQuantizationType.F32) if target is None else int(get_format(target).gguf_type)

    report = QuantReport(ft.name)
    journal = Journal(out, fingerprint, verbose=progress) if fingerprint is not None else None
    tmp = journal.part if journal is not None else atomic_target(out)
    writer = GGUFStreamWriter(tmp)
    writer.add("general.architecture", STRING, arch)
    for key, rawv in raw_kv or []:
        writer.add_raw(key, rawv)
    if metadata is not None:
        for key, rawv in _collected_kv(arch, metadata):
            writer.add_raw(key, rawv)
    writer.add("general.file_type", int(gguf.GGUFValueType.UINT32), ft.ftype)
    writer.add("general.quantization_version", int(gguf.GGUFValueType.UINT32), gguf.GGML_QUANT_VERSION)
    writer.add("general.quantized_by", STRING, "lowbit")
    writer.add(GGUF_KEY, STRING, SEAL_PLACEHOLDER)  # lowbit's marker: a digest of the finished file (lowbit.io.outputs)
    for name in order:
        writer.add_tensor_info(name, shapes[name], out_type[name])

    def one(name: str) -> None:
        """Quantize (or copy) tensor ``name``, write it and record it in the report."""
        shape = shapes[name]
        target = types[name]
        if prequantized and name in prequantized and target is not None:
            tfmt = get_format(target)
            pq = prequantized[name]
            if get_format(pq.format).gguf_type != tfmt.gguf_type or tuple(pq.shape) != (shape[0], int(np.prod(shape[1:]))):
                raise LowbitError(f"{source}: tensor {name} was quantized as {pq.format} {tuple(pq.shape)}, "
                                  f"but {ft.name} stores it as {tfmt.name} {tuple(shape)}")
            writer.write_tensor(name, _as_array(tfmt.name, pq.to("cpu").parts))
            report.tensors.append(TensorRecord(name, shape, tfmt.name, True, tfmt.storage_bits(pq.shape), None))
            return
        rows = shape[0]
        cols = int(np.prod(shape[1:], dtype=np.int64))
        by_rows = len(shape) >= 2  # a vector (a norm's weight) is one piece
        step = max(1, chunk_values // max(cols, 1)) if by_rows else max(rows, 1)
        spans = [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
        full: list[np.ndarray] = []

        def rows_of(r0: int, r1: int) -> np.ndarray:
            """Rows r0:r1 as float32 [r1 - r0, cols], checked finite; read in row chunks where the source
            allows it (``load_rows``), else sliced from the tensor loaded once."""
            if load_rows is not None and by_rows:
                w = load_rows(name, r0, r1)
            else:
                if not full:
                    full.append(load(name))
                w = full[0][r0:r1]
            w = np.ascontiguousarray(w, dtype=np.float32).reshape(r1 - r0, cols)
            _check_finite(w, source, name)
            return w

        if name in copied:
            data = raw(name)[1]  # type: ignore[misc]
            # the values are checked (from their scales where the type allows: no dequantization), the bytes copied
            ok = finite_rows(copied[name], data.reshape(rows, -1)) if by_rows else None
            if ok is None:
                for r0, r1 in spans:
                    rows_of(r0, r1)
            elif not ok.all():
                raise FormatError(f"{source}: tensor {name} has NaN or Inf values in {int((~ok).sum())} rows; "
                                  "refusing to quantize")
            writer.write_tensor(name, data)
            kept = gguf.GGMLQuantizationType(copied[name]).name.lower()
            report.tensors.append(TensorRecord(name, shape, target or kept, target is not None,
                                               8 * int(np.asarray(data).nbytes), 0.0))
            return
        if target is None:
            writer.write_tensor_parts(name, (rows_of(r0, r1) for r0, r1 in spans))
            report.tensors.append(TensorRecord(name, shape, "f32", False, 32 * rows * cols, 0.0))
            return
        tfmt = get_format(target)
        dev = device(name) if callable(device) else device
        # a type the matrix does not change leaves its entry unread, and unchecked
        im = imatrix.get(name) if tfmt.uses_imatrix else None
        if im is not None and np.asarray(im).size != cols:
            raise FormatError(f"importance matrix entry {name} has {np.asarray(im).size} values, "
                              f"the tensor has {cols} columns")
        imt = None if im is None else torch.as_tensor(np.asarray(im, np.float32), device=dev)
        sq = [0.0, 0.0]

        def quantized() -> Iterator[np.ndarray]:
            # every GGUF type quantizes each row on its own (as ggml does), so row chunks give the bytes
            # of the whole tensor; only one chunk's float32 values and temporaries are in memory
            for r0, r1 in spans:
                wt = torch.from_numpy(rows_of(r0, r1)).to(dev)
                qt = tfmt.quantize(wt, name=f"{source}:{name}", imatrix=imt)
                yield _as_array(tfmt.name, qt.to("cpu").parts)
                if measure_error:
                    sq[0] += float(((tfmt.dequantize(qt) - wt) ** 2).sum(dtype=torch.float64))
                    sq[1] += float((wt * wt).sum(dtype=torch.float64))

        writer.write_tensor_parts(name, quantized())
        err = sq[0] / max(sq[1], 1e-30) if measure_error else None
        report.tensors.append(TensorRecord(name, shape, tfmt.name, True, tfmt.storage_bits((rows, cols)), err))

    done = 0
    try:
        if journal is not None:
            journal.lock()
            done = journal.resume_point(writer, report)
        writer.begin(done)
        bar = tqdm(order[done:], desc=f"quantize {ft.name} -> {out.name}", unit="tensor", disable=not progress,
                   initial=done, total=len(order), leave=False)
        for i, name in enumerate(bar, start=done):
            one(name)
            if release is not None:
                release(name)
            if journal is not None:
                journal.save(i + 1, writer.sync(), report)
        writer.close()
        seal_gguf(tmp)
    except BaseException as exc:
        writer.abort()
        # an interruption (Ctrl-C) or a system error (a full disk ...) keeps the finished tensors for a
        # rerun; an error in the input (NaN weights ...) would come back, so nothing is kept then
        keep = journal is not None and journal.done > 0 and isinstance(exc, (KeyboardInterrupt, OSError))
        if journal is not None:
            journal.unlock()
            if not keep:
                journal.path.unlink(missing_ok=True)
        if keep:
            print(f"lowbit: {journal.done} of {len(order)} tensors are kept in {tmp}; the same command "  # type: ignore[union-attr]
                  "resumes from there", file=sys.stderr)
        else:
            tmp.unlink(missing_ok=True)
        raise
    try:
        commit_file(tmp, out, GGUF, force)  # a refusal keeps the finished file (and a journal: a rerun ends at once)
    finally:
        if journal is not None:
            journal.unlock()
    if journal is not None:
        journal.finish()
    return report


def fingerprint(inputs: list[Path], **args: object) -> dict[str, Any]:
    """What identifies a run: each input file's path, size and modification time, the arguments
    (format, importance-matrix digest ...) and lowbit's version."""
    files = {}
    for f in inputs:
        st = f.stat()
        files[str(f.resolve())] = [st.st_size, st.st_mtime_ns]
    return {"files": files, "lowbit": __version__, **args}


def array_digest(values: dict[str, np.ndarray] | None) -> str | None:
    """SHA-256 of a dict of arrays (an importance matrix), for fingerprints."""
    if not values:
        return None
    h = hashlib.sha256()
    for k in sorted(values):
        h.update(k.encode())
        h.update(np.ascontiguousarray(values[k], dtype=np.float32).tobytes())
    return h.hexdigest()


def resumable_part(out: Path) -> Path:
    """The partial file of a resumable write of ``out`` (a fixed name, so that a rerun finds it)."""
    return out.with_name(f".{out.name}.part")


class Journal:
    """Progress of a resumable GGUF write, ``.<name>.part-resume.json`` beside the partial file
    ``.<name>.part``: a first line with the fingerprint of the inputs and arguments and the SHA-256
    of the header, then after each finished tensor a line with its index, the file length and its
    report record (:meth:`read` puts them together).  The partial file is fsynced before each line
    is written, so the journal never claims more than the disk holds.  A rerun whose fingerprint and header match truncates
    the partial file to the last finished tensor and goes on; anything else starts over.  The
    output is renamed into place only once complete, then the journal is removed.  An exclusive
    lock (flock) on the partial file keeps two runs from writing it at once."""

    def __init__(self, out: Path, fingerprint: dict[str, Any], verbose: bool = True) -> None:
        self.verbose = verbose  # say on stderr when a run resumes or starts over
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.part = resumable_part(out)
        self.path = out.with_name(f".{out.name}.part-resume.json")
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back
        self.header_sha256 = ""
        self.done = 0
        self.n = 0
        self._saved: int | None = None  # records in the journal file (None: not written by this run)
        self._lock_fh: Any = None

    def _say(self, text: str, report: QuantReport | None = None) -> None:
        """A note on stderr while the run shows progress; it also goes into the report's details
        (``journal``), which the command line prints with its results."""
        if report is not None:
            report.details["journal"] = text.removeprefix("lowbit: ")
        if self.verbose:
            print(text, file=sys.stderr)

    def lock(self) -> None:
        import fcntl

        for p in (self.part, self.path):
            if p.is_symlink() or (p.exists() and not p.is_file()):
                raise LowbitError(f"{p}: lowbit's partial output is in the way as a link or a directory; remove it")
        fh = open(self.part, "ab")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise LowbitError(f"{self.part}: another lowbit run is writing {self.out}") from None
        self._lock_fh = fh

    def unlock(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def resume_point(self, writer: GGUFStreamWriter, report: QuantReport) -> int:
        """How many tensors the partial file already holds (0: start over); fills ``report`` with their records."""
        self.header_sha256 = hashlib.sha256(writer.header_bytes()).hexdigest()
        n = self.n = writer.n_tensors
        if not self.path.exists():
            return 0
        try:
            state = self.read(self.path)
            done, offset = int(state["done"]), int(state["offset"])
            records = state["records"]
        except (OSError, ValueError, KeyError, TypeError):
            self._say(f"lowbit: {self.path} is unreadable; starting over", report)
            return 0
        size = self.part.stat().st_size if self.part.exists() else -1
        why = None
        if state.get("fingerprint") != self.fingerprint:
            changed = sorted(k for k in set(self.fingerprint) | set(state.get("fingerprint") or {})
                             if (state.get("fingerprint") or {}).get(k) != self.fingerprint.get(k))
            why = f"the inputs or arguments changed ({', '.join(changed)})"
        elif state.get("header_sha256") != self.header_sha256 or int(state.get("n_tensors", -1)) != n:
            why = "the output's header differs"
        elif not 0 < done <= n or len(records) != done or offset != writer.end_of(done) or size < offset:
            why = f"{self.part} does not hold the {done} tensors the journal records"
        if why is not None:
            self._say(f"lowbit: starting over: {why}", report)
            self.path.unlink(missing_ok=True)  # before the partial file is overwritten
            return 0
        report.tensors.extend(TensorRecord(r[0], tuple(r[1]), r[2], bool(r[3]), int(r[4]), r[5]) for r in records)
        self.done = done
        self._say(f"lowbit: resuming after tensor {done} of {n} ({self.part})", report)
        return done

    @staticmethod
    def read(path: Path) -> dict[str, Any]:
        """The state a journal file records: its first line (fingerprint, header digest, tensor
        count ...) with ``done``, ``offset`` and ``records`` brought up to its last complete line."""
        lines = path.read_text().split("\n")
        state = json.loads(lines[0])
        for line in lines[1:]:
            try:
                step = json.loads(line)
            except ValueError:  # a line cut short by a crash (or the empty end): the lines before it hold
                break
            state["done"], state["offset"] = step["done"], step["offset"]
            state["records"].extend(step["records"])
        return state

    def save(self, done: int, offset: int, report: QuantReport) -> None:
        """Record that ``done`` tensors (ending at ``offset``, already fsynced) are written.  The first
        save writes the whole state (write, fsync, rename); later ones append a line with the new
        records, so a save costs the same at the last tensor as at the first."""
        recs = [[t.name, list(t.shape), t.format, t.quantized, t.bits, t.rel_error] for t in report.tensors]
        if self._saved is None or not self.path.exists():
            state = {"lowbit_journal": 2, "out": str(self.out), "fingerprint": self.fingerprint,
                     "header_sha256": self.header_sha256, "n_tensors": self.n, "done": done, "offset": offset,
                     "records": recs}
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w") as fh:
                fh.write(json.dumps(state) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(self.path)
        else:
            # losing this line to a crash only means redoing its tensors: the partial file is fsynced first
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"done": done, "offset": offset, "records": recs[self._saved:]}) + "\n")
        self._saved = len(recs)
        self.done = done

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)
        self.unlock()
