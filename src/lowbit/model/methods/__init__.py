"""Quantization methods, one module each; every module here registers its method on import.

    from lowbit.model.methods import get_method, list_methods
    get_method("gptq").check_format(get_format("q4_0"), "blk.0.attn_q.weight")
"""

from __future__ import annotations

import pkgutil
from importlib import import_module

from lowbit.model.methods.base import (
    CalibConfig,
    LayerLog,
    LinearResult,
    Method,
    RunInputs,
    get_method,
    list_methods,
    register_method,
)

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.startswith("_")):
    import_module(f"lowbit.model.methods.{_m}")

__all__ = ["CalibConfig", "LayerLog", "LinearResult", "Method", "RunInputs", "get_method", "list_methods",
           "register_method"]
