"""A tiny M3Dsynth-format folder for detector tests, in the builder's layout:
``<root>/README.md`` (YAML ``configs``, default ``all``) +
``<root>/data/<generator>/<task>/<split>-00000-00000.parquet``;
a fake is stored as the box it changed over the pristine scan of its site, as the builder stores it.

Scans are small synthetic chests (body, two lungs, CT-like noise). A fake changes a blob at the site:
injection adds a bright nodule, removal flattens an existing one to lung; each generator leaves its own
trace (pix2pix: noise-free fill, cyclegan: fill with coarse noise), so a detector can learn something.
"""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import nibabel as nib
import numpy as np

from m3d.data.ct import CTVolume
from m3d.data.nifti import nifti_affine
from m3d.dataset_builder.features import FEATURES, box_fields, changed_box

SHAPE = (24, 64, 64)
SPACING = (2.5, 0.7, 0.7)
README = """---
configs:
- config_name: all
  default: true
  data_files:
{files}
---
# mini M3Dsynth (test fixture)
"""


def _nifti_bytes(data_zyx: np.ndarray, volume: CTVolume) -> dict:
    image = nib.Nifti1Image(np.ascontiguousarray(data_zyx.transpose(2, 1, 0)), nifti_affine(volume))
    buffer = io.BytesIO()
    file_map = image.make_file_map({"image": buffer, "header": buffer})
    image.to_file_map(file_map)
    return {"bytes": buffer.getvalue(), "path": "scan.nii"}


def _scan(rng: np.random.Generator, site: tuple[int, int, int], nodule: bool) -> np.ndarray:
    z, y, x = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    hu = np.full(SHAPE, -1000.0)
    hu[((y - 32) / 30) ** 2 + ((x - 32) / 31) ** 2 < 1] = 40
    for cx in (18, 46):
        hu[((y - 32) / 22) ** 2 + ((x - cx) / 11) ** 2 < 1] = -850
    if nodule:
        hu[((z - site[0]) * 2.5) ** 2 + ((y - site[1]) * 0.7) ** 2 + ((x - site[2]) * 0.7) ** 2 < 16] = 30
    return hu + rng.normal(0, 25, SHAPE)


def _fake(hu: np.ndarray, site, task: str, generator: str, rng) -> tuple[np.ndarray, np.ndarray]:
    z, y, x = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    mask = ((z - site[0]) * 2.5) ** 2 + ((y - site[1]) * 0.7) ** 2 + ((x - site[2]) * 0.7) ** 2 < 30
    fill = 60.0 if task == "inject" else -850.0
    texture = (
        0.0 if generator == "pix2pix" else np.repeat(rng.normal(0, 60, (SHAPE[0], SHAPE[1] // 2, SHAPE[2])), 2, axis=1)
    )
    fake = hu.copy()
    fake[mask] = (fill + texture)[mask] if np.ndim(texture) else fill
    return fake, mask


def make_mini_m3dsynth(
    root: str | Path,
    sites: dict[str, int] | None = None,
    generators: tuple[str, ...] = ("pix2pix", "cyclegan"),
    tasks: tuple[str, ...] = ("inject", "remove"),
    seed: int = 0,
) -> Path:
    """Write the folder (``sites``: split -> sites per task; default train 3, validation 2, test 2)."""
    root = Path(root)
    sites = sites or {"train": 3, "validation": 2, "test": 2}
    rng = np.random.default_rng(seed)
    rows: dict[tuple[str, str, str], list[dict]] = {}
    for split, count in sites.items():
        for task in tasks:
            for number in range(count):
                site = (
                    int(rng.integers(8, 16)),
                    int(rng.integers(24, 40)),
                    int(rng.choice([18, 46])) + int(rng.integers(-3, 4)),
                )
                if number == 0 and split == "test":
                    site = (site[0], site[1], 4)  # at the scan's edge: crops are shifted inside
                hu = _scan(rng, site, nodule=task == "remove")
                volume = CTVolume(np.clip(np.rint(hu), -1024, 3000).astype(np.int16), SPACING)
                site_id = f"{split}-{task}-{number}"
                scans = {"real": (volume.hu, np.zeros(SHAPE, bool))}
                for generator in generators:
                    fake, mask = _fake(hu, site, task, generator, rng)
                    scans[generator] = (np.clip(np.rint(fake), -1024, 3000).astype(np.int16), mask)
                for generator, (data, mask) in scans.items():
                    stored, placement = volume.with_hu(data), box_fields((0, 0, 0), SHAPE, None)
                    if generator != "real":
                        start, stop = changed_box(volume, stored, mask)
                        stored, mask = (
                            stored.region(start, stop),
                            mask[tuple(slice(a, b) for a, b in zip(start, stop))],
                        )
                        placement = box_fields(start, SHAPE, f"{site_id}_real")
                    rows.setdefault((generator, task, split), []).append(
                        {
                            "img_id": f"{site_id}_{generator}",
                            "site_id": site_id,
                            "volume": _nifti_bytes(stored.hu, stored),
                            "mask": _nifti_bytes(mask.astype(np.uint8), stored),
                            **placement,
                            "label": "pristine" if generator == "real" else "fake",
                            "task": task,
                            "generator": generator,
                            "patient_id": f"P{number}",
                            "series_instance_uid": f"1.2.3.{number}",
                            "site_voxel_zyx": list(site),
                            "site_lps_mm": [0.0, 0.0, 0.0],
                            "test_crop_center_zyx": list(site),
                            "spacing_mm": list(SPACING),
                            "nodule_diameter_mm": 8.0,
                            "malignancy_before": None,
                            "malignancy_after": None,
                        }
                    )
    for (generator, task, split), examples in rows.items():
        path = root / "data" / generator / task / f"{split}-00000-00000.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = {key: [example[key] for example in examples] for key in examples[0]}
        datasets.Dataset.from_dict(columns, features=FEATURES).to_parquet(str(path))
    files = "\n".join(f"  - split: {split}\n    path: data/*/*/{split}-*.parquet" for split in sites)
    (root / "README.md").write_text(README.format(files=files))
    return root
