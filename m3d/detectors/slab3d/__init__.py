"""Slab3D: m3d's own volumetric detector — 3-D convolutions over a slab of CT slices in HU."""

from .configuration_slab3d import Slab3DConfig
from .modeling_slab3d import Slab3DForForgeryDetection

__all__ = ["Slab3DConfig", "Slab3DForForgeryDetection"]
