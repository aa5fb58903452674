"""What every layer may know of lowbit's surroundings: its version, where it caches files, and how
it writes one (atomically)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__version__ = "0.1.0"


def cache_dir() -> Path:
    """lowbit's cache (converted models, text digests, sensitivities): ``$LOWBIT_CACHE`` or
    ``~/.cache/lowbit``, created on first use."""
    d = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary file beside ``target`` (hidden, this process's own) to write; renamed over
    ``target`` when the block ends, removed if it raises: no reader ever sees a half-written file.
    For lowbit's own files (its cache); a user's outputs go through :mod:`lowbit.io.outputs`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
