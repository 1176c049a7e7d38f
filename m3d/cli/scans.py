"""What several commands share: reading a scan, finding its LIDC XML, parsing a location, and the options
that say so."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from ..data.ct import CTVolume


def is_nifti(path: Path) -> bool:
    """Whether ``path`` names a NIfTI file (.nii, .nii.gz)."""
    return path.name.endswith((".nii", ".nii.gz"))


def find_lidc_xml(folder: Path, series_instance_uid: str = "") -> Path | None:
    """The first LIDC XML in ``folder`` or one level below; with ``series_instance_uid``, one annotating it."""
    from ..data.lidc_discovery import is_lidc_xml, xml_series_uid

    for candidate in sorted(folder.glob("*.xml")) + sorted(folder.glob("*/*.xml")):
        if is_lidc_xml(candidate) and (not series_instance_uid or xml_series_uid(candidate) == series_instance_uid):
            return candidate
    return None


def load_scan(path: Path, series_instance_uid: str | None = None) -> CTVolume:
    """A `CTVolume` from a DICOM series folder or a NIfTI file."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if is_nifti(path):
        from ..data.nifti import read_nifti

        return read_nifti(path)
    if path.is_dir():
        from ..data.dicom import read_dicom_series

        return read_dicom_series(path, series_instance_uid)
    raise ValueError(f"{path} is neither a DICOM series folder nor a NIfTI file (.nii, .nii.gz)")


def parse_location(text: str, volume: CTVolume, in_mm: bool) -> np.ndarray:
    """``X,Y,Z`` -> LPS mm: voxel indices (column, row, slice) by default, LPS mm with ``in_mm``."""
    import numpy as np

    try:
        x, y, z = (float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--at expects three comma-separated numbers X,Y,Z; got {text!r}") from None
    if in_mm:
        return np.array([x, y, z])
    return volume.voxel_to_world((z, y, x))


def add_location_options(parser: argparse.ArgumentParser) -> None:
    """``--at X,Y,Z`` (repeatable) and ``--mm``, read by `parse_location`."""
    parser.add_argument(
        "--at",
        required=True,
        action="append",
        metavar="X,Y,Z",
        help="location: voxel indices (column, row, slice) or, with --mm, LPS mm; repeat for several",
    )
    parser.add_argument("--mm", action="store_true", help="--at is in LPS world mm rather than voxel indices")


def add_enhanced_option(parser: argparse.ArgumentParser) -> None:
    """``--enhanced``: write a DICOM series as one Enhanced CT object."""
    parser.add_argument(
        "--enhanced",
        action="store_true",
        help="write the DICOM series as one Enhanced CT object (all slices as frames of one file)",
    )


def add_scan_options(parser: argparse.ArgumentParser) -> None:
    """``--series UID``: which series of a folder `load_scan` reads."""
    parser.add_argument("--series", metavar="UID", help="SeriesInstanceUID to read when a folder holds several series")
