"""What lowbit writes, and the rule that protects everything else: lowbit never deletes or
overwrites a file it did not write.

Every output carries a marker that says lowbit wrote it, what kind of output it is, and enough about
its contents to tell when something else has changed it since:

* a directory (a lowbit checkpoint, an export, an imported model): the file ``.lowbit-output.json``
  inside it, listing every file lowbit wrote there with its size and modification time; a file
  that is not listed, or no longer has the size and time it had, is not lowbit's;
* a GGUF model file: the key ``lowbit.output``, whose value is a digest of the file's header (but
  for the value itself) and of samples of its tensor data; tools that copy a GGUF's metadata into a
  file of their own (llama-quantize, gguf-split) copy the key, not a digest that fits their file;
* an importance matrix: the key ``lowbit.output = "imatrix"`` (GGUF), or a trailer after the
  dataset name (legacy .dat; llama.cpp's readers stop before it);
* a report: a ``lowbit_output`` key (JSON), a first-line comment (Markdown), a ``Software`` text
  chunk (PNG).

:func:`check_output` runs before any work: it refuses a symbolic link, a path of the wrong kind (a
directory where a file goes), an unwritable place, and an existing path unless ``force`` is given
and the path is lowbit's own earlier output of the same kind, holding nothing lowbit did not write.
Outputs are written under a new temporary name beside the target (created exclusively, so nothing
already there is written through) and renamed into place when complete (:func:`writing_dir`,
:func:`writing_file`, :func:`commit_file`); a replaced directory is removed file by file from its
marker's list, never with a recursive delete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

from lowbit.env import __version__
from lowbit.errors import LowbitError
from lowbit.model.gguf_file import GGUFFile

MARKER = ".lowbit-output.json"

#: output kinds: what a path holds when lowbit wrote it
GGUF = "GGUF model file"
IMATRIX = "importance matrix"
MODEL_DIR = "model directory"
REPORT = "report"
DIR_KINDS = {MODEL_DIR}

#: the GGUF key of lowbit's marker; a model file's value is ``SEAL_PREFIX`` + a hex digest
GGUF_KEY = "lowbit.output"
SEAL_PREFIX = "lowbit-gguf:"
SEAL_PLACEHOLDER = SEAL_PREFIX + "0" * 64
#: the trailer that marks a legacy .dat importance matrix as lowbit's (after the dataset name)
DAT_TRAILER = b"\0lowbit-output:imatrix\0"
#: the first line of a Markdown report
MD_MARKER = "<!-- written by lowbit -->"
PNG_SOFTWARE = "lowbit"


# ---- recognizing lowbit's outputs ------------------------------------------------------------
def dir_marker(path: Path) -> dict | None:
    """The marker of a directory lowbit wrote, or None."""
    f = Path(path) / MARKER
    if f.is_symlink() or not f.is_file():
        return None
    try:
        doc = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("lowbit_output") != 2 or not isinstance(doc.get("files"), dict):
        return None
    return doc


def _file_stamp(p: Path) -> list[int]:
    st = p.lstat()
    return [st.st_size, st.st_mtime_ns]


def gguf_seal(path: Path, value_offset: int, data_start: int) -> str:
    """The digest that marks a GGUF file as lowbit's: its size, its header but for the marker's value
    (at ``value_offset``, ``len(SEAL_PLACEHOLDER)`` bytes) and 17 samples of 64 KiB of its tensor data
    (the last one its end)."""
    n = len(SEAL_PLACEHOLDER)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        h.update(struct.pack("<QQ", size, data_start))
        header = fh.read(data_start)
        h.update(header[:value_offset])
        h.update(header[value_offset + n:])
        span = max(0, size - data_start)
        for i in range(16):
            fh.seek(data_start + (span * i) // 16)
            h.update(fh.read(1 << 16))
        fh.seek(max(data_start, size - (1 << 16)))  # and the last 64 KiB
        h.update(fh.read())
    return SEAL_PREFIX + h.hexdigest()


def _gguf_layout(path: Path) -> tuple[object, int, int] | None:
    """(the parsed file, the byte offset of the marker's value, where tensor data starts)."""
    try:
        gf = GGUFFile(path)
    except (LowbitError, OSError, ValueError):
        return None
    value = gf.field(GGUF_KEY)
    if not isinstance(value, str) or not value.startswith(SEAL_PREFIX) or len(value) != len(SEAL_PLACEHOLDER):
        return gf, -1, 0
    data_start = min((t.offset for t in gf.tensors.values()), default=gf.size)
    with open(path, "rb") as fh:
        head = fh.read(data_start)
    off = head.rfind(value.encode())
    return gf, off, data_start


def seal_gguf(path: Path) -> None:
    """Write the marker's digest into a finished GGUF file whose header holds ``SEAL_PLACEHOLDER`` (or
    an earlier digest) as the value of ``GGUF_KEY``."""
    layout = _gguf_layout(path)
    if layout is None or layout[1] < 0:
        raise LowbitError(f"{path}: no place for lowbit's marker in the header")
    _gf, off, data_start = layout
    del _gf
    seal = gguf_seal(path, off, data_start)
    with open(path, "r+b") as fh:
        fh.seek(off)
        fh.write(seal.encode())
        fh.flush()
        os.fsync(fh.fileno())


def _gguf_kind(path: Path) -> str | None:
    layout = _gguf_layout(path)
    if layout is None:
        return None
    gf, off, data_start = layout
    if gf.field(GGUF_KEY) == "imatrix" and gf.field("general.type") == "imatrix":  # type: ignore[attr-defined]
        return IMATRIX
    if off < 0:
        return None
    return GGUF if gguf_seal(path, off, data_start) == gf.field(GGUF_KEY) else None  # type: ignore[attr-defined]


def _png_is_ours(path: Path) -> bool:
    """Whether a PNG file carries lowbit's ``Software`` text chunk (read up to the image data)."""
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            while True:
                head = fh.read(8)
                if len(head) < 8:
                    return False
                n, ctype = struct.unpack(">I4s", head)
                if ctype in (b"IDAT", b"IEND") or n > 1 << 20:
                    return False
                data = fh.read(n)
                fh.read(4)  # CRC
                if ctype == b"tEXt" and data.split(b"\0", 1) == [b"Software", PNG_SOFTWARE.encode()]:
                    return True
    except OSError:
        return False


def file_kind(path: Path) -> str | None:
    """The kind of a regular file lowbit wrote (see the module docstring), or None."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            size = os.fstat(fh.fileno()).st_size
            if head[:4] != b"GGUF" and size >= len(DAT_TRAILER):
                fh.seek(size - len(DAT_TRAILER))
                tail = fh.read()
            else:
                tail = b""
    except OSError:
        return None
    if head[:4] == b"GGUF":
        return _gguf_kind(path)
    if tail == DAT_TRAILER:
        return IMATRIX
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return REPORT if _png_is_ours(path) else None
    if head.startswith(MD_MARKER.encode()[:16]):
        try:
            first = path.read_text(encoding="utf-8").split("\n", 1)[0]
        except (OSError, UnicodeDecodeError):
            return None
        return REPORT if first.strip() == MD_MARKER else None
    if head.lstrip()[:1] == b"{":
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return REPORT if isinstance(doc, dict) and doc.get("lowbit_output") == REPORT else None
    return None


def output_kind(path: Path) -> str | None:
    """What lowbit output ``path`` is (None: not one of lowbit's, or nothing there)."""
    path = Path(path)
    if path.is_symlink():
        return None
    if path.is_dir():
        m = dir_marker(path)
        return str(m["kind"]) if m is not None and m.get("kind") in DIR_KINDS else None
    if path.is_file():
        return file_kind(path)
    return None


def _foreign_entries(path: Path, marker: dict) -> list[str]:
    """What under the directory ``path`` lowbit did not write, as its marker tells: files it does not
    list, listed files changed since (another size or modification time), links, and directories
    that hold none of the listed files."""
    files: dict = marker.get("files", {})
    dirs = {str(Path(f).parent) for f in files} | {"."}
    dirs |= {str(p) for f in files for p in Path(f).parents}
    out = []
    for root, subdirs, names in os.walk(path):
        rel_root = Path(root).relative_to(path)
        for name in names + subdirs:
            p = Path(root) / name
            rel = str(rel_root / name) if str(rel_root) != "." else name
            if p.is_symlink():
                out.append(rel)
            elif p.is_dir():
                if rel not in dirs:
                    out.append(rel + "/")
            elif rel == MARKER:
                continue
            elif rel not in files:
                out.append(rel)
            elif list(files[rel]) != _file_stamp(p):
                out.append(f"{rel} (changed since lowbit wrote it)")
        subdirs[:] = [d for d in subdirs if not (Path(root) / d).is_symlink() and
                      (str(rel_root / d) if str(rel_root) != "." else d) in dirs]
    return sorted(out)


# ---- the check before the work ---------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    p = path.absolute().parent
    while not p.exists():
        if p.is_symlink():  # a dangling link on the way
            raise LowbitError(f"{p}: is a broken symbolic link")
        p = p.parent
    return p


def check_writable_dir(d: Path, what: Path) -> None:
    """Can a file be created in the existing directory ``d``? (A probe file is made and removed: the
    permission bits do not tell for root, read-only file systems or full disks.)"""
    if not d.is_dir():
        raise LowbitError(f"{what}: {d} is not a directory")
    probe = d / f".lowbit-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise LowbitError(f"{what}: cannot write in {d} ({exc.strerror or exc})") from None


def _is_stream(path: Path) -> bool:
    """A terminal, pipe or other device (``/dev/stdout``): written in place, never replaced."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def check_output(path: str | os.PathLike[str], kind: str, force: bool = False, option: str = "--out",
                 replace_own: bool = False) -> Path:
    """Refuse, before any work, an output that lowbit could not or must not write: see the module
    docstring.  ``replace_own``: lowbit's own earlier output of this kind is replaced even without
    ``force`` (reports, which every run rewrites; a report may also go to a pipe or a terminal).
    Returns the path."""
    path = Path(path)
    where = f"{option} {path}" if option else str(path)
    is_dir = kind in DIR_KINDS
    if replace_own and not is_dir and _is_stream(path):
        return path
    if path.is_symlink():
        raise LowbitError(f"{where}: is a symbolic link; lowbit writes only to real paths (give the path it points to, "
                          "or another name)")
    if path.exists():
        if is_dir and not path.is_dir():
            raise LowbitError(f"{where}: is a file, but this output is a directory ({kind})")
        if not is_dir and path.is_dir():
            hint = " (give a file name ending in .gguf)" if kind == GGUF and path.suffix.lower() != ".gguf" else ""
            raise LowbitError(f"{where}: is a directory, but this output ({kind}) is a file{hint}")
        found = output_kind(path)
        if found is None:
            raise LowbitError(f"{where}: already exists and is not an output of lowbit's; lowbit never overwrites what "
                              "it did not write (choose another name)")
        if found != kind:
            article = "an" if kind[0] in "aeiou" else "a"
            raise LowbitError(f"{where}: is lowbit's {found}, not {article} {kind}; --force replaces only an output of "
                              "the same kind (choose another name)")
        if not force and not replace_own:
            raise LowbitError(f"{where}: already exists (--force replaces it)")
        if is_dir:
            foreign = _foreign_entries(path, dir_marker(path) or {})
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise LowbitError(f"{where}: holds files lowbit did not write ({shown}); lowbit never deletes them "
                                  "(move them away or choose another name)")
        check_writable_dir(path.absolute().parent, path)
        return path
    check_writable_dir(_nearest_existing(path), path)
    return path


# ---- writing ----------------------------------------------------------------------------------
def _umask() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    m = os.umask(0o022)
    os.umask(m)
    return m


def readable_modes(path: Path) -> None:
    """Give ``path`` (a file, or a directory and everything in it) the modes a plain file or
    directory gets under the user's umask (temporary files and safetensors' are created 0600)."""
    mask = _umask()
    fmode, dmode = 0o666 & ~mask, 0o777 & ~mask
    path = Path(path)
    if path.is_file():
        os.chmod(path, fmode)
        return
    os.chmod(path, dmode)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(Path(root) / d, dmode)
        for f in files:
            if not (Path(root) / f).is_symlink():
                os.chmod(Path(root) / f, fmode)


def temp_beside(out: Path, tag: str = "part") -> Path:
    """A new, empty file beside ``out`` (same directory, so that the final rename is atomic), created
    exclusively: nothing that was there before is written through."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        p = out.with_name(f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return p
        except FileExistsError:
            continue
    raise LowbitError(f"{out.parent}: cannot create a temporary file")


def _temp_dir_beside(out: Path, tag: str = "part") -> Path:
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-{os.getpid()}-", dir=out.parent))


def _listing(d: Path) -> dict[str, list[int]]:
    out = {}
    for root, _dirs, files in os.walk(d):
        for f in files:
            p = Path(root, f)
            rel = str(p.relative_to(d))
            if rel != MARKER:
                out[rel] = _file_stamp(p)
    return dict(sorted(out.items()))


def _remove_listed(d: Path, marker: dict) -> list[str]:
    """Remove from ``d`` the files ``marker`` lists (unchanged since lowbit wrote them) and the marker,
    then the directories they were in if that leaves them empty; returns what stays."""
    d = Path(os.path.normpath(Path(d).absolute()))
    files: dict = marker.get("files", {})
    for rel, stamp in files.items():
        f = Path(os.path.normpath(d / str(rel)))
        if d not in f.parents or any(p.is_symlink() for p in [f, *f.parents] if d in p.parents or p == d):
            continue
        if f.is_file() and list(stamp) == _file_stamp(f):
            f.unlink()
    (d / MARKER).unlink(missing_ok=True)
    for sub in sorted({Path(os.path.normpath(d / str(rel))).parent for rel in files}, key=lambda p: -len(p.parts)):
        if d in sub.parents and not sub.is_symlink():
            with contextlib.suppress(OSError):
                sub.rmdir()  # only when empty
    with contextlib.suppress(OSError):
        d.rmdir()
    return [str(p.relative_to(d)) for p in d.rglob("*")] if d.exists() else []


@contextlib.contextmanager
def writing_dir(out: str | os.PathLike[str], force: bool = False, kind: str = MODEL_DIR,
                details: dict | None = None) -> Iterator[Path]:
    """Write a directory output: yields a new temporary directory beside ``out`` to fill; when the
    block ends without error, the marker (listing every file written) goes in, the modes are made
    plain and the directory is renamed to ``out``, replacing lowbit's own earlier one with ``force``.
    On an error in the block the temporary directory is removed and ``out`` is untouched; when ``out``
    turns out, at the end, not to be replaceable, the finished directory is kept and the error names it."""
    out = Path(out)
    check_output(out, kind, force, option="")
    tmp = _temp_dir_beside(out)
    try:
        yield tmp
        readable_modes(tmp)
        marker = {"lowbit_output": 2, "kind": kind, "lowbit": __version__, **(details or {}), "files": _listing(tmp)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        os.chmod(tmp / MARKER, 0o666 & ~_umask())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a new directory of this block's own: nothing else is in it
        raise
    try:
        _swap_in(tmp, out, kind, force)
    except LowbitError as exc:
        raise LowbitError(f"{exc}; the finished output is kept as {tmp}") from None


def _swap_in(tmp: Path, out: Path, kind: str, force: bool) -> None:
    check_output(out, kind, force, option="")  # again: it may have changed during the work
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    old_marker = dir_marker(out) or {"files": {}}
    trash = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(out, trash)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(trash, out)
        raise
    left = _remove_listed(trash, old_marker)
    if left:
        print(f"lowbit: kept {trash}: it holds files lowbit did not write ({', '.join(left[:5])})", file=sys.stderr)


def commit_file(tmp: Path, out: Path, kind: str, force: bool = False, replace_own: bool = False) -> None:
    """Rename the finished temporary file ``tmp`` to ``out`` after checking ``out`` again (it may have
    appeared or changed during the work); when it cannot be replaced, ``tmp`` is kept and the error
    names it."""
    try:
        check_output(out, kind, force, option="", replace_own=replace_own)
    except LowbitError as exc:
        raise LowbitError(f"{exc}; the finished output is kept as {tmp}") from None
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        os.replace(tmp, out)
    except OSError as exc:
        raise LowbitError(f"{out}: cannot be replaced ({exc.strerror or exc}); the finished output is kept as "
                          f"{tmp}") from None


@contextlib.contextmanager
def writing_file(out: str | os.PathLike[str], kind: str, force: bool = False, replace_own: bool = False) -> Iterator[Path]:
    """Write a file output: yields a new temporary file beside ``out`` to write; renamed to ``out`` when
    the block ends without error (:func:`commit_file`), removed otherwise.  A report bound for a pipe
    or terminal is written there directly."""
    out = Path(out)
    check_output(out, kind, force, option="", replace_own=replace_own)
    if replace_own and _is_stream(out):
        yield out
        return
    tmp = temp_beside(out)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit_file(tmp, out, kind, force, replace_own)
