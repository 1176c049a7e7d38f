"""Xception (Chollet, CVPR 2017): the detection-only baseline."""

from .configuration_xception import XceptionConfig
from .modeling_xception import XceptionForForgeryDetection

__all__ = ["XceptionConfig", "XceptionForForgeryDetection"]
