"""ManTra-Net (Wu, AbdAlmageed & Natarajan, CVPR 2019): a manipulation-trace feature extractor followed
by a local-anomaly detection network. Reference: the Keras code of ISICV/ManTraNet (``modelCore.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling_utils import BayarConv2d, DetectorOutput, M3DDetectorPreTrainedModel, window_mean
from .configuration_mantranet import ManTraNetConfig


def srm_base_kernels() -> torch.Tensor:
    """The three fixed 5x5 SRM kernels of ManTra-Net, ``(3, 5, 5)``: the 3x3 second-order kernel / 4
    (zero-padded to 5x5), the 5x5 "KV" kernel / 12 and the horizontal [1, -2, 1] / 2 (zero-padded)."""
    kernels = torch.zeros(3, 5, 5)
    kernels[0, 1:4, 1:4] = torch.tensor([[-1.0, 2.0, -1.0], [2.0, -4.0, 2.0], [-1.0, 2.0, -1.0]]) / 4
    kernels[1] = (
        torch.tensor(
            [
                [-1.0, 2.0, -2.0, 2.0, -1.0],
                [2.0, -6.0, 8.0, -6.0, 2.0],
                [-2.0, 8.0, -12.0, 8.0, -2.0],
                [2.0, -6.0, 8.0, -6.0, 2.0],
                [-1.0, 2.0, -2.0, 2.0, -1.0],
            ]
        )
        / 12
    )
    kernels[2, 2, 1:4] = torch.tensor([1.0, -2.0, 1.0]) / 2
    return kernels


def srm_kernel_bank(in_channels: int) -> torch.Tensor:
    """``(3 * in_channels, in_channels, 5, 5)``: each SRM kernel applied to each input channel alone,
    ordered kernel-major (kernel 0 on channels 0, 1, 2, then kernel 1, ...) as in the Keras code."""
    base = srm_base_kernels()
    bank = torch.zeros(3 * in_channels, in_channels, 5, 5)
    for k in range(3):
        for channel in range(in_channels):
            bank[k * in_channels + channel, channel] = base[k]
    return bank


def symmetric_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Mirror padding that repeats the edge pixel (TensorFlow's ``mode="symmetric"``)."""
    if pad == 0:
        return x
    if min(x.shape[-2:]) < pad:
        raise ValueError(
            f"symmetric padding of {pad} needs an input of at least {pad}x{pad}; got {tuple(x.shape[-2:])}"
        )
    x = torch.cat([x[..., :pad, :].flip(-2), x, x[..., -pad:, :].flip(-2)], dim=-2)
    return torch.cat([x[..., :pad].flip(-1), x, x[..., -pad:].flip(-1)], dim=-1)


class ManTraNetPaddedConv(nn.Conv2d):
    """'Same' convolution with symmetric (edge-including mirror) or zero padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding_mode: str, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, padding=0, bias=bias)
        self.symmetric = padding_mode == "symmetric"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.kernel_size[0] // 2
        if self.symmetric:
            return F.conv2d(symmetric_pad(x, pad), self.weight, self.bias)
        return F.conv2d(x, self.weight, self.bias, padding=pad)


class ManTraNetCombinedConv(nn.Module):
    """The first layer: one 5x5 bias-free conv whose filters are ``plain`` (trainable) + SRM (fixed,
    a persistent buffer) + Bayar (trainable under the Bayar constraint), concatenated in that order."""

    def __init__(self, in_channels: int, out_channels: int, padding_mode: str) -> None:
        super().__init__()
        num_plain = out_channels - 3 * in_channels - 3
        self.plain = nn.Conv2d(in_channels, num_plain, 5, padding=0, bias=False) if num_plain > 0 else None
        self.register_buffer("srm_kernels", srm_kernel_bank(in_channels), persistent=True)
        self.bayar = BayarConv2d(in_channels, 3, 5, padding=0)
        self.symmetric = padding_mode == "symmetric"

    def reset_srm_kernels(self) -> None:
        with torch.no_grad():
            self.srm_kernels.copy_(srm_kernel_bank(self.srm_kernels.shape[1]))

    @property
    def weight(self) -> torch.Tensor:
        parts = [self.srm_kernels.to(self.bayar.weight.dtype), self.bayar.weight]
        if self.plain is not None:
            parts.insert(0, self.plain.weight)
        return torch.cat(parts, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            return F.conv2d(symmetric_pad(x, 2), self.weight)
        return F.conv2d(x, self.weight, padding=2)


class ManTraNetFeatureExtractor(nn.Module):
    """The IMC-pretrained "Featex": combined first layer + ReLU, VGG-like 3x3 conv + ReLU blocks without
    pooling, a 3x3 transform conv and per-pixel L2 normalisation."""

    def __init__(self, config: ManTraNetConfig) -> None:
        super().__init__()
        self.first = ManTraNetCombinedConv(config.num_channels, config.first_layer_filters, config.padding_mode)
        layers: list[nn.Module] = []
        channels = config.first_layer_filters
        for width, depth in zip(config.featex_block_widths, config.featex_block_depths):
            for _ in range(depth):
                layers += [ManTraNetPaddedConv(channels, width, 3, config.padding_mode), nn.ReLU(inplace=True)]
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.transform = ManTraNetPaddedConv(channels, config.feature_dim, 3, config.padding_mode)
        self.tanh = config.transform_activation == "tanh"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.first(pixel_values)))
        x = self.transform(x)
        if self.tanh:
            x = torch.tanh(x)
        return F.normalize(x, p=2, dim=1, eps=1e-12)


class ManTraNetUnitNormConv(nn.Conv2d):
    """1x1 bias-free conv whose filters are kept at unit L2 norm over the input channels (the Keras
    ``unit_norm`` kernel constraint), here by normalising the weight in the forward pass."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, F.normalize(self.weight, p=2, dim=(1, 2, 3), eps=1e-7))


