"""Every name ``--format`` takes, in one place: lowbit's tensor formats, llama.cpp's file types and
the activation schemes; what each one is, and a "did you mean" for names that are none of them."""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import FormatError, did_you_mean
from lowbit.formats import Format, get_format, list_formats
from lowbit.model.actscheme import ActScheme, parse_act_scheme
from lowbit.model.gguf_mix import FILE_TYPES, FileType, file_type

#: activation schemes, as ``lowbit formats`` lists them (each names a family of settings)
ACT_EXAMPLES = ("w8a8", "w4a8", "w4a4", "w8a8-static", "w8a8-static-pct", "w8a8-static-mse", "w8a8-fp8", "llm-int8")
#: members of the format families, for suggestions
FAMILY_EXAMPLES = ("int8", "int8-ch", "int4-g128", "int4-asym-g128", "int4-g64", "int4-asym-g64", "int4-g32",
                   "int3-asym-g128", "int3-asym-g64", "int2-asym-g64", "int4-asym-g128-clip", "spqr3-g16", "spqr4-g16")


@dataclass(frozen=True)
class Scheme:
    """What a ``--format`` name is: exactly one of a tensor format, a file type, an activation scheme."""

    name: str
    format: Format | None = None
    file_type: FileType | None = None
    act: ActScheme | None = None

    @property
    def kind(self) -> str:
        return "activation scheme" if self.act else ("llama.cpp file type" if self.file_type else "tensor format")


def known_names() -> list[str]:
    names = [n for n in list_formats() if "<" not in n]
    return list(dict.fromkeys([*names, *FILE_TYPES, *ACT_EXAMPLES, *FAMILY_EXAMPLES]))


def unknown(name: str, what: str = "format") -> FormatError:
    return FormatError(f"unknown {what} '{name}'{did_you_mean(name, known_names())} (`lowbit formats` lists them all)")


def resolve_scheme(name: str) -> Scheme:
    """The scheme a ``--format`` name stands for, or one clear error (with a suggestion)."""
    key = str(name).strip().lower()
    act = parse_act_scheme(key)
    if act is not None:
        return Scheme(act.name, act=act)
    ft = file_type(key)
    if ft is not None:
        fmt = None
        try:
            fmt = get_format(key)
        except FormatError:
            pass
        return Scheme(ft.name, format=fmt, file_type=ft)
    try:
        fmt = get_format(key)
    except FormatError as exc:
        if str(exc).startswith("unknown format"):
            raise unknown(name) from None
        raise
    return Scheme(fmt.name, format=fmt)
