"""Training cubes of the tampering generators: which nodules each task learns from, 40 mm cubes cut
around them once, and CT-GAN's augmentations applied on the fly.

Sites (as M3Dsynth / CT-GAN):

* ``task="inject"``: the injector learns to paint a *malignant* nodule, so it trains on nodules whose
  median LIDC malignancy rating is >= 4 ("moderately" or "highly suspicious"; ratings run 1-5) and
  whose diameter is > 10 mm (the paper's injection targets are > 10 mm).
* ``task="remove"``: the remover learns to paint a *small benign* nodule (or nothing much) in place of
  a real one: it trains on nodules with a median rating <= 2 ("highly" or "moderately unlikely") and a
  diameter < 8 mm (the paper removes nodules < 8 mm by pasting such a benign look-alike).
* ``task="cad"``: the malignancy scorer (`m3d.cad`) learns from every rated nodule, any size; which
  ratings are classification targets is the scorer's rule (`m3d.cad.malignancy_labels`).

Nodules without a malignancy rating (LIDC readers rate only nodules >= 3 mm) are never selected; a site
whose 32 mm cube would reach beyond the scan (the rule `m3d.tamper.cube.check_location` applies at
tampering time, lungs not required) is skipped.

Cases come from a folder of LIDC-style cases (`iter_case_folders`: ``<case>/dicom/`` + an LIDC XML,
the layout `m3d phantom` writes), from a real LIDC-IDRI download (`iter_lidc_root`: every DICOM
series folder with an LIDC XML beside its files whose SeriesInstanceUid matches), or from phantoms made
in memory (`iter_phantom_cases`). They are read one at a time: `CubeDataset.from_cases` cuts the cubes
of a case and lets its volume go, so a whole LIDC-IDRI pass fits in memory.

Cubes: a 40 mm cube (40^3 at 1 mm, the scan's own axis directions, linear interpolation) is cut once
around each site and cached as float32 HU; where it reaches beyond the scan (at most the 4 mm margin)
the nearest scan voxel is repeated. `CubeDataset.__getitem__` applies CT-GAN's augmentations, drawn
deterministically from ``(seed, epoch, index)``: a random 32^3 crop (shifts of up to +-4 voxels per
axis), a flip of each axis with probability 1/2 and a rotation by a multiple of 90 degrees in the
axial plane (array axes 1, 2). CT-GAN also rotates in 6 degree steps; right-angle rotations need no
interpolation and keep the 1 mm grid, so only those are used. With ``shuffle=True`` the order of an
epoch is a permutation drawn from ``(seed, epoch)`` inside the dataset, so the data seen at any
training step depends only on the seed and the step (exact resumption, any number of workers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..constants import TASKS
from ..data.ct import CTVolume
from ..data.lidc_discovery import is_lidc_xml, lidc_series
from ..tamper.cube import (
    CUBE_SIZE,
    TRAIN_CUBE_SIZE,
    TamperLocationError,
    check_location,
    cut_training_cube,
    hole_mask,
    hu_to_unit,
)
from ..tamper.quality import nodule_mask

logger = logging.getLogger(__name__)

SELECTIONS = TASKS + ("cad",)  # site selections: the generator tasks and the CAD scorer's
INJECT_MIN_MALIGNANCY = 4.0  # median rating >= 4: moderately / highly suspicious
INJECT_MIN_DIAMETER_MM = 10.0  # strictly greater
REMOVE_MAX_MALIGNANCY = 2.0  # median rating <= 2: highly / moderately unlikely
REMOVE_MAX_DIAMETER_MM = 8.0  # strictly smaller
MAX_SHIFT = (TRAIN_CUBE_SIZE - CUBE_SIZE) // 2  # +-4 voxels


# -- cases and sites -----------------------------------------------------------------------------


@dataclass
class TrainingCase:
    """A scan and its grouped LIDC nodules (`m3d.data.lidc.Nodule`: ``centroid_zyx`` voxel index,
    ``diameter_mm``, ``malignancy`` median rating or None)."""

    case_id: str
    volume: CTVolume
    nodules: list[Any]


@dataclass
class NoduleSite:
    """A nodule a generator trains on: the scan, its centre (LPS x, y, z mm), size and rating."""

    volume: CTVolume | None
    center_lps_mm: np.ndarray
    diameter_mm: float
    malignancy: float | None
    source: str  # "<case id>/nodule<k>"

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description (no volume)."""
        return {
            "source": self.source,
            "center_lps_mm": [round(float(v), 3) for v in self.center_lps_mm],
            "diameter_mm": round(float(self.diameter_mm), 3),
            "malignancy": None if self.malignancy is None else float(self.malignancy),
        }


