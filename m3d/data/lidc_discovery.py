"""Finding LIDC-IDRI on disk: which XML files are LIDC annotation files, which series they annotate, and
every DICOM series folder of a download paired with its own XML."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)


def is_lidc_xml(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return b"LidcReadMessage" in handle.read(8192)
    except OSError:
        return False


_SERIES_UID = re.compile(rb"<(?:\w+:)?SeriesInstanceUid>\s*([^<\s]+)\s*</", re.IGNORECASE)


def xml_series_uid(path: Path) -> str | None:
    """The ResponseHeader SeriesInstanceUid of an LIDC XML (read from its head), or None."""
    with open(path, "rb") as handle:
        match = _SERIES_UID.search(handle.read(65536))
    return match.group(1).decode() if match else None


def _dicom_series_uid(folder: Path, files: list[str]) -> str | None:
    import pydicom

    for name in files:
        try:
            header = pydicom.dcmread(folder / name, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except Exception:  # noqa: BLE001 - a broken file: try the next one
            continue
        uid = getattr(header, "SeriesInstanceUID", None)
        if uid:
            return str(uid)
    return None


def lidc_series(root: str | Path) -> list[tuple[Path, Path, str]]:
    """``(series folder, xml, SeriesInstanceUID)`` for each DICOM series folder under a LIDC-IDRI root
    holding an LIDC XML whose SeriesInstanceUid is the series' own (sorted by folder)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        dicoms = sorted(f for f in filenames if f.lower().endswith(".dcm"))
        xmls = sorted(f for f in filenames if f.lower().endswith(".xml"))
        if not dicoms or not xmls:
            continue
        folder = Path(dirpath)
        series_uid = _dicom_series_uid(folder, dicoms)
        for name in xmls:
            path = folder / name
            if is_lidc_xml(path) and series_uid is not None and xml_series_uid(path) == series_uid:
                found.append((folder, path, series_uid))
                break
        else:
            logger.info("skipping %s: no LIDC XML there matches its series %s", folder, series_uid)
    if not found:
        raise FileNotFoundError(f"no DICOM series with a matching LIDC XML under {root}")
    return found
