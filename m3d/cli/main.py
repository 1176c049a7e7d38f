"""The `m3d` top parser: every sub-command module registers itself (``add_parser``) in the order of
`m3d --help`; `main` fixes negative ``--at`` coordinates, hands delegated commands their arguments and runs
the others' handler under m3d's error policy (`m3d.errors.run_guarded`)."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, Protocol, Sequence

from .. import __version__
from ..errors import run_guarded
from . import (
    cad,
    cad_analysis,
    card,
    convert,
    demo,
    detect,
    export_official,
    import_official,
    info,
    lidc,
    phantom,
    plan,
    push,
    report,
    tamper,
)
from .delegated import BENCH, BUILD, DELEGATED_COMMANDS, TRAIN_CAD, TRAIN_DETECTOR, TRAIN_GENERATOR


class Command(Protocol):
    """A sub-command: a module of this package or a `DelegatedCommand`."""

    def add_parser(self, subparsers: argparse._SubParsersAction) -> None: ...


COMMANDS: tuple[Command, ...] = (
    info,
    convert,
    phantom,
    tamper,
    detect,
    TRAIN_GENERATOR,
    TRAIN_CAD,
    TRAIN_DETECTOR,
    BENCH,
    cad,
    cad_analysis,
    plan,
    BUILD,
    import_official,
    export_official,
    push,
    report,
    card,
    lidc,
    demo,
)


def build_parser() -> argparse.ArgumentParser:
    """The `m3d` parser with every sub-command's."""
    parser = argparse.ArgumentParser(
        prog="m3d",
        description="m3d: AI-manipulated 3D CT scans (M3Dsynth). CT I/O and LIDC-IDRI annotations, "
        "synthetic chest CT, "
        "nodule injection/removal generators, the M3Dsynth dataset builder, forensic detectors and their benchmark, "
        "the CAD malignancy check, model cards, the report. `m3d demo` runs the whole mission on synthetic scans.",
        epilog="Every command has --help. Bad input gives one line on stderr and exit status 2.",
    )
    parser.add_argument("--version", action="version", version=f"m3d {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


COORDINATE = re.compile(r"^-?[\d.]+(,-?[\d.]+){2}$")


def _attach_negative_coordinates(argv: list[str]) -> list[str]:
    """``--at -60,20,-150`` -> ``--at=-60,20,-150``: argparse reads a value that starts with ``-`` as an
    option, and LPS coordinates are usually negative."""
    joined: list[str] = []
    for token in argv:
        if joined and joined[-1] == "--at" and COORDINATE.match(token):
            joined[-1] = f"--at={token}"
        else:
            joined.append(token)
    return joined


def main(argv: Sequence[str] | None = None) -> int:
    """Run `m3d` on ``argv`` (default: the process's arguments); the exit status (0, 2 bad input, 130 Ctrl-C)."""
    argv = _attach_negative_coordinates(list(sys.argv[1:] if argv is None else argv))
    if argv and argv[0] in DELEGATED_COMMANDS:  # commands with their own parser (accelerate entry points)
        return DELEGATED_COMMANDS[argv[0]].run(argv[1:])
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.func
    return run_guarded("m3d", lambda: handler(args))
