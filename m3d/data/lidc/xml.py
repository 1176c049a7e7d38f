"""The LIDC-IDRI XML read messages: `read_lidc_xml` and `write_lidc_xml`.

The ``LidcReadMessage`` files ship next to each LIDC-IDRI CT series (namespace ``http://www.nih.gov``).
Chest X-ray reads (``IdriReadMessage`` with ``CXRreadingSession``) are refused with a clear error.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..ct import CTVolume
from .geometry import check_axial_grid, volume_z_positions
from .model import CHARACTERISTICS, Annotation, ContourROI, LIDCScan, NonNodule

LIDC_NAMESPACE = "http://www.nih.gov"


# -- reading ----------------------------------------------------------------------------------------
def _local(tag: Any) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _children(element: ET.Element | None, name: str) -> list[ET.Element]:
    name = name.lower()
    return [] if element is None else [c for c in element if _local(c.tag).lower() == name]


def _text(element: ET.Element | None, name: str) -> str | None:
    found = _children(element, name)
    if not found or found[0].text is None:
        return None
    return found[0].text.strip() or None


def _float(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def _points(element: ET.Element, name: str) -> np.ndarray:
    pairs = []
    for point in _children(element, name):
        x, y = _float(_text(point, "xCoord")), _float(_text(point, "yCoord"))
        if x is not None and y is not None:
            pairs.append((x, y))
    return np.asarray(pairs, dtype=np.float64).reshape(-1, 2)


def _reader_names(ids: list[str | None]) -> list[str]:
    """One distinct name per reading session: the servicingRadiologistID (public files say "anon" or
    "anonymous" for everyone), made unique as ``ID#k`` (k = 1-based session number) when repeated."""
    counts = Counter(ids)
    names = []
    for k, reader_id in enumerate(ids, start=1):
        if not reader_id:
            names.append(f"reader{k}")
        else:
            names.append(f"{reader_id}#{k}" if counts[reader_id] > 1 else reader_id)
    return names


def _slice_thickness(volume: CTVolume) -> float:
    """The nominal slice thickness the reader recorded (SliceThickness), else the z step."""
    return volume.metadata.slice_thickness_mm or float(volume.spacing_mm[0])


