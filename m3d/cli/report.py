"""`m3d report`: a self-contained HTML (and Markdown) report of a results folder."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `m3d report`."""
    parser = subparsers.add_parser(
        "report",
        help="a self-contained HTML (and Markdown) report of a results folder: tables, ROC, CAD, example scans",
        description="Reads the benchmark (m3d bench) and CAD (m3d cad-analysis) outputs in "
        "RESULTS_DIR and the M3Dsynth "
        "folder the benchmark used; writes report.html (opens from disk, figures embedded) and report.md.",
    )
    parser.add_argument("results_dir", metavar="RESULTS_DIR", help="the folder m3d bench (and m3d cad-analysis) wrote")
    parser.add_argument("--out", default=None, help="where to write the report (default: RESULTS_DIR)")
    parser.add_argument(
        "--data", default=None, help="M3Dsynth folder for the example scans (default: the benchmark's)"
    )
    parser.add_argument("--device", default="cpu", help="device for the example detector maps (cpu, cuda)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Build the report and print its two files."""
    from ..report import build_report

    html_path, markdown_path = build_report(args.results_dir, args.out, args.data, device=args.device)
    print(f"report: {html_path}\n        {markdown_path}")
