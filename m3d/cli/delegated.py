"""The commands with their own parser (`m3d build` and the Accelerate entry points): `m3d --help` lists
them, and `m3d NAME ...` hands the rest of the command line to their module's ``main(argv, prog)``."""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class DelegatedCommand:
    """``m3d NAME``, run by ``MODULE.main``; ``help`` is its line in `m3d --help`."""

    name: str
    module: str
    help: str

    def add_parser(self, subparsers: argparse._SubParsersAction) -> None:
        """List the command; its own parser reads its arguments (and its --help)."""
        subparsers.add_parser(self.name, add_help=False, help=self.help)

    def run(self, argv: list[str]) -> int:
        """The module's ``main`` on ``argv`` (the arguments after the command name)."""
        return importlib.import_module(self.module).main(argv, prog=f"m3d {self.name}")


TRAIN_GENERATOR = DelegatedCommand(
    "train-generator",
    "m3d.train.train_generator",
    "train a tampering generator (pix2pix | cyclegan | ddpm) with Accelerate; --help for its options",
)
TRAIN_CAD = DelegatedCommand(
    "train-cad",
    "m3d.train.train_cad",
    "train the CAD malignancy scorer with Accelerate; --help for its options",
)
TRAIN_DETECTOR = DelegatedCommand(
    "train-detector",
    "m3d.train.train_detector",
    "fine-tune a forensic detector on M3Dsynth with Accelerate; --help for its options",
)
BENCH = DelegatedCommand(
    "bench",
    "m3d.train.benchmark",
    "the M3Dsynth benchmark: detectors x train x test generators -> results folder",
)
BUILD = DelegatedCommand(
    "build",
    "m3d.build",
    "build the M3Dsynth dataset folder (phantom default or --lidc-root); --help for its options",
)
DELEGATED_COMMANDS: dict[str, DelegatedCommand] = {
    command.name: command for command in (TRAIN_GENERATOR, TRAIN_CAD, TRAIN_DETECTOR, BENCH, BUILD)
}
