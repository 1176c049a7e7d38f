"""Fixtures shared by several test modules."""

import pytest
import torch

from m3d.pipelines import CycleGAN3DPipeline, M3DInpaintPipeline, Pix2Pix3DPipeline


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine threads make them slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_pipelines_dir(tmp_path_factory):
    """Random tiny pipelines of the three generators x two tasks, in `m3d build --pipelines`' layout."""
    root = tmp_path_factory.mktemp("pipelines")
    torch.manual_seed(0)
    for name, cls in (("pix2pix", Pix2Pix3DPipeline), ("cyclegan", CycleGAN3DPipeline), ("ddpm", M3DInpaintPipeline)):
        for task in ("inject", "remove"):
            cls.from_preset("tiny", task=task).save_pretrained(root / f"{name}-{task}")
    return root
