"""Fixtures shared by several test modules."""

import os

import datasets
import pytest
import torch

from m3d.pipelines import CycleGAN3DPipeline, M3DInpaintPipeline, Pix2Pix3DPipeline


@pytest.fixture(scope="session", autouse=True)
def datasets_cache(tmp_path_factory):
    """`datasets` caches under the session's temporary folder (subprocesses too), not the user's
    ~/.cache: each M3Dsynth folder a test builds is cached apart, and hundreds of MB would pile up there."""
    folder = tmp_path_factory.mktemp("hf_datasets_cache")
    previous_config, previous_env = datasets.config.HF_DATASETS_CACHE, os.environ.get("HF_DATASETS_CACHE")
    datasets.config.HF_DATASETS_CACHE, os.environ["HF_DATASETS_CACHE"] = folder, str(folder)
    yield folder
    datasets.config.HF_DATASETS_CACHE = previous_config
    if previous_env is None:
        os.environ.pop("HF_DATASETS_CACHE")
    else:
        os.environ["HF_DATASETS_CACHE"] = previous_env


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
