"""The package's modules import each other without a cycle (imports inside functions included:
a deferred import is how a cycle hides). Read from the source with ast, so it needs no build."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "centroidkv"


def module_name(path: Path) -> str:
    parts = ("centroidkv",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str], missing: Optional[list] = None) -> set[str]:
    """The package's modules that `path` imports, anywhere in the file (an import of the package
    that names no module of it goes to `missing`)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from mod import name` the module.
            subs = {f"{base}.{alias.name}" for alias in node.names} & known
            found.update(subs or {base})
    if missing is not None:
        missing.extend(f"{name} imports {m}" for m in found if m.split(".")[0] == "centroidkv" and m not in known)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, known) for p in paths}


def find_cycle(graph: dict[str, set[str]]):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_policies_form_one_package():
    graph = import_graph()
    assert {"centroidkv.policies.base", "centroidkv.policies.plain", "centroidkv.policies.protected",
            "centroidkv.policies.protection", "centroidkv.policies.cluster_budget"} <= set(graph)
    assert "centroidkv.policies.protection" in graph["centroidkv.policies.protected"]
    assert "centroidkv.policies.base" in graph["centroidkv.policies.plain"]


def test_no_import_cycle():
    # the package __init__ imports its submodules; a submodule importing the package (`from ..
    # import backend` names a module, not the package) would be the cycle this finds.
    assert find_cycle(import_graph()) is None


def test_every_import_of_the_package_names_a_module():
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    missing = []
    for path in paths:
        imported_modules(path, known, missing)
    assert missing == []


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
