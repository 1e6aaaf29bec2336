"""The package's layering, read from the source: every module imports only from its own layer or below, and no
module imports itself through a cycle (lazy imports inside functions count too: they are cycles waiting for a
refactor to hoist them)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "inc_ipamp"

#: the layers, bottom first: a module (or package) imports only from its own layer or below. A new module must be
#: placed here (docs/DESIGN.md lists the same order).
LAYERS = [
    ("__init__", "errors", "io", "formats", "ops", "models", "data", "runtime"),
    ("records", "lossmodel", "moe"),
    ("export", "synthetic", "distributed"),  # export: plan -> config translations, no model code
    ("apply",),  # every way a plan is put on a model
    ("gains", "sensitivity", "partition", "solver", "kvcache"),
    ("evaluate", "baselines", "tasks", "report"),
    ("pipeline",),
    ("cli", "inc", "inc2"),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


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


def test_every_module_imports_only_its_layer_or_below():
    def layer(mod: str) -> int:
        top = (mod.split(".") + ["__init__"])[1]
        assert top in LAYER, f"{mod} has no layer in tests/test_layering.py LAYERS"
        return LAYER[top]

    up = [(m, d) for m, deps in _imports().items() for d in deps if layer(d) > layer(m)]
    assert not up, f"imports from a higher layer: {up}"


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
