"""DICOM CT series <-> `CTVolume` with pydicom.

A series is a folder of single-frame CT slices, or one Enhanced (or Legacy Converted Enhanced) CT object
whose frames are read as the slices they stand for, with the geometry and rescale of its shared and
per-frame functional groups. Reading sorts slices by their position along the slice normal (never by file
name or InstanceNumber), applies RescaleSlope/Intercept and pixel padding (PixelPaddingValue,
PixelPaddingRangeLimit -> -1024 HU, air), and refuses — with a message saying what to do — folders with
several series, gaps, uneven spacing, gantry tilt, conflicting duplicates, non-CT data or compressed pixel
data whose decoder is not installed. The folder is scanned header-only (pixel data deferred); the chosen
series' pixels are then read in a thread pool straight into the volume (uncompressed data) or through
pydicom's decoders.

Writing produces a CT Image Storage series (Explicit VR Little Endian, int16 HU with slope 1 and
intercept 0, so HU round-trip exactly): derived from the volume's source headers when it has them (new
Series/SOP UIDs, ImageType DERIVED, geometry and pixels updated), else a complete minimal CT IOD; or, as
an option, the same as one Enhanced CT Image object.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    LegacyConvertedEnhancedCTImageStorage,
    generate_uid,
)
from scipy import ndimage

from .ct import HU_MAX, HU_MIN, CTMetadata, CTVolume

PADDING_HU = -1024  # value given to padding pixels (air)
POSITION_TOLERANCE_MM = 0.01  # slices closer than this along the normal are at the same position
SPACING_TOLERANCE = 0.01  # relative deviation of a slice step from the median step that counts as uneven
TILT_TOLERANCE_PIXELS = 0.1  # in-plane drift of the slice origins (gantry tilt) that counts as a shear
DEFER_SIZE = 64 * 1024  # the header scan leaves pixel data (and any element above 64 KiB) in the file
_PIXEL_DATA = 0x7FE00010
_NATIVE_LITTLE_ENDIAN = {ImplicitVRLittleEndian, ExplicitVRLittleEndian}
_ENHANCED_CT = {EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage}
# functional groups whose attributes a single-frame slice holds at its top level (read from shared, then per frame)
_FRAME_GROUPS = (
    "PlanePositionSequence",
    "PlaneOrientationSequence",
    "PixelMeasuresSequence",
    "PixelValueTransformationSequence",
    "FrameVOILUTSequence",
    "UnassignedSharedConvertedAttributesSequence",
    "UnassignedPerFrameConvertedAttributesSequence",
)
# tags that describe a multi-frame object as a whole, not one of its frames
_WHOLE_OBJECT_TAGS = {
    Tag(keyword)
    for keyword in (
        "NumberOfFrames",
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
        "DimensionOrganizationSequence",
        "DimensionIndexSequence",
        "DimensionOrganizationType",
        "PixelData",
    )
}
# a supplemental palette (Enhanced CT) maps stored values, which the writer changes: it is not kept
_PALETTE_KEYWORDS = (
    "PixelPresentation",
    *(
        f"{colour}PaletteColorLookupTable{part}"
        for colour in ("Red", "Green", "Blue")
        for part in ("Descriptor", "Data")
    ),
)
_PIP_NAMES = {"gdcm": "python-gdcm"}  # pydicom's dependency names that differ from the PyPI name
_WORKERS = min(8, (os.cpu_count() or 1) + 2)


class DicomSeriesError(ValueError):
    """A DICOM folder that cannot be read as one CT series, or a series that cannot be written."""


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One image series found in a folder."""

    series_instance_uid: str
    modality: str
    n_files: int
    description: str
    patient_id: str


class FrameHeader(Dataset):
    """The header of one frame of a multi-frame object, made to look like a single-frame slice's."""

    frame_number: int  # 1-based, as DICOM counts frames


Item = tuple[Path, Dataset]  # a file and its header (a `FrameHeader` for a frame of a multi-frame object)


def _name(path: Path, header: Dataset) -> str:
    """How messages name a slice: its file, and its frame when it is one of a multi-frame object."""
    return f"{path.name} frame {header.frame_number}" if isinstance(header, FrameHeader) else path.name


