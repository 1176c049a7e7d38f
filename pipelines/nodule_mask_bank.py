"""`NoduleMaskBank`: a mask-conditioned pipeline's component holding the masks of the nodules its network was
trained on, which the pipeline draws from when a call gives no ``nodule_masks`` (`m3d.tamper.nodule_shape`).

It is a diffusers component in its own subfolder (``nodule_mask_bank/``: ``config.json`` and the bit-packed masks
as a safetensors buffer), so that every loader that fetches a pipeline's components, a Hub download included, gets
it with the weights.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..constants import HOLE_SIZE

__all__ = ["NoduleMaskBank"]


class NoduleMaskBank(ModelMixin, ConfigMixin):
    """``count`` bool masks of ``edge``^3 voxels (the cube's centre hole), stored bit-packed in the
    ``packed_masks`` buffer (uint8, so that a half-precision cast leaves it as it is). ``diameter_mm``: the
    ``(low, high)`` equivalent diameters (mm) of the masks a pipeline draws when a call names no size (None: any
    mask of the bank)."""

    @register_to_config
    def __init__(self, count: int, edge: int = HOLE_SIZE, diameter_mm: tuple[float, float] | None = None):
        super().__init__()
        if count < 1 or edge < 1:
            raise ValueError(f"a nodule-mask bank needs count >= 1 and edge >= 1; got count={count}, edge={edge}")
        if diameter_mm is not None and not (len(diameter_mm) == 2 and 0 <= diameter_mm[0] <= diameter_mm[1]):
            raise ValueError(
                f"a nodule-mask bank's diameter_mm must be (low, high) with 0 <= low <= high; got {diameter_mm}"
            )
        self.register_buffer("packed_masks", torch.zeros(-(-count * edge**3 // 8), dtype=torch.uint8))

    @classmethod
    def from_masks(cls, masks: np.ndarray, diameter_mm: tuple[float, float] | None = None) -> "NoduleMaskBank":
        """The bank of ``masks``, ``(N, edge, edge, edge)`` (nonzero inside), drawn in ``diameter_mm`` by default."""
        masks = np.asarray(masks) != 0
        if masks.ndim != 4 or len(set(masks.shape[1:])) != 1 or not len(masks):
            raise ValueError(f"nodule masks must be (N, edge, edge, edge) with N >= 1; got shape {masks.shape}")
        bank = cls(
            count=len(masks),
            edge=masks.shape[1],
            diameter_mm=None if diameter_mm is None else tuple(map(float, diameter_mm)),
        )
        bank.packed_masks.copy_(torch.from_numpy(np.packbits(masks.ravel())))
        return bank

    @property
    def masks(self) -> np.ndarray:
        """The ``(count, edge, edge, edge)`` bool masks."""
        shape = (self.config.count,) + (self.config.edge,) * 3
        return np.unpackbits(self.packed_masks.cpu().numpy(), count=int(np.prod(shape))).astype(bool).reshape(shape)

    def __len__(self) -> int:
        return self.config.count
