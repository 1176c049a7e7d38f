"""The m3d CAD malignancy scorer: a residual 3-D CNN on a 1 mm nodule cube, as a transformers model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_cad import CADConfig

IGNORE_INDEX = -100  # a label that is not a classification target (transformers' convention)


def malignancy_labels(ratings, config: CADConfig) -> np.ndarray:
    """Classification targets from median ratings: 1 malignant (>= ``malignant_min_rating``), 0 benign
    (<= ``benign_max_rating``), `IGNORE_INDEX` for the ratings between and for missing (NaN) ones."""
    ratings = np.asarray(ratings, dtype=np.float64)
    labels = np.full(ratings.shape, IGNORE_INDEX, dtype=np.int64)
    with np.errstate(invalid="ignore"):
        labels[ratings >= config.malignant_min_rating] = 1
        labels[ratings <= config.benign_max_rating] = 0
    return labels


@dataclass
class CADOutput(ModelOutput):
    """Output of `CADForMalignancyScoring`.

    Args:
        loss: BCE on the malignancy logit (labelled samples) + ``rating_loss_weight`` x smooth L1 on the
            rating (rated samples), when ``labels`` / ``ratings`` are given.
        logits: ``(batch,)`` malignancy logit; ``sigmoid(logits)`` is the probability of malignancy.
        rating: ``(batch,)`` predicted median reader rating in [1, 5] (None without the rating head).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    rating: torch.Tensor | None = None


class CADResidualBlock(nn.Module):
    """conv3x3x3 -> GroupNorm -> ReLU -> conv3x3x3 -> GroupNorm, plus the input, then ReLU."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(x + self.norm2(self.conv2(h)))


class CADStage(nn.Sequential):
    """A stride-2 3x3x3 conv (halves the resolution, sets the width), GroupNorm, ReLU, residual blocks."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, groups: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(),
            *[CADResidualBlock(out_channels, groups) for _ in range(blocks)],
        )


class CADPreTrainedModel(PreTrainedModel):
    """Weight init and the Auto-class plumbing of the CAD scorer."""

    config_class = CADConfig
    base_model_prefix = "cad"
    main_input_name = "pixel_values"

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained`, and the model's code with ``config.auto_map`` beside the weights,
        so that ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` works without m3d."""
        from ..remote_code import save_with_code

        save_with_code(self, save_directory, ("AutoModel", "AutoModelForImageClassification"))
        super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv3d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class CADForMalignancyScoring(CADPreTrainedModel):
    """A residual 3-D CNN that scores how likely the nodule at the centre of a cube is malignant (the
    M3Dsynth paper's diagnostic check: does a tampering change what a CAD tool concludes?).

    Input: ``pixel_values`` ``(batch, 1, S, S, S)``, the ``S = cube_size`` mm cube around the location at
    1 mm, HU scaled to [-1, 1] by `m3d.tamper.cube.hu_to_unit` (`m3d.cad.scoring` cuts and scales it).
    Layers: a 3x3x3 stem at full resolution and the first width, then one stage per width (a stride-2
    conv, then residual blocks), GroupNorm + ReLU throughout, global average pooling, dropout, then a
    linear malignancy logit and, with ``rating_head``, a linear rating squashed to [1, 5]
    (``1 + 4 * sigmoid``). Default config: 48^3 input, stages at 24^3, 12^3, 6^3 and 3^3 with widths
    16-32-64-128 (1.47 M parameters); downsampling before the first residual block keeps a training
    step on a CPU affordable.

    ``labels``: ``(batch,)`` 1 malignant / 0 benign / `IGNORE_INDEX` (`malignancy_labels`);
    ``ratings``: ``(batch,)`` median reader ratings, NaN where unrated.
    """

    def __init__(self, config: CADConfig) -> None:
        super().__init__(config)
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.stem = nn.Sequential(
            nn.Conv3d(1, widths[0], 3, padding=1, bias=False), nn.GroupNorm(groups, widths[0]), nn.ReLU()
        )
        self.stages = nn.ModuleList(
            CADStage(widths[max(i - 1, 0)], width, config.layers_per_block, groups) for i, width in enumerate(widths)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(widths[-1], 1)
        self.rating_regressor = nn.Linear(widths[-1], 1) if config.rating_head else None
        self.post_init()

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Raise a clear ValueError unless ``pixel_values`` is ``(batch, 1, S, S, S)``, S = cube_size."""
        size = self.config.cube_size
        if pixel_values.ndim != 5 or tuple(pixel_values.shape[1:]) != (1, size, size, size):
            raise ValueError(
                f"pixel_values must be (batch, 1, {size}, {size}, {size}); got {tuple(pixel_values.shape)}"
            )

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        ratings: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> CADOutput | tuple:
        self.check_pixel_values(pixel_values)
        hidden = self.stem(pixel_values)
        for stage in self.stages:
            hidden = stage(hidden)
        features = self.dropout(hidden.mean(dim=(2, 3, 4)))
        logits = self.classifier(features).squeeze(1)
        rating = None
        if self.rating_regressor is not None:
            rating = 1 + 4 * torch.sigmoid(self.rating_regressor(features).squeeze(1))
        output = CADOutput(loss=self.loss(logits, rating, labels, ratings), logits=logits, rating=rating)
        return output if return_dict else output.to_tuple()

    def loss(
        self,
        logits: torch.Tensor,
        rating: torch.Tensor | None,
        labels: torch.Tensor | None,
        ratings: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """BCE over the labelled samples + weighted smooth L1 over the rated ones (None if neither). A term
        whose samples are all unlabelled (unrated) is 0 but keeps its head in the graph: every parameter gets
        a gradient, as processes training together (DDP) need."""
        terms = []
        if labels is not None:
            labels = labels.to(logits.device).view_as(logits)
            keep = labels != IGNORE_INDEX
            targets = torch.where(keep, labels, 0).float()
            bce = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
            terms.append((bce * keep).sum() / keep.sum().clamp(min=1))
        if ratings is not None and rating is not None:
            ratings = ratings.to(rating.device).view_as(rating).float()
            keep = torch.isfinite(ratings)
            l1 = F.smooth_l1_loss(rating.float(), torch.where(keep, ratings, 0.0), reduction="none")
            terms.append(self.config.rating_loss_weight * (l1 * keep).sum() / keep.sum().clamp(min=1))
        if not terms:
            return None
        return torch.stack(terms).sum()


def register_cad() -> None:
    """Register the scorer with `AutoConfig`, `AutoModel` and `AutoModelForImageClassification`."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    AutoConfig.register(CADConfig.model_type, CADConfig, exist_ok=True)
    AutoModel.register(CADConfig, CADForMalignancyScoring, exist_ok=True)
    AutoModelForImageClassification.register(CADConfig, CADForMalignancyScoring, exist_ok=True)
