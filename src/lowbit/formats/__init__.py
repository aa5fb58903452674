"""Formats: a tensor in, codes and scales out, and back.

Every module in this package registers its formats on import; adding a format is adding a file
here and naming it in ``_MODULES``.
"""

from __future__ import annotations

from importlib import import_module

from lowbit.formats.base import Format, QTensor, get_format, list_formats, register, register_family

_MODULES = ("floats", "integer", "nf4", "gguf_legacy")
for _m in _MODULES:
    import_module(f"lowbit.formats.{_m}")

__all__ = ["Format", "QTensor", "get_format", "list_formats", "register", "register_family"]
