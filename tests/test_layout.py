"""The package layout (README "Layout"): one subpackage per stage of the data flow, each importing only the
stages upstream of it; no import circles; no private name imported across modules; imports of dataworth's
own modules at module level (the CLI alone defers them, so ``dataworth --help`` stays light).

The allowed order is written once, here (`LAYERS`). A stage may import its own modules and any stage in an
earlier layer; stages in one layer are independent of each other. `layout_problems` reads a package's
source with `ast` (nothing is imported), so the same checks run on a small broken package to show that
each of them fails when it should.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import dataworth

PACKAGE = Path(dataworth.__file__).parent

LAYERS = [
    {"errors"},
    {"util"},
    {"distributed"},
    {"data"},
    {"model"},
    {"store"},  # the on-disk format: written by gradients, read by influence, knows nothing of models
    {"gradients"},
    {"influence"},
    {"evaluation", "reports", "selection"},
    {"demo"},
    {"cli"},
    {"__main__"},
]
LAYER = {stage: i for i, layer in enumerate(LAYERS) for stage in layer}
DEFERRING_STAGES = {"cli"}  # command bodies import lazily: `--help` must not load torch


def modules_of(package: Path) -> dict[str, Path]:
    """``{dotted module name: path}`` for every ``.py`` file of the package directory."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(path: Path, modules: dict[str, Path], root: str) -> list[tuple[str, str | None, bool, int]]:
    """``(imported module, imported name or None, at module level?, line)`` for every import of ``root``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == root:
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                if target in modules:  # `from pkg.x import submodule`
                    found.append((target, None, id(node) in top, node.lineno))
                else:
                    found.append((node.module, alias.name, id(node) in top, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == root:
                    found.append((alias.name, None, id(node) in top, node.lineno))
    return found


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle ``[a, b, …, a]`` of the module graph, or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path + [node, nxt]
                return cycle[cycle.index(nxt):]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            circle = visit(module, [])
            if circle:
                return circle
    return None


def layout_problems(package: Path) -> dict[str, list[str]]:
    """Every violation of the layout rules in ``package``, by rule (empty lists: none)."""
    root = package.name
    modules = modules_of(package)
    found = {module: imports(path, modules, root) for module, path in modules.items()}
    problems: dict[str, list[str]] = {"unknown stage": [], "missing module": [], "downstream": [], "circle": [],
                                      "private": [], "deferred": []}
    for module in modules:
        if module != root and stage(module) not in LAYER:
            problems["unknown stage"].append(module)
    for module, items in found.items():
        for target, name, top, line in items:
            where = f"{module}:{line}"
            if target not in modules:
                problems["missing module"].append(f"{where} imports {target}")
                continue
            if name is not None and name.startswith("_"):
                problems["private"].append(f"{where} imports {name} from {target}")
            if not top and stage(module) not in DEFERRING_STAGES and module != root:
                problems["deferred"].append(f"{where} imports {target} inside a function")
            if module == root or target == root or stage(target) == stage(module):
                continue
            if stage(module) in LAYER and stage(target) in LAYER and LAYER[stage(target)] >= LAYER[stage(module)]:
                problems["downstream"].append(f"{where} imports {target} ({stage(target)} is not upstream of "
                                              f"{stage(module)})")
    graph = {m: {t for t, _, _, _ in items if t in modules and t != m} for m, items in found.items()}
    circle = find_circle(graph)
    if circle:
        problems["circle"].append(" -> ".join(circle))
    return problems


PROBLEMS = layout_problems(PACKAGE)


@pytest.mark.parametrize("rule", sorted(PROBLEMS))
def test_the_package_keeps_the_layout_rule(rule):
    assert not PROBLEMS[rule], "\n".join(PROBLEMS[rule])


def test_each_rule_catches_its_violation(tmp_path):
    """A small package breaking every rule once: each check must report exactly that breach."""
    pkg = tmp_path / "dataworth"
    files = {
        "__init__.py": "",
        "errors.py": "",
        "util.py": "from dataworth.errors import _hidden\n",                          # private name
        "data/__init__.py": "",
        "data/rows.py": "from dataworth.model.load import load_model\n",             # downstream
        "model/__init__.py": "",
        "model/load.py": ("from dataworth.model.train import train\n"
                          "def load_model():\n    from dataworth.errors import InputError\n"),  # deferred
        "model/train.py": "from dataworth.model.load import load_model\n",           # circle with load
        "extras/__init__.py": "from dataworth.nowhere import x\n",                   # unknown stage, missing
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    problems = layout_problems(pkg)
    assert problems["private"] == ["dataworth.util:1 imports _hidden from dataworth.errors"]
    assert problems["downstream"] == ["dataworth.data.rows:1 imports dataworth.model.load (model is not upstream "
                                      "of data)"]
    assert problems["deferred"] == ["dataworth.model.load:3 imports dataworth.errors inside a function"]
    assert problems["circle"] == ["dataworth.model.load -> dataworth.model.train -> dataworth.model.load"]
    assert problems["unknown stage"] == ["dataworth.extras"]
    assert problems["missing module"] == ["dataworth.extras:1 imports dataworth.nowhere"]


@pytest.mark.parametrize("name", sorted(dataworth._API))
def test_public_names_live_in_stage_modules(name):
    assert dataworth._API[name] in modules_of(PACKAGE) and stage(dataworth._API[name]) in LAYER


def test_docs_api_indexes_every_module():
    text = (PACKAGE.parent.parent / "docs" / "api.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^### `(dataworth[\w.]*)` — ", text, flags=re.M))
    missing = sorted(m for m in modules_of(PACKAGE)
                     if m != "dataworth" and stage(m) not in ("cli", "__main__") and m not in listed)
    assert not missing, f"docs/api.md has no '### `module` — …' line for {missing}"
