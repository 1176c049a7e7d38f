"""Figures of the report: tri-planar views of a scan beside its ground truth and detector maps.

Every view is drawn in physical proportions (the pixel aspect comes from the scan's spacing), in the
lung window, with the ground truth or map overlaid in colour; files are written as PNG atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..data.ct import CTVolume  # noqa: E402

LUNG_WINDOW_HU = (-1350, 150)  # level -600, width 1500
PLANES = ("axial", "coronal", "sagittal")


def planes_through(array_zyx: np.ndarray, center_zyx: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The axial, coronal and sagittal sections of a ``(z, y, x)`` array through ``center_zyx``; the
    coronal and sagittal ones have the last slice at the top (superior, for the usual +z slice normal)."""
    z, y, x = (int(np.clip(c, 0, n - 1)) for c, n in zip(center_zyx, array_zyx.shape))
    return {
        "axial": array_zyx[z],
        "coronal": array_zyx[::-1, y, :],
        "sagittal": array_zyx[::-1, :, x],
    }


def _aspects(spacing_mm: tuple[float, float, float]) -> dict[str, float]:
    dz, dy, dx = spacing_mm
    return {"axial": dy / dx, "coronal": dz / dx, "sagittal": dz / dy}


def save_figure(figure: plt.Figure, path: str | Path) -> Path:
    """Save ``figure`` as PNG through a temporary file and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    figure.savefig(temporary, dpi=110, bbox_inches="tight")
    plt.close(figure)
    temporary.replace(path)
    return path


def triplanar_figure(
    volume: CTVolume,
    center_zyx: tuple[int, int, int],
    mask: np.ndarray | None = None,
    maps: Mapping[str, np.ndarray] | None = None,
    title: str = "",
) -> plt.Figure:
    """One row per plane; columns: the scan, the scan with the ground-truth mask, then one per
    detector map (probabilities in [0, 1], overlaid with a fixed colour scale so maps compare)."""
    maps = dict(maps or {})
    columns = [("scan", None, None)]
    if mask is not None:
        columns.append(("ground truth", np.asarray(mask, dtype=np.float32), "Reds"))
    columns += [(name, np.asarray(values, dtype=np.float32), "jet") for name, values in maps.items()]
    for name, overlay, _ in columns[1:]:
        if overlay.shape != volume.shape:
            raise ValueError(f"{name}: shape {overlay.shape} differs from the scan's {volume.shape}")
    aspects = _aspects(volume.spacing_mm)
    scan_planes = planes_through(volume.hu, center_zyx)
    figure, axes = plt.subplots(len(PLANES), len(columns), figsize=(2.6 * len(columns), 7.8), squeeze=False)
    for column, (name, overlay, colormap) in enumerate(columns):
        overlay_planes = planes_through(overlay, center_zyx) if overlay is not None else None
        for row, plane in enumerate(PLANES):
            axis = axes[row, column]
            axis.imshow(
                scan_planes[plane],
                cmap="gray",
                vmin=LUNG_WINDOW_HU[0],
                vmax=LUNG_WINDOW_HU[1],
                aspect=aspects[plane],
                interpolation="nearest",
            )
            if overlay_planes is not None:
                shown = np.ma.masked_less(overlay_planes[plane], 0.05)
                axis.imshow(
                    shown,
                    cmap=colormap,
                    vmin=0.0,
                    vmax=1.0,
                    alpha=0.45,
                    aspect=aspects[plane],
                    interpolation="nearest",
                )
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name, fontsize=9)
            if column == 0:
                axis.set_ylabel(plane, fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure
