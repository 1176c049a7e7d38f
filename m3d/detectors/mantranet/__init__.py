"""ManTra-Net (Wu et al., CVPR 2019)."""

from .configuration_mantranet import ManTraNetConfig
from .modeling_mantranet import ManTraNetForForgeryDetection, srm_base_kernels, srm_kernel_bank

__all__ = ["ManTraNetConfig", "ManTraNetForForgeryDetection", "srm_base_kernels", "srm_kernel_bank"]
