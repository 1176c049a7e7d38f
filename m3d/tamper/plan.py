"""Where to tamper: the M3Dsynth sites (removal of real malignant nodules, injection of fake malignant
ones) chosen from LIDC-IDRI nodules, split by patient, written in the official `data.csv` layout.

Selection (M3Dsynth, ICASSP 2024, section 2; CT-GAN): a *removal* site is a real nodule that matters —
large and suspicious (median malignancy >= ``removal_min_malignancy`` and diameter >=
``removal_min_diameter_mm``) — whose cube is replaced by a fake benign nodule < 8 mm. An *injection*
site is an existing small, benign-looking nodule (diameter < ``injection_max_diameter_mm``, median
malignancy <= ``injection_max_malignancy`` or unrated), where a fake malignant nodule > 10 mm is grown:
the paper places new nodules at or near existing benign ones so that the edit does not disturb the
anatomy. Every site is attempted by each generator; which results are kept is the builder's quality
check. Sites whose 32 mm cube would leave the scan along z are dropped (``fits_in_scan``).

`PlanCriteria.official()` is the rule the official release's tables follow (found by matching its
sites to the annotation database, not stated in the paper): nodules are sized by the sphere-equivalent
diameter of the median reader's annotated volume, *removal* takes 8 <= size < 18 mm and *injection*
size < 8 mm, whatever the malignancy ratings and however many readers; each removal is planned on two
consecutive slices and each injection 5 voxels off the nodule along both in-plane axes; the first
injections (in patient order, as many as the removal nodules) get a second site on the other side.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

from ..constants import CUBE_SPACING_MM, HOLE_SIZE
from ..data.ct import point_text
from ..data.lidc import Annotation, LIDCScan, Nodule, group_nodules

OFFICIAL_TASK = {"inject": "inj", "remove": "rem"}
OFFICIAL_SPLIT_PATIENTS = {"train": 488, "val": 100, "test": 150}
GENERATOR_CODES = {"real": "real", "pix2pix": "pix2pix", "cyclegan": "cycle", "ddpm": "diffusion"}
DATA_CSV_COLUMNS = ("img_id", "ty", "mod", "orig_id", "sdir_id", "coord_z", "coord_y", "coord_x")
SETS_CSV_COLUMNS = ("orig_id", "set")


SIZE_MEASURES = ("diameter", "volume")


def annotation_volume_mm3(annotation: Annotation, scan: LIDCScan) -> float:
    """The volume one reader outlined: the voxels of that annotation's own mask (`Nodule.local_mask` of
    the annotation alone) times the voxel size (pixel spacing squared times the slice spacing)."""
    mask, _ = Nodule([annotation], np.zeros(3), 0.0, annotation.malignancy, scan).local_mask(1.0)
    spacing_z = scan.slice_spacing_mm if np.isfinite(scan.slice_spacing_mm) else scan.slice_thickness_mm
    return float(mask.sum()) * scan.pixel_spacing_mm**2 * float(spacing_z)


def volume_diameter_mm(nodule: Nodule) -> float:
    """The diameter of the sphere with the median reader's volume (`annotation_volume_mm3`) -- the size
    by which the official M3Dsynth sites were chosen (`PlanCriteria.official`)."""
    volume = float(np.median([annotation_volume_mm3(a, nodule.scan) for a in nodule.annotations]))
    return float((6.0 * volume / np.pi) ** (1.0 / 3.0))


@dataclass(frozen=True)
class PlanCriteria:
    """Nodule selection thresholds and site layout (see the module docstring).

    ``size`` says what the diameter thresholds measure: ``"diameter"`` (`Nodule.diameter_mm`, the
    readers' median greatest in-plane extent) or ``"volume"`` (`volume_diameter_mm`). A malignancy
    bound of None does not look at the ratings. The layout fields place the sites of a chosen nodule
    (offsets in voxels, ``z, y, x``, slices in ascending z): one removal site per entry of
    ``removal_slice_offsets``, one injection site at ``injection_offset_zyx``, and -- when
    ``second_injection_offset_zyx`` is set -- a second one for the first injection nodules in patient
    order, as many as there are removal nodules (`plan_sites`). ``fit_in_scan`` drops nodules whose
    cube leaves the scan. The defaults are m3d's rule; `official` is the release's."""

    removal_min_malignancy: float | None = 3.0
    removal_min_diameter_mm: float = 8.0
    injection_max_diameter_mm: float = 8.0
    injection_max_malignancy: float | None = 3.0
    cube_half_mm: float = 16.0
    size: str = "diameter"
    removal_max_diameter_mm: float | None = None
    removal_slice_offsets: tuple[float, ...] = (0.0,)
    injection_offset_zyx: tuple[float, float, float] = (0.0, 0.0, 0.0)
    second_injection_offset_zyx: tuple[float, float, float] | None = None
    fit_in_scan: bool = True

    def __post_init__(self) -> None:
        if self.size not in SIZE_MEASURES:
            raise ValueError(f"size must be one of {SIZE_MEASURES}; got {self.size!r}")
        if not self.removal_slice_offsets:
            raise ValueError("removal_slice_offsets needs at least one offset")

    @classmethod
    def official(cls) -> "PlanCriteria":
        """The official release's rule, as its tables show it (on the annotation database: removal
        nodules chosen with precision 0.98 / recall 1.00, injection nodules 0.98 / 1.00, in the series
        the release kept): size by volume (`volume_diameter_mm`), removal 8 <= size < 18 mm, injection
        size < 8 mm, no malignancy or reader condition, no cube-fit condition (the release keeps sites
        7.8 mm from the scan's end); removal sites on the nodule's slice and the one below (the release
        lists every removal twice, on consecutive slices), injection sites 5 voxels down and right of
        the nodule's centre and, for the first injections, a second one 5 voxels up and left one slice
        below (the release's second pass, inj_1976 to inj_2507, over patients LIDC-IDRI-0001 to 0321)."""
        return cls(
            removal_min_malignancy=None,
            removal_min_diameter_mm=8.0,
            removal_max_diameter_mm=18.0,
            injection_max_diameter_mm=8.0,
            injection_max_malignancy=None,
            size="volume",
            removal_slice_offsets=(0.0, -1.0),
            injection_offset_zyx=(0.0, 5.0, 5.0),
            second_injection_offset_zyx=(-1.0, -5.0, -5.0),
            fit_in_scan=False,
        )

    def size_mm(self, nodule: Nodule) -> float:
        """The nodule's size as the thresholds measure it (``size``)."""
        return volume_diameter_mm(nodule) if self.size == "volume" else float(nodule.diameter_mm)

    def is_removal_target(self, nodule: Nodule, size_mm: float | None = None) -> bool:
        """A real nodule that matters: rated malignant enough and large enough to be worth hiding
        (``size_mm``: the nodule's `size_mm`, when already known)."""
        size = self.size_mm(nodule) if size_mm is None else size_mm
        return (
            (
                self.removal_min_malignancy is None
                or (nodule.malignancy is not None and nodule.malignancy >= self.removal_min_malignancy)
            )
            and size >= self.removal_min_diameter_mm
            and (self.removal_max_diameter_mm is None or size < self.removal_max_diameter_mm)
        )

    def is_injection_site(self, nodule: Nodule, size_mm: float | None = None) -> bool:
        """A small, benign-looking (or unrated) nodule, where a fake malignant one may be grown."""
        size = self.size_mm(nodule) if size_mm is None else size_mm
        return size < self.injection_max_diameter_mm and (
            self.injection_max_malignancy is None
            or nodule.malignancy is None
            or nodule.malignancy <= self.injection_max_malignancy
        )

    def removal_text(self) -> str:
        """The removal rule in words (for messages)."""
        measure = "volume-equivalent diameter" if self.size == "volume" else "diameter"
        parts = [] if self.removal_min_malignancy is None else [f"malignancy >= {self.removal_min_malignancy:g}"]
        upper = "" if self.removal_max_diameter_mm is None else f" and < {self.removal_max_diameter_mm:g} mm"
        return " and ".join(parts + [f"{measure} >= {self.removal_min_diameter_mm:g} mm{upper}"])

    def injection_text(self) -> str:
        """The injection rule in words (for messages)."""
        rated = "" if self.injection_max_malignancy is None else f" or rated above {self.injection_max_malignancy:g}"
        return f"no nodule >= {self.injection_max_diameter_mm:g} mm{rated}"


OFFICIAL_CRITERIA = PlanCriteria.official()


@dataclass
class Site:
    """One tampering site: the scan, the task and the location (voxel ``z, y, x``).

    A planned site (``n_slices`` set) indexes slices in ascending z, as the annotation database; a site
    read from the official tables (``n_slices`` None) keeps the release's index, descending z (its TIFF
    stacks' order). Official-format tables are always written in the release's convention."""

    task: str
    patient_id: str
    series_instance_uid: str
    center_zyx: tuple[float, float, float]
    diameter_mm: float
    malignancy: float | None
    n_readers: int
    split: str = ""
    extra: dict = field(default_factory=dict)
    n_slices: int | None = None

    def official_zyx(self) -> tuple[float, float, float]:
        """The location in the official tables' convention: slices indexed by descending z."""
        z, y, x = self.center_zyx
        return (self.n_slices - 1 - z, y, x) if self.n_slices is not None else (z, y, x)


def fits_in_scan(scan: LIDCScan, center_zyx: np.ndarray, half_mm: float) -> bool:
    """Whether a cube of half-size ``half_mm`` around ``center_zyx`` stays inside the scan."""
    z_positions = np.asarray(scan.z_positions_mm, float)
    if z_positions.size < 2:
        return False
    z_mm = np.interp(center_zyx[0], np.arange(z_positions.size), z_positions)
    in_plane_mm = np.asarray(center_zyx[1:]) * scan.pixel_spacing_mm
    fov_mm = np.array([scan.rows, scan.columns]) * scan.pixel_spacing_mm
    return bool(
        z_positions.min() <= z_mm - half_mm
        and z_mm + half_mm <= z_positions.max()
        and np.all(in_plane_mm - half_mm >= 0)
        and np.all(in_plane_mm + half_mm <= fov_mm)
    )


def plan_scan(scan: LIDCScan, criteria: PlanCriteria = PlanCriteria()) -> list[Site]:
    """The removal and injection sites of one scan (one per nodule with the default layout; see
    `PlanCriteria` for the others). A site's ``extra`` holds its nodule's number within the scan
    (``nodule``), centre (``nodule_zyx``) and the size the thresholds measured (``size_mm``)."""
    sites = []
    n_slices = len(scan.z_positions_mm)
    for number, nodule in enumerate(group_nodules(scan)):
        malignancy = nodule.malignancy
        size = criteria.size_mm(nodule)
        is_removal = criteria.is_removal_target(nodule, size)
        is_injection = not is_removal and criteria.is_injection_site(nodule, size)
        if not (is_removal or is_injection):
            continue
        centre = np.asarray(nodule.centroid_zyx, float)
        if criteria.fit_in_scan and not fits_in_scan(scan, centre, criteria.cube_half_mm):
            continue
        offsets = (
            [(dz, 0.0, 0.0) for dz in criteria.removal_slice_offsets]
            if is_removal
            else [criteria.injection_offset_zyx]
        )
        for offset in offsets:
            where = centre + np.asarray(offset, float)
            where[0] = min(max(where[0], 0.0), max(n_slices - 1, 0))
            sites.append(
                Site(
                    task="remove" if is_removal else "inject",
                    patient_id=scan.patient_id,
                    series_instance_uid=scan.series_instance_uid,
                    center_zyx=tuple(float(c) for c in where),
                    diameter_mm=float(nodule.diameter_mm),
                    malignancy=None if malignancy is None else float(malignancy),
                    n_readers=nodule.n_readers,
                    n_slices=n_slices,
                    extra={"nodule": number, "size_mm": size, "nodule_zyx": tuple(float(c) for c in centre)},
                )
            )
    return sites


SITE_TOLERANCE_MM = 3.0  # how far outside a nodule's radius a removal's location may be and still be "at" it


class SiteRuleError(ValueError):
    """A tampering site that breaks its task's rule (the plan's selection) for the scan's annotated nodules."""


def _nodule_text(nodule: Nodule) -> str:
    rating = "unrated" if nodule.malignancy is None else f"malignancy {nodule.malignancy:.1f}"
    return f"{nodule.diameter_mm:.1f} mm nodule ({rating}) at {point_text(nodule.centroid_lps_mm())} mm"


def check_site_rule(
    task: str, center_lps_mm: np.ndarray, nodules: list[Nodule], criteria: PlanCriteria = PlanCriteria()
) -> None:
    """Raise `SiteRuleError` unless ``center_lps_mm`` obeys ``task``'s rule among the scan's ``nodules``
    (grouped annotations of the series read with its volume, so that their centroids are in LPS mm).

    *remove*: a nodule is at the site (its centroid within its radius + `SITE_TOLERANCE_MM`), it is a
    removal target (`PlanCriteria.is_removal_target`) and it fits the generator's 20 mm hole, so that it
    can vanish. *inject*: no nodule reaching into the hole is anything but a small benign-looking one
    (`PlanCriteria.is_injection_site`): a fake is grown where no suspicious nodule already is.
    """
    center = np.asarray(center_lps_mm, float)
    where = f"the site {point_text(center)} mm (LPS x, y, z)"
    distances = [float(np.linalg.norm(nodule.centroid_lps_mm() - center)) for nodule in nodules]
    if task == "remove":
        at_site = [(d, i) for i, d in enumerate(distances) if d <= nodules[i].diameter_mm / 2 + SITE_TOLERANCE_MM]
        if not at_site:
            nearest = f"; the nearest is a {_nodule_text(nodules[int(np.argmin(distances))])}" if nodules else ""
            raise SiteRuleError(f"no annotated nodule at {where}{nearest}: removal replaces a real nodule")
        nodule = nodules[min(at_site)[1]]
        if not criteria.is_removal_target(nodule):
            raise SiteRuleError(f"the {_nodule_text(nodule)} is not a removal target ({criteria.removal_text()})")
        if nodule.diameter_mm > HOLE_SIZE * CUBE_SPACING_MM:
            raise SiteRuleError(
                f"the {_nodule_text(nodule)} is larger than the generators' {HOLE_SIZE * CUBE_SPACING_MM:g} mm hole: "
                "it cannot be removed"
            )
    elif task == "inject":
        reach_mm = HOLE_SIZE * CUBE_SPACING_MM / 2
        for distance, nodule in sorted(zip(distances, nodules), key=lambda pair: pair[0]):
            if distance - nodule.diameter_mm / 2 < reach_mm and not criteria.is_injection_site(nodule):
                raise SiteRuleError(
                    f"the hole around {where} reaches into a {_nodule_text(nodule)}: injection grows a fake "
                    f"where {criteria.injection_text()} is"
                )
    else:
        raise ValueError(f"task must be one of inject, remove; got {task!r}")


def split_patients(
    patient_ids: Iterable[str], seed: int = 0, proportions: Mapping[str, int] = OFFICIAL_SPLIT_PATIENTS
) -> dict[str, str]:
    """Assign each patient to train / val / test in ``proportions`` (default the official 488 / 100 /
    150), deterministically from ``seed``; no patient is in two splits, and a split with a share gets
    at least one patient when there are three or more."""
    if set(proportions) != set(OFFICIAL_SPLIT_PATIENTS) or min(proportions.values()) < 0 or not proportions["train"]:
        raise ValueError(f"split proportions must give train (> 0), val and test (>= 0); got {dict(proportions)}")
    patients = sorted(set(patient_ids))
    order = np.random.default_rng(seed).permutation(len(patients))
    total = sum(proportions.values())
    n_val = int(round(len(patients) * proportions["val"] / total))
    n_test = int(round(len(patients) * proportions["test"] / total))
    if len(patients) >= 3:
        n_val, n_test = (max(n, 1) if proportions[name] else 0 for n, name in ((n_val, "val"), (n_test, "test")))
    splits = {}
    for rank, index in enumerate(order):
        splits[patients[index]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return splits


def plan_sites(
    scans: Iterable[LIDCScan],
    criteria: PlanCriteria = PlanCriteria(),
    seed: int = 0,
    proportions: Mapping[str, int] = OFFICIAL_SPLIT_PATIENTS,
) -> list[Site]:
    """All sites over ``scans``, split by patient (`split_patients`). With
    ``criteria.second_injection_offset_zyx`` set, the first injection nodules in (patient, series) order,
    as many as the removal nodules, get a second site at that offset from the nodule's centre (the
    official release's second pass); these come after all the others."""
    sites = [site for scan in scans for site in plan_scan(scan, criteria)]
    if criteria.second_injection_offset_zyx is not None:
        offset = np.asarray(criteria.second_injection_offset_zyx, float)
        n_removals = len({(s.series_instance_uid, s.extra.get("nodule")) for s in sites if s.task == "remove"})
        injections = sorted(
            (s for s in sites if s.task == "inject"), key=lambda s: (s.patient_id, s.series_instance_uid)
        )
        for first in injections[:n_removals]:
            where = np.asarray(first.extra["nodule_zyx"]) + offset
            where[0] = min(max(where[0], 0.0), max((first.n_slices or 1) - 1, 0))
            second = replace(first, center_zyx=tuple(float(c) for c in where), extra={**first.extra, "second": True})
            sites.append(second)
    splits = split_patients((site.patient_id for site in sites), seed, proportions)
    for site in sites:
        site.split = splits[site.patient_id]
    return sites


def summarize_plan(sites: list[Site]) -> dict:
    """Counts per task, series, patients and split."""
    by_task = Counter(site.task for site in sites)
    patients_by_split = {
        split: len({s.patient_id for s in sites if s.split == split}) for split in OFFICIAL_SPLIT_PATIENTS
    }
    return {
        "sites": len(sites),
        "inject": by_task.get("inject", 0),
        "remove": by_task.get("remove", 0),
        "series": len({site.series_instance_uid for site in sites}),
        "patients": len({site.patient_id for site in sites}),
        "patients_by_split": patients_by_split,
        "sites_by_split": dict(Counter(site.split for site in sites)),
    }


def write_plan_csv(sites: list[Site], path: str | Path, generators: Iterable[str] = tuple(GENERATOR_CODES)) -> Path:
    """Write the plan in the official ``data.csv`` columns and convention: one row per site and generator
    ("real" = the pristine scan at the same site); ``sdir_id`` is the SeriesInstanceUID; ``coord_z``
    indexes slices by descending z, as the release (`Site.official_zyx`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(DATA_CSV_COLUMNS)
        for number, site in enumerate(sites):
            for generator in generators:
                z, y, x = (int(round(c)) for c in site.official_zyx())
                img_id = f"{OFFICIAL_TASK[site.task]}{number:05d}_{GENERATOR_CODES[generator]}"
                writer.writerow(
                    [
                        img_id,
                        OFFICIAL_TASK[site.task],
                        GENERATOR_CODES[generator],
                        site.patient_id,
                        site.series_instance_uid,
                        z,
                        y,
                        x,
                    ]
                )
    temporary.replace(path)
    return path


def site_record(site: Site) -> dict:
    """A flat dict of a site (for tables and JSON)."""
    record = asdict(site)
    record.pop("extra")
    return record


OFFICIAL_SETS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}


def read_table(path: Path, columns: Iterable[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """``(where, row)`` for each row of a CSV table that has ``columns``; a `ValueError` naming the file
    (and the line) for missing columns or a row that is cut or has extra fields."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            missing = set(columns) - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path} lacks the columns {sorted(missing)}")
            for row in reader:
                where = f"{path} line {reader.line_num}"
                if None in row or None in row.values():
                    raise ValueError(
                        f"{where} does not have the header's {len(reader.fieldnames)} fields: cut or damaged"
                    )
                yield where, row
        except (csv.Error, UnicodeDecodeError) as error:
            raise ValueError(f"{path} line {reader.line_num} is not CSV text ({error})") from None


def read_official_plan(release_dir: str | Path) -> list[Site]:
    """The sites of the official M3Dsynth release tables (``data/data.csv`` + ``data/sets.csv``):
    one `Site` per distinct (task, series, location), with the generators that kept it in
    ``extra["generators"]`` and the official image ids in ``extra["img_ids"]``."""
    root = Path(release_dir)
    data_dir = root / "data" if (root / "data" / "data.csv").is_file() else root
    data_csv, sets_csv = data_dir / "data.csv", data_dir / "sets.csv"
    for required in (data_csv, sets_csv):
        if not required.is_file():
            raise FileNotFoundError(f"{required} not found: point at the official M3Dsynth release (its data/ folder)")
    splits = {}
    for where, row in read_table(sets_csv, SETS_CSV_COLUMNS):
        if row["set"].strip().lower() not in OFFICIAL_SETS:
            raise ValueError(f"{where}: unknown set {row['set']!r} (expected one of {sorted(OFFICIAL_SETS)})")
        splits[row["orig_id"]] = OFFICIAL_SETS[row["set"].strip().lower()]
    sites: dict[tuple, Site] = {}
    tasks = {code: task for task, code in OFFICIAL_TASK.items()}
    for where, row in read_table(data_csv, DATA_CSV_COLUMNS):
        if row["ty"] not in tasks:
            raise ValueError(f"{where}: unknown task {row['ty']!r} (expected inj or rem)")
        if row["orig_id"] not in splits:
            raise ValueError(f"{where}: patient {row['orig_id']!r} has no split in {sets_csv}")
        try:
            center = (float(row["coord_z"]), float(row["coord_y"]), float(row["coord_x"]))
        except ValueError:
            raise ValueError(f"{where}: the coordinates are not numbers") from None
        if not all(np.isfinite(center)):
            raise ValueError(f"{where}: the coordinates are not finite")
        key = (row["ty"], row["sdir_id"], center)
        site = sites.get(key)
        if site is None:
            site = sites[key] = Site(
                task=tasks[row["ty"]],
                patient_id=row["orig_id"],
                series_instance_uid=row["sdir_id"],
                center_zyx=center,
                diameter_mm=float("nan"),
                malignancy=None,
                n_readers=0,
                split=splits[row["orig_id"]],
                extra={"generators": [], "img_ids": []},
            )
        site.extra["generators"].append(row["mod"])
        site.extra["img_ids"].append(row["img_id"])
    return list(sites.values())
