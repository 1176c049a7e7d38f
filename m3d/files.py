"""Writing files whole or not at all: the data goes to a temporary file beside the target, which an atomic
rename then puts in its place, so that a reader (or a run cut short) never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "write_json_atomic"]


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through ``.{name}.tmp-{pid}`` beside it and `os.replace`,
    creating the parent folders; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def write_json_atomic(
    path: Path, payload: Any, indent: int = 2, trailing_newline: bool = False, sort_keys: bool = True
) -> Path:
    """`write_atomic` of ``payload`` as indented JSON (keys sorted unless ``sort_keys`` is false), with a
    final newline when ``trailing_newline``; returns ``path``."""
    text = json.dumps(payload, indent=indent, sort_keys=sort_keys)
    return write_atomic(path, text + "\n" if trailing_newline else text)
