"""`m3d convert`: DICOM series <-> NIfTI, HU and physical geometry preserved."""

from __future__ import annotations

import argparse
from pathlib import Path

from .scans import add_enhanced_option, add_scan_options, is_nifti, load_scan


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `m3d convert`."""
    parser = subparsers.add_parser("convert", help="DICOM series <-> NIfTI, HU and physical geometry preserved")
    parser.add_argument("source", help="DICOM series folder or NIfTI file")
    parser.add_argument("target", help="NIfTI file (.nii/.nii.gz) or an output folder for a DICOM series")
    parser.add_argument("--description", default="m3d convert", help="SeriesDescription of a written DICOM series")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the target: the NIfTI file, or the DICOM files in the target folder",
    )
    add_enhanced_option(parser)
    add_scan_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Read the source scan and write it as the target's format."""
    source, target = Path(args.source), Path(args.target)
    if args.enhanced and is_nifti(target):
        raise ValueError(f"--enhanced applies to a DICOM target folder, not the NIfTI file {target}")
    volume = load_scan(source, args.series)
    if is_nifti(target):
        from ..data.nifti import write_nifti

        if target.exists() and not args.overwrite:
            raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
        write_nifti(volume, target)
    else:
        from ..data.dicom import write_dicom_series

        write_dicom_series(
            volume, target, series_description=args.description, overwrite=args.overwrite, enhanced=args.enhanced
        )
    print(f"wrote {target}  {volume.shape} voxels, spacing_mm {tuple(round(s, 4) for s in volume.spacing_mm)}")
