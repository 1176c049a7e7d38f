"""`m3d phantom`: synthetic chest CT scans on real LIDC geometry with real LIDC nodule contours."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `m3d phantom`."""
    parser = subparsers.add_parser(
        "phantom", help="synthetic chest CT scans on real LIDC geometry with real LIDC nodule contours"
    )
    parser.add_argument("--n", type=int, default=4, help="number of scans (default 4)")
    parser.add_argument("--out", required=True, help="output folder; one <patient>/dicom + annotations.xml per scan")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    parser.add_argument("--size", type=int, default=512, help="in-plane matrix size (512 as LIDC; smaller is faster)")
    parser.add_argument("--max-slices", type=int, default=None, help="cap on the number of slices (small test scans)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Write the phantom cases and print their folders."""
    from ..data.phantom import generate_phantoms

    cases = generate_phantoms(args.n, args.out, seed=args.seed, size=args.size, max_slices=args.max_slices)
    for case in cases:
        print(case)
