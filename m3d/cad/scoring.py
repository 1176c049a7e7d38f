"""Apply the CAD scorer to locations of a scan: cut the 1 mm cube, scale it, score it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..data.ct import CTVolume, point_text
from ..tamper.cube import TamperLocationError, cut_training_cube, hu_to_unit
from .configuration_cad import CADConfig
from .modeling_cad import CADForMalignancyScoring


@dataclass(frozen=True)
class CADScore:
    """The scorer's verdict at one location: ``probability`` of malignancy, its ``logit`` and the
    predicted median ``rating`` (1-5; NaN without the rating head)."""

    probability: float
    logit: float
    rating: float

    @property
    def malignant(self) -> bool:
        return self.probability >= 0.5


def load_cad(path: str | Path, device: str | torch.device = "cpu") -> CADForMalignancyScoring:
    """A saved scorer (``save_pretrained`` folder) in eval mode on ``device``; clear errors otherwise."""
    from ..loading import load_saved_model

    model = load_saved_model(
        path,
        {CADConfig.model_type},
        f"the CAD scorer ({CADConfig.model_type!r})",
        CADForMalignancyScoring.from_pretrained,
    )
    return model.to(device).eval()


def cad_cube(volume: CTVolume, center_lps_mm: Sequence[float], size: int) -> np.ndarray:
    """The ``size``^3 1 mm cube (HU float32) the scorer sees around ``center_lps_mm`` (LPS mm), axes along
    the scan's; where it reaches beyond the scan the nearest scan voxel is repeated. Raises
    `TamperLocationError` for a centre outside the scan."""
    center = np.asarray(center_lps_mm, float)
    index = volume.world_to_voxel(center)
    if not volume.contains_voxel(index):
        raise TamperLocationError(
            f"location {point_text(center)} mm (LPS x, y, z) is outside the scan "
            f"(voxel z, y, x {point_text(index)}, shape {volume.shape})"
        )
    return cut_training_cube(volume, center, size)


@torch.no_grad()
def score_cubes(model: CADForMalignancyScoring, cubes_hu: np.ndarray, batch_size: int = 16) -> list[CADScore]:
    """Scores of ``(N, S, S, S)`` HU cubes (S = the model's ``cube_size``)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    scores: list[CADScore] = []
    for start in range(0, len(cubes_hu), batch_size):
        batch = torch.from_numpy(hu_to_unit(np.asarray(cubes_hu[start : start + batch_size], np.float32)))[:, None]
        output = model(pixel_values=batch.to(device=device, dtype=dtype))
        logits = output.logits.float().cpu().numpy()
        ratings = output.rating.float().cpu().numpy() if output.rating is not None else np.full(len(logits), np.nan)
        for logit, rating in zip(logits, ratings):
            probability = float(1 / (1 + np.exp(-float(logit))))
            scores.append(CADScore(probability=probability, logit=float(logit), rating=float(rating)))
    return scores


def score_locations(
    model: CADForMalignancyScoring, volume: CTVolume, locations_lps_mm: Iterable[Sequence[float]], batch_size: int = 16
) -> list[CADScore]:
    """The scorer's verdict at each location (LPS mm) of ``volume``."""
    model.eval()
    cubes = [cad_cube(volume, location, model.config.cube_size) for location in locations_lps_mm]
    if not cubes:
        return []
    return score_cubes(model, np.stack(cubes), batch_size)
