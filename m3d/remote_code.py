"""Saved folders that carry their own code, as Hub users of custom architectures expect.

A detector or CAD folder gets the source of its configuration and modeling modules (and of the m3d modules
they import, flattened beside them with the imports rewritten to ``from .module import ...``) and
``config.auto_map``, so that ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` works where m3d
cannot be imported. Without ``trust_remote_code`` transformers keeps using m3d's own registered classes.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Iterable


def _module_source(module_name: str) -> str:
    return inspect.getsource(sys.modules[module_name])


def _flat_name(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


def code_bundle(module_names: Iterable[str]) -> dict[str, str]:
    """``{file name: source}`` for the given m3d modules and every m3d module they import (relative imports,
    at any depth of the code), each rewritten to import the others from its own folder."""
    todo, bundle, origins = list(module_names), {}, {}
    while todo:
        module_name = todo.pop()
        file_name = _flat_name(module_name) + ".py"
        if file_name in bundle:
            if origins[file_name] != module_name:
                raise ValueError(f"{module_name} and {origins[file_name]} would both be saved as {file_name}")
            continue
        source = _module_source(module_name)
        lines = source.splitlines(keepends=True)
        package = module_name.rpartition(".")[0]
        for node in sorted(ast.walk(ast.parse(source)), key=lambda n: -getattr(n, "lineno", 0)):
            if isinstance(node, ast.Import) and any(alias.name.split(".")[0] == "m3d" for alias in node.names):
                raise ValueError(
                    f"{module_name} imports m3d by name (line {node.lineno}): it cannot travel with a model"
                )
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 0:
                if (node.module or "").split(".")[0] == "m3d":
                    raise ValueError(
                        f"{module_name} imports m3d by name (line {node.lineno}): it cannot travel with a model"
                    )
                continue
            target = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            if target not in sys.modules:
                importlib.import_module(target)
            todo.append(target)
            names = ", ".join(alias.name + (f" as {alias.asname}" if alias.asname else "") for alias in node.names)
            first, last = node.lineno - 1, node.end_lineno or node.lineno
            indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
            lines[first:last] = [f"{indent}from .{_flat_name(target)} import {names}\n"]
        bundle[file_name], origins[file_name] = "".join(lines), module_name
    return bundle


def missing_code(folder: str | Path, config: dict) -> list[str]:
    """The ``config.auto_map`` references (``"modeling_x.Class"``, or ``"repo--modeling_x.Class"``) whose module
    file is not in ``folder``: ``trust_remote_code`` loading would fail on each."""
    return [
        reference
        for reference in (config.get("auto_map") or {}).values()
        if not (Path(folder) / (reference.split("--")[-1].rsplit(".", 1)[0] + ".py")).is_file()
    ]


def save_with_code(model: Any, save_directory: str | Path, auto_classes: Iterable[str]) -> None:
    """Write ``model``'s code bundle into ``save_directory`` and set ``model.config.auto_map`` (AutoConfig and
    each of ``auto_classes``) so that the `save_pretrained` that follows records it."""
    folder = Path(save_directory)
    config_class, model_class = type(model.config), type(model)
    bundle = code_bundle([config_class.__module__, model_class.__module__])
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, source in bundle.items():
        (folder / file_name).write_text(source)
    model.config.auto_map = {
        "AutoConfig": f"{_flat_name(config_class.__module__)}.{config_class.__name__}",
        **{auto: f"{_flat_name(model_class.__module__)}.{model_class.__name__}" for auto in auto_classes},
    }
