"""LIDC pixel indices on a `CTVolume`: the grid orientation they need and the slices' z positions."""

from __future__ import annotations

import numpy as np

from ..ct import CTVolume


def check_axial_grid(volume: CTVolume) -> None:
    """LIDC pixel indices need a volume whose rows run along +y and columns along +x (DICOM order)."""
    direction = volume.direction
    if not (
        np.allclose(direction[:, 1], (0, 1, 0), atol=1e-3)
        and np.allclose(direction[:, 2], (1, 0, 0), atol=1e-3)
        and abs(abs(direction[2, 0]) - 1.0) < 1e-3
    ):
        raise ValueError(
            "LIDC annotations need an axial volume whose rows run along LPS +y and columns along +x "
            f"(as stored in DICOM); got direction {np.round(direction, 4).tolist()}"
        )


def volume_z_positions(volume: CTVolume) -> np.ndarray:
    """LPS z (mm) of each slice of ``volume`` in its array order."""
    index = np.zeros((volume.shape[0], 3))
    index[:, 0] = np.arange(volume.shape[0])
    return volume.voxel_to_world(index)[:, 2]
