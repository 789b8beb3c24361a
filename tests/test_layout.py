"""The package layout (README "Layout"): one subpackage per stage of the data flow, each importing only the
stages upstream of it; no import circles; no private name imported across modules; imports of dataworth's
own modules at module level (the CLI alone defers them, so ``dataworth --help`` does not load torch).

The allowed order is written once, here. A stage may import its own modules and any stage in an earlier
layer; stages in one layer are independent of each other.
"""

from __future__ import annotations

import ast
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


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(module: str) -> list[tuple[str, str | None, bool, int]]:
    """``(imported module, imported name or None, at module level?, line)`` for every dataworth import."""
    tree = ast.parse(MODULES[module].read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dataworth":
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                if target in MODULES:  # `from dataworth.x import submodule`
                    found.append((target, None, id(node) in top, node.lineno))
                else:
                    found.append((node.module, alias.name, id(node) in top, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "dataworth":
                    found.append((alias.name, None, id(node) in top, node.lineno))
    return found


def test_every_module_belongs_to_a_stage_of_the_order():
    unknown = sorted(m for m in MODULES if m != "dataworth" and stage(m) not in LAYER)
    assert not unknown, f"modules outside the stage order (add them to LAYERS or move them): {unknown}"


def test_imported_modules_exist():
    missing = [(m, target) for m in MODULES for target, _, _, _ in imports(m) if target not in MODULES]
    assert not missing


def test_stages_import_only_upstream_stages():
    wrong = []
    for module in MODULES:
        if module == "dataworth":
            continue
        for target, _, _, line in imports(module):
            if target == "dataworth" or stage(target) == stage(module):
                continue
            if LAYER[stage(target)] >= LAYER[stage(module)]:
                wrong.append(f"{module}:{line} imports {target} ({stage(target)} is not upstream of {stage(module)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    graph = {m: {t for t, _, _, _ in imports(m) if t in MODULES and t != m} for m in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            circle = visit(module, [])
            assert circle is None, " -> ".join(circle[circle.index(circle[-1]):])


def test_no_private_name_is_imported_across_modules():
    private = [f"{m}:{line} imports {name} from {target}" for m in MODULES
               for target, name, _, line in imports(m) if name is not None and name.startswith("_")]
    assert not private, "\n".join(private)


def test_imports_of_dataworth_modules_are_at_module_level_outside_the_cli():
    deferred = [f"{m}:{line} imports {target} inside a function" for m in MODULES if stage(m) != "cli"
                for target, _, top, line in imports(m) if not top]
    assert not deferred, "\n".join(deferred)


@pytest.mark.parametrize("name", sorted(dataworth._API))
def test_public_names_live_in_stage_modules(name):
    assert dataworth._API[name] in MODULES and stage(dataworth._API[name]) in LAYER


def test_docs_api_indexes_every_module():
    text = (PACKAGE.parent.parent / "docs" / "api.md").read_text(encoding="utf-8")
    listed = set(re_module_headings(text))
    missing = sorted(m for m in MODULES if m != "dataworth" and stage(m) not in ("cli", "__main__") and m not in listed)
    assert not missing, f"docs/api.md has no '### `module` — …' line for {missing}"


def re_module_headings(text: str) -> list[str]:
    import re

    return re.findall(r"^### `(dataworth[\w.]*)` — ", text, flags=re.M)
