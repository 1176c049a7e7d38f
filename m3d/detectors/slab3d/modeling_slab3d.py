"""Slab3D: m3d's own volumetric detector of generative CT manipulation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling_utils import BayarConv3d, DetectorOutput, M3DDetectorPreTrainedModel, window_mean
from ..unet.modeling_unet import double_conv, pool_logits
from .configuration_slab3d import Slab3DConfig

# Fixed high-pass filters of the front end, each a (3, 3, 3) kernel over (slice, row, column) that sums
# to 0: the in-plane Laplacian (the noise of each slice, which a generator must match), the second
# difference across slices (the change from slice to slice: a generator fills a 3-D hole from a 1 mm
# grid, the scan's slices are thicker) and the 3-D Laplacian.
HIGH_PASS_KERNELS_3D = torch.zeros(3, 3, 3, 3)
HIGH_PASS_KERNELS_3D[0, 1] = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]) / 4
HIGH_PASS_KERNELS_3D[1, :, 1, 1] = torch.tensor([1.0, -2.0, 1.0]) / 2
HIGH_PASS_KERNELS_3D[2, 1] = torch.tensor([[0.0, 1.0, 0.0], [1.0, -6.0, 1.0], [0.0, 1.0, 0.0]]) / 6
HIGH_PASS_KERNELS_3D[2, 0, 1, 1] = HIGH_PASS_KERNELS_3D[2, 2, 1, 1] = 1.0 / 6
CONSISTENCY_EPS = 1e-3  # in squared residual units: (0.03 of residual_unit_hu)^2, far below any scan's noise


def factorized_conv3d(in_channels: int, out_channels: int) -> nn.Sequential:
    """A 3x3 conv in the slice, then a 3-tap conv across slices, each -> BN -> ReLU (R(2+1)D's
    factorisation: in-plane and through-plane filters apart, as CT slices are thicker than their pixels;
    a tiny training step takes 0.6 s on one CPU thread, 1.2 s with two full 3x3x3 convs)."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, (1, 3, 3), padding=(0, 1, 1), bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv3d(out_channels, out_channels, (3, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
    )


def noise_consistency(residuals: torch.Tensor, window: int) -> torch.Tensor:
    """How each voxel's neighbourhood noise compares with the slab's own: log of the residuals' local
    energy (mean square over an in-plane ``window``) over its median across the whole slab, per sample
    and channel. 0 where a region's noise is the scan's; a generated region that is too smooth or too
    rough stands out whatever the scan's reconstruction kernel."""
    batch, channels, depth, height, width = residuals.shape
    energy = window_mean(residuals.square().flatten(1, 2), window).view(batch, channels, depth, height, width)
    typical = energy.flatten(2).median(dim=2).values[:, :, None, None, None]
    return torch.log(energy + CONSISTENCY_EPS) - torch.log(typical + CONSISTENCY_EPS)


