"""`m3d export-official`: an m3d dataset folder in the official M3Dsynth release layout (TIFF stacks, tables)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `m3d export-official`."""
    parser = subparsers.add_parser(
        "export-official",
        help="write an m3d dataset folder in the official M3Dsynth release layout (TIFF stacks, tables)",
        description="The inverse of import-official: <mod>/scan|label/<img_id>/slide%04d.tiff "
        "(slices by descending z, "
        "HU shifted to be non-negative), real/scan/<img_id>/ for the pristine scans, data/ with data.csv, sets.csv, "
        "centers.csv, LIDC.csv, and dicom/<patient>/<series>/, the pristine series in place of the "
        "LIDC-IDRI download. "
        "See m3d.dataset_builder.official_export.",
    )
    parser.add_argument(
        "data", metavar="DIR", help="an M3Dsynth dataset folder (m3d build or m3d import-official output)"
    )
    parser.add_argument("--out", required=True, help="output folder in the release layout (must be new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Export the dataset and print what was written and how to read it back."""
    from ..dataset_builder.official_export import DICOM_FOLDER, export_official

    summary = export_official(args.data, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    print(
        f"wrote {summary.folder}: {summary.series} series, {summary.sites} sites, {summary.fakes} tampered scans; "
        f"read it back with m3d import-official --release {summary.folder} --lidc-root {summary.folder / DICOM_FOLDER}"
    )