def site_matches(task: str, diameter_mm: float, malignancy: float | None) -> bool:
    """Whether a nodule of this size and median malignancy is a training site for ``task``."""
    if task not in SELECTIONS:
        raise ValueError(f"task must be one of {SELECTIONS}; got {task!r}")
    if malignancy is None or not np.isfinite(malignancy):
        return False
    if task == "cad":
        return True
    if task == "inject":
        return malignancy >= INJECT_MIN_MALIGNANCY and diameter_mm > INJECT_MIN_DIAMETER_MM
    return malignancy <= REMOVE_MAX_MALIGNANCY and diameter_mm < REMOVE_MAX_DIAMETER_MM


def _nodule_center_lps(volume: CTVolume, nodule: Any) -> np.ndarray:
    """LPS centre of an `m3d.data.lidc.Nodule` from its scan's own geometry (slice z positions, in-plane
    origin) when known, else from ``centroid_zyx`` as an index into ``volume``."""
    centroid_lps = getattr(nodule, "centroid_lps_mm", None)
    if callable(centroid_lps):
        try:
            return np.asarray(centroid_lps(), float)
        except ValueError:  # the annotation source knows no in-plane origin
            pass
    return volume.voxel_to_world(np.asarray(nodule.centroid_zyx, float))


def sites_for_task(cases: Iterable[TrainingCase], task: str) -> list[NoduleSite]:
    """The training sites of ``task`` in ``cases`` (selection rules in the module doc), in case order
    then nodule order. Sites whose 32 mm cube does not fit in the scan are skipped (logged)."""
    if task not in SELECTIONS:
        raise ValueError(f"task must be one of {SELECTIONS}; got {task!r}")
    sites: list[NoduleSite] = []
    for case in cases:
        for number, nodule in enumerate(case.nodules):
            malignancy = getattr(nodule, "malignancy", None)
            malignancy = None if malignancy is None else float(malignancy)
            diameter = float(nodule.diameter_mm)
            if not site_matches(task, diameter, malignancy):
                continue
            center = _nodule_center_lps(case.volume, nodule)
            source = f"{case.case_id}/nodule{number}"
            try:
                check_location(case.volume, center, allow_outside_lung=True)
            except TamperLocationError as error:
                logger.info("skipping %s: %s", source, error)
                continue
            sites.append(NoduleSite(case.volume, center, diameter, malignancy, source))
    return sites


# -- case sources -------------------------------------------------------------------------------


def _read_case(case_id: str, series_folder: Path, xml: Path, series_uid: str | None = None) -> TrainingCase:
    from ..data.dicom import read_dicom_series
    from ..data.lidc import group_nodules, read_lidc_xml

    volume = read_dicom_series(series_folder, series_uid) if series_uid else read_dicom_series(series_folder)
    scan = read_lidc_xml(xml, volume)
    return TrainingCase(case_id=case_id, volume=volume, nodules=list(group_nodules(scan)))


def _case_xml(folder: Path) -> Path | None:
    for candidate in sorted(folder.glob("*.xml")) + sorted(folder.glob("*/*.xml")):
        if is_lidc_xml(candidate):
            return candidate
    return None


