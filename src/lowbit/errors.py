"""Errors that lowbit reports to users as one clear line."""

from __future__ import annotations


class LowbitError(Exception):
    """A problem with the user's input (file, format name, tensor), reported without a traceback."""


class FormatError(LowbitError):
    """A tensor cannot be quantized with the requested format."""


class ModelLoadError(LowbitError):
    """A model file or directory cannot be read."""


def did_you_mean(name: str, candidates: object, n: int = 3) -> str:
    """``"; did you mean 'x'?"`` for the known names closest to ``name`` (empty when none is close)."""
    import difflib

    known = [str(c) for c in candidates]  # type: ignore[attr-defined]
    close = difflib.get_close_matches(str(name).strip().lower(), [k.lower() for k in known], n=n, cutoff=0.6)
    by_lower = {k.lower(): k for k in known}
    if not close:
        return ""
    return "; did you mean " + " or ".join(f"'{by_lower[c]}'" for c in close) + "?"
