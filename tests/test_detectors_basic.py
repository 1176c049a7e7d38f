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
    load_detector,
)
from m3d.detectors.hpfcn import HIGH_PASS_KERNELS
from m3d.detectors.hpfcn.modeling_hpfcn import bilinear_kernel
from m3d.detectors.resnet_gp import ResNetBackbone
from m3d.detectors.resnet_gp.modeling_resnet_gp import IMAGENET_MEAN, IMAGENET_STD
from m3d.detectors.volume import slices_to_input

TINY = {
    "xception": (
        XceptionForForgeryDetection,
        XceptionConfig(stem_channels=(4, 8), entry_channels=(8, 8, 16), middle_blocks=1, exit_channels=(16, 16, 16)),
    ),
    "unet": (UNetForForgeryDetection, UNetConfig(base_channels=4, depth=3)),
    "hpfcn": (
        HPFCNForForgeryDetection,
        HPFCNConfig(base_depths=(4, 4, 8, 8), units_per_block=1, decoder_channels=(8, 4)),
    ),
    "resnet_gp": (ResNetGPForForgeryDetection, ResNetGPConfig(layers=(1, 1, 1, 1), widths=(4, 4, 8, 8))),
}
ORIGINAL_PARAMETERS = {"xception": 20.8e6, "unet": 31.0e6, "hpfcn": 7.7e6, "resnet_gp": 23.5e6}


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_hpfcn_high_pass_filters_start_as_the_papers_and_trained_ones_survive_save_and_load(tmp_path):
    model = tiny("hpfcn")
    expected = HIGH_PASS_KERNELS.repeat(3, 1, 1).unsqueeze(1)
    torch.testing.assert_close(model.high_pass.weight.detach(), expected)
    assert model.high_pass.weight.requires_grad
    # after "training", the loaded model must hold the trained filters, not re-initialised ones
    with torch.no_grad():
        model.high_pass.weight.add_(0.25)
        model.up1.weight.mul_(-3.0)
    trained_filters, trained_up = model.high_pass.weight.detach().clone(), model.up1.weight.detach().clone()
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.high_pass.weight.detach(), trained_filters)
    torch.testing.assert_close(loaded.up1.weight.detach(), trained_up)
    frozen = HPFCNForForgeryDetection(HPFCNConfig(base_depths=(4, 4, 8, 8), units_per_block=1, train_high_pass=False))
    assert not frozen.high_pass.weight.requires_grad
    torch.testing.assert_close(frozen.high_pass.weight.detach(), expected)


def test_hpfcn_high_pass_layer_computes_first_order_derivatives():
    model = tiny("hpfcn")
    image = torch.arange(36.0).view(1, 1, 6, 6).repeat(1, 3, 1, 1)  # value = 6 * row + column
    residuals = model.high_pass(image)[0, :, 2, 2]  # channel 3c + k: kernel k on input channel c
    torch.testing.assert_close(residuals, torch.tensor([6.0, 1.0, 7.0]).repeat(3))


def test_hpfcn_decoder_is_bilinear_initialised_and_strides_match_the_paper():
    model = tiny("hpfcn")
    for up in (model.up1, model.up2):
        assert up.kernel_size == (8, 8) and up.stride == (4, 4) and up.bias is None
        torch.testing.assert_close(up.weight.detach(), bilinear_kernel(up.in_channels, up.out_channels, 8))
    # one channel: a bilinear x4 transposed conv maps a constant image to the same constant (inside)
    up = torch.nn.functional.conv_transpose2d(torch.ones(1, 1, 6, 6), bilinear_kernel(1, 1, 8), stride=4, padding=2)
    assert up.shape[-2:] == (24, 24)
    torch.testing.assert_close(up[..., 4:-4, 4:-4], torch.ones(1, 1, 16, 16))
    strides = [unit.stride for unit in HPFCNForForgeryDetection(HPFCNConfig(base_depths=(4, 4, 8, 8))).encoder]
    assert strides == [1, 2] * 4  # stride 2 in each block's last unit: output stride 16


def test_hpfcn_focal_loss():
    model = tiny("hpfcn")
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])
    masks = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    probability = torch.sigmoid(logits)
    truth = torch.where(masks > 0, probability, 1 - probability)
    expected = ((1 - truth) ** 2 * -torch.log(truth)).mean()
    torch.testing.assert_close(model.focal_loss(logits, masks), expected)
    model.config.focal_gamma = 0.0
    torch.testing.assert_close(
        model.focal_loss(logits, masks), torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)
    )


def test_resnet_gp_removes_the_stem_strides_as_the_reference():
    model = tiny("resnet_gp")
    assert model.backbone.conv1.stride == (1, 1) and model.backbone.maxpool.stride == 1
    sizes = [feature.shape[-1] for feature in model.backbone(torch.randn(1, 3, 64, 64))]
    assert sizes == [64, 32, 16, 8]  # last stage at 1/8
    standard = ResNetGPForForgeryDetection(
        ResNetGPConfig(layers=(1, 1, 1, 1), widths=(4, 4, 8, 8), stem_stride=2, pool_stride=2)
    )
    assert [feature.shape[-1] for feature in standard.backbone(torch.randn(1, 3, 64, 64))] == [16, 8, 4, 2]


def test_resnet_gp_normalises_with_imagenet_statistics():
    model = tiny("resnet_gp")
    plain = ResNetGPForForgeryDetection(
        ResNetGPConfig(layers=(1, 1, 1, 1), widths=(4, 4, 8, 8), imagenet_normalize=False)
    ).eval()
    plain.load_state_dict(model.state_dict())
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=pixels).logits, plain(pixel_values=((pixels + 1) / 2 - mean) / std).logits
        )


def test_resnet_backbone_strides_dilation_and_channels():
    backbone = ResNetBackbone(layers=(1, 1, 1, 1), widths=(4, 4, 8, 8), expansion=4)
    assert backbone.out_channels == [16, 16, 32, 32]
    features = backbone(torch.randn(1, 3, 64, 64))
    assert [f.shape[1:] for f in features] == [(16, 16, 16), (16, 8, 8), (32, 4, 4), (32, 2, 2)]
    dilated = ResNetBackbone(
        layers=(1, 2, 1, 2), widths=(4, 4, 8, 8), replace_stride_with_dilation=(False, False, True)
    )
    assert [f.shape[-1] for f in dilated(torch.randn(1, 3, 64, 64))] == [16, 8, 4, 4]  # 1/4, 1/8, 1/16, 1/16
    assert dilated.layer4[1].conv2.dilation == (2, 2) and dilated.layer4[0].conv2.dilation == (1, 1)
    assert ResNetBackbone(stem_stride=1).conv1.stride == (1, 1)
    with torch.device("meta"):
        resnet50 = ResNetBackbone()
    assert resnet50.out_channels == [256, 512, 1024, 2048]
    assert sum(p.numel() for p in resnet50.parameters()) == 23_508_032  # torchvision resnet50 without fc


def test_xception_layout():
    with torch.device("meta"):
        model = XceptionForForgeryDetection(XceptionConfig())
    assert len(model.blocks) == 3 + 8 + 1
    assert all(len([m for m in block.rep if isinstance(m, torch.nn.BatchNorm2d)]) == 3 for block in model.blocks[3:11])
    assert model.classifier.in_features == 2048
    strides = [block.skip[0].stride for block in model.blocks if not isinstance(block.skip, torch.nn.Identity)]
    assert strides == [(2, 2)] * 4  # entry 128, 256, 728 and exit 1024 blocks have strided 1x1 shortcuts
    assert tiny("xception").localizes is False


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_unet_image_logit_pools_the_map(pooling):
    model = UNetForForgeryDetection(UNetConfig(base_channels=4, depth=3, image_pooling=pooling)).eval()
    with torch.no_grad():
        output = model(pixel_values=torch.randn(2, 3, 32, 32))
    flat = output.localization_logits.flatten(1)
    torch.testing.assert_close(output.logits, flat.amax(1) if pooling == "max" else flat.mean(1))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: XceptionConfig(middle_blocks=-1), "middle_blocks"),
        (lambda: UNetConfig(image_pooling="median"), "image_pooling"),
        (lambda: HPFCNConfig(base_depths=(1, 2)), "base_depths"),
        (lambda: ResNetGPConfig(stem_stride=3), "stem_stride"),
        (lambda: ResNetGPConfig(pool_stride=0), "pool_stride"),
        (lambda: ResNetGPForForgeryDetection(ResNetGPConfig(num_channels=1)), "imagenet_normalize"),
        (lambda: HPFCNConfig(focal_gamma=-1), "focal_gamma"),
        (lambda: ResNetBackbone(replace_stride_with_dilation=(True,)), "replace_stride_with_dilation"),
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
                np.testing.assert_allclose(
                    result.localization[index], torch.sigmoid(output.localization_logits)[0, 0].numpy(), atol=1e-5
                )
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
    with pytest.raises(ValueError, match="trust_remote_code"):  # an unknown type: only the folder's own code could
        AutoModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a 'm3d_not_a_detector' model, not an m3d detector"):
        load_detector(tmp_path)


def test_labels_describe_the_one_logit(tmp_path):
    """Every detector's config names what its single logit scores (not LABEL_0 / LABEL_1), as does the
    CAD scorer's, and the names survive save and load; shipped folders read the same."""
    from m3d.cad import CADConfig
    from m3d.train.demo_detectors import starting_weights

    for name, (config_class, _) in DETECTORS.items():
        config = config_class()
        assert config.id2label == {0: "pristine", 1: "manipulated"}, name
        assert config.label2id == {"pristine": 0, "manipulated": 1}, name
    CADConfig().save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).id2label == {0: "benign", 1: "malignant"}
    assert AutoConfig.from_pretrained(starting_weights("unet", "pix2pix")).id2label[1] == "manipulated"


def test_load_detector_errors_name_the_folder(tmp_path):
    """Every way a detector folder can be wrong is one clear error naming it, never a traceback or a
    model with random weights."""
    import json
    import shutil

    from m3d.detectors import load_detector
    from m3d.train.demo_detectors import starting_weights

    def folder(name):
        copy = tmp_path / name
        shutil.copytree(starting_weights("unet", "pix2pix"), copy)
        return copy

    cut = folder("cut")
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:300])
    misfit = folder("misfit")
    config = json.loads((misfit / "config.json").read_text())
    (misfit / "config.json").write_text(json.dumps({**config, "base_channels": 2 * config["base_channels"]}))
    bert = folder("bert")
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    pickled = folder("pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    broken = folder("broken")
    (broken / "config.json").write_text("{not json")
    cases = {
        cut: "truncated or not a safetensors",
        misfit: "does not fit config.json",
        bert: "'bert' model, not an m3d",
        pickled: "pytorch_model.bin is pickle",
        broken: "not a JSON object",
        tmp_path / "none": "no config.json",
    }
    for path, message in cases.items():
        with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
            load_detector(path)
        assert str(path) in str(error.value)
    assert load_detector(starting_weights("unet", "pix2pix")).config.model_type == "m3d_unet"


@pytest.mark.parametrize(
    "measured, message",
    [
        ({"balanced_accuracy": 0.5}, "balanced accuracy 0.50 (< 0.6): its detection output has collapsed"),
        (
            {"balanced_accuracy": 0.96, "tied_pair_fraction": 0.13},
            "gives 13% of its training (fake, pristine) scan pairs the same score (> 2%): its detection output "
            "has saturated",
        ),
    ],
)
def test_a_detector_whose_scores_collapsed_is_not_shipped(tmp_path, capsys, measured, message):
    """A pre-training run whose volume scores do not separate its own training scans (a dead detection head gives
    every scan the same score), or tie many of them at the top (a saturated head), is refused with one line, and
    the shipped starting weights stay as they were."""
    import json
    import shutil

    from m3d.train import demo_detectors

    shipped = demo_detectors.starting_weights("unet", "pix2pix")
    before = (shipped / "model.safetensors").read_bytes()
    run = tmp_path / "runs" / "unet-pix2pix"
    shutil.copytree(shipped, run / "best")
    calibration = {"split": "train", "threshold": 0.3, "n_fake": 80, "n_pristine": 84, **measured}
    (run / "training_summary.json").write_text(json.dumps({"steps": 800, "calibration": calibration}))
    argv = ["--data", str(tmp_path), "--runs-dir", str(tmp_path / "runs"), "--only", "unet-pix2pix", "--ship-only"]
    assert demo_detectors.main(argv) == 2
    assert message in capsys.readouterr().err
    assert (shipped / "model.safetensors").read_bytes() == before
