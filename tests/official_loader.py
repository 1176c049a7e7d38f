"""What the official M3Dsynth code (grip-unina/M3Dsynth, commit 2900f7c) does with a table row, re-stated
for the tests: how it turns a DICOM series into the TIFF stack (utils/dicom_utils.py ``load_dicom_scan``)
and (coord_z, coord_y, coord_x) or the test-crop centre into a crop of that stack (data/dataset.py
``M3Dsynth.__getitem__``, ``get_random_slide``; utils/tiff_utils.py ``load_slice_tiff_scan``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom


def official_stack(dicom_folder: Path) -> np.ndarray:
    """The series' pixel arrays (stored values, in-plane as stored) sorted by descending
    ImagePositionPatient z: the official stack's slice k is ``slide%04d.tiff`` % k."""
    headers = [pydicom.dcmread(path) for path in Path(dicom_folder).glob("*.dcm")]
    headers.sort(key=lambda header: -float(header.ImagePositionPatient[2]))
    return np.stack([header.pixel_array for header in headers])


def fixed_crop_window(center: int, size: int) -> tuple[int, int]:
    """The fixed test crop along one axis: ``[center - size // 2, center - size // 2 + size)``, so the centre
    index lands at position ``size // 2`` of the crop."""
    start = int(center) - size // 2
    return start, start + size


def random_crop_starts(length: int, position: int, size: int, jitter: int) -> tuple[int, int]:
    """The first and last start of the training crop along one axis (it picks one in between at random):
    ``position - size // 2`` moved by at most ``jitter`` (``4 + max((size - 40) // 2, 0)``), kept inside the
    axis, which is first padded evenly when shorter than the crop."""
    pad = max(size - length, 0)
    lowest, highest = pad // 2 - pad, length + pad // 2 - size
    first = min(max(position - jitter - size // 2, lowest), highest)
    last = min(max(position + jitter - size // 2, lowest), highest)
    return first, last


def jitter_of(size: int) -> int:
    """The training crop's random shift for a crop of ``size`` along an axis."""
    return 4 + max((size - 40) // 2, 0)


def crop(stack: np.ndarray, starts: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
    """``stack[start:start + size]`` on each axis, zeros where the window leaves the stack (as the official
    slice loader and ``crop_and_padding`` fill it)."""
    out = np.zeros(shape, stack.dtype)
    source = tuple(slice(max(a, 0), min(a + n, length)) for a, n, length in zip(starts, shape, stack.shape))
    target = tuple(slice(s.start - a, s.stop - a) for s, a in zip(source, starts))
    out[target] = stack[source]
    return out