def _warn(message: str) -> None:
    """A UserWarning attributed to the first caller outside this module."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


# -- scanning a folder ---------------------------------------------------------------------------------
def _starts_with_dicom_tag(path: Path) -> bool:
    """Whether a file without the 'DICM' preamble starts like a raw DICOM data set (group 0002 or 0008)."""
    with open(path, "rb") as file:
        start = file.read(2)
    return len(start) == 2 and int.from_bytes(start, "little") in (0x0002, 0x0008)


# image attributes read as one number; a damaged header can give them several values, or none
_SINGLE_NUMBERS = (
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SamplesPerPixel",
    "RescaleSlope",
    "RescaleIntercept",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "SliceThickness",
    "SpacingBetweenSlices",
)


def _check_single_numbers(where: str, header: Dataset) -> None:
    """A `DicomSeriesError` unless each of `_SINGLE_NUMBERS` that ``header`` has is one finite number."""
    for keyword in _SINGLE_NUMBERS:
        value = header[keyword].value if keyword in header else None
        if value in (None, ""):
            continue
        try:
            finite = bool(np.isfinite(float(value)))
        except (TypeError, ValueError):
            finite = False
        if not finite:
            raise DicomSeriesError(f"{where} is a damaged DICOM image: {keyword} is {value!r}, not one number")


def _decode_header(dataset: Dataset) -> None:
    """Decode (and read, where the header scan deferred it) every element but the pixel data now: pydicom
    decodes on first use, and a damaged header must be found while its file is read, not later."""
    for tag in list(dataset.keys()):
        if tag != _PIXEL_DATA:
            element = dataset[tag]
            if element.VR == "SQ":
                for item in element.value:
                    _decode_header(item)


def _try_read(path: Path) -> Dataset | None:
    """The header of a DICOM image file (pixel data deferred), or None if the file is not one; a file that
    says it is a DICOM image but cannot be read whole is an error naming it (never a slice dropped in silence)."""
    try:
        try:
            dataset = pydicom.dcmread(path, defer_size=DEFER_SIZE)
        except pydicom.errors.InvalidDicomError:
            if not _starts_with_dicom_tag(path):
                if _is_dicom_file(path):  # a .dcm file, or one cut inside its preamble
                    raise DicomSeriesError(
                        f"{path} is a damaged DICOM file (no DICM marker); repair or remove it"
                    ) from None
                return None
            dataset = pydicom.dcmread(path, defer_size=DEFER_SIZE, force=True)  # legacy file, no preamble
        _decode_header(dataset)
    except Exception as error:  # pydicom raises many types on files that are not DICOM
        if _is_dicom_file(path):
            raise DicomSeriesError(
                f"{path} is a damaged DICOM file ({type(error).__name__}: {error}); repair or remove it"
            ) from None
        return None
    if any(keyword not in dataset for keyword in ("SeriesInstanceUID", "Rows", "Columns")):
        file_meta = dataset.get("file_meta", Dataset())
        sop_class = file_meta.get("MediaStorageSOPClassUID") or dataset.get("SOPClassUID")
        meta_length = file_meta.get("FileMetaInformationGroupLength")
        if sop_class is None or (meta_length is not None and path.stat().st_size < 144 + int(meta_length)):
            raise DicomSeriesError(
                f"{path} is a damaged DICOM file: its header stops before it says what it holds; repair or remove it"
            )
        if "Image Storage" in getattr(sop_class, "name", ""):
            raise DicomSeriesError(
                f"{path} is a damaged DICOM image: a {sop_class.name} file whose header stops "
                "before its series and image size; repair or remove it"
            )
        return None  # DICOMDIR, structured reports, presentation states...
    _check_single_numbers(str(path), dataset)
    if "TransferSyntaxUID" not in dataset.file_meta:  # no file meta: the encoding it was read with
        implicit, little = dataset.original_encoding
        dataset.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return dataset


def _read_headers(folder: Path) -> list[Item]:
    """Headers of every DICOM image file under ``folder``; one warning lists the files skipped."""
    if not folder.exists():
        raise DicomSeriesError(f"{folder} does not exist")
    if not folder.is_dir():
        raise DicomSeriesError(f"{folder} is not a folder (a DICOM series is read from the folder holding its files)")
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        headers = list(pool.map(_try_read, paths))
    # LIDC-IDRI keeps its annotation XML beside the slices: expected there, so skipped without a warning
    skipped = [path.name for path, header in zip(paths, headers) if header is None and path.suffix.lower() != ".xml"]
    if skipped:
        shown = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        _warn(f"{folder}: skipped {len(skipped)} file(s) that are not DICOM images: {shown}")
    return [(path, header) for path, header in zip(paths, headers) if header is not None]


def _series_table(items: list[Item]) -> dict[str, list[Item]]:
    table: dict[str, list[Item]] = defaultdict(list)
    for path, header in items:
        table[str(header.SeriesInstanceUID)].append((path, header))
    return dict(sorted(table.items()))


def _info(uid: str, items: list[Item]) -> DicomSeriesInfo:
    header = items[0][1]
    return DicomSeriesInfo(
        uid,
        str(header.get("Modality", "")),
        len(items),
        str(header.get("SeriesDescription", "")),
        str(header.get("PatientID", "")),
    )


def list_dicom_series(folder: str | Path) -> list[DicomSeriesInfo]:
    """The image series found (recursively) in ``folder``, sorted by SeriesInstanceUID (headers only)."""
    return [_info(uid, items) for uid, items in _series_table(_read_headers(Path(folder))).items()]


def _describe(infos: list[DicomSeriesInfo]) -> str:
    return "; ".join(f"{i.series_instance_uid} ({i.modality}, {i.n_files} files, '{i.description}')" for i in infos)


def _select_series(folder: Path, series_instance_uid: str | None) -> list[Item]:
    table = _series_table(_read_headers(folder))
    if not table:
        raise DicomSeriesError(f"{folder} holds no DICOM image files")
    infos = [_info(uid, items) for uid, items in table.items()]
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
            _warn(f"{folder}: skipped non-CT series: {_describe(others)}")
        if len(ct) > 1:
            raise DicomSeriesError(
                f"{folder} holds {len(ct)} CT series; choose one by SeriesInstanceUID: {_describe(ct)}"
            )
        chosen = table[ct[0].series_instance_uid]
    info = _info(str(chosen[0][1].SeriesInstanceUID), chosen)
    if info.modality != "CT":
        raise DicomSeriesError(
            f"series {info.series_instance_uid} is {info.modality or 'of unknown modality'}, not CT"
        )
    return chosen


# -- multi-frame objects -----------------------------------------------------------------------------------
def _is_multi_frame(header: Dataset) -> bool:
    return header.get("SOPClassUID") in _ENHANCED_CT or int(header.get("NumberOfFrames", 1) or 1) > 1


def _frame_records(path: Path, header: Dataset) -> list[Item]:
    """One single-frame header per frame of an enhanced CT object: the object's own tags, then the attributes
    of its shared and the frame's functional groups (position, orientation, pixel measures, rescale, window),
    and pixel data pointing at the frame in the file (uncompressed) or holding it decoded."""
    frames = int(header.get("NumberOfFrames", 1) or 1)
    per_frame = header.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != frames:
        raise DicomSeriesError(f"{path.name} has {len(per_frame)} per-frame functional groups for its {frames} frames")
    if "PixelData" not in header:
        raise DicomSeriesError(f"{path.name} has no pixel data")
    shared = (header.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    common = {tag: element for tag, element in header.items() if tag not in _WHOLE_OBJECT_TAGS}
    file_meta = header.file_meta
    if _native_dtype(header) is not None:  # uncompressed 16-bit: each frame is read from the file into the volume
        pixels = header.get_item(_PIXEL_DATA, keep_deferred=True)
        size = int(header.Rows) * int(header.Columns) * 2
        if pixels.length < frames * size:
            raise DicomSeriesError(f"{path.name}: pixel data is truncated ({pixels.length} of {frames * size} bytes)")
        frame_pixels = [
            pixels._replace(value=None, length=size, value_tell=pixels.value_tell + index * size)
            for index in range(frames)
        ]
    else:  # every frame decoded at once, kept as native little-endian bytes
        decoded = _decode(path, header).reshape(frames, -1)
        vr = "OB" if decoded.itemsize == 1 else "OW"
        frame_pixels = [
            DataElement(_PIXEL_DATA, vr, frame.astype(frame.dtype.newbyteorder("<")).tobytes()) for frame in decoded
        ]
        file_meta = copy.copy(file_meta)
        file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    records = []
    for index, groups in enumerate(per_frame):
        frame = FrameHeader(dict(common))
        frame.frame_number = index + 1
        for group in (shared, groups):
            for keyword in _FRAME_GROUPS:
                if group.get(keyword):
                    frame.update(group[keyword][0])
        frame[_PIXEL_DATA] = frame_pixels[index]
        _check_single_numbers(f"{path} frame {index + 1}", frame)
        frame.file_meta = file_meta
        records.append((path, frame))
    return records


def _single_frames(items: list[Item]) -> list[Item]:
    """The series as single-frame slices: an Enhanced (or Legacy Converted Enhanced) CT object becomes one
    slice per frame; several multi-frame objects, or one beside single-frame files, are refused."""
    multi = [(path, header) for path, header in items if _is_multi_frame(header)]
    if not multi:
        return items
    path, header = multi[0]
    series = f"series {header.SeriesInstanceUID}"
    if len(multi) > 1:
        raise DicomSeriesError(
            f"{path.name} and {multi[1][0].name} are both multi-frame objects of {series}; "
            "a series is read from one enhanced CT object: keep one of them"
        )
    if len(items) > 1:
        others = [other.name for other, _ in items if other != path]
        raise DicomSeriesError(
            f"{path.name} is a multi-frame object of {series}, which also has {len(others)} "
            f"single-frame file(s) ({', '.join(others[:3])}); keep either the object or the slices"
        )
    sop_class = UID(str(header.get("SOPClassUID", "")))
    if sop_class not in _ENHANCED_CT:
        raise DicomSeriesError(
            f"{path.name} is a multi-frame {sop_class.name or 'object'}, not an Enhanced CT image: "
            "the geometry of its frames is unknown"
        )
    return _frame_records(path, header)


# -- geometry --------------------------------------------------------------------------------------------
_VALUE_COUNTS = {"ImageOrientationPatient": 6, "ImagePositionPatient": 3, "PixelSpacing": 2}


def _require(items: list[Item], keyword: str) -> np.ndarray:
    """``keyword``'s numeric value in every header, as rows of an array."""
    missing = [_name(path, header) for path, header in items if keyword not in header]
    if missing:
        raise DicomSeriesError(f"{missing[0]} has no {keyword}: the series geometry is unknown")
    count = _VALUE_COUNTS[keyword]
    rows = []
    for path, header in items:
        element = header[keyword]
        values = [element.value] if element.VM == 1 else list(element.value)
        if len(values) != count or not all(isinstance(v, (int, float)) and np.isfinite(float(v)) for v in values):
            raise DicomSeriesError(
                f"{_name(path, header)}: {keyword} is {element.value!r}, not {count} finite numbers"
            )
        rows.append([float(v) for v in values])
    return np.array(rows)