class ManTraNetGlobalStd(nn.Module):
    """Per-sample, per-channel spatial std, floored at ``min_std_init / 10 + relu(min_std)`` where
    ``min_std`` is learnable (non-negative)."""

    def __init__(self, channels: int, min_std_init: float) -> None:
        super().__init__()
        self.min_std_init = min_std_init
        self.min_std = nn.Parameter(torch.full((1, channels, 1, 1), min_std_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = x.float().std(dim=(2, 3), keepdim=True, unbiased=False)
        return torch.maximum(std, self.min_std_init / 10 + self.min_std.clamp(min=0)).to(x.dtype)


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Keras 2's ``hard_sigmoid``: clip(0.2 x + 0.5, 0, 1)."""
    return (0.2 * x + 0.5).clamp(0.0, 1.0)


class ConvLSTMGateConv(ManTraNetPaddedConv):
    """The gate convolution of `ConvLSTMCell` (its own type so that `_init_weights` can set the forget
    bias: transformers only initialises modules that hold parameters themselves)."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int, padding_mode: str = "zeros") -> None:
        super().__init__(in_channels + hidden_channels, 4 * hidden_channels, kernel_size, padding_mode)
        self.hidden_channels = hidden_channels

    def reset_forget_bias(self) -> None:
        with torch.no_grad():
            self.bias.zero_()
            self.bias[self.hidden_channels : 2 * self.hidden_channels] = 1.0


class ConvLSTMCell(nn.Module):
    """A ConvLSTM cell as Keras' ``ConvLSTM2D`` (gates i, f, c, o; tanh activation; hard-sigmoid
    recurrent activation; 'same' zero padding (or symmetric); bias on the input path only, forget bias
    initialised to 1). The input and recurrent convolutions are computed as one conv over ``[x, h]``."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.conv = ConvLSTMGateConv(in_channels, hidden_channels, kernel_size, padding_mode)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if state is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_channels, *x.shape[-2:])
            state = (zeros, zeros)
        hidden, cell = state
        gate_i, gate_f, candidate, gate_o = self.conv(torch.cat([x, hidden], dim=1)).chunk(4, dim=1)
        cell = hard_sigmoid(gate_f) * cell + hard_sigmoid(gate_i) * torch.tanh(candidate)
        hidden = hard_sigmoid(gate_o) * torch.tanh(cell)
        return hidden, cell


class ManTraNetAnomalyNetwork(nn.Module):
    """Local anomaly detection: unit-norm 1x1 conv, affine-free BatchNorm, deviations from the local
    window means (and the global mean) divided by the per-sample std, abs, ConvLSTM over the window
    sizes (as a sequence), and a conv to one logit."""

    def __init__(self, config: ManTraNetConfig) -> None:
        super().__init__()
        self.window_sizes = list(config.window_sizes)
        self.include_global_mean = config.include_global_mean
        self.projection = ManTraNetUnitNormConv(config.feature_dim, config.anomaly_channels)
        self.norm = nn.BatchNorm2d(
            config.anomaly_channels, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum, affine=False
        )
        self.global_std = ManTraNetGlobalStd(config.anomaly_channels, config.min_std_init)
        self.lstm = ConvLSTMCell(
            config.anomaly_channels, config.lstm_channels, config.lstm_kernel_size, config.anomaly_padding_mode
        )
        self.prediction = ManTraNetPaddedConv(
            config.lstm_channels, 1, config.prediction_kernel_size, config.anomaly_padding_mode
        )

    def deviations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``window mean - x`` for each window (means over the pixels inside the image only), then
        ``global mean - x``."""
        steps = [window_mean(x, size) - x for size in self.window_sizes]
        if self.include_global_mean:
            steps.append(x.mean(dim=(2, 3), keepdim=True) - x)
        return steps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.projection(features))
        sigma = self.global_std(x)
        state = None
        for deviation in self.deviations(x):
            state = self.lstm((deviation / sigma).abs(), state)
        return self.prediction(state[0])


class ManTraNetForForgeryDetection(M3DDetectorPreTrainedModel):
    """ManTra-Net (Wu, AbdAlmageed & Natarajan, "ManTra-Net: Manipulation Tracing Network for Detection
    and Localization of Image Forgeries With Anomalous Features", CVPR 2019; Keras code ISICV/ManTraNet).

    Key components:
    - **Feature extractor** (full resolution, no pooling): a 5x5 bias-free combined first layer of
      ``F`` filters = ``F - 12`` plain + 9 fixed SRM kernels (3 per colour channel, a persistent
      buffer ``featex.first.srm_kernels``) + 3 Bayar-constrained kernels (call
      `register_bayar_constraint(optimizer, model)` when training); VGG-like 3x3 conv + ReLU blocks
      32; 64x2; 128x3; 256x3; 256x2 with symmetric padding; a 256 "transform" conv; L2 normalisation.
    - **Anomaly network**: unit-norm 1x1 conv 256 -> 64, affine-free BatchNorm, deviations
      ``x - mean`` over local windows 7/15/31 and the global mean (4 steps), divided by a per-sample
      std with a learnable floor, abs, a ConvLSTM (8 filters, 7x7) over the 4 steps and a 7x7 conv
      to one logit per pixel (the original applies a sigmoid; here the map is returned as logits).
    - **Image logit**: the max of the logit map (``config.image_pooling``; "mean" also available).
    - **Loss**: the training code was never released, so `standard_loss` (BCE on the image logit +
      BCE and Dice on the map).

    Inputs may have any height and width (no down-sampling). Default config: 3,804,950 trainable
    parameters + 675 fixed SRM taps (original: 3,805,625 weights incl. the SRM taps, ~3.8 M).
    """

    config_class = ManTraNetConfig
    base_model_prefix = "mantranet"
    localizes = True

    def __init__(self, config: ManTraNetConfig) -> None:
        super().__init__(config)
        self.featex = ManTraNetFeatureExtractor(config)
        self.anomaly = ManTraNetAnomalyNetwork(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ManTraNetCombinedConv):
            # Fixed filters: (re)set to the paper's kernels; values loaded from a checkpoint are equal.
            module.reset_srm_kernels()
        elif isinstance(module, ManTraNetGlobalStd):
            nn.init.constant_(module.min_std, module.min_std_init)
        elif isinstance(module, ConvLSTMGateConv):
            if not getattr(module.bias, "_is_hf_initialized", False):
                module.reset_forget_bias()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DetectorOutput | tuple:
        self.check_pixel_values(pixel_values)
        localization_logits = self.anomaly(self.featex(pixel_values))
        if self.config.image_pooling == "max":
            logits = localization_logits.flatten(1).amax(dim=1)
        else:
            logits = localization_logits.flatten(1).mean(dim=1)
        loss = self.standard_loss(logits, localization_logits, labels, masks)
        if not return_dict:
            return tuple(v for v in (loss, logits, localization_logits) if v is not None)
        return DetectorOutput(loss=loss, logits=logits, localization_logits=localization_logits)
