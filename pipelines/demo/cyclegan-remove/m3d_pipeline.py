"""This pipeline folder's code for ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``:
m3d's own pipeline classes (``pip install m3d``); ``model_index.json`` names the one the folder holds."""
from m3d.pipelines import CycleGAN3DPipeline, M3DInpaintPipeline, Pix2Pix3DPipeline  # noqa: F401
