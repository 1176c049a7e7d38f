"""DICOM CT series <-> `CTVolume` with pydicom.

Reading sorts slices by their position along the slice normal (never by file name or InstanceNumber),
applies RescaleSlope/Intercept and pixel padding, and refuses — with a message saying what to do —
series with several candidates, gaps, duplicates, uneven spacing, non-CT modalities or compressed
pixel data whose decoder is not installed. Writing produces a CT Image Storage series: derived from
the volume's source headers when it has them (new Series/SOP UIDs, geometry and pixels updated), else
a complete minimal CT IOD.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from .ct import CTMetadata, CTVolume

PADDING_HU = -1024  # value given to padding pixels (air)
UNCOMPRESSED_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
DECODER_HINTS = {  # transfer syntax UID prefix -> what to install
    "1.2.840.10008.1.2.4.8": "pip install pylibjpeg pylibjpeg-libjpeg  (JPEG-LS)",
    "1.2.840.10008.1.2.4.9": "pip install pylibjpeg pylibjpeg-openjpeg  (JPEG 2000)",
    "1.2.840.10008.1.2.4.20": "pip install pylibjpeg pylibjpeg-openjpeg  (HTJ2K)",
    "1.2.840.10008.1.2.4.": "pip install pylibjpeg pylibjpeg-libjpeg  (JPEG)",
}
POSITION_TOLERANCE_MM = 0.01
SPACING_TOLERANCE = 0.01  # relative


class DicomSeriesError(ValueError):
    """A DICOM folder that cannot be read as one CT series, or a series that cannot be written."""


@dataclass(frozen=True)
class DicomSeriesInfo:
    series_instance_uid: str
    modality: str
    n_files: int
    description: str
    patient_id: str


_WORKERS = min(8, (os.cpu_count() or 1) + 2)


def _try_read(path: Path) -> Dataset | None:
    """The whole DICOM image file (read once: header and pixel bytes), or None if it is not one."""
    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError):
        return None
    if "SeriesInstanceUID" not in dataset or "Rows" not in dataset:
        return None  # DICOMDIR, structured reports, presentation states...
    return dataset


def _read_headers(folder: Path) -> tuple[list[tuple[Path, Dataset]], list[Path]]:
    if not folder.exists():
        raise DicomSeriesError(f"{folder} does not exist")
    if not folder.is_dir():
        raise DicomSeriesError(f"{folder} is not a folder (a DICOM series is read from the folder holding its files)")
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        read = list(pool.map(_try_read, paths))
    headers = [(path, dataset) for path, dataset in zip(paths, read) if dataset is not None]
    skipped = [path for path, dataset in zip(paths, read) if dataset is None]
    if skipped:
        shown = ", ".join(p.name for p in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        warnings.warn(f"{folder}: skipped {len(skipped)} file(s) that are not DICOM images: {shown}", stacklevel=3)
    return headers, skipped


def _series_table(headers: list[tuple[Path, Dataset]]) -> dict[str, list[tuple[Path, Dataset]]]:
    table: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for path, header in headers:
        table[str(header.SeriesInstanceUID)].append((path, header))
    return table


def list_dicom_series(folder: str | Path) -> list[DicomSeriesInfo]:
    """The image series found (recursively) in ``folder``."""
    headers, _ = _read_headers(Path(folder))
    return [
        DicomSeriesInfo(
            uid,
            str(items[0][1].get("Modality", "")),
            len(items),
            str(items[0][1].get("SeriesDescription", "")),
            str(items[0][1].get("PatientID", "")),
        )
        for uid, items in sorted(_series_table(headers).items())
    ]


def _describe(infos: list[DicomSeriesInfo]) -> str:
    return "; ".join(f"{i.series_instance_uid} ({i.modality}, {i.n_files} files, '{i.description}')" for i in infos)


def _select_series(folder: Path, series_instance_uid: str | None) -> list[tuple[Path, Dataset]]:
    headers, _ = _read_headers(folder)
    if not headers:
        raise DicomSeriesError(f"{folder} holds no DICOM image files")
    table = _series_table(headers)
    infos = [
        DicomSeriesInfo(uid, str(items[0][1].get("Modality", "")), len(items), str(items[0][1].get("SeriesDescription", "")), "")
        for uid, items in sorted(table.items())
    ]
    if series_instance_uid is not None:
        if series_instance_uid not in table:
            raise DicomSeriesError(f"{folder} has no series {series_instance_uid}; it holds: {_describe(infos)}")
        chosen = table[series_instance_uid]
    else:
        ct = [info for info in infos if info.modality == "CT"]
        others = [info for info in infos if info.modality != "CT"]
        if not ct:
            raise DicomSeriesError(f"{folder} holds no CT series; found: {_describe(infos)}")
        if others:
            warnings.warn(f"{folder}: skipped non-CT series: {_describe(others)}", stacklevel=3)
        if len(ct) > 1:
            raise DicomSeriesError(
                f"{folder} holds {len(ct)} CT series; choose one by SeriesInstanceUID: {_describe(ct)}"
            )
        chosen = table[ct[0].series_instance_uid]
    modality = str(chosen[0][1].get("Modality", ""))
    if modality != "CT":
        raise DicomSeriesError(f"series {chosen[0][1].SeriesInstanceUID} is {modality or 'of unknown modality'}, not CT")
    if int(chosen[0][1].get("NumberOfFrames", 1) or 1) > 1:
        raise DicomSeriesError("multi-frame (enhanced) CT objects are not supported; convert them to single-frame slices")
    return chosen


def _decode(path: Path, dataset: Dataset) -> np.ndarray:
    """Stored pixel values of one slice (no rescale), decoding compressed data with pydicom's plugins."""
    syntax = str(dataset.file_meta.TransferSyntaxUID)
    if syntax in UNCOMPRESSED_LITTLE_ENDIAN and int(dataset.BitsAllocated) == 16 and int(dataset.get("SamplesPerPixel", 1)) == 1:
        dtype = np.int16 if int(dataset.PixelRepresentation) == 1 else np.uint16
        pixels = np.frombuffer(dataset.PixelData, dtype=dtype, count=int(dataset.Rows) * int(dataset.Columns))
        pixels = pixels.reshape(int(dataset.Rows), int(dataset.Columns))
        bits_stored = int(dataset.get("BitsStored", 16))
        if bits_stored < 16:  # sign-extend or mask the unused high bits
            shift = 16 - bits_stored
            pixels = (pixels.astype(np.int32) << shift).astype(dtype) >> shift if dtype == np.int16 else pixels & ((1 << bits_stored) - 1)
        return pixels
    try:
        return dataset.pixel_array
    except Exception as error:  # pydicom raises RuntimeError/NotImplementedError for missing plugins
        hint = next((text for prefix, text in DECODER_HINTS.items() if syntax.startswith(prefix)), None)
        name = getattr(dataset.file_meta.TransferSyntaxUID, "name", syntax)
        install = f"; install a decoder: {hint}" if hint else ""
        raise DicomSeriesError(f"{path.name}: cannot decode '{name}' pixel data{install} ({error})") from None


