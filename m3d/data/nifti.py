"""NIfTI read/write with nibabel. NIfTI world space is RAS, m3d's is DICOM LPS: the two differ by
flipping x and y, and nibabel indexes voxels ``(i, j, k)`` = our ``(x, y, z)`` array axes reversed."""

from __future__ import annotations

import os
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from .ct import HU_MAX, HU_MIN, CTMetadata, CTVolume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def nifti_affine(volume: CTVolume) -> np.ndarray:
    """RAS affine of ``volume`` for a NIfTI data array indexed ``(x, y, z)`` (our array transposed)."""
    index_zyx_to_lps = volume.affine
    index_xyz_to_lps = index_zyx_to_lps[:, [2, 1, 0, 3]]
    return LPS_TO_RAS @ index_xyz_to_lps


def _check_path(path: Path) -> None:
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")


def _image(data_xyz: np.ndarray, affine: np.ndarray, description: str = "") -> nib.Nifti1Image:
    image = nib.Nifti1Image(data_xyz, affine)
    image.set_qform(affine, code=1)  # scanner
    image.set_sform(affine, code=1)
    image.header.set_data_dtype(data_xyz.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = description[:79].encode()
    return image


def _save(data_xyz: np.ndarray, affine: np.ndarray, path: Path, description: str = "") -> Path:
    _check_path(path)
    image = _image(data_xyz, affine, description)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}{''.join(path.suffixes)}")  # same suffix: same format
    try:
        nib.save(image, temporary)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def nifti_image(volume: CTVolume) -> nib.Nifti1Image:
    """``volume`` as an in-memory int16 HU NIfTI image, as `write_nifti` writes it."""
    return _image(volume.hu.transpose(2, 1, 0), nifti_affine(volume), volume.metadata.series_instance_uid)


def mask_nifti_image(mask: np.ndarray, reference: CTVolume) -> nib.Nifti1Image:
    """A boolean ``(z, y, x)`` mask on ``reference``'s grid as an in-memory uint8 NIfTI image."""
    mask = np.asarray(mask)
    if mask.shape != reference.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the reference volume's {reference.shape}")
    return _image(mask.astype(np.uint8).transpose(2, 1, 0), nifti_affine(reference), "m3d mask")


def write_nifti(volume: CTVolume, path: str | Path) -> Path:
    """Write ``volume`` as int16 HU NIfTI (slope 1, intercept 0) with its RAS affine (qform + sform)."""
    return _save(volume.hu.transpose(2, 1, 0), nifti_affine(volume), Path(path), volume.metadata.series_instance_uid)


def write_mask_nifti(mask: np.ndarray, reference: CTVolume, path: str | Path) -> Path:
    """Write a boolean ``(z, y, x)`` mask on ``reference``'s grid as uint8 NIfTI."""
    image = mask_nifti_image(mask, reference)
    return _save(np.asarray(image.dataobj), image.affine, Path(path), "m3d mask")


def write_map_nifti(values: np.ndarray, reference: CTVolume, path: str | Path) -> Path:
    """Write a float ``(z, y, x)`` map (a detector's probabilities) on ``reference``'s grid as float32 NIfTI."""
    values = np.asarray(values, dtype=np.float32)
    if values.shape != reference.shape:
        raise ValueError(f"map shape {values.shape} differs from the reference volume's {reference.shape}")
    return _save(values.transpose(2, 1, 0), nifti_affine(reference), Path(path), "m3d map")


def read_nifti(path: str | Path, fill_nonfinite_hu: float | None = None) -> CTVolume:
    """Read a 3-D NIfTI file (any orientation, any axis order) as a `CTVolume` in HU: scl_slope/inter
    applied, rounded to int16 (values beyond int16 clipped with a warning). Spacing and direction come
    from the affine's columns (sform, else qform), converted from RAS to LPS. NaN or infinite voxels
    are an error unless ``fill_nonfinite_hu`` gives the HU to put there (e.g. -1024, air)."""
    path = Path(path)
    _check_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises several types for corrupt files
        raise ValueError(f"{path} is not a readable NIfTI file: {' '.join(str(error).split())}") from None
    return volume_from_nifti_image(image, source=str(path), fill_nonfinite_hu=fill_nonfinite_hu)


