import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForSemanticSegmentation

from m3d.detectors import (
    DETECTORS,
    HPFCNConfig,
    HPFCNForForgeryDetection,
    ResNetGPConfig,
    ResNetGPForForgeryDetection,
    UNetConfig,
    UNetForForgeryDetection,
    XceptionConfig,
    XceptionForForgeryDetection,
    detect_volume,
)
from m3d.detectors.hpfcn import HIGH_PASS_KERNELS
from m3d.detectors.volume import slices_to_input

TINY = {
    "xception": (XceptionForForgeryDetection, XceptionConfig(stem_channels=(4, 8), entry_channels=(8, 8, 16), middle_blocks=1, exit_channels=(16, 16, 16))),
    "unet": (UNetForForgeryDetection, UNetConfig(base_channels=4, depth=3)),
    "hpfcn": (HPFCNForForgeryDetection, HPFCNConfig(base_depths=(4, 4, 8, 8), units_per_block=1, decoder_channels=(8, 4))),
    "resnet_gp": (ResNetGPForForgeryDetection, ResNetGPConfig(layers=(1, 1, 1, 1), widths=(4, 4, 8, 8))),
}
ORIGINAL_PARAMETERS = {"xception": 20.8e6, "unet": 31.0e6, "hpfcn": 7.7e6, "resnet_gp": 23.5e6}


def tiny(name):
    torch.manual_seed(0)
    model_class, config = TINY[name]
    return model_class(config).eval()


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_shapes_and_loss(name):
    model = tiny(name).train()
    pixels = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 1, 64, 64)
    masks[1, :, 20:40, 20:40] = 1
    output = model(pixel_values=pixels, labels=torch.tensor([0.0, 1.0]), masks=masks)
    assert output.logits.shape == (2,)
    if model.localizes:
        assert output.localization_logits.shape == (2, 1, 64, 64)
    else:
        assert output.localization_logits is None
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(TINY))
def test_auto_round_trip_gives_identical_outputs(name, tmp_path):
    model = tiny(name)
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is type(model.config)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    task_auto = AutoModelForSemanticSegmentation if model.localizes else AutoModelForImageClassification
    assert type(task_auto.from_pretrained(tmp_path)) is type(model)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, actual = model(pixel_values=pixels), loaded(pixel_values=pixels)
    torch.testing.assert_close(actual.logits, expected.logits)
    if model.localizes:
        torch.testing.assert_close(actual.localization_logits, expected.localization_logits)


@pytest.mark.parametrize("name", sorted(ORIGINAL_PARAMETERS))
def test_default_size_matches_the_original(name):
    config_class, model_class = DETECTORS[name]
    with torch.device("meta"):
        count = sum(p.numel() for p in model_class(config_class()).parameters())
    assert abs(count / ORIGINAL_PARAMETERS[name] - 1) < 0.15


def test_hpfcn_high_pass_filters_survive_save_and_load(tmp_path):
    model = tiny("hpfcn")
    expected = HIGH_PASS_KERNELS.repeat(3, 1, 1).unsqueeze(1)
    torch.testing.assert_close(model.high_pass.weight.detach(), expected)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.high_pass.weight.detach(), expected)
    frozen = HPFCNForForgeryDetection(HPFCNConfig(base_depths=(4, 4, 8, 8), units_per_block=1, train_high_pass=False))
    assert not frozen.high_pass.weight.requires_grad


def test_resnet_gp_removes_the_first_stride():
    model = tiny("resnet_gp")
    assert model.backbone.conv1.stride == (1, 1)
    assert ResNetGPForForgeryDetection(ResNetGPConfig(layers=(1, 1, 1, 1), widths=(4, 4, 8, 8), stem_stride=2)).backbone.conv1.stride == (2, 2)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: XceptionConfig(middle_blocks=-1), "middle_blocks"),
        (lambda: UNetConfig(image_pooling="median"), "image_pooling"),
        (lambda: HPFCNConfig(base_depths=(1, 2)), "base_depths"),
        (lambda: ResNetGPConfig(stem_stride=3), "stem_stride"),
        (lambda: UNetConfig(input_mode="rgb"), "input_mode"),
        (lambda: UNetConfig(hu_windows=((0, 1), (1, 0), (0, 1))), "hu_windows"),
    ],
)
def test_invalid_configs_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_input_size_errors_are_clear():
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny("unet")(pixel_values=torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny("hpfcn")(pixel_values=torch.randn(1, 3, 40, 64))


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_volume_inference_equals_a_slice_loop(name, batch_size):
    model = tiny(name)
    hu = np.random.default_rng(0).integers(-1000, 400, (5, 64, 64)).astype(np.int16)
    result = detect_volume(model, hu, batch_size=batch_size)
    assert result.score == pytest.approx(result.slice_scores.max())
    with torch.no_grad():
        for index in range(hu.shape[0]):
            output = model(pixel_values=slices_to_input(hu, [index], model.config))
            assert result.slice_scores[index] == pytest.approx(torch.sigmoid(output.logits).item(), abs=1e-5)
            if model.localizes:
                np.testing.assert_allclose(result.localization[index], torch.sigmoid(output.localization_logits)[0, 0].numpy(), atol=1e-5)
    if not model.localizes:
        assert result.localization is None


def test_volume_inference_single_slice_and_bad_input():
    model = tiny("unet")
    result = detect_volume(model, np.zeros((1, 64, 64), np.int16))
    assert result.localization.shape == (1, 64, 64)
    with pytest.raises(ValueError, match="batch_size"):
        detect_volume(model, np.zeros((1, 64, 64), np.int16), batch_size=0)
    with pytest.raises(ValueError, match="volume"):
        detect_volume(model, np.zeros((64, 64), np.int16))


@pytest.mark.parametrize("mode", ["hu_windows", "percentile", "adjacent_slices"])
def test_slice_input_modes(mode):
    config = UNetConfig(input_mode=mode)
    hu = np.stack([np.full((8, 8), value, np.int16) for value in (-1000, 0, 400)])
    pixels = slices_to_input(hu, [1], config)
    assert pixels.shape == (1, 3, 8, 8) and pixels.min() >= -1 and pixels.max() <= 1
    if mode == "adjacent_slices":
        low, high = config.hu_windows[0]
        expected = [np.clip((v - low) / (high - low), 0, 1) * 2 - 1 for v in (-1000, 0, 400)]
        np.testing.assert_allclose(pixels[0, :, 0, 0].numpy(), expected, atol=1e-6)
    if mode == "hu_windows":
        low, high = config.hu_windows[1]
        assert pixels[0, 1, 0, 0].item() == pytest.approx((0 - low) / (high - low) * 2 - 1)


def test_a_config_it_does_not_understand_is_refused(tmp_path):
    import json

    tiny("unet").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["input_mode"] = "rgb_jpeg"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="input_mode"):
        AutoModel.from_pretrained(tmp_path)
    config["input_mode"], config["model_type"] = "hu_windows", "m3d_not_a_detector"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="m3d_not_a_detector"):
        AutoModel.from_pretrained(tmp_path)
