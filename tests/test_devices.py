"""`m3d.devices`: the names results record for the device they were measured on."""

import pytest
import torch

from m3d.devices import cpu_model, describe_device


def test_a_cpu_is_named_by_its_model_and_threads():
    assert describe_device("cpu") == f"CPU {cpu_model()} ({torch.get_num_threads()} threads)"
    assert cpu_model()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_cuda_device_is_a_one_line_error():
    with pytest.raises(ValueError, match="^--device cuda: no CUDA device is visible to torch$"):
        describe_device("cuda")