def volume_from_nifti_image(
    image: nib.spatialimages.SpatialImage, source: str = "NIfTI image", fill_nonfinite_hu: float | None = None
) -> CTVolume:
    """A `CTVolume` from an in-memory nibabel image (as `datasets.Nifti` decodes one); see `read_nifti`."""
    if len(image.shape) != 3:
        if len(image.shape) == 4 and image.shape[3] == 1:
            image = image.slicer[..., 0]
        else:
            raise ValueError(f"{source} has shape {image.shape}; m3d reads 3-D volumes")
    slope, intercept = image.header.get_slope_inter()
    scaled = slope not in (None, 1.0) or intercept not in (None, 0.0)
    try:
        data_xyz = image.get_fdata(dtype=np.float64) if scaled else np.asarray(image.dataobj)
    except (EOFError, OSError, OverflowError, ValueError, zlib.error) as error:  # the voxels are read only now
        reason = " ".join(str(error).split())  # nibabel's messages span lines
        raise ValueError(
            f"{source}: its voxel data cannot be read, the file is truncated or corrupt ({reason})"
        ) from None
    if data_xyz.dtype.kind not in "biuf":
        what = f"colour ({', '.join(data_xyz.dtype.names)})" if data_xyz.dtype.names else str(data_xyz.dtype)
        raise ValueError(f"{source} holds {what} voxels; a CT volume holds one number (HU) per voxel")
    if data_xyz.dtype.kind == "f":
        nonfinite = ~np.isfinite(data_xyz)
        if nonfinite.any():
            if fill_nonfinite_hu is None:
                raise ValueError(
                    f"{source} holds {int(nonfinite.sum())} NaN or infinite voxels; CT needs a HU value "
                    "everywhere (read_nifti(..., fill_nonfinite_hu=-1024) puts air there)"
                )
            data_xyz = np.where(nonfinite, fill_nonfinite_hu, data_xyz)
    if data_xyz.dtype != np.int16:
        data_xyz = np.rint(data_xyz) if data_xyz.dtype.kind == "f" else data_xyz
        if data_xyz.size and (data_xyz.min() < HU_MIN or data_xyz.max() > HU_MAX):
            warnings.warn(f"{source}: values outside the int16 range were clipped", UserWarning, stacklevel=2)
            data_xyz = np.clip(data_xyz, HU_MIN, HU_MAX)
    index_xyz_to_lps = LPS_TO_RAS @ image.affine
    columns = index_xyz_to_lps[:3, :3]
    spacing_xyz = np.linalg.norm(columns, axis=0)
    direction_xyz = columns / spacing_xyz
    if not np.allclose(direction_xyz.T @ direction_xyz, np.eye(3), atol=1e-4):
        raise ValueError(f"{source}: the affine has shear; m3d needs orthogonal voxel axes")
    return CTVolume(
        hu=np.array(data_xyz.transpose(2, 1, 0), dtype=np.int16, order="C"),  # a copy, never nibabel's memmap
        spacing_mm=tuple(spacing_xyz[::-1]),
        origin_mm=tuple(index_xyz_to_lps[:3, 3]),
        direction=direction_xyz[:, ::-1],
        metadata=CTMetadata(series_instance_uid=_series_uid(image.header)),
    )


def _series_uid(header) -> str:
    """The SeriesInstanceUID `write_nifti` keeps in the header's description, if it holds one."""
    text = header["descrip"].tobytes().decode(errors="ignore").strip("\x00 ")
    return text if text and all(c.isdigit() or c == "." for c in text) else ""
