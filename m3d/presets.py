"""Presets, one mechanism for all of m3d: a table of named keyword sets, looked up by `lookup_preset`.

A class that has sizes (the generator networks, the detector and CAD configs) mixes in `PresetMixin`
and declares its table as the class attribute ``presets``; ``Class.from_preset(name, **overrides)``
builds it. Run recipes (the benchmark's ``BENCH_PRESETS``, the demo's ``SCALES``) are tables of the same
shape, read with `lookup_preset`. The names agree across m3d: ``"tiny"`` (tests), ``"default"`` (the class
defaults), and where a class has them ``"demo"`` (what the CPU demo ships) and ``"reference"`` (the
papers' sizes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = ["PresetMixin", "lookup_preset"]


def lookup_preset(table: Mapping[str, Mapping[str, Any]], name: str, owner: str) -> dict[str, Any]:
    """A copy of ``table[name]``; a one-line error naming ``owner`` and the choices if there is none."""
    if name not in table:
        raise ValueError(f"{owner}: preset must be one of {', '.join(table)}; got {name!r}")
    return dict(table[name])


class PresetMixin:
    """Named constructor keywords of a class: ``presets`` (``"default"``: the class defaults) and
    `from_preset`."""

    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {"default": {}}

    @classmethod
    def from_preset(cls, name: str = "default", **overrides: Any):
        """An instance built from ``presets[name]``, with ``overrides`` on top."""
        return cls(**{**lookup_preset(cls.presets, name, cls.__name__), **overrides})
