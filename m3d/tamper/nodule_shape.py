"""Target nodule shapes: where a mask-conditioned generator is asked to draw the nodule (as LeFusion conditions
its lesion inpainting on a lesion mask).

A generator trained with ``in_channels=3`` sees, besides the masked cube and the hole mask, the mask of the nodule
to draw. In training that is the real nodule's mask, measured on the training cube as the builder's quality check
measures it (`m3d.tamper.quality.nodule_mask`: the solid part, above -400 HU, reaching the centre). At tampering time
a pipeline saved by training draws one from its bank of those training masks (`bank_nodule_mask`, turned as the
training augmentations turn cubes). Without a bank it draws `random_nodule_mask`: a lobulated body with a few thin
spicules and an irregular margin, scaled to an equivalent diameter drawn from the task's range
(`TARGET_NODULE_DIAMETER_MM`) and kept one voxel inside the hole. Those shapes give the fakes away: on held-out
phantom sites a small 3-D CNN told a mask-conditioned Pix2Pix's injections from real nodules 0.86 of the time with
them and 0.54 with real nodules' masks.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..constants import CUBE_SIZE, CUBE_SPACING_MM, HOLE_SIZE, TARGET_NODULE_DIAMETER_MM
from .cube import hole_mask
from .quality import QualityCriteria, ball_structure, central_component, equivalent_diameter_mm

__all__ = ["bank_nodule_mask", "fit_mask_in_hole", "random_nodule_mask", "sample_target_diameter_mm"]

_LOBES = (2, 6)  # number of lobes (inclusive range)
_SPICULES = (0, 6)
# relative amplitude of the margin's fine irregularity: real phantom nodules' solid parts (above -400 HU) have 1.05-2.2
# times (10th-90th percentile, median 1.26) the surface of a ball of their volume; these shapes 1.06-1.46 (median 1.22)
_ROUGHNESS = (0.05, 0.2)
CENTRE_RADIUS_MM = QualityCriteria().center_radius_mm  # a nodule's body reaches the central ball the check looks in
BODY_RADIUS = 3  # voxels: a nodule's body is the part of its mask a ball of this radius fits in (vessels are thinner)


def sample_target_diameter_mm(
    rng: np.random.Generator, task: str, diameter_mm: float | tuple[float, float] | None
) -> float:
    """One target diameter (mm): ``diameter_mm`` itself, uniform in its ``(low, high)`` range, or (None) uniform
    in the task's `TARGET_NODULE_DIAMETER_MM`."""
    bounds = TARGET_NODULE_DIAMETER_MM[task] if diameter_mm is None else diameter_mm
    if np.ndim(bounds) == 0:
        return float(bounds)
    low, high = (float(v) for v in bounds)
    return float(rng.uniform(low, high))


