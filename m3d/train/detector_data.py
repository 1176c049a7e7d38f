"""Detector data from an M3Dsynth folder: split loading with generator/task filters, crops around the
tampering site (random in training, fixed at test), balanced slice sampling, and a memory-bounded cache
of decoded crops.

Crops (``crop_size = (z, y, x)`` voxels, or None for the whole scan): a window of that size centred on
a point and shifted to lie inside the scan; an axis shorter than the crop is taken whole and padded at
its end with air (-1024 HU, mask 0). Whole scans are padded in-plane to a multiple of `INPLANE_MULTIPLE`
(what every detector's down-sampling accepts); maps are cut back to the scan before scoring.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from m3d.constants import GENERATORS, LABELS, TASKS
from m3d.dataset_builder.features import ScanResolver, example_mask, example_volume, folder_cache_dir
from m3d.detectors.modeling_utils import M3DDetectorConfig
from m3d.detectors.volume import input_slices, slices_to_input, volume_statistics

AIR_HU = -1024
INPLANE_MULTIPLE = 32  # HP-FCN needs multiples of 16, TruFor of 32
DEFAULT_CROP_SIZE = (32, 128, 128)
CropSize = tuple[int, int, int] | None  # None: the whole scan

logger = logging.getLogger("m3d.train.detector_data")


# -- crop geometry ------------------------------------------------------------------------------


def parse_crop_size(text: str) -> CropSize:
    """``"Z,Y,X"`` voxels (Y and X multiples of 32) or ``"full"`` (None: the whole scan)."""
    if text.strip().lower() == "full":
        return None
    try:
        size = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"crop size must be Z,Y,X voxels or 'full'; got {text!r}") from None
    return check_crop_size(size)


def check_crop_size(size: Sequence[int] | None) -> CropSize:
    if size is None:
        return None
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"crop size must be three positive voxel counts Z,Y,X; got {size}")
    if size[1] % INPLANE_MULTIPLE or size[2] % INPLANE_MULTIPLE:
        raise ValueError(
            f"crop Y and X must be multiples of {INPLANE_MULTIPLE} (the detectors' down-sampling); got {size}"
        )
    return size  # type: ignore[return-value]


def crop_window(center: int, size: int, length: int) -> tuple[int, int]:
    """``(start, stop)`` of a ``size`` window centred on ``center``, shifted inside ``[0, length)``;
    the whole axis when it is shorter than ``size``."""
    start = min(max(int(center) - size // 2, 0), max(length - size, 0))
    return start, min(start + size, length)


def _pad_to(array: np.ndarray, shape: Sequence[int], fill: int) -> np.ndarray:
    pad = [(0, max(target - n, 0)) for n, target in zip(array.shape, shape)]
    return np.pad(array, pad, constant_values=fill) if any(after for _, after in pad) else array


def extract_crop(
    array: np.ndarray, center_zyx: Sequence[int], size: Sequence[int], fill: int, min_size: Sequence[int] | None = None
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The ``size`` window of ``array`` around ``center_zyx`` (see `crop_window`), padded with ``fill``
    up to ``min_size`` (default ``size``); returns it and the window's start (z, y, x) in ``array``."""
    windows = [crop_window(c, s, n) for c, s, n in zip(center_zyx, size, array.shape)]
    crop = array[tuple(slice(a, b) for a, b in windows)]
    return _pad_to(crop, min_size or size, fill), tuple(a for a, _ in windows)  # type: ignore[return-value]


