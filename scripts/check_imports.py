"""lowbit's import contract, checked from the source (no import is executed).

1. Layers point one way: errors (and env) < formats < algorithms < kernels < model < io < eval < cli (the package's
   ``__init__`` is the public face, above them all). A module may import its own layer and the ones below.
2. No cycles between modules, counting imports inside functions too.
3. No private name crosses a module: ``from lowbit.x import _y`` or ``x._y`` where ``_y`` is defined in
   another lowbit module and not in the importing one.

Prints every violation, one per line, and exits 1 if there is any; ``--stats`` also counts imports made
inside functions. Run: ``python scripts/check_imports.py [src/lowbit]``.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

#: the layers, lowest first; the first holds lowbit.errors and lowbit.env (version, cache directory)
LAYERS = ["errors", "formats", "algorithms", "kernels", "model", "io", "eval", "cli", ""]
FOUNDATION = {"errors", "env"}
PACKAGE = "lowbit"


@dataclass
class Module:
    name: str  # dotted, e.g. lowbit.model.load
    path: Path
    tree: ast.Module
    imports: list[tuple[str, int, bool]] = field(default_factory=list)  # (module, line, inside a function)
    private_uses: list[tuple[str, int]] = field(default_factory=list)  # (name, line)
    defined: set[str] = field(default_factory=set)


def layer_of(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else ""
    if key in FOUNDATION:
        return 0
    return LAYERS.index(key) if key in LAYERS else LAYERS.index("")


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def collect(root: Path) -> dict[str, Module]:
    mods: dict[str, Module] = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(root, path)
        mods[name] = Module(name, path, ast.parse(path.read_text(), filename=str(path)))
    for mod in mods.values():
        is_pkg = mod.path.name == "__init__.py"
        func_lines: set[int] = set()
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Import | ast.ImportFrom):
                        func_lines.add(id(sub))
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                mod.defined.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                mod.defined.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                mod.defined.add(node.attr)
            elif isinstance(node, ast.arg):
                mod.defined.add(node.arg)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        mod.imports.append((alias.name, node.lineno, id(node) in func_lines))
            elif isinstance(node, ast.ImportFrom):
                target = resolve(mod.name, is_pkg, node)
                if target.split(".")[0] != PACKAGE:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    # "from lowbit.model import load" names a module; "from lowbit.model.load import f" a name
                    dest = sub if sub in mods else target
                    mod.imports.append((dest, node.lineno, id(node) in func_lines))
                    if alias.name.startswith("_") and not alias.name.startswith("__") and dest != mod.name:
                        mod.private_uses.append((f"{target}.{alias.name}", node.lineno))
    return mods


def private_attributes(mods: dict[str, Module]) -> list[str]:
    """``obj._name`` where ``_name`` is defined only in other lowbit modules."""
    owners: dict[str, set[str]] = {}
    for mod in mods.values():
        for name in mod.defined:
            if name.startswith("_") and not name.startswith("__"):
                owners.setdefault(name, set()).add(mod.name)
    out = []
    for mod in mods.values():
        for node in ast.walk(mod.tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            where = owners.get(node.attr)
            if where and mod.name not in where:
                out.append(f"{mod.path}:{node.lineno}: private name {node.attr} of {', '.join(sorted(where))}")
    return out


def cycles(mods: dict[str, Module]) -> list[list[str]]:
    graph = {m: sorted({t for t, _, _ in mod.imports if t in mods and t != m}) for m, mod in mods.items()}
    # a package's __init__ re-exporting its modules is not a cycle with them: drop package -> child edges
    for m in graph:
        graph[m] = [t for t in graph[m] if not t.startswith(m + ".")]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def check(root: Path, stats: bool = False) -> list[str]:
    mods = collect(root)
    problems = []
    for mod in mods.values():
        here = layer_of(mod.name)
        for target, line, _ in mod.imports:
            if layer_of(target) > here:
                problems.append(f"{mod.path}:{line}: upward import {mod.name} -> {target}")
        for name, line in mod.private_uses:
            problems.append(f"{mod.path}:{line}: private import {name}")
    problems += private_attributes(mods)
    for comp in cycles(mods):
        problems.append(f"cycle: {' <-> '.join(comp)}")
    if stats:
        inner = sum(1 for mod in mods.values() for *_, f in mod.imports if f)
        print(f"{len(mods)} modules, {sum(len(m.imports) for m in mods.values())} lowbit imports, "
              f"{inner} inside functions")
    return problems


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    root = Path(args[0] if args else Path(__file__).resolve().parents[1] / "src" / PACKAGE)
    problems = check(root, stats="--stats" in argv)
    for p in problems:
        print(p)
    print(f"import contract: {len(problems)} violation(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
