"""The names of activation schemes (``w8a8``, ``w4a4``, ``w8a8-static-mse``, ``w8a8-fp8``,
``llm-int8-t6``): what each one asks for, parsed once.  The layers that run them are in
:mod:`lowbit.model.actquant`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.algorithms.observers import OBSERVERS
from lowbit.errors import LowbitError

_WA = re.compile(r"^w(\d)a(\d)(-fp8)?(-static(?:-(minmax|pct|mse))?)?$")
_INT8 = re.compile(r"^llm-int8(?:-t(\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class ActScheme:
    name: str
    w_bits: int
    a_bits: int
    kind: str  # "int", "fp8" or "llm-int8"
    static: bool = False
    observer: str = "minmax"
    threshold: float = 6.0

    @property
    def weight_format(self) -> str:
        return "fp8-e4m3-ch" if self.kind == "fp8" else f"int{self.w_bits}-ch"

    @property
    def wa(self) -> str:
        """Bits of weights and activations, e.g. ``W8A8``; LLM.int8() is W8A8 with FP16 outliers."""
        return f"W{self.w_bits}A{self.a_bits}"

    @property
    def description(self) -> str:
        if self.kind == "llm-int8":
            return (f"LLM.int8(): int8 weights per row and activations per token, input features over "
                    f"{self.threshold:g} in FP16")
        if self.kind == "fp8":
            return "W8A8 FP8 E4M3: weights per channel, activations per token (dynamic)"
        act = (f"static per-tensor int{self.a_bits} activations ({self.observer} observer)" if self.static
               else f"dynamic per-token int{self.a_bits} activations")
        return f"W{self.w_bits}A{self.a_bits}: int{self.w_bits} weights per channel, {act}, integer products"


def parse_act_scheme(name: str) -> ActScheme | None:
    """The activation scheme named ``name``, or None if it names none (a weight-only format)."""
    key = name.strip().lower()
    m = _INT8.match(key)
    if m:
        thr = float(m.group(1)) if m.group(1) else 6.0
        if thr <= 0:
            raise LowbitError(f"'{name}': the LLM.int8() threshold must be positive")
        return ActScheme(key, 8, 8, "llm-int8", threshold=thr)
    m = _WA.match(key)
    if not m:
        return None
    wb, ab = int(m.group(1)), int(m.group(2))
    if not (2 <= wb <= 8 and 2 <= ab <= 8):
        raise LowbitError(f"'{name}': weights and activations take 2 to 8 bits")
    if m.group(3):
        if (wb, ab) != (8, 8) or m.group(4):
            raise LowbitError(f"'{name}': FP8 is W8A8 with dynamic activations only ('w8a8-fp8')")
        return ActScheme(key, 8, 8, "fp8")
    static = bool(m.group(4))
    obs = m.group(5) or "minmax"
    assert obs in OBSERVERS
    return ActScheme(key, wb, ab, "int", static=static, observer=obs)
