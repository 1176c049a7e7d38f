"""The M3Dsynth example schema, shared by the builder, `import-official`, detector training and the
benchmark. One example = one scan: the pristine scan of a site (label "pristine", empty mask), or a
tampered scan (label "fake") with the 3-D mask of what the generator changed.

A tampered scan differs from the pristine scan of its site only inside the changed box, so it is stored
as that box (``volume`` and ``mask`` cover it, placed in the world by their affine; ``box_start_zyx`` is
its first voxel in the whole scan, ``scan_shape_zyx`` the whole scan's shape) over its pristine example
(``base_img_id``). `example_volume` pastes the box back over the pristine scan; `example_mask` gives the
mask on the whole scan. Pristine rows hold the whole scan (``base_img_id`` None, ``box_start_zyx``
zeros). This keeps a fake's cost to its changed voxels (about 1/100 of a scan) and loads in one decode
of the pristine scan per site.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import datasets
import numpy as np

from ..constants import GENERATORS, LABELS, TASKS
from ..data.ct import CTVolume
from ..data.nifti import volume_from_nifti_image

# config name -> (generators, tasks) it selects; every config holds the pristine scans of its sites
CONFIGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "all": (GENERATORS, TASKS),
    **{generator: (("real", generator), TASKS) for generator in GENERATORS if generator != "real"},
    **{task: (GENERATORS, (task,)) for task in TASKS},
    "pristine": (("real",), TASKS),
}

FEATURES = datasets.Features(
    {
        "img_id": datasets.Value("string"),  # unique: "<site_id>_<generator>"
        "site_id": datasets.Value("string"),  # the tampering site; pristine and fakes of one site share it
        # int16 HU, gzip NIfTI with its RAS affine: the whole scan, or a fake's changed box
        "volume": datasets.Nifti(),
        "mask": datasets.Nifti(),  # uint8 ground truth on the volume's grid (the box of a fake); all zero if pristine
        "base_img_id": datasets.Value(
            "string"
        ),  # a fake: the pristine example its box is pasted over; None: whole scan
        "box_start_zyx": datasets.Sequence(datasets.Value("int32"), length=3),  # the box's first voxel in the scan
        "scan_shape_zyx": datasets.Sequence(datasets.Value("int32"), length=3),  # the whole scan's shape
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


def is_box(example: dict[str, Any]) -> bool:
    """Whether the example stores only its changed box over a pristine example (``base_img_id``)."""
    return bool(example.get("base_img_id"))


def stored_volume(example: dict[str, Any]) -> CTVolume:
    """What the example's ``volume`` column holds, decoded: the whole scan, or a fake's changed box."""
    return volume_from_nifti_image(example["volume"], source=f"example {example.get('img_id', '?')}")


def example_volume(example: dict[str, Any], base: dict[str, Any] | CTVolume | None = None) -> CTVolume:
    """The example's whole scan as a `CTVolume`. A fake stored as its changed box needs ``base``: its
    pristine example (the row whose ``img_id`` is its ``base_img_id``) or that scan already decoded;
    `ScanResolver` finds and caches it for a whole split."""
    stored = stored_volume(example)
    if not is_box(example):
        return stored
    if base is None:
        raise ValueError(
            f"example {example.get('img_id')} stores the box it changed over the pristine scan "
            f"{example['base_img_id']}: "
            "pass base= (that example) or use m3d.dataset_builder.ScanResolver(dataset).volume(example)"
        )
    pristine = base if isinstance(base, CTVolume) else stored_volume(base)
    shape = tuple(example["scan_shape_zyx"])
    if pristine.shape != shape:
        raise ValueError(
            f"example {example.get('img_id')}: its base scan has shape {pristine.shape}, the example says {shape}"
        )
    start = np.asarray(example["box_start_zyx"], int)
    hu = pristine.hu.copy()
    hu[tuple(slice(a, a + n) for a, n in zip(start, stored.shape))] = stored.hu
    return pristine.with_hu(hu)


def example_mask(example: dict[str, Any]) -> np.ndarray:
    """The example's ground-truth mask as a boolean ``(z, y, x)`` array on the whole scan's grid."""
    stored = np.asarray(example["mask"].dataobj).transpose(2, 1, 0) > 0
    if not is_box(example):
        return stored
    mask = np.zeros(tuple(example["scan_shape_zyx"]), bool)
    start = np.asarray(example["box_start_zyx"], int)
    mask[tuple(slice(a, a + n) for a, n in zip(start, stored.shape))] = stored
    return mask


def changed_box(
    pristine: CTVolume, tampered: CTVolume, mask: np.ndarray
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(start, stop)`` voxels of the smallest box holding ``mask`` and every voxel where ``tampered``
    differs from ``pristine`` (one voxel if nothing changed)."""
    if tampered.shape != pristine.shape or mask.shape != pristine.shape:
        raise ValueError(
            f"tampered {tampered.shape}, pristine {pristine.shape} and mask {mask.shape} must share one grid"
        )
    changed = mask | (tampered.hu != pristine.hu)
    if not changed.any():
        return (0, 0, 0), (1, 1, 1)
    start, stop = [], []
    for axis in range(3):
        present = np.flatnonzero(changed.any(axis=tuple(a for a in range(3) if a != axis)))
        start.append(int(present[0]))
        stop.append(int(present[-1]) + 1)
    return tuple(start), tuple(stop)  # type: ignore[return-value]


