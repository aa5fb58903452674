"""Evaluation and calibration text.

The default text is the 107 real Wikipedia articles that the ``gensim`` wheel ships (its test data):
extracted with gensim's own wiki parser, cleaned of leftover markup, and split *by article* into a
calibration part (every 8th article) and an evaluation part (the rest), so the two never overlap.
Users can pass any UTF-8 text file instead.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import os
import re
from pathlib import Path

from lowbit.env import atomic_path, cache_dir
from lowbit.errors import LowbitError

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CALIBRATION_EVERY = 8


def _clean(text: str) -> str:
    text = re.sub(r"'{2,}", "", text)  # bold / italic quotes
    text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", lambda m: f"{m.group(1)} {m.group(2)} {m.group(1)}", text, flags=re.M)
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # parentheses emptied by template removal
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def wiki_articles() -> list[tuple[str, str]]:
    """(title, cleaned text) of every non-redirect article in gensim's bundled Wikipedia dump."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise LowbitError("the default evaluation text needs the gensim package (pip install gensim)")
    path = Path(spec.origin).parent / WIKI_FILE
    if not path.is_file():
        raise LowbitError(f"{path}: gensim's Wikipedia test file is missing")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    out = []
    with bz2.open(path) as fh:
        for title, raw, _ in extract_pages(fh, filter_namespaces=("0",)):
            if raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            out.append((title, _clean(filter_wiki(raw))))
    return out


def _cached(name: str, make) -> str:  # type: ignore[no-untyped-def]
    f = cache_dir() / name
    if f.is_file():
        return f.read_text(encoding="utf-8")
    text = make()
    with atomic_path(f) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return text


def _split(part: str) -> str:
    arts = wiki_articles()
    keep = [(t, x) for i, (t, x) in enumerate(arts) if (i % CALIBRATION_EVERY == CALIBRATION_EVERY - 1) == (part == "calib")]
    return "\n\n".join(f" = {t} = \n\n{x}" for t, x in keep)


def eval_text() -> str:
    """The evaluation part of the bundled Wikipedia text (about 2.7 MB)."""
    return _cached("wiki-eval-v1.txt", lambda: _split("eval"))


def calibration_text() -> str:
    """The calibration part (every 8th article); disjoint from :func:`eval_text`."""
    return _cached("wiki-calib-v1.txt", lambda: _split("calib"))


def read_text_file(path: str | os.PathLike[str]) -> str:
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"{p}: no such text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LowbitError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise LowbitError(f"{p}: the text file is empty")
    return text


def check_text_length(path: str | os.PathLike[str], text: str, n_ctx: int, option: str = "--text") -> None:
    """Refuse, before any model is loaded, a text too short for one context of ``n_ctx`` tokens: a
    token of a byte-level or byte-fallback tokenizer covers at least one byte, so a text of fewer
    bytes than ``n_ctx`` - 1 (a BOS token may be added) has fewer tokens than a context."""
    n_bytes = len(text.encode("utf-8"))
    if n_bytes + 1 < n_ctx:
        raise LowbitError(f"{option} {path}: {n_bytes} bytes, so at most {n_bytes + 1} tokens: fewer than one "
                          f"context of {n_ctx} tokens (give a longer text or a smaller context)")


def too_short(source: str, n_tokens: int, n_ctx: int, what: str = "context") -> LowbitError:
    """The error for a text of ``n_tokens`` tokens that holds no whole ``what`` of ``n_ctx`` tokens."""
    return LowbitError(f"{source}: {n_tokens} tokens, fewer than one {what} of {n_ctx} tokens "
                       "(give a longer text or a smaller context)")


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def files_digest(paths: list[Path]) -> str:
    """SHA-256 over the contents of ``paths`` (a model's files), remembered in lowbit's cache by each
    file's path, size and modification time so that a file is read only once."""
    import json

    memo_file = cache_dir() / "digests.json"
    try:
        memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
    except (OSError, ValueError):
        memo = {}
    h = hashlib.sha256()
    changed = False
    for p in sorted(Path(x).resolve() for x in paths):
        st = p.stat()
        key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
        d = memo.get(key)
        if d is None:
            fh_hash = hashlib.sha256()
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):  # noqa: B023
                    fh_hash.update(block)
            d = memo[key] = fh_hash.hexdigest()
            changed = True
        h.update(d.encode())
    if changed:
        with atomic_path(memo_file) as tmp:
            tmp.write_text(json.dumps(memo))
    return h.hexdigest()