def _unit_vectors(rng: np.random.Generator, count: int) -> np.ndarray:
    vectors = rng.normal(size=(count, 3))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def random_nodule_mask(
    rng: np.random.Generator, diameter_mm: float, size: int = CUBE_SIZE, spacing_mm: float = CUBE_SPACING_MM
) -> np.ndarray:
    """A bool ``size``^3 mask of a lobulated, possibly spiculated nodule at the cube's centre whose volume is that
    of a sphere of ``diameter_mm`` (as far as the hole allows), inside the centre hole less one voxel."""
    if not 0 < diameter_mm < (HOLE_SIZE - 2) * spacing_mm:
        raise ValueError(
            f"diameter_mm must be in (0, {(HOLE_SIZE - 2) * spacing_mm:g}) to fit the hole; got {diameter_mm}"
        )
    grid = (np.indices((size,) * 3, dtype=np.float32) - (size - 1) / 2) * spacing_mm
    radius = np.sqrt((grid**2).sum(0))
    directions = grid / np.maximum(radius, 1e-6)
    # the shape's radius in each direction, relative to its mean: an ellipsoid, lobes (broad bumps), spicules
    axes = rng.uniform(0.8, 1.25, 3)
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rotated = np.einsum("ij,jxyz->ixyz", rotation.T.astype(np.float32), directions)
    relative = 1.0 / np.sqrt(((rotated / axes[:, None, None, None]) ** 2).sum(0))
    for lobe in _unit_vectors(rng, int(rng.integers(_LOBES[0], _LOBES[1] + 1))):
        cosine = np.einsum("i,ixyz->xyz", lobe.astype(np.float32), directions)
        relative += rng.uniform(0.1, 0.3) * np.exp(rng.uniform(2.0, 6.0) * (cosine - 1))
    for spicule in _unit_vectors(rng, int(rng.integers(_SPICULES[0], _SPICULES[1] + 1))):
        cosine = np.einsum("i,ixyz->xyz", spicule.astype(np.float32), directions)
        relative += rng.uniform(0.3, 0.8) * np.exp(rng.uniform(80.0, 200.0) * (cosine - 1))
    roughness = ndimage.gaussian_filter(rng.normal(size=relative.shape), 1.0)  # a margin as irregular as real ones
    relative *= 1 + rng.uniform(*_ROUGHNESS) * roughness / roughness.std()
    inside = hole_mask((size,) * 3, HOLE_SIZE - 2)
    target_voxels = np.pi / 6 * diameter_mm**3 / spacing_mm**3
    shape_radius = radius / relative  # a voxel is inside when this is below the mean radius
    candidates = np.sort(shape_radius[inside])
    count = int(np.clip(round(target_voxels), 1, candidates.size))
    mask = inside & (shape_radius <= candidates[count - 1])
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    return labels == labels[(size // 2,) * 3]  # a spicule thinner than a voxel can leave fragments: the body only


def bank_nodule_mask(
    rng: np.random.Generator,
    bank: np.ndarray,
    diameter_mm: float | tuple[float, float] | None = None,
    size: int = CUBE_SIZE,
) -> np.ndarray:
    """A bool ``size``^3 mask at the cube's centre: one of ``bank``'s ``(N, 20, 20, 20)`` hole masks (the measured
    nodules a generator was trained on), flipped along each axis with probability 1/2 and turned by a
    multiple of 90 degrees in the axial plane (the training augmentations); with ``diameter_mm``, one whose equivalent
    diameter is nearest that value or, for a ``(low, high)`` range, one inside it (the nearest to it if none is)."""
    bank = np.asarray(bank, bool)
    diameters = equivalent_diameter_mm(bank)
    if diameter_mm is None:
        choices = np.arange(len(bank))
    elif np.ndim(diameter_mm) == 0:
        distance = np.abs(diameters - float(diameter_mm))
        choices = np.flatnonzero(distance == distance.min())
    else:
        low, high = sorted(float(v) for v in diameter_mm)
        choices = np.flatnonzero((diameters >= low) & (diameters <= high))
        if not choices.size:
            distance = np.maximum(low - diameters, diameters - high)
            choices = np.flatnonzero(distance == distance.min())
    shape = bank[int(rng.choice(choices))]
    for axis in range(3):
        if rng.random() < 0.5:
            shape = np.flip(shape, axis)
    shape = np.rot90(shape, int(rng.integers(4)), axes=(1, 2))
    mask = np.zeros((size,) * 3, bool)
    mask[hole_mask((size,) * 3, HOLE_SIZE)] = shape.ravel()
    return mask


def fit_mask_in_hole(mask: np.ndarray) -> np.ndarray | None:
    """A real nodule's mask on the ``CUBE_SIZE``^3 grid (bool, nodule at the centre) made to fit the hole. The
    nodule is the mask's body (the part a ball of `BODY_RADIUS` fits in, where it reaches the centre) grown by a
    voxel within the mask; the rest is vessels and spicules leaving it. When the nodule reaches beyond the hole,
    the whole mask is scaled down about the centre until the nodule fits the hole. Returns the ``HOLE_SIZE``^3 hole
    mask, or None when the nodule reaches the cube's faces (cut by the cube: its shape is unknown).

    Cut to the hole as it was, a large nodule's mask had flat faces, and a generator that follows its mask drew a
    nodule with straight edges (23 of 30 masks of the demo GAN injectors' banks reached the hole's faces). With a
    voxel of lung left between the nodule and the faces, the two-sample test told a Pix2Pix's nodules from real ones
    0.87 of the time, against 0.75-0.80 fitted to the hole (`generator_experiments_mask_fit_cpu.json`)."""
    mask = np.asarray(mask, bool)
    if mask.shape != (CUBE_SIZE,) * 3:
        raise ValueError(f"mask must have shape {(CUBE_SIZE,) * 3}; got {mask.shape}")
    body = central_component(ndimage.binary_opening(mask, structure=ball_structure(BODY_RADIUS)), CENTRE_RADIUS_MM)
    nodule = mask & ndimage.binary_dilation(body) if body.any() else mask
    if (nodule & ~hole_mask((CUBE_SIZE,) * 3, CUBE_SIZE - 2)).any():
        return None
    centre = (CUBE_SIZE - 1) / 2
    reach = np.abs(np.argwhere(nodule) - centre).max() + 0.5 if nodule.any() else 0.0
    scale = min(1.0, HOLE_SIZE / 2 / max(reach, 1e-6))
    if scale < 1.0:  # sample the mask at centre + offset / scale: the nodule shrunk by ``scale`` about the centre
        mask = (
            ndimage.affine_transform(
                mask.astype(np.float32), np.full(3, 1 / scale), offset=centre * (1 - 1 / scale), order=1
            )
            > 0.5
        )
    return mask[hole_mask((CUBE_SIZE,) * 3, HOLE_SIZE)].reshape((HOLE_SIZE,) * 3)
