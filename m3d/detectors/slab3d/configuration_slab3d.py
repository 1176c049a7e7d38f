"""Configuration of Slab3D, m3d's own volumetric detector."""

from __future__ import annotations

from ..modeling_utils import M3DDetectorConfig
from ..unet.configuration_unet import IMAGE_POOLINGS

ENCODER_INPUTS = ("intensity", "residuals", "consistency")


class Slab3DConfig(M3DDetectorConfig):
    """Configuration of `Slab3DForForgeryDetection`.

    The input is always a slab (``input_mode="slab"``): ``slab_slices`` axial slices centred on the one
    the model answers for, in the first HU window, one channel each.

    Args:
        slab_slices: slices per slab (odd; 7 by default, 5 in the demo's tiny preset).
        widths: channels of the 3-D encoder's levels; each level after the first halves the slices'
            height and width (never the slice axis), so inputs must be multiples of ``2**(len - 1)``.
        bayar_channels: learned constrained (Bayar) 3-D residual filters beside the fixed high-pass ones
            (0 by default: in the demo they cost cross-generator accuracy, see the model's docstring).
        bayar_kernel: their ``(slices, height, width)`` kernel (odd sizes).
        residual_unit_hu: the HU that one unit of the residual channels stands for (about the noise
            of a CT slice), so that they start near unit scale.
        noise_window: in-plane size (voxels) of the window over which the consistency channels measure
            each residual's local energy before comparing it with the slab's median.
        image_pooling: how the slice logit is pooled from its logit map, ``"max"`` (default) or ``"mean"``.
        encoder_inputs: what the 3-D encoder reads, any of ``"intensity"`` (the slab's HU: the anatomy,
            what a fake looks like), ``"residuals"`` (the high-pass residuals: how it was made) and
            ``"consistency"`` (the residuals' local energy against the slab's own); by default the last two
            (reading the HU too cost cross-generator accuracy in the demo, see the model's docstring).
    """

    model_type = "m3d_slab3d"
    # "tiny": the demo's and the tests' size, a 5-slice slab with widths (8, 16, 32)
    presets = {"tiny": dict(slab_slices=5, widths=(8, 16, 32)), "default": {}}

    def __init__(
        self,
        slab_slices: int = 7,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        bayar_channels: int = 0,
        bayar_kernel: tuple[int, int, int] = (3, 5, 5),
        residual_unit_hu: float = 20.0,
        noise_window: int = 7,
        image_pooling: str = "max",
        encoder_inputs: tuple[str, ...] = ("residuals", "consistency"),
        **kwargs,
    ) -> None:
        input_mode = kwargs.pop("input_mode", "slab")
        if input_mode != "slab":
            raise ValueError(f"Slab3D reads slabs of slices: input_mode must be 'slab'; got {input_mode!r}")
        if len(widths) < 1 or min(widths) < 1:
            raise ValueError(f"widths must be one or more positive integers; got {widths}")
        if bayar_channels < 0 or len(bayar_kernel) != 3 or any(k < 1 or k % 2 == 0 for k in bayar_kernel):
            raise ValueError(
                f"bayar_channels must be >= 0 and bayar_kernel three odd sizes; got {bayar_channels}, {bayar_kernel}"
            )
        if residual_unit_hu <= 0:
            raise ValueError(f"residual_unit_hu must be positive; got {residual_unit_hu}")
        if noise_window < 1 or noise_window % 2 == 0:
            raise ValueError(f"noise_window must be a positive odd number of voxels; got {noise_window}")
        if (
            not encoder_inputs
            or set(encoder_inputs) - set(ENCODER_INPUTS)
            or len(set(encoder_inputs)) != len(encoder_inputs)
        ):
            raise ValueError(f"encoder_inputs must be distinct names among {ENCODER_INPUTS}; got {encoder_inputs}")
        if image_pooling not in IMAGE_POOLINGS:
            raise ValueError(f"image_pooling must be one of {IMAGE_POOLINGS}; got {image_pooling!r}")
        self.widths = list(widths)
        self.bayar_channels = bayar_channels
        self.bayar_kernel = list(bayar_kernel)
        self.residual_unit_hu = float(residual_unit_hu)
        self.noise_window = noise_window
        self.image_pooling = image_pooling
        self.encoder_inputs = list(encoder_inputs)
        kwargs.setdefault("num_channels", slab_slices)
        super().__init__(input_mode="slab", slab_slices=slab_slices, **kwargs)
