"""lowbit's compiled CPU kernels (``csrc/``), built once with torch's C++ extension builder.

``scripts/install.sh`` builds them (``python -m lowbit.kernels.native``).  A module is named by a
hash of its sources, its flags and the torch version, so a changed source or torch builds anew and
an unchanged one is imported directly.  Builds go to ``LOWBIT_KERNEL_DIR`` when set, else beside the
package when that is writable, else ``~/.cache/lowbit/kernels``.  Where no compiler is found the
kernels are unavailable and the backends that need them take nothing (the reference takes over).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import shutil
import sys
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))
#: what the build's name is a hash of: the sources and the headers they include
HASHED = sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h"))
#: -fopenmp: at::parallel_for is inline and runs on OpenMP in torch's CPU builds; without the flag its
#: pragma is ignored and every kernel runs on one thread.  The module links the libgomp torch has
#: loaded (same soname), so torch.set_num_threads governs it.
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def _key() -> str:
    h = hashlib.sha256()
    for src in HASHED:
        h.update(src.name.encode())
        h.update(src.read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:12]


def build_root() -> Path:
    env = os.environ.get("LOWBIT_KERNEL_DIR")
    if env:
        return Path(env)
    here = Path(__file__).parent / "_build"
    try:
        here.mkdir(exist_ok=True)
        if os.access(here, os.W_OK):
            return here
    except OSError:
        pass
    return Path.home() / ".cache" / "lowbit" / "kernels"


def _import(name: str, so: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, so)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(verbose: bool = False) -> ModuleType:
    """Import the compiled kernels, building them first where they are not built yet."""
    name = f"lowbit_cpu_{_key()}"
    d = build_root() / name
    so = d / f"{name}.so"
    if so.exists():
        return _import(name, so)
    d.mkdir(parents=True, exist_ok=True)
    for old in build_root().glob("lowbit_cpu_*"):  # builds of earlier sources (lowbit's own)
        if old.is_dir() and old != d:
            shutil.rmtree(old, ignore_errors=True)
    from torch.utils import cpp_extension

    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink if not verbose else sys.stdout):
        warnings.simplefilter("ignore")
        return cpp_extension.load(name, [str(s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, build_directory=str(d),
                                  verbose=verbose)


@cache
def cpu_kernels() -> ModuleType | None:
    """The compiled CPU kernels, or None where they cannot be built here."""
    try:
        return build()
    except Exception:  # no compiler, no ninja, a failed build: the kernels are unavailable
        return None


def loaded_kernels() -> ModuleType:
    """The compiled CPU kernels, for a kernel object built where they were available.  Kernels look
    them up at each call instead of holding the module, so that a model that ran on its kernels stays
    copyable and picklable (a model is deep-copied and saved with its layers' kernels)."""
    lib = cpu_kernels()
    assert lib is not None  # a kernel is only built where the library is
    return lib


if __name__ == "__main__":
    mod = build(verbose="-v" in sys.argv)
    print(f"lowbit CPU kernels: {mod.__file__} ({mod.simd()})")
