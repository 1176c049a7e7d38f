"""Configuration of ManTra-Net (Wu, AbdAlmageed & Natarajan, CVPR 2019)."""

from __future__ import annotations

from ..modeling_utils import M3DDetectorConfig

TRANSFORM_ACTIVATIONS = ("none", "tanh")
PADDING_MODES = ("symmetric", "zeros")
IMAGE_POOLINGS = ("max", "mean")


def _int_list(name: str, values, minimum: int = 1) -> list[int]:
    try:
        values = [int(v) for v in values]
    except TypeError as error:  # not iterable
        raise ValueError(f"{name} must be a sequence of integers; got {values!r}") from error
    if not values or any(v < minimum for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of integers >= {minimum}; got {values}")
    return values


class ManTraNetConfig(M3DDetectorConfig):
    """Configuration of `ManTraNetForForgeryDetection`. Defaults reproduce the released ManTra-Net
    (``ManTraNet_Ptrain4``: IMC feature extractor type 2, windows 7/15/31).

    Args:
        first_layer_filters: filters ``F`` of the combined 5x5 first layer: ``F - 3 * C - 3`` plain
            trainable kernels, ``3 * C`` fixed SRM kernels (three per input channel ``C``) and 3
            Bayar-constrained kernels. The released model uses 16 (type 2); types 0/1 used 32.
        featex_block_widths / featex_block_depths: widths and numbers of the 3x3 conv + ReLU layers of
            the five VGG-like blocks that follow the first layer (no pooling anywhere).
        feature_dim: width of the final 3x3 "transform" conv, whose output is L2-normalised per pixel.
        transform_activation: ``"none"`` (types >= 1, the released model) or ``"tanh"`` (type 0).
        padding_mode: ``"symmetric"`` (edge-including mirror padding, as the Keras ``Conv2DSymPadding``)
            or ``"zeros"`` for the feature-extractor convolutions.
        anomaly_channels: width of the unit-norm 1x1 "outlierTrans" conv of the anomaly network.
        window_sizes: odd sizes of the local windows whose means are subtracted (Z-score deviations).
        include_global_mean: also use the deviation from the global (per-image) mean as a last step.
        min_std_init: initial value of the learnable floor on the per-sample feature std.
        lstm_channels / lstm_kernel_size: ConvLSTM hidden channels and kernel size.
        prediction_kernel_size: kernel size of the final conv to one logit.
        anomaly_padding_mode: padding of the ConvLSTM and final convs: ``"zeros"`` (Keras' 'same', the
            released model) or ``"symmetric"``. Zero padding gives the map's border pixels less evidence
            than the interior, so after training on small crops they hold its highest logits and the
            max-pooled image logit sits on the border, whatever the content (the tiny demo detector's
            failure); symmetric padding makes the border look like the pixels next to it.
        batch_norm_eps / batch_norm_momentum: of the affine-free BatchNorm (Keras defaults 1e-3 and
            0.99, i.e. PyTorch momentum 0.01).
        image_pooling: how the image logit is pooled from the logit map: ``"max"`` (default) or ``"mean"``.
    """

    model_type = "m3d_mantranet"
    # "tiny": a few thousand parameters for tests and the CPU demo: the same structure, narrow and shallow, with the
    # released windows 7/15/31; the anomaly head padded symmetrically (on small crops zero padding puts the image
    # logit on the border) and the map's loss weighted 3 (ManTra-Net is a localization network; at weight 1 the
    # max-pooled image loss wins and the map marks a few pixels of a fake instead of its region)
    presets = {
        "tiny": dict(
            anomaly_padding_mode="symmetric",
            localization_loss_weight=3.0,
            featex_block_widths=(8, 8, 16),
            featex_block_depths=(1, 1, 1),
            feature_dim=16,
            anomaly_channels=8,
            window_sizes=(7, 15, 31),
            lstm_channels=4,
            lstm_kernel_size=3,
            prediction_kernel_size=3,
        ),
        "default": {},
    }

    def __init__(
        self,
        first_layer_filters: int = 16,
        featex_block_widths: tuple[int, ...] = (32, 64, 128, 256, 256),
        featex_block_depths: tuple[int, ...] = (1, 2, 3, 3, 2),
        feature_dim: int = 256,
        transform_activation: str = "none",
        padding_mode: str = "symmetric",
        anomaly_channels: int = 64,
        window_sizes: tuple[int, ...] = (7, 15, 31),
        include_global_mean: bool = True,
        min_std_init: float = 1e-5,
        lstm_channels: int = 8,
        lstm_kernel_size: int = 7,
        prediction_kernel_size: int = 7,
        anomaly_padding_mode: str = "zeros",
        batch_norm_eps: float = 1e-3,
        batch_norm_momentum: float = 0.01,
        image_pooling: str = "max",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        fixed = 3 * self.num_channels + 3
        if int(first_layer_filters) < fixed:
            raise ValueError(
                f"first_layer_filters must be >= {fixed} (3 SRM kernels per input channel + 3 Bayar "
                f"kernels for num_channels={self.num_channels}); got {first_layer_filters}"
            )
        widths = _int_list("featex_block_widths", featex_block_widths)
        depths = _int_list("featex_block_depths", featex_block_depths, minimum=0)
        if len(widths) != len(depths):
            raise ValueError(
                f"featex_block_widths and featex_block_depths must have the same length; got {widths} and {depths}"
            )
        if sum(depths) < 1:
            raise ValueError(f"featex_block_depths must contain at least one layer; got {depths}")
        windows = [int(w) for w in window_sizes]
        if any(w < 1 or w % 2 == 0 for w in windows):
            raise ValueError(f"window_sizes must be odd positive integers; got {list(window_sizes)}")
        if not windows and not include_global_mean:
            raise ValueError("need at least one window size or include_global_mean=True")
        for name, value in (
            ("feature_dim", feature_dim),
            ("anomaly_channels", anomaly_channels),
            ("lstm_channels", lstm_channels),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        for name, value in (
            ("lstm_kernel_size", lstm_kernel_size),
            ("prediction_kernel_size", prediction_kernel_size),
        ):
            if int(value) < 1 or int(value) % 2 == 0:
                raise ValueError(f"{name} must be an odd positive integer; got {value}")
        if transform_activation not in TRANSFORM_ACTIVATIONS:
            raise ValueError(
                f"transform_activation must be one of {TRANSFORM_ACTIVATIONS}; got {transform_activation!r}"
            )
        for name, value in (("padding_mode", padding_mode), ("anomaly_padding_mode", anomaly_padding_mode)):
            if value not in PADDING_MODES:
                raise ValueError(f"{name} must be one of {PADDING_MODES}; got {value!r}")
        if image_pooling not in IMAGE_POOLINGS:
            raise ValueError(f"image_pooling must be one of {IMAGE_POOLINGS}; got {image_pooling!r}")
        if not min_std_init > 0:
            raise ValueError(f"min_std_init must be > 0; got {min_std_init}")
        if not batch_norm_eps > 0 or not 0 < batch_norm_momentum <= 1:
            raise ValueError(
                f"need batch_norm_eps > 0 and 0 < batch_norm_momentum <= 1; got {batch_norm_eps}, "
                f"{batch_norm_momentum}"
            )
        self.first_layer_filters = int(first_layer_filters)
        self.featex_block_widths = widths
        self.featex_block_depths = depths
        self.feature_dim = int(feature_dim)
        self.transform_activation = transform_activation
        self.padding_mode = padding_mode
        self.anomaly_channels = int(anomaly_channels)
        self.window_sizes = windows
        self.include_global_mean = bool(include_global_mean)
        self.min_std_init = float(min_std_init)
        self.lstm_channels = int(lstm_channels)
        self.lstm_kernel_size = int(lstm_kernel_size)
        self.prediction_kernel_size = int(prediction_kernel_size)
        self.anomaly_padding_mode = anomaly_padding_mode
        self.batch_norm_eps = float(batch_norm_eps)
        self.batch_norm_momentum = float(batch_norm_momentum)
        self.image_pooling = image_pooling
