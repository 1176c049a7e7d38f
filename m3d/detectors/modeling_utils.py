"""What every m3d detector shares: the base config (with the CT slice transform), one output class,
the base `PreTrainedModel` with the standard losses, the Bayar-constrained convolutions and a fast window mean."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from ..presets import PresetMixin

INPUT_MODES = ("hu_windows", "percentile", "adjacent_slices", "slab")
# (low, high) HU: lung, mediastinum, wide — the default three-channel view of one CT slice.
DEFAULT_HU_WINDOWS = ((-1350.0, 150.0), (-160.0, 240.0), (-1000.0, 400.0))


def check_slice_transform(
    input_mode: str,
    hu_windows: Sequence[Sequence[float]],
    percentiles: Sequence[float],
    slab_slices: int,
) -> None:
    """Raise a one-line ValueError unless these make a valid HU -> slice input transform (see `M3DDetectorConfig`)."""
    if input_mode not in INPUT_MODES:
        raise ValueError(f"input_mode must be one of {INPUT_MODES}; got {input_mode!r}")
    if len(hu_windows) != 3 or any(len(w) != 2 or w[0] >= w[1] for w in hu_windows):
        raise ValueError(f"hu_windows must be three (low, high) pairs with low < high; got {hu_windows}")
    if not 0 <= percentiles[0] < percentiles[1] <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100; got {percentiles}")
    if slab_slices < 1 or slab_slices % 2 == 0:
        raise ValueError(f"slab_slices must be a positive odd number; got {slab_slices}")


class M3DDetectorConfig(PresetMixin, PreTrainedConfig):
    """Base config of the m3d detectors; holds how HU become the model's 3-channel slice input (the transform
    itself is `M3DCTImageProcessor`, saved beside a trained detector as ``preprocessor_config.json``).

    Args:
        input_mode: ``"hu_windows"`` (each channel one HU window), ``"percentile"`` (the official
            M3Dsynth loader: stored values scaled per scan between two percentiles, repeated on 3
            channels) or ``"adjacent_slices"`` (2.5-D: slices k-1, k, k+1 in the first HU window).
        hu_windows: three ``(low, high)`` HU windows for ``"hu_windows"``; the first is also used by
            ``"adjacent_slices"``.
        percentiles: ``(low, high)`` percentiles for ``"percentile"``.
        localization_loss_weight / detection_loss_weight: weights of the two standard losses.
        volume_threshold: the volume score (max of the slice probabilities) above which a scan is called
            manipulated. A slice classifier trained on balanced slices puts its 0.5 at the slice level;
            the max over many pristine slices sits higher, so `m3d train-detector` sets this to the
            threshold of best balanced accuracy on its calibration scans (crops of its training crop
            size; its ``training_summary.json`` says which). 0.5 when uncalibrated.
    """

    model_type = "m3d_detector"

    def __init__(
        self,
        input_mode: str = "hu_windows",
        hu_windows: tuple[tuple[float, float], ...] = DEFAULT_HU_WINDOWS,
        percentiles: tuple[float, float] = (0.5, 99.5),
        num_channels: int = 3,
        localization_loss_weight: float = 1.0,
        detection_loss_weight: float = 1.0,
        initializer_range: float = 0.02,
        volume_threshold: float = 0.5,
        slab_slices: int = 1,
        **kwargs,
    ) -> None:
        if not 0 <= volume_threshold <= 1:
            raise ValueError(f"volume_threshold must be a probability in [0, 1]; got {volume_threshold}")
        check_slice_transform(input_mode, hu_windows, percentiles, slab_slices)
        if input_mode == "slab" and num_channels != slab_slices:
            raise ValueError(
                f"input_mode 'slab' gives one channel per slice: num_channels ({num_channels}) must equal "
                f"slab_slices ({slab_slices})"
            )
        self.input_mode = input_mode
        self.hu_windows = [list(map(float, w)) for w in hu_windows]
        self.percentiles = list(map(float, percentiles))
        self.num_channels = num_channels
        self.localization_loss_weight = localization_loss_weight
        self.detection_loss_weight = detection_loss_weight
        self.initializer_range = initializer_range
        self.volume_threshold = float(volume_threshold)
        self.slab_slices = slab_slices
        kwargs.setdefault("id2label", {0: "pristine", 1: "manipulated"})  # the one logit's sigmoid is P(manipulated)
        kwargs.setdefault("label2id", {"pristine": 0, "manipulated": 1})
        super().__init__(**kwargs)


@dataclass
class DetectorOutput(ModelOutput):
    """Output of every m3d detector.

    Args:
        loss: total training loss, when ``labels`` and/or ``masks`` are given.
        logits: ``(batch,)`` image-level logit that the slice is manipulated.
        localization_logits: ``(batch, 1, H, W)`` per-pixel logits at the input size (localizing models).
        confidence: ``(batch, 1, H, W)`` TruFor's confidence map (logit-free, in [0, 1] after sigmoid).
        auxiliary: model-specific extra maps (MVSS-Net's edge logits, ...).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    localization_logits: torch.Tensor | None = None
    confidence: torch.Tensor | None = None
    auxiliary: torch.Tensor | None = None


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per sample, averaged."""
    probability = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    overlap = (probability * target).sum(1)
    return (1 - (2 * overlap + eps) / (probability.sum(1) + target.sum(1) + eps)).mean()


class M3DDetectorPreTrainedModel(PreTrainedModel):
    """Base of the m3d detectors: weight init and the standard detection + localization losses."""

    config_class = M3DDetectorConfig
    base_model_prefix = "detector"
    main_input_name = "pixel_values"
    localizes: bool = True  # False for image-level classifiers (Xception, the general-purpose ResNet)

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained`, and the model's code with ``config.auto_map`` beside the weights,
        so that ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` works without m3d."""
        from ..remote_code import save_with_code

        task = "AutoModelForSemanticSegmentation" if self.localizes else "AutoModelForImageClassification"
        save_with_code(self, save_directory, ("AutoModel", task))
        super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (BayarConv2d, BayarConv3d)):
            nn.init.uniform_(module.weight, 0.0, 1.0)
            module.apply_constraint()
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Conv3d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif (
            isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm))
            and module.weight is not None
        ):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Raise a clear ValueError unless ``pixel_values`` is ``(batch, num_channels, H, W)``."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.config.num_channels}, H, W); got {tuple(pixel_values.shape)}"
            )

    def standard_loss(
        self,
        logits: torch.Tensor | None,
        localization_logits: torch.Tensor | None,
        labels: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """BCE on the image logit (``labels``: 1 = manipulated) + BCE and Dice on the map (``masks``)."""
        terms = []
        if labels is not None and logits is not None:
            bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float().view_as(logits))
            terms.append(self.config.detection_loss_weight * bce)
        if masks is not None and localization_logits is not None:
            target = masks.float().view_as(localization_logits)
            pixel = F.binary_cross_entropy_with_logits(localization_logits.float(), target)
            terms.append(self.config.localization_loss_weight * (pixel + dice_loss(localization_logits, target)))
        return torch.stack(terms).sum() if terms else None


