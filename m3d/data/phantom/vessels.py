"""Lung vessel trees grown by territory splitting (Murray's law radii) and the bronchi alongside the
larger arteries."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .anatomy import Anatomy
from .grid import Grid
from .mediastinum import Mediastinum
from .render import SliceRenderer
from .tubes import Tubes, tube_sdf

LUNG_SAMPLING_STEP_MM = 4.0  # the coarse grid the territories are drawn on


def lung_points(
    anatomy: Anatomy, mediastinum: Mediastinum, rng: np.random.Generator, n_per_side: int
) -> dict[str, np.ndarray]:
    """Uniform random points (X, Y, Z) inside each lung (full apex-to-base extent, independent of the
    scan's window and grid, so a seed gives the same trees at any size)."""
    step = LUNG_SAMPLING_STEP_MM
    half_width = anatomy.cavity_half_width + 20.0
    x_mm = np.arange(-half_width, half_width + step, step)
    y_mm = np.arange(
        anatomy.cavity_centre_y - anatomy.cavity_half_depth - 20.0,
        anatomy.cavity_centre_y + anatomy.cavity_half_depth + 20.0,
        step,
    )
    z_mm = np.arange(anatomy.z_of(1.02), anatomy.z_of(-0.05), step)
    grid = Grid(x_mm, y_mm, z_mm, thickness=step)
    renderer = SliceRenderer(anatomy, grid, rng, mediastinum, want_hu=False)
    sdf = tube_sdf(grid, mediastinum.all_soft, 12.0)
    mask = np.stack([renderer.render(k, sdf[k])[1] for k in range(len(z_mm))])
    mask = ndimage.binary_erosion(mask, iterations=1)
    zz, yy, xx = np.nonzero(mask)
    out = {}
    for side, on_side in (("right", x_mm[xx] < 0), ("left", x_mm[xx] > 0)):
        cells = np.flatnonzero(on_side)
        pick = rng.choice(cells, size=min(n_per_side, len(cells)), replace=len(cells) < n_per_side)
        jitter = rng.uniform(-0.5 * step, 0.5 * step, (len(pick), 3))
        out[side] = np.stack([x_mm[xx[pick]], y_mm[yy[pick]], z_mm[zz[pick]]], axis=1) + jitter
    return out


def territory_tree(rng: np.random.Generator, root: np.ndarray, points: np.ndarray, root_radius: float) -> Tubes:
    """Grow a branching tree from ``root`` whose leaves fill the territory ``points`` (n, 3).

    Each branch heads for the centroid of its territory, bifurcates part of the way there, and the
    territory is split across its principal axis; radii follow Murray's law (r^3 ~ territory size).
    """
    starts: list = []
    ends: list = []
    start_radii: list = []
    end_radii: list = []
    stack = [(np.asarray(root, float), root_radius, np.arange(len(points)), 0)]
    while stack:
        start, radius, members, depth = stack.pop()
        territory = points[members]
        centre = territory.mean(axis=0)
        if len(members) <= 1:  # a leaf: two pieces to the point, a little off the straight line
            to_centre = centre - start
            middle = start + 0.5 * to_centre + rng.normal(0.0, 0.08 * float(np.linalg.norm(to_centre)), 3)
            starts.extend([start, middle])
            ends.extend([middle, centre])
            start_radii.extend([radius, radius * 0.85])
            end_radii.extend([radius * 0.85, radius * 0.6])
            continue
        fraction = rng.uniform(0.3, 0.55) if depth > 0 else rng.uniform(0.35, 0.5)
        end = start + fraction * (centre - start)
        # gentle curvature: the branch is three pieces bending around a random sideways offset
        branch = end - start
        length = float(np.linalg.norm(branch))
        bend = rng.normal(0.0, 0.07 * length, 3)
        knee_1 = start + branch / 3.0 + 0.8 * bend
        knee_2 = start + 2.0 * branch / 3.0 + 0.8 * bend + rng.normal(0.0, 0.03 * length, 3)
        taper = (radius, radius * 0.98, radius * 0.96, radius * 0.94)
        for piece, (piece_start, piece_end) in enumerate(((start, knee_1), (knee_1, knee_2), (knee_2, end))):
            starts.append(piece_start)
            ends.append(piece_end)
            start_radii.append(taper[piece])
            end_radii.append(taper[piece + 1])
        # split the territory along its principal axis
        centred = territory - centre
        _, axes = np.linalg.eigh(centred.T @ centred)
        projection = centred @ axes[:, -1]
        kth = int(rng.uniform(0.3, 0.7) * (len(projection) - 1))
        cut = np.partition(projection, kth)[kth]
        left = projection <= cut
        if left.all() or not left.any():
            left = projection <= np.median(projection)
            if left.all() or not left.any():
                left = np.arange(len(members)) < len(members) // 2
        for part in (members[left], members[~left]):
            child_radius = radius * (len(part) / len(members)) ** (1.0 / 3.0)
            stack.append((end, child_radius, part, depth + 1))
    return Tubes(np.array(starts), np.array(ends), np.array(start_radii), np.array(end_radii))


def bronchial_tree(arteries: Tubes, min_radius: float) -> tuple[Tubes, Tubes]:
    """Bronchi alongside the arteries of at least ``min_radius``: (wall tubes, lumen tubes)."""
    keep = arteries.r0 >= min_radius
    artery_start, artery_end, artery_radius = arteries.p0[keep], arteries.p1[keep], arteries.r0[keep]
    if not len(artery_radius):
        empty = Tubes(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0))
        return empty, empty
    lumen = 0.8 * artery_radius
    wall = lumen + 0.6 + 0.18 * lumen

    # each bronchus runs beside its artery, offset towards the back (a fixed direction made
    # perpendicular to the branch, so that consecutive pieces stay nearly joined)
    def beside(points: np.ndarray, direction: np.ndarray) -> np.ndarray:
        reference = np.where(np.abs(direction[:, 1:2]) > 0.85, [[0.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]])
        side = reference - (reference * direction).sum(axis=1, keepdims=True) * direction
        side /= np.linalg.norm(side, axis=1, keepdims=True)
        return points + side * (wall + artery_radius + 0.3)[:, None]

    direction = artery_end - artery_start
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-6)
    bronchus_start = beside(artery_start, direction)
    bronchus_end = beside(artery_end, direction)
    return (
        Tubes(bronchus_start, bronchus_end, wall, wall * 0.95),
        Tubes(bronchus_start, bronchus_end, lumen, lumen * 0.95),
    )
