"""The directory layouts other engines load (``--out-format``), each declared by its own module.

An export module (``export_*.py`` in this package) registers an :class:`Export`: its name, what it
holds, a ``check(fmt, layers)`` that says before any work whether a format fits the layout on a
model's linear layers (``{name: (rows, cols)}``), and the function that writes a quantized model.
The command line takes its ``--out-format`` choices and its checks from here.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from lowbit.errors import LowbitError, did_you_mean
from lowbit.formats import Format


@dataclass(frozen=True)
class Export:
    name: str
    description: str
    check: Callable[[Format, dict[str, tuple[int, int]]], None]
    write: Callable[..., Path]  # write(loaded, out, force=False) -> out


_EXPORTS: dict[str, Export] = {}
_SCANNED = False


def register_export(export: Export) -> Export:
    if export.name in _EXPORTS:
        raise ValueError(f"export {export.name} registered twice")
    _EXPORTS[export.name] = export
    return export


def _load() -> dict[str, Export]:
    # Import every export module once, even when one of them was imported on its own before.
    global _SCANNED
    if not _SCANNED:
        import lowbit.io as pkg

        for m in sorted(x.name for x in pkgutil.iter_modules(pkg.__path__) if x.name.startswith("export_")):
            import_module(f"lowbit.io.{m}")
        _SCANNED = True
    return _EXPORTS


def export_names() -> list[str]:
    return list(_load())


def get_export(name: str) -> Export:
    exports = _load()
    if name not in exports:
        raise LowbitError(f"unknown export layout '{name}'{did_you_mean(name, exports)} "
                          f"(known: {', '.join(exports)})")
    return exports[name]


def group_divides(fmt: Format, layers: dict[str, tuple[int, int]], layout: str, group: int) -> None:
    """Refuse a group size that does not divide every layer's input features (``layout`` names the
    export in the message)."""
    for n, (_rows, cols) in layers.items():
        if group > 0 and cols % group:
            raise LowbitError(f"{fmt.name}: {n} has {cols} input features, not a multiple of the group size {group}; "
                              f"{layout} has no shorter last group (use a group size that divides every layer's "
                              "input features)")


def export(loaded, out: str | Path, layout: str, force: bool = False) -> Path:  # type: ignore[no-untyped-def]
    """Write ``loaded`` (a model lowbit quantized in memory, or what :func:`lowbit.load_model` returns)
    in the layout ``layout`` (``compressed-tensors``, ``bitsandbytes``, ``gptq``, ``awq``) to the
    directory ``out``; an existing ``out`` is replaced only with ``force`` and only when lowbit wrote it."""
    return get_export(layout).write(loaded, Path(out), force=force)
