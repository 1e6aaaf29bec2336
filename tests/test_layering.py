"""The package's layering, read from the source: no import cycles, and the homes that sit low import nothing above
them (lazy imports inside functions count too: they are cycles waiting for a refactor to hoist them)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "inc_ipamp"

#: home -> packages/modules it must never import (they sit above it)
BELOW = {
    "inc_ipamp.apply": ("inc_ipamp.gains", "inc_ipamp.evaluate", "inc_ipamp.pipeline", "inc_ipamp.inc",
                        "inc_ipamp.solver", "inc_ipamp.cli", "inc_ipamp.tasks"),
    "inc_ipamp.export": ("inc_ipamp.apply", "inc_ipamp.gains", "inc_ipamp.evaluate", "inc_ipamp.pipeline",
                         "inc_ipamp.inc", "inc_ipamp.cli"),
    "inc_ipamp.records": ("inc_ipamp.solver", "inc_ipamp.pipeline", "inc_ipamp.gains", "inc_ipamp.apply"),
}


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the inc_ipamp modules it imports (relative or absolute, anywhere but under TYPE_CHECKING)."""
    mods = {_name(p): p for p in ROOT.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
                       for n in ast.walk(node)}
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for n in ast.walk(tree):
            if not isinstance(n, ast.ImportFrom) or id(n) in typing_only:
                continue
            if n.level:
                base = pkg.split(".")[: len(pkg.split(".")) - n.level + 1]
                target = ".".join(base + ([n.module] if n.module else []))
            else:
                target = n.module or ""
            subs = {f"{target}.{a.name}" for a in n.names} & mods.keys()
            deps |= (subs or {target}) & mods.keys()
        out[mod] = deps - {mod}
    return out


def test_homes_import_nothing_above_them():
    def under(mod: str, pkg: str) -> bool:
        return mod == pkg or mod.startswith(pkg + ".")

    bad = [(m, d) for m, deps in _imports().items() for home, above in BELOW.items() if under(m, home)
           for d in deps if any(under(d, a) for a in above)]
    assert not bad, bad


def test_no_import_cycles():
    """No module reaches itself through its imports (package ``__init__`` re-exports included)."""
    graph = _imports()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    cyclic = [m for m in graph if m in reach(m)]
    assert not cyclic, f"modules that import themselves through a cycle: {cyclic}"
