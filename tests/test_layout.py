"""Where a concern lives is the folder it is in: each package imports only the layers below it (docs/design.md
"Code layout"), so the foundation loads without the stages, and no two packages import each other."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# package -> the project packages it may import; anything not listed here is a new package to place
LAYERS = {
    "common": set(),
    "clipdata": {"common"},
    "dali_pipelines": {"common", "clipdata"},
    "preprocessing": {"common", "clipdata"},
    "trainer": {"common", "clipdata", "dali_pipelines"},
    "launch": {"common", "clipdata", "dali_pipelines", "trainer"},
    "tools": {"common", "clipdata", "dali_pipelines", "preprocessing", "trainer", "launch"},
}


def _imports(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
    return found & set(LAYERS)


def test_every_package_imports_only_the_layers_below_it():
    wrong = []
    for package, allowed in LAYERS.items():
        for name in sorted(os.listdir(os.path.join(ROOT, package))):
            if name.endswith(".py"):
                bad = _imports(os.path.join(ROOT, package, name)) - allowed - {package}
                wrong += [f"{package}/{name} imports {b}" for b in sorted(bad)]
    assert not wrong, "; ".join(wrong)


def test_every_package_is_placed_in_a_layer():
    packages = {d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))}
    assert packages - {"tests"} == set(LAYERS)
