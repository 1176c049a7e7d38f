"""TruFor (tiny configs, CPU, 64x64 inputs)."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSemanticSegmentation

from m3d.detectors.trufor import (
    TruForConfig,
    TruForForForgeryDetection,
    TruForNoiseprint,
    convert_original_trufor_state_dict,
    weighted_statistics_pooling,
)
from m3d.detectors.trufor.modeling_trufor import (
    TruForCrossAttn,
    TruForFeatureFusionModule,
    TruForFeatureRectifyModule,
    confidence_targets,
    squared_dice_loss,
    weighted_pixel_bce,
)
from m3d.detectors.volume import detect_volume

ORIGINAL_PARAMETERS = 68.7e6  # REFERENCES.md


def pixels(batch: int = 2, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


def box_masks(batch: int = 2, size: int = 64) -> torch.Tensor:
    masks = torch.zeros(batch, 1, size, size)
    masks[0, :, 16:44, 20:48] = 1
    return masks


def small_volume(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = np.full((5, 64, 64), -1000.0)
    hu[:, 6:58, 4:60] = 40
    hu[:, 12:52, 8:30] = -850
    hu[:, 12:52, 34:56] = -850
    return (hu + rng.normal(0, 20, hu.shape)).astype(np.int16)


def tiny_model(seed: int = 0, **kwargs) -> TruForForForgeryDetection:
    torch.manual_seed(seed)
    return TruForForForgeryDetection(TruForConfig.from_preset("tiny", **kwargs))


def randomise_batch_norms(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)


# --------------------------------------------------------------------------------------------------
# forward, maps, losses
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(64, 64), (64, 96)])
def test_forward_shapes_and_maps_at_input_size(height, width):
    model = tiny_model().eval()
    with torch.no_grad():
        out = model(pixel_values=pixels(height=height, width=width))
    assert out.logits.shape == (2,)
    assert out.localization_logits.shape == (2, 1, height, width)
    assert out.confidence.shape == (2, 1, height, width)
    assert torch.all((out.confidence >= 0) & (out.confidence <= 1))  # sigmoid already applied
    assert out.loss is None
    logits, localization, confidence = model(pixel_values=pixels(height=height, width=width), return_dict=False)
    torch.testing.assert_close(logits, out.logits)
    torch.testing.assert_close(confidence, out.confidence)


def test_attention_implementations_agree():
    model = tiny_model().eval()
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        sdpa = model(pixel_values=pixels())
        model.set_attn_implementation("eager")
        eager = model(pixel_values=pixels())
    torch.testing.assert_close(sdpa.logits, eager.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sdpa.localization_logits, eager.localization_logits, rtol=1e-4, atol=1e-4)


def test_input_size_must_be_multiple_of_32():
    model = tiny_model()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(pixel_values=pixels(height=48, width=64))
    with pytest.raises(ValueError, match="pixel_values"):
        model(pixel_values=torch.zeros(1, 1, 64, 64))


def test_joint_loss_backward_reaches_every_trainable_parameter():
    model = tiny_model().train()
    out = model(pixel_values=pixels(), labels=torch.tensor([1, 0]), masks=box_masks())
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, parameter in model.named_parameters():
        if name.startswith("noiseprint."):
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    model.zero_grad()
    assert torch.isfinite(model(pixel_values=pixels(), labels=torch.tensor([1.0, 0.0])).loss)
    assert torch.isfinite(model(pixel_values=pixels(), masks=box_masks()).loss)


def test_loss_terms_follow_the_training_phase():
    x, labels, masks = pixels(), torch.tensor([1.0, 0.0]), box_masks()
    joint = tiny_model(seed=1).eval()
    with torch.no_grad():
        total = joint(pixel_values=x, labels=labels, masks=masks).loss
        joint.set_training_phase("localization")
        localization = joint(pixel_values=x, labels=labels, masks=masks).loss
        assert joint(pixel_values=x, labels=labels).loss is None  # phase 2 needs masks
        joint.set_training_phase("detection")
        detection = joint(pixel_values=x, labels=labels, masks=masks).loss
        out = joint(pixel_values=x, masks=masks)
    torch.testing.assert_close(total, localization + detection)
    # phase 2 by hand: 0.3 weighted CE (0.5 / 2.5) + 0.7 Dice
    expected = 0.3 * weighted_pixel_bce(out.localization_logits, masks, (0.5, 2.5)) + 0.7 * squared_dice_loss(
        out.localization_logits, masks
    )
    torch.testing.assert_close(localization, expected)
    # only masks: the detection target is "more than 3 manipulated pixels"
    with torch.no_grad():
        from_masks = joint(pixel_values=x, labels=(masks.flatten(1).sum(1) > 3).float(), masks=masks).loss
    torch.testing.assert_close(out.loss, from_masks)
    with pytest.raises(ValueError, match="training_phase"):
        joint.set_training_phase("pretraining")


def test_detection_phase_freezes_encoder_and_anomaly_decoder():
    model = tiny_model(training_phase="detection").train()
    assert not model.encoder.training and not model.anomaly_decoder.training and not model.noiseprint.training
    assert model.confidence_decoder.training and model.detection_head.training
    out = model(pixel_values=pixels(), labels=torch.tensor([1, 0]), masks=box_masks())
    out.loss.backward()
    for name, parameter in model.named_parameters():
        trainable = name.startswith(("confidence_decoder.", "detection_head."))
        assert parameter.requires_grad == trainable, name
        assert (parameter.grad is not None) == trainable, name
    model.set_training_phase("joint")
    assert model.encoder.training and all(p.requires_grad for p in model.encoder.parameters())
    assert not any(p.requires_grad for p in model.noiseprint.parameters())


def test_weighted_ce_and_dice_match_the_two_class_originals():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=generator)
    target = (torch.rand(2, 1, 8, 8, generator=generator) > 0.7).float()
    two_class = torch.cat((torch.zeros_like(logits), logits), dim=1)  # softmax(.)_1 = sigmoid(logit)
    ce = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.5]))(two_class, target[:, 0].long())
    torch.testing.assert_close(weighted_pixel_bce(logits, target, (0.5, 2.5)), ce)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (p * t).sum(1) + 1) / ((p**2).sum(1) + (t**2).sum(1) + 1)
    torch.testing.assert_close(squared_dice_loss(logits, target), 1 - dice.mean())


def test_confidence_targets_ignore_the_mask_border():
    masks = box_masks()
    authentic, manipulated = confidence_targets(masks, erode_size=15, dilate_size=11)
    assert manipulated[0, 0].sum() == (28 - 14) * (28 - 14)  # eroded by 7 on each side
    assert authentic[0, 0, 16:44, 20:48].sum() == 0 and authentic[0, 0, 0, 0] == 1
    assert authentic[0, 0, 11, 30] == 0 and authentic[0, 0, 10, 30] == 1  # dilated by 5
    assert torch.all(authentic[1] == 1) and torch.all(manipulated[1] == 0)
    assert torch.all(authentic * manipulated == 0)


def test_weighted_statistics_pooling():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=generator)
    pooled = weighted_statistics_pooling(x)
    assert pooled.shape == (3, 4)
    flat = x.flatten(1)
    torch.testing.assert_close(pooled[:, 2], flat.mean(1))
    torch.testing.assert_close(pooled[:, 3], flat.square().mean(1))
    torch.testing.assert_close(pooled[:, 1], torch.logsumexp(flat, 1) - math.log(64))
    assert torch.all(pooled[:, 0] <= flat.mean(1)) and torch.all(flat.mean(1) <= pooled[:, 1])
    # (almost) all weight on one pixel -> every statistic is that pixel's value
    log_w = torch.full_like(x, -1e4)
    log_w[:, :, 2, 3] = 0
    focused = weighted_statistics_pooling(x, log_w)
    value = x[:, 0, 2, 3]
    torch.testing.assert_close(focused, torch.stack((value, value, value, value**2), 1), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# components
# --------------------------------------------------------------------------------------------------


def test_frm_and_ffm_shapes_and_formulas():
    torch.manual_seed(0)
    x1, x2 = torch.randn(2, 16, 8, 12), torch.randn(2, 16, 8, 12)
    frm = TruForFeatureRectifyModule(16)
    out_1, out_2 = frm(x1, x2)
    assert out_1.shape == out_2.shape == (2, 16, 8, 12)
    channel_1, channel_2 = frm.channel_weights(x1, x2)
    spatial_1, spatial_2 = frm.spatial_weights(x1, x2)
    assert channel_1.shape == (2, 16, 1, 1) and spatial_1.shape == (2, 1, 8, 12)
    assert frm.channel_weights.mlp[0].in_features == 64 and frm.channel_weights.mlp[2].out_features == 32
    assert frm.spatial_weights.mlp[0].out_channels == 16 and frm.spatial_weights.mlp[2].out_channels == 2
    torch.testing.assert_close(out_1, x1 + 0.5 * channel_2 * x2 + 0.5 * spatial_2 * x2)
    torch.testing.assert_close(out_2, x2 + 0.5 * channel_1 * x1 + 0.5 * spatial_1 * x1)

    ffm = TruForFeatureFusionModule(16, reduction=1, num_heads=2).eval()
    fused = ffm(out_1, out_2)
    assert fused.shape == (2, 16, 8, 12)
    assert ffm.channel_emb.residual.in_channels == 32 and ffm.channel_emb.residual.out_channels == 16

    attention = TruForCrossAttn(16, num_heads=2)
    tokens = torch.randn(2, 96, 16)
    context = attention._context(tokens, attention.kv1)
    assert context.shape == (2, 2, 8, 8)
    torch.testing.assert_close(context.sum(dim=-2), torch.ones(2, 2, 8))  # softmax over the key channels


def test_noiseprint_structure_and_frozen_by_default():
    with torch.device("meta"):
        model = TruForForForgeryDetection(TruForConfig())
    convs = [m for m in model.noiseprint if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.noiseprint if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 17 and len(norms) == 15
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert [c.bias is not None for c in convs] == [True] + [False] * 15 + [True]
    assert convs[0].in_channels == 3 and convs[-1].out_channels == 1
    assert sum(p.numel() for p in model.noiseprint.parameters()) == 557_249  # 0.56 M
    assert not any(p.requires_grad for p in model.noiseprint.parameters())

    tiny = tiny_model().train()
    assert tiny.noiseprint.frozen and not tiny.noiseprint.training  # BatchNorm on running statistics
    assert not any(p.requires_grad for p in tiny.noiseprint.parameters())
    unfrozen = tiny_model(freeze_noiseprint=False).train()
    assert unfrozen.noiseprint.training and all(p.requires_grad for p in unfrozen.noiseprint.parameters())

    # 1 output channel tiled to 3; no residual connection (all-zero weights -> the last bias only)
    noiseprint = TruForNoiseprint(num_layers=4, channels=4, frozen=True)
    with torch.no_grad():
        for parameter in noiseprint.parameters():
            parameter.zero_()
        noiseprint[-1].bias.fill_(0.25)
    out = noiseprint(torch.rand(1, 3, 16, 16))
    assert out.shape == (1, 3, 16, 16)
    torch.testing.assert_close(out, torch.full_like(out, 0.25))


def test_default_parameter_count_matches_the_original():
    with torch.device("meta"):
        model = TruForForForgeryDetection(TruForConfig())
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - ORIGINAL_PARAMETERS) / ORIGINAL_PARAMETERS < 0.15
    assert total == 68_696_908  # the released architecture: 68,697,421 with its 2-class classifier
    stream = sum(p.numel() for p in model.encoder.rgb_stages.parameters())
    assert abs(stream - 24.2e6) / 24.2e6 < 0.01  # one MiT-B2 stream
    assert model.config._attn_implementation in ("sdpa", "eager")


def test_invalid_configs_raise():
    with pytest.raises(ValueError, match="training_phase"):
        TruForConfig(training_phase="pretraining")
    with pytest.raises(ValueError, match="divisible"):
        TruForConfig(hidden_sizes=(64, 128, 320, 510))
    with pytest.raises(ValueError, match="hidden_sizes"):
        TruForConfig(hidden_sizes=(64, 128, 320))
    with pytest.raises(ValueError, match="noiseprint_out_channels"):
        TruForConfig(noiseprint_out_channels=2)
    with pytest.raises(ValueError, match="class_weights"):
        TruForConfig(class_weights=(0.5, -1.0))
    with pytest.raises(ValueError, match="rgb_preprocessing"):
        TruForConfig(rgb_preprocessing="caffe")
    with pytest.raises(ValueError, match="confidence_erode_size"):
        TruForConfig(confidence_erode_size=4)
    with pytest.raises(ValueError, match="3-channel"):
        TruForConfig(num_channels=1)


# --------------------------------------------------------------------------------------------------
# save / load, volume inference, conversion of the released weights
# --------------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip_identical(tmp_path):
    model = tiny_model(seed=2)
    randomise_batch_norms(model)
    model.eval()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), TruForConfig)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is TruForForForgeryDetection
    assert type(AutoModelForSemanticSegmentation.from_pretrained(tmp_path)) is TruForForForgeryDetection
    loaded.eval()
    for name, tensor in model.state_dict().items():  # every weight and buffer back bit for bit
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x = pixels(seed=3)
    with torch.no_grad():
        a, b = model(pixel_values=x), loaded(pixel_values=x)
    # the same numbers; oneDNN may sum in another order for another allocation (seen: 2e-9)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.localization_logits, b.localization_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.confidence, b.confidence, rtol=0, atol=0)
    # Noiseprint++ is loaded (not re-initialised) and still frozen
    for key, value in model.noiseprint.state_dict().items():
        torch.testing.assert_close(loaded.noiseprint.state_dict()[key], value, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.noiseprint.parameters())
    assert all(p.requires_grad for n, p in loaded.named_parameters() if not n.startswith("noiseprint."))
    # the fixed ImageNet normalisation (non-persistent buffers) is rebuilt on load
    torch.testing.assert_close(loaded.rgb_normalization.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(loaded.rgb_normalization.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))


def test_rgb_preprocessing():
    x01 = (pixels() + 1) / 2
    imagenet = tiny_model().rgb_normalization(x01)
    torch.testing.assert_close(imagenet[:, 1], (x01[:, 1] - 0.456) / 0.224)
    torch.testing.assert_close(tiny_model(rgb_preprocessing="xception").rgb_normalization(x01), x01 * 2 - 1)
    torch.testing.assert_close(tiny_model(rgb_preprocessing="none").rgb_normalization(x01), x01)


def test_detect_volume():
    model = tiny_model()
    volume = small_volume()
    result = detect_volume(model, volume, batch_size=3)
    assert result.slice_scores.shape == (5,)
    assert result.score == pytest.approx(float(result.slice_scores.max()))
    assert result.localization is not None and result.localization.shape == volume.shape
    assert np.all((result.localization >= 0) & (result.localization <= 1))


def original_state_dict_like(model: TruForForForgeryDetection) -> dict[str, torch.Tensor]:
    """Random tensors under the parameter names of grip-unina/TruFor's ``EncoderDecoder`` (2-class
    anomaly classifier, fused ``attn.kv``) for the architecture of ``model``'s config."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    ours = model.state_dict()
    original: dict[str, torch.Tensor] = {}

    def add(name: str, shape) -> None:
        original[name] = torch.randn(tuple(shape), generator=generator)

    for key, value in model.noiseprint.state_dict().items():
        add(f"dncnn.{key}", value.shape)
    for stream, prefix in (("rgb_stages", ""), ("noise_stages", "extra_")):
        for stage in range(4):
            size = config.hidden_sizes[stage]
            ours_stage = f"encoder.{stream}.{stage}"
            for part in ("proj.weight", "proj.bias"):
                shape = ours[f"{ours_stage}.patch_embeddings.{part}"].shape
                add(f"backbone.{prefix}patch_embed{stage + 1}.{part}", shape)
            for part in ("weight", "bias"):
                add(f"backbone.{prefix}patch_embed{stage + 1}.norm.{part}", (size,))
                add(f"backbone.{prefix}norm{stage + 1}.{part}", (size,))
            for index in range(config.depths[stage]):
                block = f"backbone.{prefix}block{stage + 1}.{index}"
                hidden = size * config.mlp_ratios[stage]
                shapes = {
                    "norm1": [(size,), (size,)],
                    "norm2": [(size,), (size,)],
                    "attn.q": [(size, size), (size,)],
                    "attn.kv": [(2 * size, size), (2 * size,)],
                    "attn.proj": [(size, size), (size,)],
                    "mlp.fc1": [(hidden, size), (hidden,)],
                    "mlp.dwconv.dwconv": [(hidden, 1, 3, 3), (hidden,)],
                    "mlp.fc2": [(size, hidden), (size,)],
                }
                sr = config.sr_ratios[stage]
                if sr > 1:
                    shapes["attn.sr"] = [(size, size, sr, sr), (size,)]
                    shapes["attn.norm"] = [(size,), (size,)]
                for name, (weight, bias) in shapes.items():
                    add(f"{block}.{name}.weight", weight)
                    add(f"{block}.{name}.bias", bias)
    for stage in range(4):
        for key, value in model.encoder.frms[stage].state_dict().items():
            add(f"backbone.FRMs.{stage}.{key}", value.shape)
        for key, value in model.encoder.ffms[stage].state_dict().items():
            add(f"backbone.FFMs.{stage}.{key}", value.shape)
    decoders = (("decode_head", model.anomaly_decoder), ("decode_head_conf", model.confidence_decoder))
    for original_name, decoder in decoders:
        outputs = 2 if original_name == "decode_head" else 1
        for index, linear in enumerate(decoder.linear_c):
            add(f"{original_name}.linear_c{index + 1}.proj.weight", linear.weight.shape)
            add(f"{original_name}.linear_c{index + 1}.proj.bias", linear.bias.shape)
        add(f"{original_name}.linear_fuse.0.weight", decoder.linear_fuse.weight.shape)
        add(f"{original_name}.linear_fuse.0.bias", decoder.linear_fuse.bias.shape)
        for key, value in decoder.batch_norm.state_dict().items():
            add(f"{original_name}.linear_fuse.1.{key}", value.shape)
        add(f"{original_name}.linear_pred.weight", (outputs, config.decoder_hidden_size, 1, 1))
        add(f"{original_name}.linear_pred.bias", (outputs,))
    for index in (0, 3):
        add(f"detection.{index}.weight", model.detection_head[index].weight.shape)
        add(f"detection.{index}.bias", model.detection_head[index].bias.shape)
    for key in original:
        if key.endswith("num_batches_tracked"):
            original[key] = torch.tensor(7)
    return original


def test_convert_original_state_dict():
    model = tiny_model()
    original = original_state_dict_like(model)
    converted = convert_original_trufor_state_dict(original)
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    block = model.encoder.noise_stages[1].blocks[0].attention
    kv = original["backbone.extra_block2.0.attn.kv.weight"]
    torch.testing.assert_close(block.k_proj.weight, kv[:32])
    torch.testing.assert_close(block.v_proj.weight, kv[32:])
    pred_w, pred_b = original["decode_head.linear_pred.weight"], original["decode_head.linear_pred.bias"]
    torch.testing.assert_close(model.anomaly_decoder.classifier.weight[0], pred_w[1] - pred_w[0])
    torch.testing.assert_close(model.anomaly_decoder.classifier.bias[0], pred_b[1] - pred_b[0])
    with pytest.raises(ValueError, match="unknown TruFor parameter"):
        convert_original_trufor_state_dict({"backbone.head.weight": torch.zeros(1)})
