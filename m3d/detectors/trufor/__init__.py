"""TruFor (Guillaro et al., CVPR 2023)."""

from .configuration_trufor import TruForConfig
from .modeling_trufor import (
    TruForForForgeryDetection,
    TruForNoiseprint,
    convert_original_trufor_state_dict,
    weighted_statistics_pooling,
)

__all__ = [
    "TruForConfig",
    "TruForForForgeryDetection",
    "TruForNoiseprint",
    "convert_original_trufor_state_dict",
    "weighted_statistics_pooling",
]
