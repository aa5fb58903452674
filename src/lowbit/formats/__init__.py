"""Formats: a tensor in, codes and scales out, and back.

Every module in this package registers its formats on import, and every module here is imported:
adding a format is adding one file.
"""

from __future__ import annotations

import pkgutil
from importlib import import_module

from lowbit.formats.base import (
    Format,
    QTensor,
    exact_formats,
    family_info,
    get_format,
    list_formats,
    register,
    register_family,
    registry_version,
)

_MODULES = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
for _m in _MODULES:
    import_module(f"lowbit.formats.{_m}")

__all__ = ["Format", "QTensor", "exact_formats", "family_info", "get_format", "list_formats", "register", "register_family",
           "registry_version"]
