"""The import contract (scripts/check_imports.py): layers point one way, no cycles, no private names
across modules; and the checker itself catches each kind of violation."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_imports", ROOT / "scripts" / "check_imports.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["check_imports"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_lowbit_keeps_its_import_contract():
    problems = _checker().check(ROOT / "src" / "lowbit")
    assert problems == []


def test_the_checker_finds_upward_imports_cycles_and_private_names(tmp_path):
    pkg = tmp_path / "lowbit"
    for d in ("formats", "model", "eval"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("class E(Exception):\n    pass\n")
    (pkg / "formats" / "a.py").write_text("from lowbit.model.b import f\n")  # formats -> model: upward
    (pkg / "model" / "b.py").write_text("from lowbit.model.c import _g\n\ndef f():\n    return _g()\n")
    (pkg / "model" / "c.py").write_text("def _g():\n    from lowbit.model.b import f\n    return f\n")  # cycle b <-> c
    (pkg / "eval" / "d.py").write_text("from lowbit.model import c\n\ndef h():\n    return c._g()\n")
    problems = _checker().check(pkg)
    text = "\n".join(problems)
    assert "upward import lowbit.formats.a -> lowbit.model.b" in text
    assert "private import lowbit.model.c._g" in text
    assert "private name _g of lowbit.model.c" in text
    assert "cycle: lowbit.model.b <-> lowbit.model.c" in text
    assert len(problems) == 4
