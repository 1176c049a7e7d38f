"""HP-FCN (Li & Huang, ICCV 2019): high-pass fully convolutional inpainting localizer."""

from .configuration_hpfcn import HPFCNConfig
from .modeling_hpfcn import HIGH_PASS_KERNELS, HPFCNForForgeryDetection

__all__ = ["HIGH_PASS_KERNELS", "HPFCNConfig", "HPFCNForForgeryDetection"]
