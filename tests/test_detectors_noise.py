"""Noise-residual detectors: ManTra-Net and MVSS-Net (tiny configs, CPU, 64x64 inputs)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

from m3d.detectors.mantranet import ManTraNetConfig, ManTraNetForForgeryDetection, srm_base_kernels
from m3d.detectors.mantranet.modeling_mantranet import symmetric_pad
from m3d.detectors.modeling_utils import window_mean
from m3d.detectors.modeling_utils import BayarConv2d, register_bayar_constraint
from m3d.detectors.volume import detect_volume


def pixels(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


def box_masks(batch: int = 2, size: int = 64) -> torch.Tensor:
    masks = torch.zeros(batch, 1, size, size)
    masks[0, :, 16:40, 20:44] = 1
    return masks


def small_volume(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = np.full((5, 64, 64), -1000.0)
    hu[:, 6:58, 4:60] = 40
    hu[:, 12:52, 8:30] = -850
    hu[:, 12:52, 34:56] = -850
    return (hu + rng.normal(0, 20, hu.shape)).astype(np.int16)


def assert_forward_and_loss(model, size: int = 64) -> None:
    model.train()
    x = pixels(size=size)
    out = model(pixel_values=x)
    assert out.logits.shape == (2,)
    assert out.localization_logits.shape == (2, 1, size, size)
    assert out.loss is None
    out = model(pixel_values=x, labels=torch.tensor([1, 0]), masks=box_masks(size=size))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()
    assert torch.isfinite(model(pixel_values=x, labels=torch.tensor([1.0, 0.0])).loss)
    assert torch.isfinite(model(pixel_values=x, masks=box_masks(size=size)).loss)


def assert_save_load_identical(model, tmp_path, config_class) -> torch.nn.Module:
    model.eval()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), config_class)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    loaded.eval()
    x = pixels(seed=3)
    with torch.no_grad():
        a, b = model(pixel_values=x), loaded(pixel_values=x)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.localization_logits, b.localization_logits, rtol=0, atol=0)
    if a.auxiliary is not None:
        torch.testing.assert_close(a.auxiliary, b.auxiliary, rtol=0, atol=0)
    return loaded


def assert_detect_volume(model) -> None:
    volume = small_volume()
    result = detect_volume(model, volume, batch_size=3)
    assert result.slice_scores.shape == (5,)
    assert result.score == pytest.approx(float(result.slice_scores.max()))
    assert result.localization is not None and result.localization.shape == volume.shape
    assert np.all((result.localization >= 0) & (result.localization <= 1))


def assert_bayar_constraint(model, conv: BayarConv2d, x: torch.Tensor, **targets) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    register_bayar_constraint(optimizer, model)
    before = conv.weight.detach().clone()
    model.train()
    model(pixel_values=x, **targets).loss.backward()
    optimizer.step()
    weight = conv.weight.detach()
    assert not torch.equal(weight, before)
    k = conv.kernel_size[0] // 2
    torch.testing.assert_close(weight[:, :, k, k], torch.full_like(weight[:, :, k, k], -1.0))
    torch.testing.assert_close(weight.sum(dim=(2, 3)), torch.zeros(weight.shape[:2]), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- ManTra-Net


@pytest.fixture(scope="module")
def mantranet() -> ManTraNetForForgeryDetection:
    torch.manual_seed(0)
    return ManTraNetForForgeryDetection(ManTraNetConfig.from_preset("tiny"))


def test_mantranet_forward_loss_backward(mantranet):
    assert_forward_and_loss(mantranet)


def test_mantranet_any_size():
    model = ManTraNetForForgeryDetection(ManTraNetConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.zeros(1, 3, 40, 56))
    assert out.localization_logits.shape == (1, 1, 40, 56)
    with pytest.raises(ValueError, match="pixel_values"):
        model(pixel_values=torch.zeros(1, 1, 32, 32))


def test_mantranet_image_logit_is_max_of_map(mantranet):
    mantranet.eval()
    with torch.no_grad():
        out = mantranet(pixel_values=pixels())
    torch.testing.assert_close(out.logits, out.localization_logits.flatten(1).amax(1))
    model = ManTraNetForForgeryDetection(ManTraNetConfig.from_preset("tiny", image_pooling="mean")).eval()
    with torch.no_grad():
        out = model(pixel_values=pixels())
    torch.testing.assert_close(out.logits, out.localization_logits.flatten(1).mean(1))


@pytest.mark.parametrize("size", [1, 3, 7, 31])
def test_mantranet_window_mean_is_avg_pool_without_padding(size):
    x = torch.randn(2, 3, 20, 37)
    expected = F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False)
    torch.testing.assert_close(window_mean(x, size), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("padding, flat", [("symmetric", True), ("zeros", False)])
def test_mantranet_anomaly_head_border(padding, flat):
    """Deviations constant over the image carry no anomaly anywhere: through the ConvLSTM and the final
    conv padded symmetrically the map stays flat; with Keras' zero padding its border differs from the
    interior (what the max-pooled image logit then finds, whatever the content)."""
    torch.manual_seed(0)
    head = (
        ManTraNetForForgeryDetection(ManTraNetConfig.from_preset("tiny", anomaly_padding_mode=padding)).eval().anomaly
    )
    deviations = torch.rand(2, head.projection.out_channels, 1, 1).expand(-1, -1, 24, 24)
    state = None
    with torch.no_grad():
        for _ in range(3):
            state = head.lstm(deviations, state)
        logits = head.prediction(state[0])
    border_gap = (logits[..., 0, :] - logits[..., 12, :]).abs().max()
    assert (border_gap < 1e-6) == flat, float(border_gap)


def test_mantranet_tiny_pads_its_anomaly_head_symmetrically():
    assert ManTraNetConfig.from_preset("tiny").anomaly_padding_mode == "symmetric"
    assert ManTraNetConfig().anomaly_padding_mode == "zeros"  # the released model
    with pytest.raises(ValueError, match="anomaly_padding_mode"):
        ManTraNetConfig(anomaly_padding_mode="reflect")


def test_mantranet_save_load_keeps_fixed_srm_kernels(mantranet, tmp_path):
    loaded = assert_save_load_identical(mantranet, tmp_path, ManTraNetConfig)
    first = loaded.featex.first
    assert "featex.first.srm_kernels" in loaded.state_dict()
    assert not any(p is first.srm_kernels for p in loaded.parameters())
    base = srm_base_kernels()
    expected_first = torch.zeros(5, 5)
    expected_first[1:4, 1:4] = torch.tensor([[-1.0, 2, -1], [2, -4, 2], [-1, 2, -1]]) / 4
    torch.testing.assert_close(base[0], expected_first)
    torch.testing.assert_close(base[1][2], torch.tensor([-2.0, 8, -12, 8, -2]) / 12)
    torch.testing.assert_close(base[2][2], torch.tensor([0.0, 1, -2, 1, 0]) / 2)
    for k in range(3):
        for channel in range(3):
            kernel = first.srm_kernels[3 * k + channel]
            torch.testing.assert_close(kernel[channel], base[k], rtol=0, atol=0)
            assert kernel.abs().sum() == kernel[channel].abs().sum()  # only its own channel
    # the combined weight: plain (F - 12) + SRM (9) + Bayar (3), in that order
    weight = first.weight
    assert weight.shape == (16, 3, 5, 5)
    torch.testing.assert_close(weight[4:13], first.srm_kernels, rtol=0, atol=0)
    torch.testing.assert_close(weight[13:], first.bayar.weight, rtol=0, atol=0)


def drop_keys_and_reload(model, tmp_path, suffix: str):
    """Save, remove every tensor whose name ends with ``suffix`` from the checkpoint, reload."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    dropped = [k for k in tensors if k.endswith(suffix)]
    assert dropped
    save_file({k: v for k, v in tensors.items() if k not in dropped}, path, metadata={"format": "pt"})
    return AutoModel.from_pretrained(tmp_path), dropped