def read_lidc_xml(
    path: str | Path,
    volume: CTVolume | None = None,
    *,
    pixel_spacing_mm: float | None = None,
    slice_thickness_mm: float | None = None,
) -> LIDCScan:
    """Parse an LIDC-IDRI CT read message (``LidcReadMessage``) into an `LIDCScan`.

    With ``volume`` (the annotated series) the geometry -- slice z positions, pixel spacing, rows and
    columns, in-plane origin, patient id -- comes from it, and ROIs without ``imageZposition`` are placed
    through their ``imageSOP_UID`` when the volume keeps its DICOM headers. Without it the geometry is
    best effort: z positions are a regular grid spanning the marked slices (step = the smallest gap
    between them), pixel spacing and slice thickness are the keyword values or NaN (then `group_nodules`
    warns, groups with a nominal pixel and leaves diameters NaN), rows/columns 512, origin unknown,
    patient id from an ``LIDC-IDRI-dddd`` path part.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, LookupError) as error:  # LookupError: an encoding Python does not know
        raise ValueError(f"{path}: not well-formed XML ({error})") from None
    root_name = _local(root.tag)
    is_xray = root_name == "IdriReadMessage" or any(_local(e.tag) == "CXRreadingSession" for e in root.iter())
    if is_xray:
        raise ValueError(f"{path}: a chest X-ray read ({root_name}, CXRreadingSession), not a CT LidcReadMessage")
    if root_name != "LidcReadMessage":
        raise ValueError(f"{path}: root element <{root_name}> is not an LIDC-IDRI CT read message <LidcReadMessage>")
    header = (_children(root, "ResponseHeader") or [None])[0]
    series_uid = _text(header, "SeriesInstanceUid") or ""
    study_uid = _text(header, "StudyInstanceUID") or ""
    if volume is not None:
        check_axial_grid(volume)
        volume_uid = volume.metadata.series_instance_uid
        if series_uid and volume_uid and series_uid != volume_uid:
            raise ValueError(f"{path} annotates series {series_uid}, the volume is series {volume_uid}")

    sop_z: dict[str, float] = {}
    if volume is not None and volume.metadata.source_headers:
        for slice_header, z in zip(volume.metadata.source_headers, volume_z_positions(volume)):
            uid = getattr(slice_header, "SOPInstanceUID", None)
            if uid:
                sop_z[str(uid)] = float(z)

    def roi_z(element: ET.Element, what: str) -> float | None:
        z = _float(_text(element, "imageZposition"))
        if z is None:
            z = sop_z.get(_text(element, "imageSOP_UID") or "")
        if z is None:
            warnings.warn(f"{path}: {what} has no usable imageZposition; skipped", stacklevel=3)
        return z

    sessions = _children(root, "readingSession")
    readers = _reader_names([_text(s, "servicingRadiologistID") for s in sessions])
    annotations: list[Annotation] = []
    non_nodules: list[NonNodule] = []
    for reader, session in zip(readers, sessions):
        for nodule in _children(session, "unblindedReadNodule"):
            nodule_id = _text(nodule, "noduleID") or ""
            characteristics: dict[str, int] = {}
            for block in _children(nodule, "characteristics"):
                for name in CHARACTERISTICS:
                    value = _float(_text(block, name))
                    if value is not None:
                        characteristics[name] = int(round(value))
            rois = []
            for roi in _children(nodule, "roi"):
                z = roi_z(roi, f"nodule {nodule_id!r} of {reader} ROI")
                points = _points(roi, "edgeMap")
                if z is None or len(points) == 0:
                    continue
                inclusion = (_text(roi, "inclusion") or "TRUE").upper() not in ("FALSE", "0", "NO")
                rois.append(ContourROI(z, points, inclusion, _text(roi, "imageSOP_UID") or ""))
            if rois:
                annotations.append(Annotation(nodule_id, reader, rois, characteristics))
            else:
                warnings.warn(f"{path}: nodule {nodule_id!r} of {reader} has no usable ROI; skipped", stacklevel=2)
        for mark in _children(session, "nonNodule"):
            mark_id = _text(mark, "nonNoduleID") or ""
            z = roi_z(mark, f"non-nodule {mark_id!r} of {reader}")
            points = _points(mark, "locus")
            if z is not None and len(points):
                non_nodules.append(NonNodule(mark_id, reader, z, points, _text(mark, "imageSOP_UID") or ""))

    marked_z = [roi.z_mm for a in annotations for roi in a.rois] + [n.z_mm for n in non_nodules]
    if volume is not None:
        z_positions = volume_z_positions(volume)
        dz, dy, dx = volume.spacing_mm
        if abs(dy - dx) > 1e-4 * max(dy, dx):
            warnings.warn(f"{path}: non-square pixels ({dy}, {dx}) mm; using the row spacing {dy}", stacklevel=2)
        far = [z for z in marked_z if np.abs(z_positions - z).min() > 0.5 * dz]
        if far:
            warnings.warn(
                f"{path}: {len(far)} marks lie between the volume's slices (e.g. z = {far[0]})", stacklevel=2
            )
        meta = volume.metadata
        return LIDCScan(
            patient_id=meta.patient_id or _patient_id_from_path(path),
            series_instance_uid=series_uid or meta.series_instance_uid,
            study_instance_uid=study_uid or meta.study_instance_uid,
            slice_thickness_mm=_slice_thickness(volume) if slice_thickness_mm is None else slice_thickness_mm,
            pixel_spacing_mm=dy if pixel_spacing_mm is None else pixel_spacing_mm,
            z_positions_mm=z_positions,
            annotations=annotations,
            rows=volume.shape[1],
            columns=volume.shape[2],
            origin_xy_mm=(volume.origin_mm[0], volume.origin_mm[1]),
            non_nodules=non_nodules,
        )
    z_positions = _grid_from_marks(marked_z)
    thickness = slice_thickness_mm
    if thickness is None:
        thickness = float(z_positions[1] - z_positions[0]) if len(z_positions) > 1 else math.nan
    return LIDCScan(
        patient_id=_patient_id_from_path(path),
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        slice_thickness_mm=thickness,
        pixel_spacing_mm=math.nan if pixel_spacing_mm is None else pixel_spacing_mm,
        z_positions_mm=z_positions,
        annotations=annotations,
        non_nodules=non_nodules,
    )


def _patient_id_from_path(path: Path) -> str:
    for part in reversed(path.resolve().parts):
        match = re.fullmatch(r"(LIDC-IDRI-\d{4})", part)
        if match:
            return match.group(1)
    return ""


def _grid_from_marks(marked_z: list[float], max_slices: int = 2000) -> np.ndarray:
    """A regular slice grid spanning the marked z positions (step: the smallest gap between them), or
    the distinct marked positions when they do not sit on such a grid."""
    positions = np.unique(np.round(np.asarray(marked_z, dtype=np.float64), 4))
    if len(positions) < 2:
        return positions
    step = float(np.diff(positions).min())
    n_slices = int(round((positions[-1] - positions[0]) / step)) + 1
    grid = positions[0] + step * np.arange(n_slices)
    offsets = (positions - positions[0]) / step
    if n_slices <= max_slices and np.all(np.abs(offsets - np.round(offsets)) < 0.05):
        return grid
    return positions


# -- writing ----------------------------------------------------------------------------------------
def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def write_lidc_xml(scan: LIDCScan, path: str | Path) -> Path:
    """Write ``scan``'s annotations and non-nodules as an LIDC ``LidcReadMessage`` (one readingSession per
    reader, in order of first appearance; annotations without a reader go to one "anonymous" session).
    Written atomically; `read_lidc_xml` reads it back to equal annotations. Geometry is not part of the
    format: read it back with the volume. Non-integer pixel coordinates are written as decimals."""
    ET.register_namespace("", LIDC_NAMESPACE)

    def child(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
        element = ET.SubElement(parent, f"{{{LIDC_NAMESPACE}}}{tag}")
        if text is not None:
            element.text = text
        return element

    root = ET.Element(f"{{{LIDC_NAMESPACE}}}LidcReadMessage")
    header = child(root, "ResponseHeader")
    child(header, "TaskDescription", "m3d write_lidc_xml")
    child(header, "SeriesInstanceUid", scan.series_instance_uid)
    child(header, "StudyInstanceUID", scan.study_instance_uid)
    for reader in scan.readers:
        session = child(root, "readingSession")
        child(session, "annotationVersion", "3.12")
        child(session, "servicingRadiologistID", reader or "anonymous")
        for annotation in (a for a in scan.annotations if a.reader == reader):
            nodule = child(session, "unblindedReadNodule")
            child(nodule, "noduleID", annotation.nodule_id)
            if annotation.characteristics:
                block = child(nodule, "characteristics")
                for name in CHARACTERISTICS:
                    if name in annotation.characteristics:
                        child(block, name, str(int(annotation.characteristics[name])))
            for roi in annotation.rois:
                element = child(nodule, "roi")
                child(element, "imageZposition", repr(roi.z_mm))
                child(element, "imageSOP_UID", roi.sop_instance_uid)
                child(element, "inclusion", "TRUE" if roi.inclusion else "FALSE")
                for x, y in roi.points_xy_px:
                    edge = child(element, "edgeMap")
                    child(edge, "xCoord", _number(x))
                    child(edge, "yCoord", _number(y))
        for mark in (m for m in scan.non_nodules if m.reader == reader):
            element = child(session, "nonNodule")
            child(element, "nonNoduleID", mark.nodule_id)
            child(element, "imageZposition", repr(mark.z_mm))
            child(element, "imageSOP_UID", mark.sop_instance_uid)
            for x, y in mark.points_xy_px:
                locus = child(element, "locus")
                child(locus, "xCoord", _number(x))
                child(locus, "yCoord", _number(y))
    tree = ET.ElementTree(root)
    ET.indent(tree)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            tree.write(stream, encoding="UTF-8", xml_declaration=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