def full_scan_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """A whole scan's shape padded in-plane to multiples of `INPLANE_MULTIPLE`."""
    z, y, x = shape
    return z, -(-y // INPLANE_MULTIPLE) * INPLANE_MULTIPLE, -(-x // INPLANE_MULTIPLE) * INPLANE_MULTIPLE


def jitter_of(crop_size: Sequence[int]) -> tuple[int, int, int]:
    """Largest random shift of a training crop's centre from the site: a quarter of the crop per axis,
    so the site stays in the crop's central half."""
    return tuple(s // 4 for s in crop_size)  # type: ignore[return-value]


# -- dataset loading and filters ----------------------------------------------------------------


def load_split(data: str | Path | Any, split: str, cache_dir: str | None = None):
    """One split of an M3Dsynth folder (``datasets.load_dataset(DIR, split=split)``, cached under
    `folder_cache_dir`), or of a ``DatasetDict`` passed in; a clear error when the split is missing."""
    import datasets

    if isinstance(data, datasets.Dataset):
        return data
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"the dataset has no {split!r} split (has {', '.join(data)})")
        return data[split]
    path = Path(data)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not an M3Dsynth folder")
    try:
        return datasets.load_dataset(str(path), split=split, cache_dir=str(folder_cache_dir(path, cache_dir)))
    except ValueError as error:
        if "split" in str(error).lower():
            raise ValueError(f"{path} has no {split!r} split") from None
        raise


def _names(dataset, column: str, names: Sequence[str]) -> np.ndarray:
    """Column values as names (ClassLabel integers mapped through ``names``) without decoding volumes."""
    values = dataset.select_columns([column]).with_format("numpy")[column]
    values = np.asarray(values)
    return np.asarray(names)[values] if values.dtype.kind in "iu" else values.astype(str)


def filter_examples(dataset, generators: Sequence[str] | None = None, tasks: Sequence[str] | None = None):
    """The examples of the chosen ``generators`` (their fakes; pristine scans, generator "real", are
    always kept) and ``tasks``; reads only those two columns."""
    for name, allowed, chosen in (("generator", GENERATORS, generators), ("task", TASKS, tasks)):
        unknown = sorted(set(chosen or ()) - set(allowed))
        if unknown:
            raise ValueError(f"unknown {name} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    keep = np.ones(len(dataset), bool)
    if generators:
        keep &= np.isin(_names(dataset, "generator", GENERATORS), [*generators, "real"])
    if tasks:
        keep &= np.isin(_names(dataset, "task", TASKS), list(tasks))
    if not keep.any():
        raise ValueError(
            f"no example left after the filters generators={list(generators or [])} tasks={list(tasks or [])}"
        )
    return dataset if keep.all() else dataset.select(np.flatnonzero(keep))


def generators_present(dataset) -> list[str]:
    """The fake-making generators found in ``dataset``, in `GENERATORS` order."""
    found = set(_names(dataset, "generator", GENERATORS))
    return [g for g in GENERATORS if g != "real" and g in found]


# -- decoded crops ------------------------------------------------------------------------------


@dataclass
class Crop:
    """One example's decoded crop: ``hu`` int16 and ``mask`` bool ``(z, y, x)``, ``valid`` the unpadded
    extent, ``statistics`` the whole scan's percentile bounds (input_mode "percentile"), ``info`` its
    metadata (img_id, site_id, generator, task, label names)."""

    hu: np.ndarray
    mask: np.ndarray
    valid: tuple[int, int, int]
    statistics: tuple[float, float] | None
    info: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return self.hu.nbytes + self.mask.nbytes


def example_info(example: dict[str, Any]) -> dict[str, Any]:
    def name(value, names):
        return names[value] if isinstance(value, (int, np.integer)) else str(value)

    return {
        "img_id": example["img_id"],
        "site_id": example["site_id"],
        "generator": name(example["generator"], GENERATORS),
        "task": name(example["task"], TASKS),
        "label": name(example["label"], LABELS),
    }


def decode_crop(
    example: dict[str, Any],
    crop_size: CropSize,
    config: M3DDetectorConfig | None = None,
    center_key: str = "test_crop_center_zyx",
    margin: Sequence[int] = (0, 0, 0),
    scans: ScanResolver | None = None,
) -> Crop:
    """Decode one example and cut its crop around ``example[center_key]``, enlarged by ``margin`` per
    side (room for random training crops); ``crop_size`` None: the whole scan, padded in-plane.
    ``scans`` (the dataset's `ScanResolver`) is needed for a fake stored as its box."""
    volume = scans.volume(example) if scans is not None else example_volume(example)
    mask = example_mask(example)
    if mask.shape != volume.shape:
        raise ValueError(f"example {example.get('img_id')}: mask {mask.shape} and volume {volume.shape} differ")
    statistics = volume_statistics(volume.hu, config) if config is not None else None
    if crop_size is None:
        shape = full_scan_shape(volume.shape)
        hu, mask_crop = _pad_to(volume.hu, shape, AIR_HU), _pad_to(mask, shape, 0)
        start = (0, 0, 0)
    else:
        size = [s + 2 * m for s, m in zip(crop_size, margin)]
        center = example[center_key]
        hu, start = extract_crop(volume.hu, center, size, AIR_HU, min_size=crop_size)
        mask_crop, _ = extract_crop(mask, center, size, 0, min_size=crop_size)
    valid = tuple(min(n - a, s) for n, a, s in zip(volume.shape, start, hu.shape))
    info = example_info(example) | {"site_in_crop_zyx": [int(c) - a for c, a in zip(example["site_voxel_zyx"], start)]}
    return Crop(np.ascontiguousarray(hu), np.ascontiguousarray(mask_crop, dtype=bool), valid, statistics, info)  # type: ignore[arg-type]


class CropCache:
    """Decoded crops of a dataset, computed on first use and kept in memory up to ``max_bytes``
    (least recently used dropped first, re-decoded when needed again). ``make(example, scans)`` cuts
    one crop; ``scans`` (a `ScanResolver` of the dataset) gives whole scans, fakes pasted over their base."""

    def __init__(
        self, dataset, make: Callable[[dict[str, Any], ScanResolver], Crop], max_bytes: int, crop_size: CropSize = None
    ) -> None:
        self.dataset = dataset
        self.scans = ScanResolver(dataset)
        self.make = make
        self.max_bytes = max_bytes
        self.crop_size = crop_size
        self._crops: OrderedDict[int, Crop] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Crop:
        crop = self._crops.get(index)
        if crop is not None:
            self._crops.move_to_end(index)
            return crop
        crop = self.make(self.dataset[int(index)], self.scans)
        self._crops[index] = crop
        self._bytes += crop.nbytes
        while self._bytes > self.max_bytes and len(self._crops) > 1:
            _, dropped = self._crops.popitem(last=False)
            self._bytes -= dropped.nbytes
        return crop

    def fill(self, progress: bool = False, desc: str = "decoding") -> list[Crop]:
        """Decode every example once (kept while the budget allows); returns them in order."""
        return [self[i] for i in tqdm(range(len(self)), desc=desc, unit="scan", disable=not progress)]


def evaluation_crops(
    dataset, crop_size: CropSize, config: M3DDetectorConfig | None = None, max_bytes: int = 4 << 30
) -> CropCache:
    """The evaluation crops of ``dataset`` (fixed ``test_crop_center_zyx``), decoded on first use.
    ``config`` is needed only for input_mode "percentile" (per-scan bounds)."""
    crop_size = check_crop_size(crop_size)
    needs_statistics = config is not None and config.input_mode == "percentile"
    return CropCache(
        dataset,
        lambda ex, scans: decode_crop(ex, crop_size, config if needs_statistics else None, scans=scans),
        max_bytes,
        crop_size,
    )


# -- training slices ----------------------------------------------------------------------------


@dataclass
class _Site:
    """What planning a training epoch needs of one example, kept without its voxels."""

    region_shape: tuple[int, int, int]
    site: tuple[int, int, int]  # in the region
    boxes: dict[int, tuple[int, int, int, int]]  # z -> (y0, y1, x0, x1) of the mask on that slice


def _mask_boxes(mask: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    boxes = {}
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        ys, xs = np.flatnonzero(mask[z].any(1)), np.flatnonzero(mask[z].any(0))
        boxes[int(z)] = (int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1)
    return boxes


class TrainingSlices(torch.utils.data.Dataset):
    """Axial training slices from random crops around the tampering sites, half of them tampered.

    Each epoch (`set_epoch`) every example gets one random crop (centre = site + a uniform shift of up
    to `jitter_of(crop_size)`); a slice is tampered when the ground truth touches it inside the crop,
    pristine otherwise (pristine scans and the untouched slices of fakes). The epoch's
    ``samples_per_epoch`` slices are drawn half from each group (without replacement while the group
    lasts) and shuffled, all from ``(seed, epoch)``. An item: ``pixel_values`` (C, H, W) in [-1, 1],
    ``labels`` (1 = tampered slice), ``masks`` (1, H, W).
    """

    def __init__(
        self,
        dataset,
        crop_size: CropSize,
        config: M3DDetectorConfig,
        *,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        multiple: int = 1,
        max_cache_bytes: int = 4 << 30,
        progress: bool = False,
    ) -> None:
        self.crop_size = crop_size
        self.config = config
        self.seed = seed
        self.margin = jitter_of(crop_size) if crop_size is not None else (0, 0, 0)
        center_key = "site_voxel_zyx"
        self.cache = CropCache(
            dataset,
            lambda ex, scans: decode_crop(
                ex, crop_size, config, center_key=center_key, margin=self.margin, scans=scans
            ),
            max_cache_bytes,
            crop_size,
        )
        self.sites: list[_Site] = []
        for crop in self.cache.fill(progress, desc="training crops"):
            self.sites.append(_Site(crop.hu.shape, tuple(crop.info["site_in_crop_zyx"]), _mask_boxes(crop.mask)))
        tampered = sum(len(site.boxes) for site in self.sites)
        if tampered == 0:
            logger.warning("the training crops hold no tampered slice: every sample will be pristine")
        wanted = samples_per_epoch or max(2 * tampered, 1)
        self.samples_per_epoch = -(-max(wanted, multiple) // multiple) * multiple
        self.epoch = -1
        self.set_epoch(0)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _crop_start(self, site: _Site, rng: np.random.Generator) -> tuple[int, int, int]:
        if self.crop_size is None:
            return (0, 0, 0)
        starts = []
        for position, size, jitter, length in zip(site.site, self.crop_size, self.margin, site.region_shape):
            shift = int(rng.integers(-jitter, jitter + 1)) if jitter else 0
            starts.append(min(max(position + shift - size // 2, 0), max(length - size, 0)))
        return tuple(starts)  # type: ignore[return-value]

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's crops and slice order (deterministic in ``(seed, epoch)``)."""
        if epoch == self.epoch:
            return
        rng = np.random.default_rng([self.seed, epoch, 0x5D])
        self.starts, tampered, pristine = [], [], []
        for index, site in enumerate(self.sites):
            start = self._crop_start(site, rng)
            self.starts.append(start)
            size = self.crop_size or site.region_shape
            y0, x0 = start[1], start[2]
            for z in range(start[0], min(start[0] + size[0], site.region_shape[0])):
                box = site.boxes.get(z)
                hit = (
                    box is not None and box[0] < y0 + size[1] and box[1] > y0 and box[2] < x0 + size[2] and box[3] > x0
                )
                (tampered if hit else pristine).append((index, z))
        half = self.samples_per_epoch // 2 if tampered else 0
        chosen = [*_draw(tampered, half, rng), *_draw(pristine, self.samples_per_epoch - half, rng)]
        self.plan = [chosen[i] for i in rng.permutation(len(chosen))]
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example, z = self.plan[index]
        crop = self.cache[example]
        start = self.starts[example]
        size = self.crop_size or crop.hu.shape
        window = (slice(None), slice(start[1], start[1] + size[1]), slice(start[2], start[2] + size[2]))
        half = input_slices(self.config) // 2  # the slice and its neighbours ("adjacent_slices", "slab")
        low = max(z - half, 0)
        neighbours = crop.hu[low : z + half + 1, window[1], window[2]]
        pixel_values = slices_to_input(neighbours, [z - low], self.config, crop.statistics)[0]
        mask = torch.from_numpy(crop.mask[z][window[1:]]).float()[None]
        return {"pixel_values": pixel_values, "labels": torch.tensor(float(mask.any())), "masks": mask}


def _draw(items: list, count: int, rng: np.random.Generator) -> list:
    """``count`` items: whole shuffled passes over ``items``, then a random subset."""
    if count <= 0 or not items:
        return []
    passes, rest = divmod(count, len(items))
    order = [i for _ in range(passes) for i in rng.permutation(len(items))]
    order += list(rng.permutation(len(items))[:rest])
    return [items[i] for i in order]