def test_mantranet_srm_kernels_rebuilt_when_missing_from_checkpoint(mantranet, tmp_path):
    loaded, dropped = drop_keys_and_reload(mantranet, tmp_path, "srm_kernels")
    torch.testing.assert_close(loaded.featex.first.srm_kernels, mantranet.featex.first.srm_kernels, rtol=0, atol=0)
    # the other weights of that layer still come from the checkpoint
    torch.testing.assert_close(loaded.featex.first.bayar.weight, mantranet.featex.first.bayar.weight, rtol=0, atol=0)


def test_mantranet_srm_kernels_stay_fixed_and_bayar_constraint_holds(mantranet):
    model = ManTraNetForForgeryDetection(ManTraNetConfig.from_preset("tiny"))
    srm = model.featex.first.srm_kernels.clone()
    assert_bayar_constraint(model, model.featex.first.bayar, pixels(), labels=torch.tensor([1, 0]), masks=box_masks())
    torch.testing.assert_close(model.featex.first.srm_kernels, srm, rtol=0, atol=0)


def test_mantranet_components():
    model = ManTraNetForForgeryDetection(ManTraNetConfig.from_preset("tiny"))
    # symmetric padding repeats the edge pixel, as TensorFlow's "symmetric" mode
    x = torch.arange(12.0).view(1, 1, 3, 4)
    expected = np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="symmetric")
    np.testing.assert_array_equal(symmetric_pad(x, 2).numpy(), expected)
    # the 1x1 projection uses unit-norm filters
    projection = model.anomaly.projection
    with torch.no_grad():
        projection.weight.mul_(3.0)
        features = torch.randn(1, projection.in_channels, 5, 5)
        out = projection(features)
    norms = F.normalize(projection.weight, dim=(1, 2, 3)).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    unit = projection.weight / projection.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, F.conv2d(features, unit))
    # window deviations: mean over the in-image part of each window, minus the pixel; then the global mean
    anomaly = model.anomaly
    feature_map = torch.randn(1, 2, 9, 11)
    steps = anomaly.deviations(feature_map)
    assert len(steps) == len(anomaly.window_sizes) + 1
    size = anomaly.window_sizes[-1]
    half = size // 2
    for i, j in [(0, 0), (4, 5), (8, 10)]:
        window = feature_map[0, :, max(0, i - half) : i + half + 1, max(0, j - half) : j + half + 1]
        torch.testing.assert_close(steps[-2][0, :, i, j], window.mean(dim=(1, 2)) - feature_map[0, :, i, j])
    torch.testing.assert_close(steps[-1], feature_map.mean(dim=(2, 3), keepdim=True) - feature_map)
    # ConvLSTM: forget-gate bias starts at 1 (Keras unit_forget_bias), other biases at 0
    hidden = model.config.lstm_channels
    bias = model.anomaly.lstm.conv.bias.detach()
    torch.testing.assert_close(bias[hidden : 2 * hidden], torch.ones(hidden))
    assert bias[:hidden].abs().sum() == 0 and bias[2 * hidden :].abs().sum() == 0
    # features are L2-normalised per pixel
    with torch.no_grad():
        features = model.featex(pixels(batch=1))
    torch.testing.assert_close(features.norm(dim=1), torch.ones(1, 64, 64))


def test_mantranet_default_parameter_count():
    with torch.device("meta"):
        model = ManTraNetForForgeryDetection(ManTraNetConfig())
    count = sum(p.numel() for p in model.parameters())
    assert count == 3_804_950
    assert abs(count - 3.8e6) / 3.8e6 < 0.15
    assert model.featex.first.srm_kernels.shape == (9, 3, 5, 5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(first_layer_filters=8),
        dict(window_sizes=(7, 16)),
        dict(featex_block_widths=(32, 64), featex_block_depths=(1,)),
        dict(image_pooling="median"),
        dict(transform_activation="relu"),
        dict(padding_mode="reflect"),
        dict(lstm_kernel_size=4),
        dict(min_std_init=0.0),
    ],
)
def test_mantranet_invalid_config(kwargs):
    with pytest.raises(ValueError):
        ManTraNetConfig(**kwargs)


def test_mantranet_detect_volume(mantranet):
    assert_detect_volume(mantranet)


# ----------------------------------------------------------------------------------------------- MVSS-Net

from m3d.detectors.mvssnet import MVSSNetConfig, MVSSNetForForgeryDetection, mask_boundary, sobel_kernels  # noqa: E402
from m3d.detectors.mvssnet.modeling_mvssnet import MVSSSobelGate, squared_dice_loss  # noqa: E402


@pytest.fixture(scope="module")
def mvssnet() -> MVSSNetForForgeryDetection:
    torch.manual_seed(0)
    return MVSSNetForForgeryDetection(MVSSNetConfig.from_preset("tiny"))


def test_mvssnet_forward_loss_backward(mvssnet):
    assert_forward_and_loss(mvssnet)
    mvssnet.eval()
    with torch.no_grad():
        out = mvssnet(pixel_values=pixels())
    assert out.auxiliary.shape == (2, 1, 64, 64)
    torch.testing.assert_close(out.logits, out.localization_logits.flatten(1).amax(1))


def test_mvssnet_feature_strides(mvssnet):
    with torch.no_grad():
        features = mvssnet.backbone(pixels())
        noise = mvssnet.noise_backbone(torch.zeros(2, 3, 64, 64))
    assert [f.shape[-1] for f in features] == [16, 8, 4, 4]  # 1/4, 1/8, 1/16, 1/16 (dilated last stage)
    assert [f.shape[1] for f in features] == [16, 32, 32, 64]
    assert noise[-1].shape == features[-1].shape


def test_mvssnet_loss_terms(mvssnet):
    mvssnet.eval()
    x, masks = pixels(), box_masks()
    config = mvssnet.config
    with torch.no_grad():
        out = mvssnet(pixel_values=x, labels=torch.tensor([1.0, 0.0]), masks=masks)
        edge_logits = mvssnet.edge_branch(list(mvssnet.backbone(x)))
    assert edge_logits.shape == (2, 1, 16, 16)  # edge logits live at 1/4 of the input
    upsampled = F.interpolate(edge_logits, size=(64, 64), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out.auxiliary, upsampled)
    target = F.adaptive_max_pool2d(mask_boundary(masks, config.edge_width), (16, 16))
    expected = (
        0.16 * squared_dice_loss(out.localization_logits, masks)
        + 0.04 * F.binary_cross_entropy_with_logits(out.logits, torch.tensor([1.0, 0.0]))
        + 0.80 * squared_dice_loss(edge_logits, target)
    )
    torch.testing.assert_close(out.loss, expected)
    # labels default to "the mask is not empty"
    with torch.no_grad():
        implicit = mvssnet(pixel_values=x, masks=masks).loss
    torch.testing.assert_close(implicit, out.loss)


def test_mvssnet_edge_target():
    mask = torch.zeros(1, 1, 12, 12)
    mask[..., 3:9, 3:9] = 1
    mask[..., 0:3, 10:12] = 1  # touches the image border: no edge along the border itself
    edge = mask_boundary(mask, 3)
    assert edge[0, 0, 3, 3] == 1 and edge[0, 0, 2, 2] == 1 and edge[0, 0, 8, 5] == 1 and edge[0, 0, 9, 5] == 1
    assert edge[0, 0, 4, 4] == 0 and edge[0, 0, 6, 6] == 0 and edge[0, 0, 6, 0] == 0
    assert edge[0, 0, 0, 11] == 0  # border pixel inside the mask, not next to background
    assert set(edge.unique().tolist()) <= {0.0, 1.0}
    assert mask_boundary(torch.zeros(1, 1, 8, 8)).sum() == 0


def test_mvssnet_save_load_keeps_fixed_sobel_kernels(mvssnet, tmp_path):
    loaded = assert_save_load_identical(mvssnet, tmp_path, MVSSNetConfig)
    gates = [m for m in loaded.modules() if isinstance(m, MVSSSobelGate)]
    assert len(gates) == 4
    expected = torch.tensor([[[1.0, 0, -1], [2, 0, -2], [1, 0, -1]], [[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]]])
    for gate in gates:
        torch.testing.assert_close(gate.kernels[:, 0], expected, rtol=0, atol=0)
    assert "edge_branch.sobel.0.kernels" in loaded.state_dict()
    torch.testing.assert_close(loaded.grey_weights.flatten(), torch.tensor([0.1140, 0.5870, 0.2989]))
    torch.testing.assert_close(sobel_kernels()[:, 0], expected)


def test_mvssnet_sobel_kernels_rebuilt_when_missing_from_checkpoint(mvssnet, tmp_path):
    loaded, dropped = drop_keys_and_reload(mvssnet, tmp_path, "kernels")
    assert len(dropped) == 4
    for gate in (m for m in loaded.modules() if isinstance(m, MVSSSobelGate)):
        torch.testing.assert_close(gate.kernels, sobel_kernels(), rtol=0, atol=0)
    running_var = mvssnet.edge_branch.sobel[0].norm.running_var
    torch.testing.assert_close(loaded.edge_branch.sobel[0].norm.running_var, running_var)


def test_mvssnet_bayar_constraint_after_step():
    model = MVSSNetForForgeryDetection(MVSSNetConfig.from_preset("tiny"))
    assert model.bayar.weight.shape == (3, 1, 5, 5)
    kernels = model.edge_branch.sobel[0].kernels.clone()
    assert_bayar_constraint(model, model.bayar, pixels(), labels=torch.tensor([1, 0]), masks=box_masks())
    torch.testing.assert_close(model.edge_branch.sobel[0].kernels, kernels, rtol=0, atol=0)


def test_mvssnet_without_optional_branches():
    model = MVSSNetForForgeryDetection(
        MVSSNetConfig.from_preset("tiny", use_sobel=False, use_noise_branch=False)
    ).eval()
    assert model.noise_backbone is None and model.edge_branch.sobel is None
    with torch.no_grad():
        out = model(pixel_values=pixels(size=96))
    assert out.localization_logits.shape == (2, 1, 96, 96)
    with pytest.raises(ValueError, match="H, W >= 32"):
        model(pixel_values=torch.zeros(1, 3, 16, 16))


def test_mvssnet_default_parameter_count():
    with torch.device("meta"):
        model = MVSSNetForForgeryDetection(MVSSNetConfig())
    count = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert abs(count - 146.9e6) / 146.9e6 < 0.15
    assert abs(head - 95.7e6) / 95.7e6 < 0.15
    assert list(model.backbone.out_channels) == [256, 512, 1024, 2048]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(backbone_layers=(3, 4, 6)),
        dict(backbone_widths=(64, 0, 256, 512)),
        dict(bayar_kernel_size=4),
        dict(grey_weights=(0.5, 0.5)),
        dict(edge_width=2),
        dict(head_dropout=1.0),
        dict(seg_loss_weight=-0.1),
        dict(head_reduction=0),
    ],
)
def test_mvssnet_invalid_config(kwargs):
    with pytest.raises(ValueError):
        MVSSNetConfig(**kwargs)


def test_mvssnet_detect_volume(mvssnet):
    assert_detect_volume(mvssnet)
