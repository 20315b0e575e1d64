"""The package's shape: no import circle, small modules, the wings the README names."""

from __future__ import annotations

from pathlib import Path

import grimp

import rolebus

SRC = Path(rolebus.__file__).parent
WINGS = {"wire", "nats", "team", "flows", "handlers", "worker", "history", "web", "cli", "testing"}


def test_no_module_imports_itself_through_others() -> None:
    graph = grimp.build_graph("rolebus")
    circles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            # A package's __init__ importing its own modules is not a circle.
            if imported.startswith(module + "."):
                continue
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back is not None and not module.startswith(imported + "."):
                circles.append((module, *back))
    assert circles == []


def test_the_wings_are_the_folders() -> None:
    folders = {path.name for path in SRC.iterdir() if (path / "__init__.py").exists()}
    assert folders == WINGS


def test_no_module_is_over_the_size_guide() -> None:
    sizes = {
        str(path.relative_to(SRC)): len(path.read_text(encoding="utf-8").splitlines())
        for path in SRC.rglob("*.py")
    }
    assert {name: lines for name, lines in sizes.items() if lines > 500} == {}