def _shared(items: list[Item], keyword: str) -> np.ndarray:
    """``keyword``'s numeric value, which every slice must share (to 1e-4)."""
    values = _require(items, keyword)
    differs = np.flatnonzero(np.abs(values - values[0]).max(axis=1) > 1e-4)
    if differs.size:
        raise DicomSeriesError(f"{_name(*items[differs[0]])}: {keyword} differs from the rest of the series")
    return values[0]


def _frame(items: list[Item]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row direction, column direction and slice normal (orthonormal, LPS) shared by every slice."""
    orientation = _shared(items, "ImageOrientationPatient")
    row, column = orientation[:3], orientation[3:]
    if min(np.linalg.norm(row), np.linalg.norm(column)) < 0.5 or abs(np.dot(row, column)) > 1e-3:
        raise DicomSeriesError(f"ImageOrientationPatient {orientation.tolist()} is not two orthogonal unit vectors")
    row = row / np.linalg.norm(row)
    column = column - np.dot(column, row) * row
    column = column / np.linalg.norm(column)
    return row, column, np.cross(row, column)


# -- pixels ----------------------------------------------------------------------------------------------
def _decoder_advice(syntax: UID, error: Exception) -> str:
    """Why pydicom could not decode ``syntax`` and what to pip-install (from pydicom's missing plugins)."""
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return "pydicom has no decoder for this transfer syntax"
    reason = str(error).strip().splitlines()[-1].strip() if decoder.is_available else "no decoder plugin is installed"
    missing = decoder.missing_dependencies  # e.g. "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"
    if not missing:
        return f"{reason}; every decoder plugin pydicom knows for it is installed: the data may be corrupt"
    preferred = sorted(missing, key=lambda entry: not entry.startswith("pylibjpeg"))[0]
    requirements = preferred.partition(" - requires ")[2].split(" and ")
    packages = [
        _PIP_NAMES.get(name, name) for name in (re.split(r"[<>=!~ ]", r)[0] for r in requirements) if name != "numpy"
    ]
    plugins = ", ".join(entry.partition(" - ")[0] for entry in missing)
    return f"{reason}; install a decoder, e.g. `pip install {' '.join(packages)}` (missing pydicom plugins: {plugins})"


def _decode(path: Path, header: Dataset) -> np.ndarray:
    """Stored pixel values of a slice through pydicom's pixel handlers (compressed or unusual encodings)."""
    try:
        return header.pixel_array
    except Exception as error:  # pydicom raises RuntimeError/NotImplementedError/ValueError
        syntax = header.file_meta.TransferSyntaxUID
        raise DicomSeriesError(
            f"{_name(path, header)}: cannot decode '{syntax.name}' pixel data: {_decoder_advice(syntax, error)}"
        ) from None


def _native_dtype(header: Dataset) -> np.dtype | None:
    """int16/uint16 when the slice is uncompressed 16-bit little-endian grey (read without pydicom)."""
    if (
        header.file_meta.TransferSyntaxUID not in _NATIVE_LITTLE_ENDIAN
        or sys.byteorder != "little"
        or int(header.get("BitsAllocated", 0)) != 16
        or int(header.get("SamplesPerPixel", 1)) != 1
    ):
        return None
    return np.dtype(np.int16 if int(header.get("PixelRepresentation", 0)) == 1 else np.uint16)


def _read_native(path: Path, header: Dataset, buffer: np.ndarray) -> None:
    """Fill ``buffer`` with the slice's uncompressed pixel bytes (from the file when deferred)."""
    element = header.get_item(_PIXEL_DATA, keep_deferred=True)
    if isinstance(element, RawDataElement) and element.value is None:
        with open(path, "rb") as file:
            file.seek(element.value_tell)
            read = file.readinto(buffer)
    else:
        data = np.frombuffer(header.PixelData, np.uint8)[: buffer.nbytes]
        read = data.size
        buffer.view(np.uint8).reshape(-1)[:read] = data
    if read < buffer.nbytes:
        raise DicomSeriesError(f"{_name(path, header)}: pixel data is truncated ({read} of {buffer.nbytes} bytes)")


def _stored_pixels(path: Path, header: Dataset) -> np.ndarray:
    """Stored values of one slice (before rescale)."""
    dtype = _native_dtype(header)
    if dtype is None:
        return _decode(path, header)
    pixels = np.empty((int(header.Rows), int(header.Columns)), dtype)
    _read_native(path, header, pixels)
    bits_stored = int(header.get("BitsStored", 16))
    if bits_stored < 16:  # sign-extend or mask away the unused high bits
        shift = 16 - bits_stored
        pixels = (pixels << shift) >> shift if dtype == np.int16 else pixels & ((1 << bits_stored) - 1)
    return pixels


def _rescale(header: Dataset) -> tuple[float, float]:
    return float(header.get("RescaleSlope", 1) or 1), float(header.get("RescaleIntercept", 0) or 0)


def _padding_mask(stored: np.ndarray, header: Dataset) -> np.ndarray | None:
    """Pixels whose stored value is PixelPaddingValue (or within PixelPaddingRangeLimit of it)."""
    if "PixelPaddingValue" not in header:
        return None
    value = int(header.PixelPaddingValue)
    limit = int(header.get("PixelPaddingRangeLimit", value))
    return (stored >= min(value, limit)) & (stored <= max(value, limit))


def _fill_slice(out: np.ndarray, path: Path, header: Dataset) -> bool:
    """Write one slice in int16 HU into ``out`` and drop its pixel data; True if values had to be clipped."""
    if "PixelData" not in header:
        raise DicomSeriesError(f"{_name(path, header)} has no pixel data")
    samples = int(header.get("SamplesPerPixel", 1))
    if samples != 1:
        colour = header.get("PhotometricInterpretation", "")
        raise DicomSeriesError(
            f"{_name(path, header)} holds {samples} samples per pixel ({colour} colour); "
            "a CT slice holds one grey value per pixel"
        )
    if int(header.Rows) != out.shape[0] or int(header.Columns) != out.shape[1]:
        raise DicomSeriesError(f"{_name(path, header)}: image size differs from the rest of the series")
    slope, intercept = _rescale(header)
    identity = slope == 1 and intercept == 0 and "PixelPaddingValue" not in header
    if identity and _native_dtype(header) == np.int16 and int(header.get("BitsStored", 16)) == 16:
        _read_native(path, header, out)  # stored values are HU already: straight into the volume
        clipped = False
    else:
        pixels = _stored_pixels(path, header)
        shift = int(intercept) if slope == 1 and intercept.is_integer() else None
        exact = shift is not None and pixels.dtype.kind in "iu" and pixels.dtype.itemsize <= 2
        if exact and HU_MIN <= int(pixels.min()) + shift and int(pixels.max()) + shift <= HU_MAX:
            np.add(pixels, shift, out=out, dtype=np.int32, casting="unsafe")  # exact integer HU, no temporaries
            clipped = False
        else:
            values = np.rint(pixels.astype(np.float64) * slope + intercept)
            clipped = bool(values.min() < HU_MIN or values.max() > HU_MAX)
            out[...] = np.clip(values, HU_MIN, HU_MAX)
        padding = _padding_mask(pixels, header)
        if padding is not None:
            out[padding] = PADDING_HU
    del header.PixelData  # the kept source headers hold no pixels
    return clipped


# -- irregular stacks ---------------------------------------------------------------------------------------
def _drop_duplicates(items: list[Item], positions: np.ndarray, hu: np.ndarray) -> list[int]:
    """Indices of the slices to keep: a repeat of a slice (same position, same pixels) is dropped."""
    keep = [0]
    for index in range(1, len(items)):
        if abs(positions[index] - positions[keep[-1]]) >= POSITION_TOLERANCE_MM:
            keep.append(index)
        elif np.array_equal(hu[index], hu[keep[-1]]):
            _warn(f"{_name(*items[index])} duplicates {_name(*items[keep[-1]])}; dropped")
        else:
            raise DicomSeriesError(
                f"{_name(*items[index])} and {_name(*items[keep[-1]])} share position {positions[index]:.2f} mm "
                "but hold different pixels: the folder mixes acquisitions; separate them"
            )
    return keep


def _untilt(hu: np.ndarray, offsets_pixels: np.ndarray) -> np.ndarray:
    """Shift each slice in-plane by its (row, column) offset (linear interpolation; air outside)."""
    out = np.empty_like(hu)
    offsets_pixels = np.round(offsets_pixels, 3)  # so that a whole-pixel shift keeps its edge row/column
    for index, (image, offset) in enumerate(zip(hu, offsets_pixels)):
        shifted = ndimage.shift(image.astype(np.float32), offset, order=1, mode="constant", cval=PADDING_HU)
        out[index] = np.rint(shifted)
    return out


def _regularise_steps(hu: np.ndarray, positions: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation along the normal onto a regular grid of ``step`` from the first slice;
    also the index of the acquired slice just below each new one."""
    regular = positions[0] + step * np.arange(int(round((positions[-1] - positions[0]) / step)) + 1)
    upper = np.clip(np.searchsorted(positions, regular, side="right"), 1, len(positions) - 1)
    weight = ((regular - positions[upper - 1]) / (positions[upper] - positions[upper - 1]))[:, None, None]
    return np.rint((1 - weight) * hu[upper - 1] + weight * hu[upper]).astype(np.int16), upper - 1


def read_dicom_series(
    folder: str | Path, series_instance_uid: str | None = None, *, on_uneven: str = "error"
) -> CTVolume:
    """Read a CT series from ``folder`` (searched recursively) as an int16 HU `CTVolume`.

    Several series in the folder: pass ``series_instance_uid`` (the error lists them). ``on_uneven``:
    what to do with missing slices, uneven slice steps or gantry tilt (sheared stacks) — ``"error"``
    (default) or ``"resample"`` (linear interpolation onto a regular, unsheared grid at the median step,
    with a warning). Padding pixels (PixelPaddingValue/RangeLimit) become -1024 HU; HU beyond int16 are
    clipped with a warning. A single slice gets SpacingBetweenSlices, else SliceThickness, else 1 mm.
    """
    if on_uneven not in ("error", "resample"):
        raise DicomSeriesError(f"on_uneven must be 'error' or 'resample'; got {on_uneven!r}")
    folder = Path(folder)
    items = _single_frames(_select_series(folder, series_instance_uid))
    row, column, normal = _frame(items)
    pixel_spacing = _shared(items, "PixelSpacing")
    origins = _require(items, "ImagePositionPatient")
    order = np.argsort(origins @ normal, kind="stable")
    items, origins = [items[i] for i in order], origins[order]
    positions = origins @ normal

    first = items[0][1]
    hu = np.empty((len(items), int(first.Rows), int(first.Columns)), np.int16)
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        clipped = list(pool.map(_fill_slice, hu, *zip(*items)))
    if any(clipped):
        _warn(f"{folder}: HU values outside the int16 range were clipped in {sum(clipped)} slice(s)")

    keep = _drop_duplicates(items, positions, hu)
    if len(keep) < len(items):
        items, positions, origins, hu = [items[i] for i in keep], positions[keep], origins[keep], hu[keep]

    step = float(first.get("SpacingBetweenSlices", 0) or first.get("SliceThickness", 0) or 1.0)
    if len(items) > 1:
        drift = origins - origins[0] - np.outer(positions - positions[0], normal)  # in-plane drift (tilt)
        drift_pixels = np.column_stack([drift @ column / pixel_spacing[0], drift @ row / pixel_spacing[1]])
        steps = np.diff(positions)
        step = float(np.median(steps))
        uneven = np.abs(steps - step) > max(POSITION_TOLERANCE_MM, SPACING_TOLERANCE * step)
        tilted = np.abs(drift_pixels).max() > TILT_TOLERANCE_PIXELS
        if tilted or uneven.any():
            if tilted:
                angle = np.degrees(np.arctan2(np.linalg.norm(drift[-1]), positions[-1] - positions[0]))
                problem = f"slices are sheared by gantry tilt (about {angle:.1f} degrees)"
            else:
                where = int(np.flatnonzero(uneven)[0])
                problem = (
                    f"uneven slice spacing ({steps.min():.3f} to {steps.max():.3f} mm, median {step:.3f}); first "
                    f"irregular step {steps[where]:.3f} mm after the slice at {positions[where]:.2f} mm"
                )
            if on_uneven == "error":
                raise DicomSeriesError(
                    f"{folder}: {problem} — missing slices? read with on_uneven='resample' to interpolate"
                )
            _warn(f"{folder}: {problem}; resampled to a regular {step:.3f} mm grid")
            if tilted:
                hu = _untilt(hu, drift_pixels)
            hu, below = _regularise_steps(hu, positions, step)
            items = [items[i] for i in below]  # nearest-below headers; the geometry comes from the grid

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
        spacing_mm=(step, float(pixel_spacing[0]), float(pixel_spacing[1])),
        origin_mm=tuple(origins[0]),
        direction=np.column_stack([normal, column, row]),
        metadata=metadata,
    )


# -- writing ------------------------------------------------------------------------------------------------
def _uid(seed: str | None, *parts: object) -> str:
    return generate_uid(entropy_srcs=[seed, *map(str, parts)]) if seed is not None else generate_uid()


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    text = "0" if text == "-0" else text
    return text if len(text) <= 16 else f"{value:.10g}"[:16]


def _is_dicom_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as file:
        head = file.read(132)
    cut_in_preamble = 0 < len(head) < 132 and not any(head)  # the zero preamble and nothing after it
    return head[128:132] == b"DICM" or path.suffix.lower() == ".dcm" or cut_in_preamble


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a folder whose contents the write would destroy: anything but DICOM files, always;
    DICOM files unless ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DicomSeriesError(f"{out_dir} exists and is not a folder")
    entries = sorted(out_dir.iterdir()) if out_dir.exists() else []
    others = [entry.name for entry in entries if not _is_dicom_file(entry)]
    if others:
        raise DicomSeriesError(
            f"{out_dir} holds other things than DICOM files ({', '.join(others[:3])}); write the series into a new "
            "or empty folder"
        )
    if entries and not overwrite:
        raise DicomSeriesError(
            f"{out_dir} is not empty ({len(entries)} DICOM files); pass overwrite=True (--overwrite on the command "
            "line) to replace them"
        )


def _minimal_ct_header(volume: CTVolume, study_uid: str, frame_uid: str) -> Dataset:
    """The series-level tags of a minimal CT Image IOD (Type 1 filled, Type 2 present)."""
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
    header.WindowCenter = "-600"  # lung window
    header.WindowWidth = "1500"
    return header


def _slice_header(
    volume: CTVolume, index: int, base: Dataset, *, derived: bool, series_uid: str, sop_uid: str, description: str
) -> Dataset:
    """A copy of ``base`` made into slice ``index`` of the new series: UIDs, geometry and pixels set."""
    header = copy.deepcopy(base)
    for keyword in (
        "PixelPaddingValue",
        "PixelPaddingRangeLimit",
        "SmallestImagePixelValue",
        "LargestImagePixelValue",
        "PixelData",
        *_PALETTE_KEYWORDS,
    ):
        if keyword in header:
            delattr(header, keyword)
    header.SOPClassUID = CTImageStorage
    header.SOPInstanceUID = sop_uid
    header.SeriesInstanceUID = series_uid
    header.SeriesDescription = description[:64]
    if derived:
        image_type = header.get("ImageType", [])
        image_type = [image_type] if isinstance(image_type, str) else list(image_type)
        header.ImageType = ["DERIVED", "SECONDARY", *(image_type[2:] or ["AXIAL"])]
        header.DerivationDescription = f"m3d: {description}"[:1024]
        if "SpacingBetweenSlices" in header:
            header.SpacingBetweenSlices = _ds(volume.spacing_mm[0])
    position = volume.voxel_to_world((index, 0, 0))
    header.InstanceNumber = index + 1
    header.ImagePositionPatient = [_ds(v) for v in position]
    header.ImageOrientationPatient = [_ds(v) for v in (*volume.direction[:, 2], *volume.direction[:, 1])]
    header.SliceLocation = _ds(float(np.dot(position, volume.slice_normal)))
    header.PixelSpacing = [_ds(volume.spacing_mm[1]), _ds(volume.spacing_mm[2])]
    header.Rows, header.Columns = volume.shape[1], volume.shape[2]
    header.BitsAllocated, header.BitsStored, header.HighBit = 16, 16, 15
    header.PixelRepresentation = 1
    header.RescaleSlope, header.RescaleIntercept, header.RescaleType = "1", "0", "HU"
    header.PixelData = np.ascontiguousarray(volume.hu[index], dtype="<i2").tobytes()
    header["PixelData"].VR = "OW"
    header.file_meta = FileMetaDataset()
    header.file_meta.MediaStorageSOPClassUID = CTImageStorage
    header.file_meta.MediaStorageSOPInstanceUID = sop_uid
    header.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return header


def _item(**values: object) -> Dataset:
    """A sequence item holding ``values`` (keyword=value)."""
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _enhanced_header(
    volume: CTVolume, base: Dataset, *, derived: bool, series_uid: str, sop_uid: str, description: str
) -> Dataset:
    """Every slice of ``volume`` as a frame of one Enhanced CT Image object: the tags of slice 0's header (see
    `_slice_header`), with the geometry, rescale and window moved into functional groups (pixel measures, plane
    orientation, pixel value transformation, frame type, frame VOI LUT shared; frame content and plane position
    per frame) and the frames indexed by stack position. Frame anatomy and irradiation event, which m3d does not
    know, are left out."""
    header = _slice_header(
        volume, 0, base, derived=derived, series_uid=series_uid, sop_uid=sop_uid, description=description
    )
    image_type = ["DERIVED", "SECONDARY", "VOLUME", "NONE"]
    shared = _item(
        PixelMeasuresSequence=[
            _item(
                PixelSpacing=header.PixelSpacing,
                SliceThickness=header.get("SliceThickness") or _ds(volume.spacing_mm[0]),
                SpacingBetweenSlices=_ds(volume.spacing_mm[0]),
            )
        ],
        PlaneOrientationSequence=[_item(ImageOrientationPatient=header.ImageOrientationPatient)],
        PixelValueTransformationSequence=[_item(RescaleIntercept="0", RescaleSlope="1", RescaleType="HU")],
        CTImageFrameTypeSequence=[
            _item(
                FrameType=image_type,
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
            )
        ],
    )
    if "WindowCenter" in header and "WindowWidth" in header:
        shared.FrameVOILUTSequence = [_item(WindowCenter=header.WindowCenter, WindowWidth=header.WindowWidth)]
    header.SharedFunctionalGroupsSequence = [shared]
    header.PerFrameFunctionalGroupsSequence = [
        _item(
            FrameContentSequence=[
                _item(StackID="1", InStackPositionNumber=index + 1, DimensionIndexValues=[1, index + 1])
            ],
            PlanePositionSequence=[_item(ImagePositionPatient=[_ds(v) for v in volume.voxel_to_world((index, 0, 0))])],
        )
        for index in range(volume.shape[0])
    ]
    for keyword in (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "SpacingBetweenSlices",
        "SliceLocation",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "WindowCenter",
        "WindowWidth",
        "WindowCenterWidthExplanation",
    ):
        if keyword in header:
            delattr(header, keyword)
    organization = _uid(sop_uid, "dimension organization")
    header.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=organization)]
    header.DimensionIndexSequence = [
        _item(
            DimensionIndexPointer=Tag(keyword),
            FunctionalGroupPointer=Tag("FrameContentSequence"),
            DimensionOrganizationUID=organization,
        )
        for keyword in ("StackID", "InStackPositionNumber")
    ]
    header.SOPClassUID = header.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    header.ImageType = image_type
    header.PixelPresentation, header.VolumetricProperties = "MONOCHROME", "VOLUME"
    header.VolumeBasedCalculationTechnique = "NONE"
    header.ContentQualification = "RESEARCH"
    header.BurnedInAnnotation, header.PresentationLUTShape = "NO", "IDENTITY"
    header.InstanceNumber = 1
    header.NumberOfFrames = volume.shape[0]
    header.PixelData = np.ascontiguousarray(volume.hu, dtype="<i2").tobytes()
    return header


def publish_folder(staging: Path, out_dir: Path) -> None:
    """Move the finished ``staging`` folder to ``out_dir``, replacing (checked) old contents."""
    if not out_dir.exists():
        staging.replace(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    out_dir.replace(old)
    try:
        staging.replace(out_dir)
    except BaseException:
        old.replace(out_dir)
        raise
    shutil.rmtree(old)


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
    enhanced: bool = False,
) -> list[Path]:
    """Write ``volume`` as a CT Image Storage series (Explicit VR Little Endian, int16 HU with slope 1
    and intercept 0) into ``out_dir``, atomically (built in a hidden sibling folder, then renamed).
    Returns the written files in slice order. With ``enhanced``, the series is one Enhanced CT Image
    object instead (every slice a frame, named by ``filename_pattern`` for index 0).

    With ``derived_from_source`` and source headers for every slice, each file keeps its source tags
    (patient, study, frame of reference, acquisition) with new Series/SOP UIDs and ImageType DERIVED;
    otherwise a minimal CT IOD is written. ``uid_seed`` makes every generated UID (and so every byte)
    reproducible; ``series_instance_uid`` sets the new series' UID (never reuse a source series' UID).
    ``out_dir`` must be new or empty, or hold only DICOM files and ``overwrite=True`` (they are replaced).
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    names = [filename_pattern.format(index=index) for index in range(1 if enhanced else volume.shape[0])]
    if len(set(names)) != len(names) or any(Path(name).name != name for name in names):
        raise DicomSeriesError(f"filename_pattern {filename_pattern!r} must give a distinct plain file name per slice")
    sources = volume.metadata.source_headers
    derived = derived_from_source and sources is not None and len(sources) == volume.shape[0]
    series_uid = series_instance_uid or _uid(uid_seed, "series")
    template = None if derived else _minimal_ct_header(volume, _uid(uid_seed, "study"), _uid(uid_seed, "frame"))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the series folder gets the usual mode
    try:
        for index, name in enumerate(names):
            base = sources[index] if derived else template
            sop_uid = _uid(uid_seed, series_uid, "sop", index)
            if enhanced:
                header = _enhanced_header(
                    volume,
                    base,
                    derived=derived,
                    series_uid=series_uid,
                    sop_uid=sop_uid,
                    description=series_description,
                )
            else:
                header = _slice_header(
                    volume,
                    index,
                    base,
                    derived=derived,
                    series_uid=series_uid,
                    sop_uid=sop_uid,
                    description=series_description,
                )
            header.save_as(staging / name, enforce_file_format=True)
        publish_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out_dir / name for name in names]
