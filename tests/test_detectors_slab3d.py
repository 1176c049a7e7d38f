"""Slab3D, m3d's own volumetric detector: slab inputs, its residual and consistency front end, shapes on
anisotropic scans, the round trip and the Bayar constraint (its learnability is in test_train_detector)."""

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSemanticSegmentation

from m3d.data.ct import CTVolume
from m3d.detectors import Slab3DConfig, Slab3DForForgeryDetection, detect_volume
from m3d.detectors.modeling_utils import M3DDetectorConfig
from m3d.detectors.slab3d.modeling_slab3d import noise_consistency
from m3d.detectors.volume import input_slices, slices_to_input

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> Slab3DForForgeryDetection:
    torch.manual_seed(0)
    return Slab3DForForgeryDetection(Slab3DConfig.from_preset("tiny", **overrides)).eval()


def test_slab_input_is_the_neighbouring_slices_and_repeats_the_ends():
    hu = np.stack([np.full((8, 8), -1000.0 + 100 * z) for z in range(6)]).astype(
        np.float32
    )  # slice z at -1000 + 100 z HU
    config = Slab3DConfig.from_preset("tiny")
    assert input_slices(config) == 5 and config.num_channels == 5
    pixels = slices_to_input(hu, [0, 3, 5], config)
    assert pixels.shape == (3, 5, 8, 8)
    low, high = config.hu_windows[0]
    slice_of = lambda value: round(((value + 1) / 2 * (high - low) + low + 1000) / 100)  # noqa: E731
    assert [slice_of(float(pixels[0, c, 0, 0])) for c in range(5)] == [
        0,
        0,
        0,
        1,
        2,
    ]  # the scan's first slice repeated
    assert [slice_of(float(pixels[1, c, 0, 0])) for c in range(5)] == [1, 2, 3, 4, 5]
    assert [slice_of(float(pixels[2, c, 0, 0])) for c in range(5)] == [3, 4, 5, 5, 5]


def test_config_refuses_what_cannot_be_a_slab():
    with pytest.raises(ValueError, match="input_mode must be 'slab'"):
        Slab3DConfig(input_mode="hu_windows")
    with pytest.raises(ValueError, match="positive odd"):
        Slab3DConfig(slab_slices=4)
    with pytest.raises(ValueError, match="num_channels .* must equal"):
        M3DDetectorConfig(input_mode="slab", slab_slices=5, num_channels=3)
    with pytest.raises(ValueError, match="odd"):
        Slab3DConfig(bayar_kernel=(3, 4, 5))
    with pytest.raises(ValueError, match="encoder_inputs"):
        Slab3DConfig(encoder_inputs=("intensity", "texture"))


@pytest.mark.parametrize(
    "inputs", [("intensity", "residuals", "consistency"), ("residuals", "consistency"), ("consistency",)]
)
def test_forward_shapes_loss_and_gradients_reach_every_parameter(inputs):
    model = tiny(encoder_inputs=inputs, bayar_channels=2).train()
    masks = torch.zeros(2, 1, 32, 64)
    masks[1, :, 8:20, 20:40] = 1
    output = model(pixel_values=torch.rand(2, 5, 32, 64) * 2 - 1, labels=torch.tensor([0.0, 1.0]), masks=masks)
    assert output.logits.shape == (2,) and output.localization_logits.shape == (2, 1, 32, 64)
    output.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match=r"\(batch, 5, H, W\)"):
        model(pixel_values=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        model(pixel_values=torch.zeros(1, 5, 30, 32))


def test_residuals_ignore_smooth_anatomy_and_consistency_flags_foreign_noise():
    model = tiny()
    z, y, x = torch.meshgrid(torch.arange(5.0), torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ramp = (0.01 * z + 0.02 * y - 0.015 * x - 0.5)[None, None]  # a linear HU ramp: no noise at all
    assert model.residuals(ramp)[..., 1:-1, 1:-1, 1:-1].abs().max() < 1e-4  # inside: the edges repeat their voxels
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 1, 5, 32, 32, generator=generator) * 0.02
    noise[..., 8:24, 8:24] *= 4  # a region whose noise is four times the scan's
    consistency = noise_consistency(model.residuals(noise), window=5)[0, 0]  # the in-plane Laplacian's channel
    inside, outside = consistency[:, 11:21, 11:21].mean(), consistency[:, :, :4].mean()
    assert inside > 2.0 and abs(outside) < 0.5, (float(inside), float(outside))


def test_volumetric_map_on_an_anisotropic_scan_and_at_its_ends():
    """Run over a whole scan with thick slices, as `m3d detect` does: one map value per voxel of the
    scan's own grid, and the first and last slices (whose slabs repeat them) scored like the others."""
    rng = np.random.default_rng(0)
    hu = (rng.normal(-850, 20, (7, 32, 48))).astype(np.float32)
    scan = CTVolume(hu, spacing_mm=(2.5, 0.7, 0.7))  # (dz, dy, dx): slices 3.6 times thicker than pixels
    detection = detect_volume(tiny(), scan, batch_size=3)
    assert detection.localization.shape == scan.shape
    assert detection.slice_scores.shape == (7,) and np.isfinite(detection.slice_scores).all()
    assert detection.score == pytest.approx(float(detection.slice_scores.max()))


def test_round_trip_keeps_filters_outputs_and_the_bayar_constraint(tmp_path):
    model = tiny(bayar_channels=2, encoder_inputs=("intensity", "residuals", "consistency")).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    from m3d.detectors import register_bayar_constraint

    register_bayar_constraint(optimizer, model)
    model(pixel_values=torch.rand(2, 5, 32, 32), labels=torch.tensor([0.0, 1.0])).loss.backward()
    optimizer.step()
    weight = model.bayar.weight.detach()
    assert torch.allclose(weight[:, :, 1, 2, 2], torch.tensor(-1.0))
    torch.testing.assert_close(weight.sum(dim=(2, 3, 4)), torch.zeros(weight.shape[:2]), atol=1e-5, rtol=0)
    model.eval().save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert type(AutoConfig.from_pretrained(tmp_path)) is Slab3DConfig
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert (
        type(loaded) is Slab3DForForgeryDetection
        and type(AutoModel.from_pretrained(tmp_path)) is Slab3DForForgeryDetection
    )
    torch.testing.assert_close(loaded.high_pass_kernels, model.high_pass_kernels)
    pixels = torch.rand(2, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixel_values=pixels).localization_logits, model(pixel_values=pixels).localization_logits
        )
