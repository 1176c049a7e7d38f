"""`m3d info`: geometry and nodules of a DICOM series, NIfTI file, LIDC XML or LIDC case folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .scans import add_scan_options, find_lidc_xml, load_scan

if TYPE_CHECKING:
    from ..data.ct import CTVolume
    from ..data.lidc import LIDCScan


def describe_volume(volume: CTVolume) -> list[str]:
    """Lines describing a volume's geometry, HU range and identity."""
    meta = volume.metadata
    extent = tuple(round((n - 1) * s, 1) for n, s in zip(volume.shape, volume.spacing_mm))
    lines = [
        f"shape (z, y, x):       {volume.shape}",
        f"spacing_mm (z, y, x):  {tuple(round(s, 4) for s in volume.spacing_mm)}",
        f"origin_mm (LPS x,y,z): {tuple(round(o, 3) for o in volume.origin_mm)}",
        f"slice normal (LPS):    {tuple(round(float(v), 4) for v in volume.slice_normal)}",
        f"extent_mm (z, y, x):   {extent}",
        f"HU range:              [{int(volume.hu.min())}, {int(volume.hu.max())}]",
        f"patient / series:      {meta.patient_id or '-'} / {meta.series_instance_uid or '-'}",
    ]
    if meta.description:
        lines.append(f"description:           {meta.description}")
    return lines


def describe_nodules(scan: LIDCScan) -> list[str]:
    """Lines listing the readers' annotations grouped into nodules."""
    from ..data.lidc import group_nodules

    nodules = group_nodules(scan)
    lines = [f"LIDC annotations:      {len(scan.annotations)} reader marks, {len(nodules)} nodules"]
    if nodules:
        lines.append(f"  {'#':>3} {'centre z,y,x (voxel)':>24} {'diameter mm':>12} {'readers':>8} {'malignancy':>10}")
    for number, nodule in enumerate(nodules):
        centre = ",".join(f"{c:.1f}" for c in nodule.centroid_zyx)
        malignancy = "-" if nodule.malignancy is None else f"{nodule.malignancy:.1f}"
        lines.append(f"  {number:>3} {centre:>24} {nodule.diameter_mm:>12.1f} {nodule.n_readers:>8} {malignancy:>10}")
    return lines


def describe_path(path: Path, series_instance_uid: str | None = None) -> list[str]:
    """A DICOM series, a NIfTI file, an LIDC XML, or a case folder (dicom/ + XML), described."""
    from ..data.lidc import read_lidc_xml

    if path.suffix == ".xml":
        return describe_nodules(read_lidc_xml(path))
    scan_path = path / "dicom" if (path / "dicom").is_dir() else path
    volume = load_scan(scan_path, series_instance_uid)
    lines = describe_volume(volume)
    xml = find_lidc_xml(path) if path.is_dir() else None
    if xml is not None:
        lines.append(f"annotations:           {xml}")
        lines += describe_nodules(read_lidc_xml(xml, volume))
    return lines


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `m3d info`."""
    parser = subparsers.add_parser("info", help="geometry and nodules of a DICOM series, NIfTI file or LIDC case")
    parser.add_argument(
        "path", help="DICOM series folder, .nii/.nii.gz file, LIDC XML, or a case folder (dicom/ + XML)"
    )
    add_scan_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Print the description of ``args.path``."""
    print("\n".join(describe_path(Path(args.path), args.series)))