def _slice_to_hu(path: Path, header: Dataset) -> np.ndarray:
    """One slice in int16 HU: rescale (integer arithmetic when the rescale is integral), padding -> air."""
    pixels = _decode(path, header)
    slope = float(header.get("RescaleSlope", 1) or 1)
    intercept = float(header.get("RescaleIntercept", 0) or 0)
    if slope == 1 and intercept.is_integer():
        values = pixels.astype(np.int32) + int(intercept)
    else:
        values = np.rint(pixels.astype(np.float64) * slope + intercept)
    padding = _padding_mask(pixels, header)
    if padding is not None:
        values[padding] = PADDING_HU
    if values.min() < -32768 or values.max() > 32767:
        warnings.warn(f"{path.name}: HU values outside the int16 range were clipped", stacklevel=2)
        values = np.clip(values, -32768, 32767)
    return values.astype(np.int16)


def _padding_mask(stored: np.ndarray, header: Dataset) -> np.ndarray | None:
    if "PixelPaddingValue" not in header:
        return None
    value = int(header.PixelPaddingValue)
    limit = int(header.get("PixelPaddingRangeLimit", value))
    low, high = min(value, limit), max(value, limit)
    return (stored >= low) & (stored <= high)


def _geometry(header: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    orientation = np.asarray(header.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=np.float64)
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    return row_direction, column_direction, normal / np.linalg.norm(normal)


def read_dicom_series(
    folder: str | Path, series_instance_uid: str | None = None, *, on_uneven: str = "error"
) -> CTVolume:
    """Read a CT series from ``folder`` (searched recursively) as an int16 HU `CTVolume`.

    ``on_uneven``: what to do with missing slices or uneven slice spacing — ``"error"`` (default) or
    ``"resample"`` (linear interpolation onto a regular grid at the median step, with a warning).
    Padding pixels (PixelPaddingValue) become -1024 HU.
    """
    if on_uneven not in ("error", "resample"):
        raise ValueError(f"on_uneven must be 'error' or 'resample'; got {on_uneven!r}")
    folder = Path(folder)
    items = _select_series(folder, series_instance_uid)
    first = items[0][1]
    row_direction, column_direction, normal = _geometry(first)
    for path, header in items:
        if not np.allclose(_geometry(header)[2], normal, atol=1e-3):
            raise DicomSeriesError(f"{path.name}: ImageOrientationPatient differs from the rest of the series")
        if (int(header.Rows), int(header.Columns)) != (int(first.Rows), int(first.Columns)):
            raise DicomSeriesError(f"{path.name}: image size differs from the rest of the series")
    if any("ImagePositionPatient" not in header for _, header in items):
        raise DicomSeriesError("a slice has no ImagePositionPatient: the series geometry is unknown")
    positions = np.array([np.dot(np.asarray(h.ImagePositionPatient, float), normal) for _, h in items])
    order = np.argsort(positions, kind="stable")
    items, positions = [items[i] for i in order], positions[order]

    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        slices = list(pool.map(lambda item: _slice_to_hu(*item), items))
    for _, header in items:
        del header.PixelData  # the kept source headers hold no pixels

    keep = [0]
    for index in range(1, len(items)):
        if abs(positions[index] - positions[keep[-1]]) < POSITION_TOLERANCE_MM:
            if not np.array_equal(slices[index], slices[keep[-1]]):
                raise DicomSeriesError(
                    f"{items[index][0].name} and {items[keep[-1]][0].name} share position {positions[index]:.2f} mm "
                    "but hold different pixels: the folder mixes acquisitions; separate them"
                )
            warnings.warn(f"{items[index][0].name} duplicates {items[keep[-1]][0].name}; dropped", stacklevel=2)
            continue
        keep.append(index)
    items, positions = [items[i] for i in keep], positions[keep]
    hu = np.stack([slices[i] for i in keep])

    pixel_spacing = [float(v) for v in first.get("PixelSpacing", [1.0, 1.0])]
    if len(items) > 1:
        steps = np.diff(positions)
        step = float(np.median(steps))
        uneven = np.abs(steps - step) > max(POSITION_TOLERANCE_MM, SPACING_TOLERANCE * step)
        if uneven.any():
            where = int(np.flatnonzero(uneven)[0])
            message = (
                f"{folder}: uneven slice spacing ({steps.min():.3f} to {steps.max():.3f} mm, median {step:.3f}); "
                f"first irregular step {steps[where]:.3f} mm after slice at {positions[where]:.2f} mm"
            )
            if on_uneven == "error":
                raise DicomSeriesError(message + " — missing slices? read with on_uneven='resample' to interpolate")
            warnings.warn(message + f"; resampled to a regular {step:.3f} mm grid", stacklevel=2)
            regular = positions[0] + step * np.arange(int(round((positions[-1] - positions[0]) / step)) + 1)
            upper = np.clip(np.searchsorted(positions, regular, side="right"), 1, len(positions) - 1)
            weight = ((regular - positions[upper - 1]) / (positions[upper] - positions[upper - 1]))[:, None, None]
            hu = np.rint((1 - weight) * hu[upper - 1] + weight * hu[upper]).astype(np.int16)
            items = [items[i] for i in upper - 1]  # nearest-below headers; geometry comes from the grid
    else:
        step = float(first.get("SpacingBetweenSlices", 0) or first.get("SliceThickness", 0) or 1.0)

    direction = np.column_stack([normal, column_direction, row_direction])
    metadata = CTMetadata(
        patient_id=str(first.get("PatientID", "")),
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=str(first.SeriesInstanceUID),
        modality=str(first.get("Modality", "")),
        description=str(first.get("SeriesDescription", "")),
        slice_thickness_mm=float(first.SliceThickness) if first.get("SliceThickness") not in (None, "") else None,
        source_headers=tuple(header for _, header in items),
    )
    return CTVolume(
        hu=hu,
        spacing_mm=(step, pixel_spacing[0], pixel_spacing[1]),
        origin_mm=tuple(float(v) for v in items[0][1].ImagePositionPatient),
        direction=direction,
        metadata=metadata,
    )


def _uid(seed: str | None, *parts: object) -> str:
    return generate_uid(entropy_srcs=[seed, *map(str, parts)]) if seed is not None else generate_uid()


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.10g}"[:16]


