"""`m3d cad`: malignancy probability of the nodule at a location (the CAD scorer)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .scans import add_location_options, add_scan_options, load_scan, parse_location


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `m3d cad`."""
    parser = subparsers.add_parser("cad", help="malignancy probability of the nodule at a location (the CAD scorer)")
    parser.add_argument("--model", required=True, help="a saved CAD scorer folder (m3d train-cad's OUTPUT_DIR/model)")
    parser.add_argument("--scan", required=True, help="DICOM series folder or NIfTI file")
    add_location_options(parser)
    parser.add_argument("--threshold", type=float, default=0.5, help="probability from which the verdict is malignant")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    add_scan_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Print the malignancy probability (and rating) and the verdict at every ``--at``."""
    import math

    from ..cad import load_cad, score_locations

    volume = load_scan(Path(args.scan), args.series)
    locations = [parse_location(text, volume, args.mm) for text in args.at]
    model = load_cad(args.model, args.device)
    for text, score in zip(args.at, score_locations(model, volume, locations)):
        rating = "" if math.isnan(score.rating) else f"  rating {score.rating:.2f}/5"
        print(
            f"{text}: malignancy {score.probability:.4f}{rating}  -> "
            f"{'MALIGNANT' if score.probability >= args.threshold else 'benign'} at threshold {args.threshold}"
        )
