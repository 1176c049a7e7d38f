"""Configuration of the m3d CAD malignancy scorer (a 3-D CNN on 1 mm nodule cubes)."""

from __future__ import annotations


from transformers import PreTrainedConfig

from ..presets import PresetMixin

MIN_CUBE_SIZE, MAX_CUBE_SIZE = 32, 64  # mm (voxels at 1 mm)


class CADConfig(PresetMixin, PreTrainedConfig):
    """Configuration of `CADForMalignancyScoring`.

    Args:
        cube_size: side of the input cube in voxels at 1 mm, 32 to 64. Default 48: it holds the largest
            LIDC nodules (up to ~30 mm) with >= 9 mm of surrounding lung on every side, and the whole
            32 mm cube a generator rewrites plus 8 mm around it, so the scorer judges a tampered site in
            its context rather than through the generator's own window.
        block_out_channels: widths of the stages; every stage halves the resolution.
        layers_per_block: residual blocks (two 3x3x3 convs each) per stage.
        norm_num_groups: GroupNorm groups (must divide every width); GroupNorm, not BatchNorm, so a
            score does not depend on the batch it was computed in.
        dropout: dropout before the heads.
        rating_head: also regress the readers' median rating (1 to 5).
        rating_loss_weight: weight of the rating regression (smooth L1) beside the malignancy BCE.
        malignant_min_rating / benign_max_rating: the classification target: median rating >= 4 is
            malignant, <= 2 benign; ratings between (3, and medians of 2.5 or 3.5) are not classification
            targets (the common LIDC CAD protocol) but train the rating head.
        initializer_range: std of the heads' initial weights.
    """

    model_type = "m3d_cad"
    # network sizes: "tiny" for tests, "default" what `m3d train-cad` trains
    presets = {
        "tiny": dict(cube_size=32, block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2),
        "default": {},
    }

    def __init__(
        self,
        cube_size: int = 48,
        block_out_channels: tuple[int, ...] = (16, 32, 64, 128),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        dropout: float = 0.2,
        rating_head: bool = True,
        rating_loss_weight: float = 0.5,
        malignant_min_rating: float = 4.0,
        benign_max_rating: float = 2.0,
        initializer_range: float = 0.02,
        **kwargs,
    ) -> None:
        if not MIN_CUBE_SIZE <= cube_size <= MAX_CUBE_SIZE:
            raise ValueError(f"cube_size must be {MIN_CUBE_SIZE} to {MAX_CUBE_SIZE} (mm at 1 mm); got {cube_size}")
        if not block_out_channels or min(block_out_channels) < 1:
            raise ValueError(f"block_out_channels must be positive integers; got {block_out_channels}")
        if norm_num_groups < 1 or any(width % norm_num_groups for width in block_out_channels):
            raise ValueError(f"norm_num_groups {norm_num_groups} must divide every width of {block_out_channels}")
        if layers_per_block < 1:
            raise ValueError(f"layers_per_block must be positive; got {layers_per_block}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        if not 1 <= benign_max_rating < malignant_min_rating <= 5:
            raise ValueError(
                f"need 1 <= benign_max_rating < malignant_min_rating <= 5; got {benign_max_rating}, "
                f"{malignant_min_rating}"
            )
        self.cube_size = int(cube_size)
        self.block_out_channels = [int(w) for w in block_out_channels]
        self.layers_per_block = int(layers_per_block)
        self.norm_num_groups = int(norm_num_groups)
        self.dropout = float(dropout)
        self.rating_head = bool(rating_head)
        self.rating_loss_weight = float(rating_loss_weight)
        self.malignant_min_rating = float(malignant_min_rating)
        self.benign_max_rating = float(benign_max_rating)
        self.initializer_range = float(initializer_range)
        kwargs.setdefault("id2label", {0: "benign", 1: "malignant"})  # the one logit's sigmoid is P(malignant)
        kwargs.setdefault("label2id", {"benign": 0, "malignant": 1})
        super().__init__(**kwargs)
