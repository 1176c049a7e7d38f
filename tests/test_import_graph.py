"""The import graph of the m3d package (`m3d/` and the folders mapped into it: `pipelines/`,
`dataset_builder/`, `model_cards/`): no cycles, and library code never imports the entry points (`m3d.cli`,
`m3d.build`, `m3d.demo`, the `m3d.train` scripts), which sit at the top of the graph."""

import ast
import tomllib
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("m3d.cli", "m3d.build", "m3d.demo", "m3d.train")


def package_folders(repository: Path = REPOSITORY) -> dict[Path, str]:
    """Each folder of the distribution's top packages and its import name, as pyproject.toml maps them."""
    mapped = tomllib.loads((repository / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {repository / "m3d": "m3d", **{repository / folder: name for name, folder in mapped.items()}}


PACKAGES = package_folders()


def module_name(path: Path) -> str:
    for folder, name in PACKAGES.items():
        if path.is_relative_to(folder):
            parts = (*name.split("."), *path.relative_to(folder).with_suffix("").parts)
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(f"{path} is in none of {list(PACKAGES)}")


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The m3d modules ``path`` imports, at module level or inside functions (lazy imports are still
    dependencies), leaving out ``if TYPE_CHECKING:`` blocks (annotations only)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking(node):
            return
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{alias.name}" for alias in node.names]
            # `from . import sibling` needs the sibling only: its own package (an ancestor) is importing it already
            siblings_only = name.startswith(target + ".") and all(n in modules for n in names)
            targets = names if siblings_only else [target, *names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        found.update(t for t in targets if t in modules and t != name)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for folder in PACKAGES for p in folder.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_library_code_never_imports_an_entry_point():
    def is_entry(module: str) -> bool:
        return any(module == e or module.startswith(e + ".") for e in ENTRY_POINTS)

    offending = {
        name: sorted(filter(is_entry, targets))
        for name, targets in import_graph().items()
        if not is_entry(name) and any(map(is_entry, targets))
    }
    assert offending == {}


def test_the_checks_see_a_cycle_and_a_lazy_import(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    module = tmp_path / "m3d" / "x.py"
    module.parent.mkdir()
    module.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .y import Y\n"
        "from . import z\ndef f():\n    from .train import common\n"
    )
    global PACKAGES
    saved, PACKAGES = PACKAGES, {tmp_path / "m3d": "m3d"}
    try:
        assert imported_modules(module, {"m3d", "m3d.y", "m3d.z", "m3d.train", "m3d.train.common"}) == {
            "m3d.z",
            "m3d.train",
            "m3d.train.common",
        }
    finally:
        PACKAGES = saved