def _minimal_ct_header(volume: CTVolume, study_uid: str, frame_uid: str) -> Dataset:
    meta = volume.metadata
    header = Dataset()
    header.SOPClassUID = CTImageStorage
    header.PatientName = meta.patient_id or "ANONYMOUS"
    header.PatientID = meta.patient_id or "ANONYMOUS"
    header.PatientBirthDate = ""
    header.PatientSex = ""
    header.StudyInstanceUID = meta.study_instance_uid or study_uid
    header.StudyDate = ""
    header.StudyTime = ""
    header.ReferringPhysicianName = ""
    header.StudyID = ""
    header.AccessionNumber = ""
    header.Modality = "CT"
    header.SeriesNumber = 1
    header.FrameOfReferenceUID = frame_uid
    header.PositionReferenceIndicator = ""
    header.Manufacturer = "m3d"
    header.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    header.KVP = ""
    header.AcquisitionNumber = 1
    header.PatientPosition = "HFS"
    header.SamplesPerPixel = 1
    header.PhotometricInterpretation = "MONOCHROME2"
    header.SliceThickness = _ds(meta.slice_thickness_mm or volume.spacing_mm[0])
    header.WindowCenter = "-600"
    header.WindowWidth = "1500"
    return header


def write_dicom_series(
    volume: CTVolume,
    out_dir: str | Path,
    *,
    series_description: str = "m3d",
    derived_from_source: bool = True,
    uid_seed: str | None = None,
    series_instance_uid: str | None = None,
    overwrite: bool = False,
    filename_pattern: str = "{index:04d}.dcm",
) -> list[Path]:
    """Write ``volume`` as a CT Image Storage series (Explicit VR Little Endian, int16 HU with slope 1
    and intercept 0) into ``out_dir``, atomically. Returns the written files in slice order.

    With ``derived_from_source`` and source headers for every slice, each file keeps its source tags
    (patient, study, acquisition) with new Series/SOP UIDs and ImageType DERIVED; otherwise a minimal
    CT IOD is written. ``uid_seed`` makes every generated UID (and so every byte) reproducible;
    ``series_instance_uid`` sets the new series' UID explicitly (never reuse a source series' UID).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DicomSeriesError(f"{out_dir} is not empty; pass overwrite=True (--overwrite on the command line) to replace it")
    sources = volume.metadata.source_headers
    derived = derived_from_source and sources is not None and len(sources) == volume.shape[0]
    series_uid = series_instance_uid or _uid(uid_seed, "series")
    study_uid = _uid(uid_seed, "study")
    frame_uid = _uid(uid_seed, "frame")
    row_direction, column_direction = volume.direction[:, 2], volume.direction[:, 1]
    orientation = [_ds(v) for v in (*row_direction, *column_direction)]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the series folder gets the usual mode
    names = []
    try:
        template = None if derived else _minimal_ct_header(volume, study_uid, frame_uid)
        for index in range(volume.shape[0]):
            header = copy.deepcopy(sources[index] if derived else template)
            for keyword in ("PixelPaddingValue", "PixelPaddingRangeLimit", "SmallestImagePixelValue",
                            "LargestImagePixelValue", "PixelData"):
                if keyword in header:
                    delattr(header, keyword)
            sop_uid = _uid(uid_seed, "sop", index)
            header.SOPClassUID = CTImageStorage
            header.SOPInstanceUID = sop_uid
            header.SeriesInstanceUID = series_uid
            header.SeriesDescription = series_description[:64]
            if derived:
                header.ImageType = ["DERIVED", "SECONDARY", *list(header.get("ImageType", ["", "", "AXIAL"]))[2:]]
                header.DerivationDescription = f"m3d: {series_description}"[:1024]
            header.InstanceNumber = index + 1
            position = volume.voxel_to_world((index, 0, 0))
            header.ImagePositionPatient = [_ds(v) for v in position]
            header.ImageOrientationPatient = orientation
            header.SliceLocation = _ds(float(np.dot(position, volume.slice_normal)))
            header.PixelSpacing = [_ds(volume.spacing_mm[1]), _ds(volume.spacing_mm[2])]
            header.Rows, header.Columns = volume.shape[1], volume.shape[2]
            header.BitsAllocated, header.BitsStored, header.HighBit = 16, 16, 15
            header.PixelRepresentation = 1
            header.RescaleSlope, header.RescaleIntercept, header.RescaleType = "1", "0", "HU"
            header.PixelData = np.ascontiguousarray(volume.hu[index]).astype("<i2").tobytes()
            header["PixelData"].VR = "OW"
            file_meta = FileMetaDataset()
            file_meta.MediaStorageSOPClassUID = CTImageStorage
            file_meta.MediaStorageSOPInstanceUID = sop_uid
            file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            header.file_meta = file_meta
            name = filename_pattern.format(index=index)
            header.save_as(staging / name, enforce_file_format=True)
            names.append(name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.replace(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out_dir / name for name in names]