def case_folders(data_dir: str | Path) -> list[Path]:
    """Case folders under ``data_dir`` in the `m3d phantom` layout (``<case>/dicom/`` + LIDC XML);
    ``data_dir`` may itself be one case."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    if (root / "dicom").is_dir():
        return [root]
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and (p / "dicom").is_dir()]
    if not folders:
        raise FileNotFoundError(f"no case folders (<case>/dicom/ + an LIDC XML) under {root}")
    return folders


def iter_case_folders(data_dir: str | Path) -> Iterator[TrainingCase]:
    """Cases of a folder in the `m3d phantom` layout, read one at a time (cases without an LIDC XML are
    skipped with a log line)."""
    for folder in case_folders(data_dir):
        xml = _case_xml(folder)
        if xml is None:
            logger.warning("skipping %s: no LIDC XML (LidcReadMessage) in it", folder)
            continue
        yield _read_case(folder.name, folder / "dicom", xml)


def iter_lidc_root(root: str | Path) -> Iterator[TrainingCase]:
    """Cases of a real LIDC-IDRI download (patient folders -> study -> series folder with the .dcm files
    and the series' XML), read one at a time."""
    root = Path(root)
    for folder, xml, series_uid in lidc_series(root):
        relative = folder.relative_to(root)
        case_id = relative.parts[0] if relative.parts else folder.name
        try:
            yield _read_case(f"{case_id}:{series_uid[-12:]}", folder, xml, series_uid)
        except (ValueError, OSError) as error:  # an unreadable series: skip it, say so
            logger.warning("skipping %s: %s", folder, error)


# Phantom nodules per task: the synthetic scans transplant random real LIDC nodules, so training scans
# ask for the sizes the task needs (injection: >= 10 mm; removal: down to 3 mm, more per scan).
PHANTOM_NODULES: dict[str | None, dict[str, Any]] = {
    None: {},
    "inject": dict(n_nodules=(2, 5), min_diameter_mm=10.0),
    "remove": dict(n_nodules=(3, 6), min_diameter_mm=3.0),
    "cad": dict(n_nodules=(3, 6), min_diameter_mm=3.0),
}


def iter_phantom_cases(
    n: int,
    *,
    seed: int = 0,
    size: int = 128,
    max_slices: int | None = None,
    task: str | None = None,
    workers: int = 1,
    native_spacing: bool = False,
) -> Iterator[TrainingCase]:
    """``n`` synthetic scans made in memory with `m3d.data.phantom.make_phantoms`, case ``i`` seeded
    with ``SeedSequence([seed, i])`` as `generate_phantoms` does (same anatomy as ``m3d phantom --seed``);
    with a ``task`` the nodules are drawn for it (`PHANTOM_NODULES`); ``workers`` processes make them;
    ``native_spacing``: the real series' pixel and slice spacing (else its field of view on ``size`` pixels)."""
    from ..data.lidc import group_nodules
    from ..data.phantom import make_phantoms

    if n < 1:
        raise ValueError(f"the number of phantoms must be positive; got {n}")
    for case in make_phantoms(
        n,
        seed,
        workers=workers,
        size=size,
        max_slices=max_slices,
        native_spacing=native_spacing,
        **PHANTOM_NODULES[task],
    ):
        yield TrainingCase(
            case_id=case.volume.metadata.patient_id, volume=case.volume, nodules=list(group_nodules(case.lidc))
        )


# -- cubes --------------------------------------------------------------------------------------


def center_crop(cube: np.ndarray, size: int = CUBE_SIZE) -> np.ndarray:
    start = [(n - size) // 2 for n in cube.shape]
    return cube[tuple(slice(s, s + size) for s in start)]


def site_nodule_diameters_mm(cubes_hu: np.ndarray) -> np.ndarray:
    """One per training cube: the equivalent diameter (mm; 0 where none) of its real nodule (the centred 32^3
    crop's) as the dataset builder's quality check measures it (`m3d.tamper.quality.measure_nodule`)."""
    from ..tamper.quality import measure_nodule

    return np.array([measure_nodule(center_crop(cube)).diameter_mm for cube in cubes_hu], float)


def passes_quality_check(cubes_hu: np.ndarray, task: str) -> np.ndarray:
    """One bool per training cube: does its real nodule (the centred 32^3 crop) pass the dataset
    builder's keep rule for ``task`` (`m3d.tamper.quality.check_quality`)?"""
    from ..tamper.quality import passes_keep_rule

    return np.asarray(passes_keep_rule(site_nodule_diameters_mm(cubes_hu), task), bool)


@dataclass(frozen=True)
class Augmentation:
    """One draw of CT-GAN's augmentations: crop shift (voxels, z y x), per-axis flips, axial quarter turns."""

    shift: tuple[int, int, int] = (0, 0, 0)
    flips: tuple[bool, bool, bool] = (False, False, False)
    quarter_turns: int = 0

    @classmethod
    def draw(cls, rng: np.random.Generator, max_shift: int = MAX_SHIFT) -> "Augmentation":
        shift = tuple(int(s) for s in rng.integers(-max_shift, max_shift + 1, size=3))
        flips = tuple(bool(f) for f in rng.random(3) < 0.5)
        return cls(shift=shift, flips=flips, quarter_turns=int(rng.integers(0, 4)))

    def apply(self, cube: np.ndarray, size: int = CUBE_SIZE) -> np.ndarray:
        """Crop ``size``^3 out of ``cube`` at the centre + ``shift``, then flip and rotate."""
        start = [(n - size) // 2 + s for n, s in zip(cube.shape, self.shift)]
        if any(b < 0 or b + size > n for b, n in zip(start, cube.shape)):
            raise ValueError(f"shift {self.shift} takes a {size}^3 crop outside a {cube.shape} cube")
        out = cube[tuple(slice(b, b + size) for b in start)]
        flip_axes = tuple(axis for axis, flip in enumerate(self.flips) if flip)
        if flip_axes:
            out = np.flip(out, axis=flip_axes)
        if self.quarter_turns % 4:
            out = np.rot90(out, self.quarter_turns, axes=(1, 2))
        return np.ascontiguousarray(out)


class CubeDataset(Dataset):
    """Generator training samples: CT-GAN-augmented 32^3 crops of 40 mm cubes around nodule sites.

    Each item is ``dict(full, masked, mask, nodule_mask)``: ``full`` ``(1, 32, 32, 32)`` float32 in [-1, 1]
    (`hu_to_unit`), ``masked`` the same with the 20^3 centre hole set to 0, ``mask`` 1.0 in the hole,
    ``nodule_mask`` 1.0 on the nodule at the centre as the quality check measures it
    (`m3d.tamper.quality.nodule_mask`): what a mask-conditioned generator is told to draw.

    Args:
        sites: `NoduleSite` objects; a 40 mm cube is cut around each one now (float32 HU, in memory).
        seed: seeds the augmentations and the epoch order.
        augment: draw CT-GAN's augmentations from ``(seed, epoch, index)``; else a centred crop.
        shuffle: visit the samples of each epoch in an order drawn from ``(seed, epoch)``.
        samples_per_epoch: length of an epoch (default: one sample per site); a longer epoch visits
            every site about equally often (``position % n_sites``).
        crop_size: side of the crops (voxels at 1 mm; 32, the generators' cube).
        cut_size: side of the cubes cut around ``sites`` (40: crops shift by up to +-4 voxels).

    Subclasses with other items (the CAD scorer's) build them from `crop`, the augmented HU crop.

    Call `set_epoch` (Accelerate's prepared DataLoader does, from its own ``set_epoch``) before each
    epoch. `from_cases` streams cases (the volumes are not kept); `from_cubes` takes cut cubes.
    """

    def __init__(
        self,
        sites: Sequence[NoduleSite] = (),
        *,
        seed: int = 0,
        augment: bool = True,
        shuffle: bool = False,
        samples_per_epoch: int | None = None,
        cubes_hu: np.ndarray | None = None,
        records: Sequence[dict[str, Any]] | None = None,
        crop_size: int = CUBE_SIZE,
        cut_size: int = TRAIN_CUBE_SIZE,
    ):
        if cubes_hu is None:
            cubes = [cut_training_cube(site.volume, site.center_lps_mm, cut_size) for site in sites]
            cubes_hu = np.stack(cubes) if cubes else np.zeros((0,) + (cut_size,) * 3, np.float32)
            records = [site.describe() for site in sites]
        cubes_hu = np.asarray(cubes_hu, dtype=np.float32)
        if cubes_hu.ndim != 4 or min(cubes_hu.shape[1:]) < crop_size:
            raise ValueError(
                f"cubes must be (N, >={crop_size}, >={crop_size}, >={crop_size}); got shape {cubes_hu.shape}"
            )
        if len(cubes_hu) == 0:
            raise ValueError("no training cubes: no nodule site matched (see m3d.train.cubes for the rules)")
        self.cubes_hu = cubes_hu
        self.records = list(records) if records is not None else [{"source": f"cube{i}"} for i in range(len(cubes_hu))]
        self.seed = int(seed)
        self.augment = bool(augment)
        self.shuffle = bool(shuffle)
        self.samples_per_epoch = int(samples_per_epoch) if samples_per_epoch else len(cubes_hu)
        if self.samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be positive; got {samples_per_epoch}")
        self.crop_size = int(crop_size)
        self.max_shift = min(MAX_SHIFT, *[(n - self.crop_size) // 2 for n in cubes_hu.shape[1:]])
        self.epoch = 0
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._mask = torch.from_numpy(hole_mask()).to(torch.float32)[None]

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_cases(
        cls,
        cases: Iterable[TrainingCase],
        task: str,
        *,
        progress: bool = False,
        cut_size: int = TRAIN_CUBE_SIZE,
        **kwargs,
    ) -> "CubeDataset":
        """Cut the cubes of ``task``'s sites case by case (each volume is released after its cubes)."""
        from tqdm.auto import tqdm

        cubes, records = [], []
        for case in tqdm(cases, desc=f"cutting {task} cubes", unit="scan", disable=not progress):
            for site in sites_for_task([case], task):
                cubes.append(cut_training_cube(site.volume, site.center_lps_mm, cut_size))
                records.append(site.describe())
        if not cubes:
            wanted = {
                "inject": "malignant (median rating >= 4) nodules > 10 mm",
                "remove": "benign (median rating <= 2) nodules < 8 mm",
                "cad": "rated nodules",
            }[task]
            raise ValueError(
                f"no {task} training sites in these cases: {wanted} whose 32 mm cube fits in the "
                "scan; use more or other scans"
            )
        return cls(cubes_hu=np.stack(cubes), records=records, cut_size=cut_size, **kwargs)

    @classmethod
    def from_cubes(cls, cubes_hu: np.ndarray, **kwargs) -> "CubeDataset":
        """From cubes already cut (``(N, 40, 40, 40)`` HU; 32^3 cubes work without shifts)."""
        return cls(cubes_hu=cubes_hu, **kwargs)

    def subset(self, keep: np.ndarray, rule: str = "passes the quality check") -> "CubeDataset":
        """The sites where ``keep`` (one bool per cube) is true, with this dataset's seed and options; ``rule``
        says what ``keep`` asks of a site's nodule, for the error when no site is left."""
        keep = np.asarray(keep, bool)
        if not keep.any():
            raise ValueError(f"no training cubes left: none of the sites' nodules {rule}")
        return CubeDataset(
            cubes_hu=self.cubes_hu[keep],
            records=[r for r, k in zip(self.records, keep) if k],
            seed=self.seed,
            augment=self.augment,
            shuffle=self.shuffle,
            crop_size=self.crop_size,
        )

    # -- epochs ----------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch, 0x0DE5])
            self._order_cache = (self.epoch, rng.permutation(self.samples_per_epoch))
        return self._order_cache[1]

    def augmentation(self, index: int) -> Augmentation:
        """The augmentation of sample ``index`` in the current epoch."""
        if not self.augment:
            return Augmentation()
        return Augmentation.draw(np.random.default_rng([self.seed, self.epoch, int(index)]), self.max_shift)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def cube_index(self, index: int) -> int:
        """Which cut cube sample ``index`` of the current epoch shows."""
        position = int(self._order()[index]) if self.shuffle else int(index)
        return position % len(self.cubes_hu)

    def crop(self, index: int) -> np.ndarray:
        """The augmented ``crop_size``^3 HU crop of sample ``index`` in the current epoch."""
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return self.augmentation(index).apply(self.cubes_hu[self.cube_index(index)], self.crop_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        crop_hu = self.crop(index)
        full = torch.from_numpy(hu_to_unit(crop_hu).astype(np.float32))[None]
        return {
            "full": full,
            "masked": full.masked_fill(self._mask.bool(), 0.0),
            "mask": self._mask.clone(),
            "nodule_mask": torch.from_numpy(nodule_mask(crop_hu)).to(torch.float32)[None],
        }


__all__ = [
    "Augmentation",
    "CubeDataset",
    "NoduleSite",
    "TrainingCase",
    "center_crop",
    "iter_case_folders",
    "iter_lidc_root",
    "iter_phantom_cases",
    "site_matches",
    "sites_for_task",
]
