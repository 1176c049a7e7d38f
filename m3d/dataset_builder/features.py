"""The M3Dsynth example schema, shared by the builder, `import-official`, detector training and the
benchmark. One example = one whole scan: a tampered scan (label "fake") with the 3-D mask of what the
generator changed, or the pristine scan of the same site (label "pristine", empty mask)."""
from __future__ import annotations

from typing import Any

import datasets
import numpy as np

from ..data.ct import CTVolume
from ..data.nifti import volume_from_nifti_image

LABELS = ("pristine", "fake")
TASKS = ("inject", "remove")
GENERATORS = ("real", "pix2pix", "cyclegan", "ddpm")  # "real": the pristine scan at the same site
SPLITS = ("train", "validation", "test")

FEATURES = datasets.Features(
    {
        "img_id": datasets.Value("string"),  # unique: "<site_id>_<generator>"
        "site_id": datasets.Value("string"),  # the tampering site; pristine and fakes of one site share it
        "volume": datasets.Nifti(),  # int16 HU, gzip-compressed NIfTI with the scan's RAS affine
        "mask": datasets.Nifti(),  # uint8 (z, y, x) ground truth on the volume's grid; all zero if pristine
        "label": datasets.ClassLabel(names=list(LABELS)),
        "task": datasets.ClassLabel(names=list(TASKS)),
        "generator": datasets.ClassLabel(names=list(GENERATORS)),
        "patient_id": datasets.Value("string"),
        "series_instance_uid": datasets.Value("string"),
        "site_voxel_zyx": datasets.Sequence(datasets.Value("int32"), length=3),
        "site_lps_mm": datasets.Sequence(datasets.Value("float32"), length=3),  # world (x, y, z), DICOM LPS
        "test_crop_center_zyx": datasets.Sequence(datasets.Value("int32"), length=3),  # fixed test-crop centre
        "spacing_mm": datasets.Sequence(datasets.Value("float32"), length=3),  # source (z, y, x) spacing
        "nodule_diameter_mm": datasets.Value("float32"),  # the site's nodule: real (removal) or grown (injection)
        "malignancy_before": datasets.Value("float32"),  # readers' median 1-5 at the site; None if none
        "malignancy_after": datasets.Value("float32"),  # after tampering (CAD-scale 1-5); None if not scored
    }
)


def example_volume(example: dict[str, Any]) -> CTVolume:
    """The example's scan as a `CTVolume` (decodes the `volume` column's nibabel image)."""
    return volume_from_nifti_image(example["volume"], source=f"example {example.get('img_id', '?')}")


def example_mask(example: dict[str, Any]) -> np.ndarray:
    """The example's ground-truth mask as a boolean ``(z, y, x)`` array on the volume's grid."""
    return np.asarray(example["mask"].dataobj).transpose(2, 1, 0) > 0
