"""Configuration of TruFor (Guillaro, Cozzolino, Sud, Dufour & Verdoliva, CVPR 2023)."""

from __future__ import annotations

from ..modeling_utils import M3DDetectorConfig

TRAINING_PHASES = ("localization", "detection", "joint")
RGB_PREPROCESSINGS = ("imagenet", "xception", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _int_list(name: str, values, length: int, minimum: int = 1) -> list[int]:
    try:
        values = [int(v) for v in values]
    except TypeError as error:  # not iterable
        raise ValueError(f"{name} must be a sequence of {length} integers >= {minimum}; got {values!r}") from error
    if len(values) != length or any(v < minimum for v in values):
        raise ValueError(f"{name} must be a sequence of {length} integers >= {minimum}; got {values}")
    return values


def _odd_at_least_3(name: str, value) -> int:
    if int(value) != value or int(value) < 3 or int(value) % 2 == 0:
        raise ValueError(f"{name} must be an odd integer >= 3; got {value}")
    return int(value)


class TruForConfig(M3DDetectorConfig):
    """Configuration of `TruForForForgeryDetection`. Defaults reproduce the released TruFor
    (``trufor.yaml``: CMX dual MiT-B2 encoder on RGB + Noiseprint++, MLP decoders of width 512,
    confidence-pooling detection head).

    Args:
        noiseprint_num_layers / noiseprint_channels / noiseprint_kernel_size: the Noiseprint++ DnCNN
            (17 convolutions 3x3 of 64 channels; BatchNorm on every layer but the first and the last,
            ReLU after every layer but the last, no residual connection).
        noiseprint_out_channels: 1 (the released Noiseprint++, tiled to 3 channels before the encoder)
            or 3.
        noiseprint_bn_momentum: BatchNorm momentum of the DnCNN (0.1).
        freeze_noiseprint: Noiseprint++ is a pre-trained, frozen extractor in every TruFor training phase:
            its parameters get ``requires_grad=False`` and it always runs in eval mode.
        hidden_sizes / depths / num_attention_heads / sr_ratios / mlp_ratios / patch_sizes / strides: the
            four stages of each MiT stream (MiT-B2: 64/128/320/512, 3/4/6/3 blocks, 1/2/5/8 heads,
            key/value reduction 8/4/2/1, MLP ratio 4, overlapping patch embeddings 7/3/3/3 with strides
            4/2/2/2).
        hidden_act / hidden_dropout_prob / attention_probs_dropout_prob / drop_path_rate: the MiT blocks'
            activation, dropouts and stochastic depth (the original: GELU, 0, 0, 0.1).
        layer_norm_eps: epsilon of the blocks' and stages' LayerNorms (1e-6 as the original MiT; the patch
            embeddings' and key/value reductions' LayerNorms keep PyTorch's 1e-5 as in the original).
        frm_reduction / frm_lambda_channel / frm_lambda_spatial: the Feature Rectify Modules (reduction 1;
            each stream += 0.5 channel-weighted + 0.5 spatially weighted other stream).
        ffm_reduction: reduction of the Feature Fusion Modules (1).
        decoder_hidden_size: width of the two all-MLP decoders (512).
        decoder_dropout: Dropout2d before the decoders' classifiers (0.1).
        decoder_batch_norm_eps: epsilon of the decoders' BatchNorm (the original's ``BN_EPS`` 1e-3).
        detection_hidden_size / detection_dropout: the detection MLP 8 -> 128 -> 1 and its dropout (0.5).
        rgb_preprocessing: how the [0, 1] image enters the RGB stream: ``"imagenet"`` (mean/std, the
            released model), ``"xception"`` ([-1, 1]) or ``"none"``. Noiseprint++ always gets [0, 1].
        training_phase: which of TruFor's losses ``forward`` computes — ``"localization"`` (phase 2:
            anomaly map), ``"detection"`` (phase 3: confidence map + detection logit; the encoder and the
            anomaly decoder are frozen, as in the original) or ``"joint"`` (both, everything but
            Noiseprint++ trainable; the default for short fine-tunes).
        localization_ce_weight / localization_dice_weight: phase-2 loss ``0.3 weighted CE + 0.7 Dice``.
        class_weights: ``(authentic, manipulated)`` pixel weights of the phase-2 cross-entropy (0.5, 2.5).
        dice_smooth: smoothing of the phase-2 Dice (1, exponent 2 as the original).
        confidence_loss_weight / detection_bce_weight: phase-3 loss ``1.0 MSE + 0.5 weighted BCE``.
        confidence_erode_size / confidence_dilate_size: the confidence target is only defined away from
            the mask border: inside ``erode(mask, 15)`` and outside ``dilate(mask, 11)``.
        detection_class_weights: ``(authentic, manipulated)`` weights of the detection BCE
            (0.5 / 0.3 and 0.5 / 0.7).
        In ``"joint"`` the base config's ``localization_loss_weight`` and ``detection_loss_weight``
        multiply the phase-2 and phase-3 losses.
    """

    model_type = "m3d_trufor"
    # "tiny": tests and the CPU demo, narrow single-block stages, a 5-layer 8-channel Noiseprint++; the detection head
    # keeps TruFor's 128 units (it reads 8 pooled numbers, so it costs nothing; with 16, its ReLUs died or saturated in
    # the demo's pre-training)
    presets = {
        "tiny": dict(
            hidden_sizes=(16, 32, 48, 64),
            depths=(1, 1, 1, 1),
            num_attention_heads=(1, 1, 1, 1),
            decoder_hidden_size=32,
            noiseprint_num_layers=5,
            noiseprint_channels=8,
        ),
        "default": {},
    }

    def __init__(
        self,
        noiseprint_num_layers: int = 17,
        noiseprint_channels: int = 64,
        noiseprint_kernel_size: int = 3,
        noiseprint_out_channels: int = 1,
        noiseprint_bn_momentum: float = 0.1,
        freeze_noiseprint: bool = True,
        hidden_sizes: tuple[int, ...] = (64, 128, 320, 512),
        depths: tuple[int, ...] = (3, 4, 6, 3),
        num_attention_heads: tuple[int, ...] = (1, 2, 5, 8),
        sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
        mlp_ratios: tuple[int, ...] = (4, 4, 4, 4),
        patch_sizes: tuple[int, ...] = (7, 3, 3, 3),
        strides: tuple[int, ...] = (4, 2, 2, 2),
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        drop_path_rate: float = 0.1,
        layer_norm_eps: float = 1e-6,
        frm_reduction: int = 1,
        frm_lambda_channel: float = 0.5,
        frm_lambda_spatial: float = 0.5,
        ffm_reduction: int = 1,
        decoder_hidden_size: int = 512,
        decoder_dropout: float = 0.1,
        decoder_batch_norm_eps: float = 1e-3,
        detection_hidden_size: int = 128,
        detection_dropout: float = 0.5,
        rgb_preprocessing: str = "imagenet",
        training_phase: str = "joint",
        localization_ce_weight: float = 0.3,
        localization_dice_weight: float = 0.7,
        class_weights: tuple[float, float] = (0.5, 2.5),
        dice_smooth: float = 1.0,
        confidence_loss_weight: float = 1.0,
        detection_bce_weight: float = 0.5,
        confidence_erode_size: int = 15,
        confidence_dilate_size: int = 11,
        detection_class_weights: tuple[float, float] = (0.5 / 0.3, 0.5 / 0.7),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if self.num_channels != 3:
            raise ValueError(
                "TruFor needs 3-channel inputs (Noiseprint++ and the RGB stream); got "
                f"num_channels={self.num_channels}"
            )
        if int(noiseprint_num_layers) < 2:
            raise ValueError(f"noiseprint_num_layers must be >= 2; got {noiseprint_num_layers}")
        if int(noiseprint_channels) < 1:
            raise ValueError(f"noiseprint_channels must be >= 1; got {noiseprint_channels}")
        noiseprint_kernel_size = _odd_at_least_3("noiseprint_kernel_size", noiseprint_kernel_size)
        if int(noiseprint_out_channels) not in (1, 3):
            raise ValueError(f"noiseprint_out_channels must be 1 (tiled to 3) or 3; got {noiseprint_out_channels}")
        if not 0 <= noiseprint_bn_momentum <= 1:
            raise ValueError(f"noiseprint_bn_momentum must be in [0, 1]; got {noiseprint_bn_momentum}")
        hidden = _int_list("hidden_sizes", hidden_sizes, 4)
        heads = _int_list("num_attention_heads", num_attention_heads, 4)
        for stage, (size, head) in enumerate(zip(hidden, heads)):
            if size % head:
                raise ValueError(
                    f"hidden_sizes[{stage}] = {size} must be divisible by num_attention_heads[{stage}] = {head}"
                )
            if size % int(ffm_reduction) or size // int(ffm_reduction) % head:
                raise ValueError(
                    f"hidden_sizes[{stage}] // ffm_reduction = {size} // {ffm_reduction} must be divisible by "
                    f"num_attention_heads[{stage}] = {head}"
                )
            if size // int(frm_reduction) < 1:
                raise ValueError(f"frm_reduction must be <= hidden_sizes[{stage}] = {size}; got {frm_reduction}")
        depths = _int_list("depths", depths, 4)
        sr_ratios = _int_list("sr_ratios", sr_ratios, 4)
        mlp_ratios = _int_list("mlp_ratios", mlp_ratios, 4)
        patch_sizes = _int_list("patch_sizes", patch_sizes, 4)
        strides = _int_list("strides", strides, 4)
        if any(p % 2 == 0 for p in patch_sizes):
            raise ValueError(f"patch_sizes must be odd (overlapping patch embeddings); got {patch_sizes}")
        from transformers.activations import ACT2FN

        if hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act must be one of transformers' activations; got {hidden_act!r}")
        for name, value in (
            ("hidden_dropout_prob", hidden_dropout_prob),
            ("attention_probs_dropout_prob", attention_probs_dropout_prob),
            ("drop_path_rate", drop_path_rate),
            ("decoder_dropout", decoder_dropout),
            ("detection_dropout", detection_dropout),
        ):
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1); got {value}")
        if not layer_norm_eps > 0 or not decoder_batch_norm_eps > 0:
            raise ValueError(
                f"layer_norm_eps and decoder_batch_norm_eps must be > 0; got {layer_norm_eps}, "
                f"{decoder_batch_norm_eps}"
            )
        if int(frm_reduction) < 1 or int(ffm_reduction) < 1:
            raise ValueError(f"frm_reduction and ffm_reduction must be >= 1; got {frm_reduction}, {ffm_reduction}")
        if int(decoder_hidden_size) < 1 or int(detection_hidden_size) < 1:
            raise ValueError(
                f"decoder_hidden_size and detection_hidden_size must be >= 1; got {decoder_hidden_size}, "
                f"{detection_hidden_size}"
            )
        if rgb_preprocessing not in RGB_PREPROCESSINGS:
            raise ValueError(f"rgb_preprocessing must be one of {RGB_PREPROCESSINGS}; got {rgb_preprocessing!r}")
        if training_phase not in TRAINING_PHASES:
            raise ValueError(f"training_phase must be one of {TRAINING_PHASES}; got {training_phase!r}")
        weights = (localization_ce_weight, localization_dice_weight, confidence_loss_weight, detection_bce_weight)
        if any(w < 0 for w in weights):
            raise ValueError(f"loss weights must be >= 0; got {weights}")
        for name, pair in (("class_weights", class_weights), ("detection_class_weights", detection_class_weights)):
            if len(pair) != 2 or any(not w > 0 for w in pair):
                raise ValueError(f"{name} must be two positive (authentic, manipulated) weights; got {pair}")
        if not dice_smooth >= 0:
            raise ValueError(f"dice_smooth must be >= 0; got {dice_smooth}")
        confidence_erode_size = _odd_at_least_3("confidence_erode_size", confidence_erode_size)
        confidence_dilate_size = _odd_at_least_3("confidence_dilate_size", confidence_dilate_size)

        self.noiseprint_num_layers = int(noiseprint_num_layers)
        self.noiseprint_channels = int(noiseprint_channels)
        self.noiseprint_kernel_size = noiseprint_kernel_size
        self.noiseprint_out_channels = int(noiseprint_out_channels)
        self.noiseprint_bn_momentum = float(noiseprint_bn_momentum)
        self.freeze_noiseprint = bool(freeze_noiseprint)
        self.hidden_sizes = hidden
        self.depths = depths
        self.num_attention_heads = heads
        self.sr_ratios = sr_ratios
        self.mlp_ratios = mlp_ratios
        self.patch_sizes = patch_sizes
        self.strides = strides
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = float(hidden_dropout_prob)
        self.attention_probs_dropout_prob = float(attention_probs_dropout_prob)
        self.drop_path_rate = float(drop_path_rate)
        self.layer_norm_eps = float(layer_norm_eps)
        self.frm_reduction = int(frm_reduction)
        self.frm_lambda_channel = float(frm_lambda_channel)
        self.frm_lambda_spatial = float(frm_lambda_spatial)
        self.ffm_reduction = int(ffm_reduction)
        self.decoder_hidden_size = int(decoder_hidden_size)
        self.decoder_dropout = float(decoder_dropout)
        self.decoder_batch_norm_eps = float(decoder_batch_norm_eps)
        self.detection_hidden_size = int(detection_hidden_size)
        self.detection_dropout = float(detection_dropout)
        self.rgb_preprocessing = rgb_preprocessing
        self.training_phase = training_phase
        self.localization_ce_weight = float(localization_ce_weight)
        self.localization_dice_weight = float(localization_dice_weight)
        self.class_weights = [float(w) for w in class_weights]
        self.dice_smooth = float(dice_smooth)
        self.confidence_loss_weight = float(confidence_loss_weight)
        self.detection_bce_weight = float(detection_bce_weight)
        self.confidence_erode_size = confidence_erode_size
        self.confidence_dilate_size = confidence_dilate_size
        self.detection_class_weights = [float(w) for w in detection_class_weights]

    @property
    def input_multiple(self) -> int:
        """Input height and width must be multiples of this (the product of the stage strides, 32)."""
        product = 1
        for stride in self.strides:
            product *= stride
        return product
