"""Configuration of MVSS-Net (Chen, Dong, Li, Wang & Wang, ICCV 2021)."""

from __future__ import annotations

from ..modeling_utils import M3DDetectorConfig


def _positive_ints(name: str, values, length: int) -> list[int]:
    try:
        values = [int(v) for v in values]
    except TypeError as error:
        raise ValueError(f"{name} must be a sequence of {length} positive integers; got {values!r}") from error
    if len(values) != length or any(v < 1 for v in values):
        raise ValueError(f"{name} must be a sequence of {length} positive integers; got {values}")
    return values


class MVSSNetConfig(M3DDetectorConfig):
    """Configuration of `MVSSNetForForgeryDetection`. Defaults reproduce the released MVSS-Net
    (``get_mvss(backbone="resnet50", sobel=True, constrain=True, nclass=1)``).

    Args:
        backbone_layers / backbone_widths / backbone_expansion: the bottleneck ResNet used by both
            branches (ResNet-50: 3, 4, 6, 3 blocks of widths 64, 128, 256, 512, expansion 4 — features
            256 / 512 / 1024 / 2048 channels).
        dilate_last_stage: replace the stride of the last stage by dilation (output stride 16, as the
            original's DeepLab-v3 layer4).
        use_sobel: gate each edge-branch stage by ``sigmoid(|Sobel|)`` (the released model does).
        use_noise_branch: add the noise-sensitive branch (grey -> Bayar conv -> second ResNet) whose last
            features are concatenated with the RGB branch's before the head (the released model does).
        bayar_kernel_size / noise_channels: the Bayar conv of the noise branch (5x5, 1 -> 3).
        grey_weights: weights of the input channels in the grey image fed to the Bayar conv; the
            default equals the original ``rgb2gray`` applied to its BGR tensors (channel 0 = blue).
        head_reduction: the DANet head works at ``in_channels // head_reduction`` channels (4).
        attention_reduction: query/key width of the position attention, ``channels // 8``.
        head_dropout: dropout before the final 1x1 conv of the head (0.1).
        edge_width: odd width in pixels (at input size) of the boundary band used as edge target:
            ``dilate(mask) - erode(mask)`` with a ``edge_width`` square structuring element.
        seg_loss_weight / clf_loss_weight / edge_loss_weight: the loss weights 0.16 (Dice on the map),
            0.04 (BCE of the global max of the map) and 0.80 (Dice on the edges).
        dice_smooth: additive smoothing of the Dice losses.
    """

    model_type = "m3d_mvssnet"
    # "tiny": tests and the CPU demo, one block per stage, narrow widths
    presets = {"tiny": dict(backbone_layers=(1, 1, 1, 1), backbone_widths=(4, 8, 8, 16)), "default": {}}

    def __init__(
        self,
        backbone_layers: tuple[int, ...] = (3, 4, 6, 3),
        backbone_widths: tuple[int, ...] = (64, 128, 256, 512),
        backbone_expansion: int = 4,
        dilate_last_stage: bool = True,
        use_sobel: bool = True,
        use_noise_branch: bool = True,
        bayar_kernel_size: int = 5,
        noise_channels: int = 3,
        grey_weights: tuple[float, ...] = (0.1140, 0.5870, 0.2989),
        head_reduction: int = 4,
        attention_reduction: int = 8,
        head_dropout: float = 0.1,
        edge_width: int = 5,
        seg_loss_weight: float = 0.16,
        clf_loss_weight: float = 0.04,
        edge_loss_weight: float = 0.80,
        dice_smooth: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        layers = _positive_ints("backbone_layers", backbone_layers, 4)
        widths = _positive_ints("backbone_widths", backbone_widths, 4)
        if int(backbone_expansion) < 1:
            raise ValueError(f"backbone_expansion must be >= 1; got {backbone_expansion}")
        if int(bayar_kernel_size) < 3 or int(bayar_kernel_size) % 2 == 0:
            raise ValueError(f"bayar_kernel_size must be an odd integer >= 3; got {bayar_kernel_size}")
        if int(noise_channels) < 1:
            raise ValueError(f"noise_channels must be >= 1; got {noise_channels}")
        grey = [float(w) for w in grey_weights]
        if len(grey) != self.num_channels:
            raise ValueError(f"grey_weights needs one weight per input channel ({self.num_channels}); got {grey}")
        fused = widths[3] * int(backbone_expansion) * (2 if use_noise_branch else 1)
        if int(head_reduction) < 1 or fused // int(head_reduction) < 1:
            raise ValueError(f"head_reduction must be in [1, {fused}]; got {head_reduction}")
        inter = fused // int(head_reduction)
        if int(attention_reduction) < 1 or inter // int(attention_reduction) < 1:
            raise ValueError(
                f"attention_reduction must be in [1, {inter}] (head width {inter}); got {attention_reduction}"
            )
        if not 0 <= head_dropout < 1:
            raise ValueError(f"head_dropout must be in [0, 1); got {head_dropout}")
        if int(edge_width) < 3 or int(edge_width) % 2 == 0:
            raise ValueError(f"edge_width must be an odd integer >= 3; got {edge_width}")
        weights = (seg_loss_weight, clf_loss_weight, edge_loss_weight)
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"loss weights must be >= 0 and not all zero; got {weights}")
        if not dice_smooth >= 0:
            raise ValueError(f"dice_smooth must be >= 0; got {dice_smooth}")
        self.backbone_layers = layers
        self.backbone_widths = widths
        self.backbone_expansion = int(backbone_expansion)
        self.dilate_last_stage = bool(dilate_last_stage)
        self.use_sobel = bool(use_sobel)
        self.use_noise_branch = bool(use_noise_branch)
        self.bayar_kernel_size = int(bayar_kernel_size)
        self.noise_channels = int(noise_channels)
        self.grey_weights = grey
        self.head_reduction = int(head_reduction)
        self.attention_reduction = int(attention_reduction)
        self.head_dropout = float(head_dropout)
        self.edge_width = int(edge_width)
        self.seg_loss_weight = float(seg_loss_weight)
        self.clf_loss_weight = float(clf_loss_weight)
        self.edge_loss_weight = float(edge_loss_weight)
        self.dice_smooth = float(dice_smooth)
