"""HP-FCN: high-pass filtered fully convolutional network for inpainting localization."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling_utils import DetectorOutput, M3DDetectorPreTrainedModel
from ..unet.modeling_unet import pool_logits
from .configuration_hpfcn import HPFCNConfig

# The paper's three first-order derivative kernels: vertical, horizontal, diagonal.
HIGH_PASS_KERNELS = torch.tensor(
    [
        [[0, 0, 0], [0, -1, 0], [0, 1, 0]],
        [[0, 0, 0], [0, -1, 1], [0, 0, 0]],
        [[0, 0, 0], [0, -1, 0], [0, 0, 1]],
    ],
    dtype=torch.float32,
)


class HighPassConv(nn.Conv2d):
    """The three derivative kernels applied depthwise to every input channel (``3 * C`` outputs)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__(in_channels, 3 * in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.reset_to_derivatives()

    @torch.no_grad()
    def reset_to_derivatives(self) -> None:
        self.weight.copy_(HIGH_PASS_KERNELS.repeat(self.in_channels, 1, 1).unsqueeze(1))


class PreActBottleneck(nn.Module):
    """ResNet-v2 unit: BN-ReLU, then 1x1 -> 3x3 (stride) -> 1x1 (4x width) with BN-ReLU between."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = 4 * width
        self.preact = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True))
        self.shortcut = None if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1, stride=stride)
        self.stride = stride
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.preact(x)
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.shortcut is None else self.shortcut(activated)
        return shortcut + self.residual(activated)


def bilinear_kernel(channels_in: int, channels_out: int, size: int) -> torch.Tensor:
    """Transposed-conv weights ``(in, out, size, size)`` that up-sample bilinearly: the reference tiles
    one bilinear kernel over every (input, output) pair; here it is also divided by ``channels_in`` so
    that an output is the bilinear up-sampling of the inputs' mean rather than of their sum (the same
    map up to a scale, which the following BatchNorm removes; it keeps activations small enough for
    half precision)."""
    factor = (size + 1) // 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    grid = torch.arange(size, dtype=torch.float32)
    profile = 1 - (grid - centre).abs() / factor
    kernel = profile[:, None] * profile[None, :]
    return kernel.expand(channels_in, channels_out, size, size) / channels_in


class HPFCNForForgeryDetection(M3DDetectorPreTrainedModel):
    """HP-FCN (Li & Huang, "Localization of Deep Inpainting Using High-Pass Fully Convolutional
    Network", ICCV 2019; TF1 code lihaod/Deep_inpainting_localization), a per-pixel localizer.

    Key components:

    - **High-pass first layer**: three 3x3 first-order derivative kernels (vertical, horizontal,
      diagonal; `HIGH_PASS_KERNELS`) applied depthwise to every input channel (3 -> 9 channels),
      initialised with these kernels and trained (``train_high_pass``, as the reference's default).
    - **Encoder**: four blocks of two pre-activation ResNet-v2 bottleneck units (widths
      32/64/128/256, outputs 4x; stride 2 in each block's last unit; identity shortcuts sub-sample,
      projection shortcuts are biased 1x1 convs on the pre-activation), no root block: output
      stride 16. As in the reference, the decoder reads block4's output (slim's ``postnorm`` is not
      on that path and is left out).
    - **Decoder**: transposed conv x4 (1024 -> 64, 8x8) then x4 (64 -> 4, 8x8), both bias-free,
      bilinear-initialised and trainable, then BatchNorm + ReLU and a 5x5 conv to the map.
    - **Output**: the reference's 2-class softmax is one logit here (sigmoid); the image logit is
      the global max of the map.
    - **Loss**: focal loss (gamma 2, no alpha, averaged over pixels) on the map, as the reference's
      ``focal_loss``, plus BCE on the image logit (`standard_loss`'s detection term).

    Inputs must be multiples of 16. Default config: 7,698,928 params (original: about 7.7 M).
    """

    config_class = HPFCNConfig

    def __init__(self, config: HPFCNConfig) -> None:
        super().__init__(config)
        self.high_pass = HighPassConv(config.num_channels)
        self.high_pass.weight.requires_grad_(config.train_high_pass)
        channels, units = 3 * config.num_channels, []
        for width in config.base_depths:
            for unit in range(config.units_per_block):
                stride = 2 if unit == config.units_per_block - 1 else 1
                units.append(PreActBottleneck(channels, width, stride))
                channels = 4 * width
        self.encoder = nn.Sequential(*units)
        middle, last = config.decoder_channels
        # kernel 8, stride 4, padding 2 = TF's "SAME" transposed conv to exactly 4x the size
        self.up1 = nn.ConvTranspose2d(channels, middle, 8, stride=4, padding=2, bias=False)
        self.up2 = nn.ConvTranspose2d(middle, last, 8, stride=4, padding=2, bias=False)
        self.decoder_norm = nn.BatchNorm2d(last)
        self.head = nn.Conv2d(last, 1, 5, padding=2)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, HighPassConv):
            module.reset_to_derivatives()
        elif isinstance(module, nn.ConvTranspose2d):
            with torch.no_grad():
                module.weight.copy_(bilinear_kernel(module.in_channels, module.out_channels, module.kernel_size[0]))
        else:
            super()._init_weights(module)

    def focal_loss(self, localization_logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Focal loss (Lin et al. 2017) without alpha: mean over pixels of (1 - p_t)^gamma * BCE."""
        target = masks.float().view_as(localization_logits)
        logits = localization_logits.float()
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        probability_of_truth = torch.exp(-bce)
        return ((1 - probability_of_truth) ** self.config.focal_gamma * bce).mean()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DetectorOutput:
        if pixel_values.shape[-1] % 16 or pixel_values.shape[-2] % 16:
            raise ValueError(
                f"HP-FCN input height and width must be multiples of 16; got {tuple(pixel_values.shape[-2:])}"
            )
        x = self.encoder(self.high_pass(pixel_values))
        x = F.relu(self.decoder_norm(self.up2(self.up1(x))))
        localization_logits = self.head(x)
        logits = pool_logits(localization_logits, "max")
        loss = self.standard_loss(logits, None, labels, None)
        if masks is not None:
            focal = self.config.localization_loss_weight * self.focal_loss(localization_logits, masks)
            loss = focal if loss is None else loss + focal
        output = DetectorOutput(loss=loss, logits=logits, localization_logits=localization_logits)
        return output if return_dict else output.to_tuple()
