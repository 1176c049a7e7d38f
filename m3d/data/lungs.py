"""A fast, dependency-free lung segmentation used to check that tampering happens inside the lungs."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .ct import CTVolume

LUNG_THRESHOLD_HU = -320


def segment_lungs(volume: CTVolume, threshold_hu: float = LUNG_THRESHOLD_HU) -> np.ndarray:
    """Boolean ``(z, y, x)`` mask of the lungs (vessels and nodules inside them included).

    Air-like voxels (< ``threshold_hu``) connected to the in-plane border of any slice are outside
    the body; of the rest, the components larger than 2 % of the largest are kept (one or two lungs,
    trachea included), then holes are filled slice by slice so that vessels and nodules count as lung.
    """
    air = volume.hu < threshold_hu
    outside = np.zeros_like(air)
    structure_2d = ndimage.generate_binary_structure(2, 1)
    for index, plane in enumerate(air):
        labels, _ = ndimage.label(plane, structure_2d)
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        outside[index] = np.isin(labels, border[border > 0])
    candidates = air & ~outside
    labels, count = ndimage.label(candidates)
    if count == 0:
        return candidates
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= 0.02 * sizes.max()) + 1
    lungs = np.isin(labels, keep)
    for index in range(lungs.shape[0]):
        lungs[index] = ndimage.binary_fill_holes(lungs[index])
    return lungs