class Slab3DForForgeryDetection(M3DDetectorPreTrainedModel):
    """Slab3D: m3d's own detector, made for CT rather than carried over from photographs.

    Why, from the benchmark: every other detector here is a 2-D network applied slice by slice, and the
    traces a generator leaves in a CT are volumetric — it fills a 3-D hole (CT-GAN's 32 mm cube, its
    20 mm centre) on a 1 mm grid that is resampled to the scan's slices, with noise that need not match
    the scan's reconstruction, and it can only be consistent with the slices above and below as far as
    it learnt to be. So Slab3D reads a slab of ``slab_slices`` slices in HU (``input_mode="slab"``) and:

    1. **residual front end, in HU**: three fixed 3-D high-pass filters (in-plane Laplacian, second
       difference across slices, 3-D Laplacian) and, optionally, ``bayar_channels`` learned constrained
       3-D filters (Bayar & Stamm's prediction-error constraint extended to a ``(slices, rows, columns)``
       kernel), replicate-padded so that the crop's borders are not edges, in units of ``residual_unit_hu``;
    2. **consistency channels** (`noise_consistency`): each residual's local energy over the slab's
       median — the scan is its own reference, so a region whose noise is not the scan's stands out
       whatever the scanner;
    3. a **3-D encoder** over ``encoder_inputs`` (by default the residuals and the consistency channels,
       not the HU themselves): per level a factorised 3-D conv (`factorized_conv3d`: 1x3x3 in the slice,
       then 3x1x1 across slices, each + BN + ReLU: kernels made for thick slices), in-plane 2x max-pooling
       between levels (the slice axis is never pooled: slabs are thin and slices thick), widths ``widths``;
    4. each level **collapsed onto the centre slice** by a learned ``(slab_slices, 1, 1)`` convolution,
       then a 2-D U-Net decoder (bilinear 2x up-sampling + 3x3 conv, skip concatenation, two 3x3 conv)
       to a logit map of the centre slice at the input size; run over every slice (`detect_volume`), the
       maps stack into a volumetric map on the scan's own grid.

    What the encoder reads was chosen by the benchmark's hardest cell (demo data, tiny preset, trained on
    CycleGAN's fakes, tested on pix2pix's; TruFor there: AUC 0.97): with the slab's HU and two Bayar
    filters as well, AUC 0.81 (removals 0.60: it learnt what CycleGAN's fills look like); without the HU,
    0.90; without the HU and the learned filters, 0.99, at the same AUC on CycleGAN itself (1.00). What
    generalises is how a region was made, measured against the scan's own noise, not its content.

    Slice logit: the max (default) or mean of the map (as the U-Net). Loss: `standard_loss` (BCE on the
    slice logit, BCE + Dice on the map). Slice spacing is not an input: the slab spans ``slab_slices``
    slices whatever their thickness, and the benchmark's scans keep their native spacing.
    """

    config_class = Slab3DConfig

    def __init__(self, config: Slab3DConfig) -> None:
        super().__init__(config)
        window_low, window_high = config.hu_windows[0]
        # pixel values span [-1, 1] over the window: one unit is half its width in HU
        self.residual_scale = (window_high - window_low) / 2 / config.residual_unit_hu
        self.register_buffer("high_pass_kernels", HIGH_PASS_KERNELS_3D.unsqueeze(1).clone(), persistent=True)
        self.bayar = (
            BayarConv3d(1, config.bayar_channels, tuple(config.bayar_kernel), padding=0)
            if config.bayar_channels
            else None
        )
        residual_channels = len(HIGH_PASS_KERNELS_3D) + config.bayar_channels
        widths = config.widths
        sizes = {"intensity": 1, "residuals": residual_channels, "consistency": residual_channels}
        self.encoder = nn.ModuleList(
            [factorized_conv3d(sum(sizes[name] for name in config.encoder_inputs), widths[0])]
        )
        self.encoder.extend(factorized_conv3d(widths[i], widths[i + 1]) for i in range(len(widths) - 1))
        self.pool = nn.MaxPool3d((1, 2, 2))
        self.collapse = nn.ModuleList(nn.Conv3d(width, width, (config.slab_slices, 1, 1)) for width in widths)
        self.upsample = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(widths[i + 1], widths[i], 3, padding=1),
            )
            for i in reversed(range(len(widths) - 1))
        )
        self.decoder = nn.ModuleList(double_conv(2 * widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], 1, 1)
        self.post_init()

    def residuals(self, slab: torch.Tensor) -> torch.Tensor:
        """The front end: fixed and constrained high-pass residuals ``(B, R, slices, H, W)`` of a slab
        ``(B, 1, slices, H, W)``, replicate-padded, in units of ``residual_unit_hu``."""
        fixed = F.conv3d(F.pad(slab, (1, 1, 1, 1, 1, 1), mode="replicate"), self.high_pass_kernels.to(slab.dtype))
        parts = [fixed]
        if self.bayar is not None:
            depth, height, width = (k // 2 for k in self.config.bayar_kernel)
            parts.append(self.bayar(F.pad(slab, (width, width, height, height, depth, depth), mode="replicate")))
        return torch.cat(parts, 1) * self.residual_scale

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DetectorOutput:
        """``pixel_values`` ``(batch, slab_slices, H, W)``: the slab of each slice (`slices_to_input`)."""
        self.check_pixel_values(pixel_values)
        multiple = 2 ** (len(self.config.widths) - 1)
        if pixel_values.shape[-1] % multiple or pixel_values.shape[-2] % multiple:
            raise ValueError(
                f"Slab3D input height and width must be multiples of {multiple}; got {tuple(pixel_values.shape[-2:])}"
            )
        slab = pixel_values.unsqueeze(1)
        residuals = self.residuals(slab)
        inputs = {
            "intensity": lambda: slab,
            "residuals": lambda: residuals,
            "consistency": lambda: noise_consistency(residuals, self.config.noise_window),
        }
        x = torch.cat([inputs[name]() for name in self.config.encoder_inputs], 1)
        skips = []
        for level, (block, collapse) in enumerate(zip(self.encoder, self.collapse)):
            x = block(x if level == 0 else self.pool(x))
            skips.append(collapse(x).squeeze(2))
        y = skips.pop()
        for upsample, block in zip(self.upsample, self.decoder):
            y = block(torch.cat([skips.pop(), upsample(y)], dim=1))
        localization_logits = self.head(y)
        logits = pool_logits(localization_logits, self.config.image_pooling)
        loss = self.standard_loss(logits, localization_logits, labels, masks)
        output = DetectorOutput(loss=loss, logits=logits, localization_logits=localization_logits)
        return output if return_dict else output.to_tuple()
