"""The package's shape: no import cycles, no module taking another's private names, no Qt outside the viewer.

Every import counts, also those inside functions (a lazy import that closes a cycle still ties the two modules
together), except those under `if TYPE_CHECKING:` (annotations only, never run); read from the source with `ast`,
so nothing is imported to check.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("napari_pathflip", "training")
GUI = ("qtpy", "napari", "PyQt6", "PyQt5", "PySide6", "vispy", "magicgui", "superqt")


def _modules(folders, pattern: str = "**/*.py") -> dict[str, Path]:
    modules = {}
    for folder in folders:
        for path in sorted((ROOT / folder).glob(pattern)):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


MODULES = _modules(PACKAGES)
CONSUMERS = {**MODULES, **_modules(["benchmarks"], "*.py")}  # the scripts, not what they build in benchmarks/_data


def _imports(name: str, path: Path):
    """(imported module, imported name or None) for every import statement of a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for statement in block.body for node in ast.walk(statement)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            yield from ((base, alias.name) for alias in node.names)


def _target(base: str, name: str | None) -> str | None:
    """The project module an import refers to (a submodule when `name` is one), or None for other packages."""
    if name and f"{base}.{name}" in MODULES:
        return f"{base}.{name}"
    while base and base not in MODULES:
        base = base.rpartition(".")[0]
    return base or None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        targets = {_target(base, imported) for base, imported in _imports(name, path)}
        # a package's own __init__ runs before its modules: importing it is not a dependency on its modules
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_the_package():
    graph = _graph()
    assert len(MODULES) > 40 and "napari_pathflip.analysis" in graph
    assert "napari_pathflip.slide" in graph["napari_pathflip.analysis"] | graph["napari_pathflip.extraction"]
    # the checker finds a cycle when there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


@pytest.mark.parametrize("name", sorted(CONSUMERS))
def test_no_module_imports_another_modules_private_names(name):
    private = [f"{base}.{imported}" for base, imported in _imports(name, CONSUMERS[name])
               if imported and imported.startswith("_") and not imported.startswith("__")
               and _target(base, imported) is not None and f"{base}.{imported}" not in MODULES]
    assert private == []


def test_the_core_never_imports_the_gui():
    core = {name: path for name, path in MODULES.items() if not name.startswith("napari_pathflip.viewer")}
    offenders = {name: sorted({base for base, _ in _imports(name, path) if base.split(".")[0] in GUI})
                 for name, path in core.items()}
    assert {name: gui for name, gui in offenders.items() if gui} == {}
