"""The chest before nodules and scanner noise: the analytic slices, the mediastinal tubes and the lung
vessel trees with their bronchi, on the scan's grid."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .anatomy import Anatomy
from .constants import AIR_HU, AIRWAY_LUMEN_HU, AORTIC_CALCIFICATION_HU, CLAVICLE_HU
from .grid import Grid, index_range
from .mediastinum import make_mediastinum
from .render import SliceRenderer
from .tubes import Tubes, paint_tubes, tube_sdf
from .vessels import bronchial_tree, lung_points, territory_tree

LUNG_POINTS_PER_SIDE = 6000  # half for the artery tree, half for the vein trees
HILUM_RADIUS_MM = 22.0  # lung vessels are drawn this far out of the lungs around their roots


@dataclass
class Chest:
    hu: np.ndarray  # float32 (z, y, x)
    lung_mask: np.ndarray  # bool
    hila: list[np.ndarray]  # (x, y, z) points to keep nodules away from


def _fill_balls(mask: np.ndarray, grid: Grid, centres: Sequence[np.ndarray], radius: float) -> None:
    """Set ``mask`` true within ``radius`` mm of each centre (X, Y, Z)."""
    for centre in centres:
        z0, z1 = index_range(grid.z_mm, centre[2] - radius, centre[2] + radius)
        y0, y1 = index_range(grid.y_mm, centre[1] - radius, centre[1] + radius)
        x0, x1 = index_range(grid.x_mm, centre[0] - radius, centre[0] + radius)
        if z0 >= z1 or y0 >= y1 or x0 >= x1:
            continue
        distance2 = (
            (grid.z_mm[z0:z1, None, None] - centre[2]) ** 2
            + (grid.y_mm[None, y0:y1, None] - centre[1]) ** 2
            + (grid.x_mm[None, None, x0:x1] - centre[0]) ** 2
        )
        mask[z0:z1, y0:y1, x0:x1] |= distance2 < radius**2


def single_threaded_blas() -> Any:
    """Many small matrix products: BLAS threads only add overhead (and stall on a busy machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def render_chest(anatomy: Anatomy, grid: Grid, rng: np.random.Generator) -> Chest:
    """The patient's chest on ``grid`` (float32 HU), its lung mask and the hila."""
    rng_mediastinum, rng_slices, rng_trees = (np.random.default_rng(s) for s in rng.bit_generator.seed_seq.spawn(3))
    mediastinum = make_mediastinum(anatomy, rng_mediastinum)
    # 1) signed distance to mediastinal tubes (carves the lungs' medial borders)
    sdf = tube_sdf(grid, mediastinum.all_soft, 12.0)
    # 2) analytic anatomy, slice by slice
    renderer = SliceRenderer(anatomy, grid, rng_slices, mediastinum)
    hu = np.empty(grid.shape, dtype=np.float32)
    lung = np.empty(grid.shape, dtype=bool)
    for k in range(grid.shape[0]):
        hu[k], lung[k] = renderer.render(k, sdf[k])
    del sdf
    # 3) mediastinal tubes
    paint_tubes(hu, grid, mediastinum.lymph_nodes, anatomy.muscle_hu - 8.0)
    for vessel in mediastinum.vessels:
        paint_tubes(hu, grid, vessel, anatomy.blood_hu)
    paint_tubes(hu, grid, mediastinum.esophagus, anatomy.muscle_hu)
    paint_tubes(hu, grid, mediastinum.esophagus.scaled(0.25), -900.0, strength=0.6)  # a little swallowed air
    paint_tubes(hu, grid, mediastinum.airways, anatomy.muscle_hu + 10.0)
    paint_tubes(hu, grid, mediastinum.airways.scaled(0.82), AIR_HU)
    paint_tubes(hu, grid, mediastinum.bones, CLAVICLE_HU)
    paint_tubes(hu, grid, mediastinum.calcifications, float(rng_mediastinum.uniform(*AORTIC_CALCIFICATION_HU)))
    # 4) lung vessel trees: one artery tree per lung (from the hilum), two vein trees per lung; the
    #    trees depend only on the anatomy (not on the grid), so a seed gives the same patient at any size
    points = lung_points(anatomy, mediastinum, rng_trees, LUNG_POINTS_PER_SIDE)
    scale = math.sqrt(anatomy.scale_x * anatomy.scale_y)
    trees, bronchi, hila, roots = [], [], [], []
    for side in ("right", "left"):
        side_points = points[side]
        artery_root = np.asarray(mediastinum.artery_roots[side])
        arteries = territory_tree(rng_trees, artery_root, side_points[: len(side_points) // 2], 8.0 * scale)
        trees.append(arteries)
        vein_points = side_points[len(side_points) // 2 :]
        vein_roots = [np.asarray(v) for v in mediastinum.vein_roots[side]]
        upper = vein_points[:, 2] > vein_roots[0][2] - 0.1 * anatomy.length
        for vein_root, territory in zip(vein_roots, (upper, ~upper)):
            if territory.sum() > 2:
                trees.append(territory_tree(rng_trees, vein_root, vein_points[territory], 6.5 * scale))
        bronchi.append(bronchial_tree(arteries, 1.4))
        roots.extend([artery_root] + vein_roots)
        hila.extend([artery_root] + vein_roots + [np.asarray(mediastinum.bronchus_roots[side])])
    # lung vessels are drawn inside the lungs, and in the hila where they leave the mediastinum
    allowed = lung.copy()
    _fill_balls(allowed, grid, roots, HILUM_RADIUS_MM)
    for wall, lumen in bronchi:
        paint_tubes(hu, grid, wall, anatomy.muscle_hu, mask=allowed)
        paint_tubes(hu, grid, lumen, AIRWAY_LUMEN_HU, mask=allowed)
    paint_tubes(hu, grid, Tubes.concat(trees), anatomy.blood_hu, mask=allowed, thin_below=grid.pixel_spacing)
    return Chest(hu=hu, lung_mask=lung, hila=hila)