def window_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over the ``size x size`` window around each pixel, of the pixels inside the image only
    (``avg_pool2d(..., count_include_pad=False)``), computed as two 1-D means: the window inside the
    image is a rectangle, so the mean of its row means is its mean; 2 ``size`` instead of ``size**2``
    operations per pixel (the released windows reach 31)."""
    half = size // 2
    rows = F.avg_pool2d(x, (size, 1), stride=1, padding=(half, 0), count_include_pad=False)
    return F.avg_pool2d(rows, (1, size), stride=1, padding=(0, half), count_include_pad=False)


@torch.no_grad()
def _bayar_normalise(weight: torch.Tensor) -> None:
    """Bayar's constraint, in place, on conv weights ``(out, in, *kernel)``: centre tap -1, the others
    scaled to sum to 1."""
    centre = (slice(None), slice(None), *(k // 2 for k in weight.shape[2:]))
    weight[centre] = 0
    total = weight.sum(dim=tuple(range(2, weight.ndim)), keepdim=True)
    weight.div_(torch.where(total.abs() < 1e-8, torch.full_like(total, 1e-8), total))
    weight[centre] = -1


class BayarConv2d(nn.Conv2d):
    """Constrained convolution (Bayar & Stamm 2018): each kernel predicts its centre pixel from its
    neighbours, so it learns prediction-error (noise-residual) filters.

    The constraint — centre tap −1, other taps summing to 1 — is restored by `apply_constraint`, which
    must run after every optimizer update: call `register_bayar_constraint(optimizer, model)` once.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, **kwargs) -> None:
        if kernel_size % 2 == 0:
            raise ValueError("BayarConv2d needs an odd kernel size")
        kwargs.setdefault("padding", kernel_size // 2)
        super().__init__(in_channels, out_channels, kernel_size, bias=False, **kwargs)
        self.apply_constraint()

    def apply_constraint(self) -> None:
        _bayar_normalise(self.weight)


class BayarConv3d(nn.Conv3d):
    """`BayarConv2d` in 3-D: each kernel predicts a voxel from its neighbours in the slice and the
    adjacent slices (``kernel_size`` ``(depth, height, width)``, all odd; padded to keep the size)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int] = (3, 5, 5), **kwargs
    ) -> None:
        if any(k % 2 == 0 for k in kernel_size):
            raise ValueError(f"BayarConv3d needs odd kernel sizes; got {tuple(kernel_size)}")
        kwargs.setdefault("padding", tuple(k // 2 for k in kernel_size))
        super().__init__(in_channels, out_channels, tuple(kernel_size), bias=False, **kwargs)
        self.apply_constraint()

    def apply_constraint(self) -> None:
        _bayar_normalise(self.weight)


def apply_bayar_constraint(model: nn.Module) -> None:
    """Restore the Bayar constraint on every `BayarConv2d` / `BayarConv3d` of ``model``."""
    for module in model.modules():
        if isinstance(module, (BayarConv2d, BayarConv3d)):
            module.apply_constraint()


def register_bayar_constraint(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Re-apply the Bayar constraint after each ``optimizer.step()``; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda *_: apply_bayar_constraint(model))


def register_detector(config_class: type[M3DDetectorConfig], model_class: type[M3DDetectorPreTrainedModel]) -> None:
    """Register a detector with transformers' Auto classes (`AutoConfig`, `AutoModel`, and
    `AutoModelForSemanticSegmentation` for localizing models or `AutoModelForImageClassification`)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForImageClassification,
        AutoModelForSemanticSegmentation,
    )

    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    task_auto = AutoModelForSemanticSegmentation if model_class.localizes else AutoModelForImageClassification
    task_auto.register(config_class, model_class, exist_ok=True)


def _detector_model_types(config_class: type) -> set[str]:
    """The model types of every m3d detector config (the registered subclasses of ``config_class``)."""
    found = set()
    for subclass in config_class.__subclasses__():
        found |= {subclass.model_type, *_detector_model_types(subclass)}
    return found


def load_detector(path: str | Path, **kwargs) -> M3DDetectorPreTrainedModel:
    """A saved m3d detector (a `save_pretrained` folder; ``kwargs`` go to ``from_pretrained``), or one
    clear error naming the folder (`m3d.loading.load_saved_model`)."""
    from transformers import AutoModel

    from ..loading import load_saved_model

    return load_saved_model(
        path,
        _detector_model_types(M3DDetectorConfig),
        "an m3d detector",
        lambda folder: AutoModel.from_pretrained(folder, **kwargs),
    )