class _ScanCache:
    """Decoded scans by key, least recently used dropped beyond ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.scans: OrderedDict[Any, CTVolume] = OrderedDict()
        self.nbytes = 0

    def get(self, key: Any) -> CTVolume | None:
        scan = self.scans.get(key)
        if scan is not None:
            self.scans.move_to_end(key)
        return scan

    def put(self, key: Any, scan: CTVolume) -> CTVolume:
        if key not in self.scans:
            self.scans[key] = scan
            self.nbytes += scan.hu.nbytes
            while self.nbytes > self.max_bytes and len(self.scans) > 1:
                _, dropped = self.scans.popitem(last=False)
                self.nbytes -= dropped.hu.nbytes
        return self.scans[key]


# Pristine scans decoded from files, shared by every resolver of this process (the benchmark's cells
# read the same scans through differently filtered splits).
SHARED_SCAN_CACHE = _ScanCache(max_bytes=2 << 30)


class ScanResolver:
    """Whole scans of the examples of one split (a `datasets.Dataset`): a fake stored as its box is
    pasted over its pristine example, found by ``base_img_id``. Decoded pristine scans are cached (for a
    dataset read from files, in `SHARED_SCAN_CACHE`), so the examples of one site decode its scan once."""

    def __init__(self, dataset, max_bytes: int = 1 << 30) -> None:
        self.dataset = dataset
        ids = dataset.select_columns(["img_id"])["img_id"] if len(dataset) else []
        self.rows = {img_id: row for row, img_id in enumerate(ids)}
        files = tuple(sorted(f["filename"] for f in getattr(dataset, "cache_files", None) or ()))
        self._source = files or None
        self._cache = SHARED_SCAN_CACHE if files else _ScanCache(max_bytes)

    def _key(self, img_id: str) -> Any:
        return (self._source, img_id) if self._source else img_id

    def base(self, img_id: str) -> CTVolume:
        """The decoded whole scan of the pristine example ``img_id``."""
        scan = self._cache.get(self._key(img_id))
        if scan is not None:
            return scan
        if img_id not in self.rows:
            raise ValueError(f"the pristine example {img_id} that a fake is stored over is not in this split")
        return self._cache.put(self._key(img_id), stored_volume(self.dataset[self.rows[img_id]]))

    def volume(self, example: dict[str, Any]) -> CTVolume:
        """The example's whole scan (`example_volume` with its base found here)."""
        if is_box(example):
            return example_volume(example, self.base(example["base_img_id"]))
        scan = self._cache.get(self._key(example["img_id"]))
        return scan if scan is not None else self._cache.put(self._key(example["img_id"]), stored_volume(example))


def box_fields(start_zyx: Sequence[int], scan_shape_zyx: Sequence[int], base_img_id: str | None) -> dict[str, Any]:
    """The schema's placement fields of an example."""
    return {
        "base_img_id": base_img_id,
        "box_start_zyx": [int(v) for v in start_zyx],
        "scan_shape_zyx": [int(v) for v in scan_shape_zyx],
    }


def folder_cache_dir(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where `datasets` should cache an M3Dsynth folder: a sub-folder of ``cache_dir`` (default: the
    `datasets` cache) named by the folder's data files (relative path, size, modification time).

    `datasets` keys the cache of a local folder on its card's ``configs`` alone, which are the same for
    every M3Dsynth folder: without this, a second folder (a rebuild, another seed) loads the first
    one's cached examples, silently."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).glob("data/**/*.parquet")):
        stat = file.stat()
        digest.update(f"{file.relative_to(path).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / f"m3dsynth-{digest.hexdigest()[:16]}"
