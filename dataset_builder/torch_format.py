"""M3Dsynth examples as torch tensors, for training loops (`torch.utils.data.DataLoader`, MONAI).

``load_dataset(DIR).with_format("torch")`` cannot turn the ``volume`` and ``mask`` NIfTI columns into
tensors; `CTToTorch` is the transform that does (``ds.with_transform(CTToTorch(ds))``, or
``streaming_ds.map(CTToTorch())``), and `collate_ct` the ``collate_fn`` for scans of different shapes.
"""

from __future__ import annotations

from typing import Any

import datasets
import torch

from .features import ScanResolver, example_mask, example_volume

TENSOR_KEYS = ("volume", "mask", "spacing_mm", "origin_mm", "direction")


class CTToTorch:
    """Transform for `datasets.Dataset.with_transform` (batches) and `datasets.IterableDataset.map`
    (examples, or batches with ``batched=True``). Per example it sets ``volume``: int16 HU tensor
    ``(z, y, x)`` (``.float()`` for float32), ``mask``: bool tensor of the same shape (the voxels the
    generator changed), and the volume's geometry as float64 tensors: ``spacing_mm`` ``(3,)`` (z, y, x),
    ``origin_mm`` ``(3,)`` (LPS x, y, z of voxel ``[0, 0, 0]``), ``direction`` ``(3, 3)`` (LPS unit vector of
    each array axis, as columns; see `m3d.data.ct`). Other columns are left as they are.

    A fake is stored as the box it changed over the pristine scan of its site (``base_img_id``).
    ``bases``: a map-style split holding those pristine examples (the split itself, or the ``pristine``
    config of the same split for a streamed one): every example then comes as its whole scan, the mask
    on the whole scan. Without ``bases``, each example comes as its row stores it: a pristine example
    as its whole scan, a fake as its changed box, whose geometry places it in the world and whose
    ``box_start_zyx`` places it in the scan (``scan_shape_zyx``)."""

    def __init__(self, bases: datasets.Dataset | None = None) -> None:
        self.bases = bases
        self._scans = ScanResolver(bases) if bases is not None else None

    def __getstate__(self) -> dict[str, Any]:
        return {"bases": self.bases}  # not the decoded scans: copies (DataLoader workers) decode their own

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["bases"])

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Tensors of one example, or of a batch (a dict of lists, as `with_transform` passes)."""
        if not isinstance(batch["volume"], list):
            return {**batch, **self.tensors(batch)}
        examples = [self.tensors(dict(zip(batch, values))) for values in zip(*batch.values())]
        return {**batch, **{key: [example[key] for example in examples] for key in TENSOR_KEYS}}

    def tensors(self, example: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``volume``, ``mask``, ``spacing_mm``, ``origin_mm`` and ``direction`` of one decoded example."""
        if self._scans is None:
            example = {**example, "base_img_id": None}  # what the row stores: a fake's box read as a scan
            volume = example_volume(example)
        else:
            volume = self._scans.volume(example)
        return {
            "volume": torch.from_numpy(volume.hu.copy()),  # a copy: the resolver caches the pristine scans
            "mask": torch.from_numpy(example_mask(example)),
            "spacing_mm": torch.tensor(volume.spacing_mm, dtype=torch.float64),
            "origin_mm": torch.tensor(volume.origin_mm, dtype=torch.float64),
            "direction": torch.from_numpy(volume.direction.copy()),
        }


def collate_ct(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """``collate_fn`` of a `torch.utils.data.DataLoader` over `CTToTorch` examples: per key, tensors of one
    shape are stacked and numbers become a tensor; the rest (volumes of different shapes, strings, lists,
    None) stays a list, one entry per example."""
    batch: dict[str, Any] = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        if all(isinstance(value, torch.Tensor) for value in values) and len({value.shape for value in values}) == 1:
            batch[key] = torch.stack(values)
        elif all(isinstance(value, (int, float)) for value in values):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch
