"""`m3d import-official`: a downloaded official M3Dsynth release -> the dataset folder of `m3d build`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..constants import FAKE_GENERATORS, TASKS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `m3d import-official`."""
    parser = subparsers.add_parser(
        "import-official",
        help="turn a downloaded official M3Dsynth release into the same dataset folder as m3d build",
        description="Reads the release's TIFF stacks (<mod>/scan|label/<img_id>/slide%04d.tiff) and tables (data.csv, "
        "sets.csv, centers.csv, LIDC.csv) and the LIDC-IDRI series they come from; writes the Hub-ready folder of "
        "m3d build (Parquet shards, card), resumable. See m3d.dataset_builder.official.",
    )
    parser.add_argument(
        "--release", required=True, metavar="DIR", help="the downloaded release (get_M3Dsynth.sh's output)"
    )
    parser.add_argument(
        "--lidc-root", required=True, metavar="DIR", help="the LIDC-IDRI download (LIDC.csv's dicom folders)"
    )
    parser.add_argument("--out", required=True, help="output dataset folder")
    parser.add_argument(
        "--tables",
        default=None,
        metavar="DIR",
        help="folder of data.csv, sets.csv, centers.csv, LIDC.csv (default: RELEASE/data or RELEASE)",
    )
    parser.add_argument(
        "--generators",
        nargs="+",
        default=list(FAKE_GENERATORS),
        choices=FAKE_GENERATORS,
        help="import the fakes of these generators",
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="import these tasks")
    parser.add_argument("--limit", type=int, default=None, help="only the first N series")
    parser.add_argument("--scans-per-shard", type=int, default=4, help="series per Parquet shard")
    parser.add_argument("--overwrite", action="store_true", help="delete a previous build in --out first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Import the release and print the dataset's summary."""
    from ..dataset_builder.official import import_official
    from ..dataset_builder.writer import format_summary, summarize

    state = import_official(
        args.release,
        args.lidc_root,
        args.out,
        tables=args.tables,
        generators=args.generators,
        tasks=args.tasks,
        limit=args.limit,
        scans_per_shard=args.scans_per_shard,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(format_summary(summarize(state)))
    print(f"wrote {Path(args.out) / 'README.md'}: load it with datasets.load_dataset({str(args.out)!r})")
