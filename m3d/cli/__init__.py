"""The `m3d` command line: `main.py` builds the top parser and dispatches; each sub-command is a module
with ``add_parser(subparsers)`` and its handler ``run(args)``, a thin layer over the library. Bad input
gives one clear line on stderr and exit status 2, never a traceback. Nothing in the library imports it."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
