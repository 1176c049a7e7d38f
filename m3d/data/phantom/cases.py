"""Many phantoms: numbered cases made in order (on several processes) and written to disk as DICOM, LIDC
XML, masks and a JSON record, atomically and resumably."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..lidc import LIDCDatabase, LIDCScan, write_lidc_xml
from .make import PhantomCase, make_phantom, uid_seed

MIN_CASES_PER_POOL = 8  # fewer phantoms do not pay for starting worker processes


def _patient_id(index: int) -> str:
    return f"M3D-PHANTOM-{index:04d}"


def _with_sop_uids(scan: LIDCScan, paths: Sequence[Path]) -> LIDCScan:
    """A copy of ``scan`` whose contours name the SOP instance UID and file of their slice."""
    import pydicom

    by_z: dict[float, tuple[str, str]] = {}
    for path in paths:
        header = pydicom.dcmread(str(path), stop_before_pixels=True)
        z = float(header.ImagePositionPatient[2])
        by_z[round(z, 3)] = (str(header.SOPInstanceUID), os.path.basename(str(path)))
    if not by_z:
        return scan
    slice_z = np.array(sorted(by_z))
    annotations = []
    for annotation in scan.annotations:
        rois = []
        for roi in annotation.rois:
            z = slice_z[int(np.argmin(np.abs(slice_z - roi.z_mm)))]
            uid, name = by_z[float(z)]
            rois.append(replace(roi, sop_instance_uid=uid, dicom_file_name=name))
        annotations.append(replace(annotation, rois=rois))
    return replace(scan, annotations=annotations)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)


def write_phantom_case(case: PhantomCase, out_dir: str | Path) -> Path:
    """Write ``out_dir/<patient_id>/``: ``dicom/*.dcm``, ``annotations.xml`` (LIDC XML of the true
    nodules), ``phantom.json`` (seed, source scans and nodules) and ``lung_mask.nii.gz`` /
    ``nodule_mask.nii.gz`` (50 % consensus of the readers); returns the case folder.

    The folder is assembled under a temporary name and renamed when complete, so a folder with the
    patient id is always whole. DICOM UIDs derive from the case's seed: the output is byte-identical
    for the same seed.
    """
    from ..dicom import write_dicom_series

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    patient_id = case.lidc.patient_id
    final = out_dir / patient_id
    partial = out_dir / f".{patient_id}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    paths = write_dicom_series(
        case.volume,
        partial / "dicom",
        series_description="M3D synthetic chest CT phantom",
        uid_seed=uid_seed(case.seed_entropy),
        series_instance_uid=case.lidc.series_instance_uid,
    )
    # the XML names the series and each contour's slice (SOP instance UID) as written
    write_lidc_xml(_with_sop_uids(case.lidc, paths), partial / "annotations.xml")
    try:
        from ..nifti import write_mask_nifti
    except ImportError:
        write_mask_nifti = None
    if write_mask_nifti is not None:
        write_mask_nifti(case.lung_mask, case.volume, partial / "lung_mask.nii.gz")
        if case.nodule_mask is not None:
            write_mask_nifti(case.nodule_mask, case.volume, partial / "nodule_mask.nii.gz")
    meta = {
        "patient_id": patient_id,
        "series_instance_uid": case.lidc.series_instance_uid,
        "study_instance_uid": case.lidc.study_instance_uid,
        "seed": case.seed_entropy,
        "geometry_series_uid": case.geometry_series_uid,
        "shape_zyx": list(case.volume.shape),
        "spacing_mm_zyx": list(case.volume.spacing_mm),
        "origin_mm_lps": list(case.volume.origin_mm),
        "slice_thickness_mm": case.lidc.slice_thickness_mm,
        "nodules": case.nodules,
    }
    (partial / "phantom.json").write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final


def _numbered_phantom(seed: int, index: int, settings: dict[str, Any]) -> PhantomCase:
    return make_phantom(np.random.SeedSequence([int(seed), index]), patient_id=_patient_id(index), **settings)


def phantom_workers(n: int, num_processes: int = 1) -> int:
    """Processes to make ``n`` phantoms with: this process's share of the CPU cores, when there are enough
    scans (8) to pay for starting them."""
    return 1 if n < MIN_CASES_PER_POOL else max(1, (os.cpu_count() or 1) // num_processes)


def make_phantoms(n: int, seed: int = 0, *, workers: int = 1, **settings: Any) -> Iterator[PhantomCase]:
    """Cases ``0 .. n-1`` in order, case ``i`` seeded ``SeedSequence([seed, i])`` with patient id
    ``M3D-PHANTOM-<i>`` (as `generate_phantoms` names them); ``settings`` go to `make_phantom`. With
    ``workers`` > 1 that many processes make them: each case depends only on ``(seed, i)``, so the
    cases are the same on any number of workers."""
    if workers <= 1 or n <= 1:
        yield from (_numbered_phantom(seed, i, settings) for i in range(n))
        return
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(min(workers, n), mp_context=get_context("spawn")) as pool:
        yield from pool.map(_numbered_phantom, [seed] * n, range(n), [settings] * n)


def _case_complete(folder: Path) -> bool:
    written = (folder / "annotations.xml").is_file() and (folder / "phantom.json").is_file()
    return written and (folder / "dicom").is_dir()


def generate_phantoms(
    n: int,
    out_dir: str | Path,
    seed: int = 0,
    size: int = 512,
    max_slices: int | None = None,
    progress: bool = True,
    *,
    db: LIDCDatabase | str | Path | None = None,
    n_nodules: int | tuple[int, int] = (1, 4),
) -> list[Path]:
    """Write ``n`` phantom cases under ``out_dir`` (``M3D-PHANTOM-0000`` ...); returns their folders.

    Case ``i`` is seeded with ``SeedSequence([seed, i])``. Cases already complete on disk are skipped
    (resume); a case is written under a temporary name and renamed when whole.
    """
    from tqdm.auto import tqdm

    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folders = []
    bar = tqdm(range(n), desc="phantoms", unit="scan", disable=not progress)
    for index in bar:
        patient_id = _patient_id(index)
        folder = out_dir / patient_id
        if _case_complete(folder):
            bar.set_postfix_str(f"{patient_id} exists")
            folders.append(folder)
            continue
        bar.set_postfix_str(patient_id)
        case = make_phantom(
            np.random.SeedSequence([int(seed), index]),
            size=size,
            db=db,
            max_slices=max_slices,
            n_nodules=n_nodules,
            patient_id=patient_id,
        )
        folders.append(write_phantom_case(case, out_dir))
    return folders
