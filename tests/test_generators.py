"""Generator networks (m3d.models) and tampering pipelines (m3d.pipelines): tiny configs, CPU."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from m3d.data.ct import CTVolume
from m3d.models import (
    CycleGAN3DDiscriminator,
    CycleGAN3DGenerator,
    PatchDiscriminator3D,
    Pix2Pix3DGenerator,
    UNet3DModel,
)
from m3d.pipelines import (
    CycleGAN3DPipeline,
    M3DInpaintPipeline,
    M3DPipelineOutput,
    NoduleMaskBank,
    Pix2Pix3DPipeline,
    default_scheduler,
    inference_scheduler,
    load_pipeline,
)
from m3d.tamper.cube import CUBE_SIZE, TamperLocationError, extract_cube, hole_mask, hu_to_unit, paste_cube, unit_to_hu
from m3d.tamper.touch_up import hole_feather

HOLE = torch.from_numpy(hole_mask())[None, None]
PIPELINES = {
    "ddpm": (M3DInpaintPipeline, "unet", ["m3d.models.unet3d", "UNet3DModel"]),
    "pix2pix": (Pix2Pix3DPipeline, "network", ["m3d.models.pix2pix3d", "Pix2Pix3DGenerator"]),
    "cyclegan": (CycleGAN3DPipeline, "network", ["m3d.models.cyclegan3d", "CycleGAN3DGenerator"]),
}


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere (the zero-initialised output layers would hide a failed load)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def tiny_pipeline(kind: str, task: str = "inject"):
    cls, component, _ = PIPELINES[kind]
    pipe = cls.from_preset("tiny", task=task)
    randomize(getattr(pipe, component))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_cubes(count: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((count, 1) + (CUBE_SIZE,) * 3, generator=generator) * 2 - 1


def phantom() -> CTVolume:
    """Body (+40 HU) in air with two lungs (-850 HU, mild noise); 40 x 96 x 96 at 1 x 1.5 x 1.5 mm."""
    rng = np.random.default_rng(0)
    hu = np.full((40, 96, 96), -1000.0)
    hu[:, 6:90, 2:94] = 40
    hu[:, 16:80, 8:44] = -850
    hu[:, 16:80, 52:88] = -850
    hu += rng.normal(0, 10, hu.shape)
    return CTVolume(hu, (1.0, 1.5, 1.5), (-72.0, -72.0, -20.0))


def call(pipe, *args, **kwargs):
    if isinstance(pipe, M3DInpaintPipeline):
        kwargs.setdefault("num_inference_steps", 3)
    return pipe(*args, progress=False, **kwargs)


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    """Pipelines saved once, early; later tests reload them with a fresh `from_pretrained`."""
    root = tmp_path_factory.mktemp("pipelines")
    folders = {}
    for kind in PIPELINES:
        pipe = tiny_pipeline(kind, task="remove")
        reference = call(pipe, random_cubes(), generator=torch.Generator().manual_seed(3)).cubes
        pipe.save_pretrained(root / kind)
        folders[kind] = (root / kind, reference)
    return folders


# -- networks ------------------------------------------------------------------------------------
def test_every_network_has_every_cli_preset():
    """One preset mechanism: train-generator's --preset choices are exactly the keys of each network's
    ``presets``, each builds its network, and an unknown name is a one-line error naming the choices."""
    from m3d.train.train_generator import PRESET_CHOICES

    for network in (
        UNet3DModel,
        Pix2Pix3DGenerator,
        PatchDiscriminator3D,
        CycleGAN3DGenerator,
        CycleGAN3DDiscriminator,
    ):
        assert set(network.presets) == set(PRESET_CHOICES), network.__name__
        for preset in ("tiny", "demo"):
            model = network.from_preset(preset)
            assert isinstance(model, network)
            assert all(model.config[key] == value for key, value in network.presets[preset].items())
        with pytest.raises(ValueError, match="preset must be one of reference, default, demo, tiny; got 'huge'"):
            network.from_preset("huge")


def test_unet_shapes_and_timesteps():
    unet = randomize(UNet3DModel.from_preset("tiny")).eval()
    x = torch.randn(2, 3, 32, 32, 32)
    with torch.no_grad():
        out = unet(x, 10).sample
        per_sample = unet(x, torch.tensor([10, 10])).sample
        other_t = unet(x, torch.tensor([10, 500])).sample
    assert out.shape == (2, 1, 32, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, per_sample)
    assert not torch.allclose(other_t[1], out[1]) and torch.allclose(other_t[0], out[0], atol=1e-6)
    assert isinstance(unet(x, 3, return_dict=False), tuple)
    with pytest.raises(ValueError, match="divisible"):
        unet(torch.randn(1, 3, 31, 32, 32), 1)
    assert UNet3DModel().config.block_out_channels == (64, 128, 256)


def test_unet_untrained_predicts_zero_noise():
    unet = UNet3DModel.from_preset("tiny")  # zero-initialised output convolution
    assert unet(torch.randn(1, 3, 32, 32, 32), 7).sample.abs().max() == 0


def test_unet_bf16_and_channels_last_3d():
    unet = randomize(UNet3DModel.from_preset("tiny")).eval()
    x = torch.randn(1, 3, 32, 32, 32)
    with torch.no_grad():
        reference = unet(x, 100).sample
        channels_last = unet.to(memory_format=torch.channels_last_3d)(
            x.to(memory_format=torch.channels_last_3d), 100
        ).sample
        bf16 = unet.to(torch.bfloat16)(x.to(torch.bfloat16), 100).sample
    torch.testing.assert_close(channels_last, reference, rtol=1e-4, atol=1e-4)
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    assert (bf16.float() - reference).abs().max() < 0.1 * reference.abs().max() + 0.05


def test_unet_gradient_checkpointing_matches():
    unet = randomize(UNet3DModel.from_preset("tiny"))
    x = torch.randn(1, 3, 32, 32, 32)
    plain = unet(x, 5).sample
    unet.enable_gradient_checkpointing()
    checkpointed = unet(x, 5).sample
    checkpointed.mean().backward()
    torch.testing.assert_close(plain, checkpointed)
    assert unet.conv_in.weight.grad is not None


@pytest.mark.parametrize("in_channels", [1, 2, 3])
@pytest.mark.parametrize("norm_type", ["batch", "instance"])
def test_pix2pix_generator_shapes(in_channels, norm_type):
    generator = Pix2Pix3DGenerator(in_channels=in_channels, gf=4, norm_type=norm_type)
    x = torch.randn(2, in_channels, 32, 32, 32)
    out = generator(x).sample  # training mode (batch statistics, dropout)
    assert out.shape == (2, 1, 32, 32, 32) and out.abs().max() <= 1
    generator.eval()
    with torch.no_grad():
        assert torch.equal(generator(x).sample, generator(x).sample)  # eval: no dropout
        seeded = [generator(x, dropout_generator=torch.Generator().manual_seed(1)).sample for _ in range(2)]
        other = generator(x, dropout_generator=torch.Generator().manual_seed(2)).sample
    assert torch.equal(*seeded) and not torch.equal(seeded[0], other)


@pytest.mark.parametrize("input_skip", [False, True])
def test_pix2pix_input_skip_is_a_full_resolution_path(input_skip):
    """With the U-Net's own layers silenced, only ``input_skip`` lets a one-voxel change of the input reach the
    output, and there only near that voxel (the output convolution's 4^3 reach)."""
    generator = Pix2Pix3DGenerator(in_channels=3, gf=4, input_skip=input_skip, upsample_mode="trilinear").eval()
    with torch.no_grad():
        for parameter in [*generator.down.parameters(), *generator.up.parameters()]:
            parameter.zero_()
        generator.conv_out[1].weight.normal_(0, 0.1)
        x = torch.zeros(1, 3, 32, 32, 32)
        poked = x.clone()
        poked[0, 2, 16, 16, 16] = 1.0
        change = (generator(poked).sample - generator(x).sample).abs()[0, 0]
    assert (change.max() > 0) == input_skip
    changed = torch.nonzero(change > 0)
    assert ((changed - 16).abs() <= 2).all()


def test_discriminators_give_2x2x2_patches():
    x = torch.randn(2, 1, 32, 32, 32)
    conditional = PatchDiscriminator3D(df=4)
    assert conditional(x, x).shape == (2, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="input channels"):
        conditional(x)
    cycle = CycleGAN3DDiscriminator(df=4)
    assert cycle(x).shape == (2, 1, 2, 2, 2)
    assert cycle.config.norm_type == "instance" and cycle.config.activation_before_norm is False


def test_cyclegan_generator_shapes_and_dtype():
    generator = CycleGAN3DGenerator.from_preset("tiny")
    out = generator(torch.randn(1, 1, 32, 32, 32)).sample
    assert out.shape == (1, 1, 32, 32, 32) and out.dtype == torch.float32 and out.abs().max() <= 1
    with torch.no_grad():
        bf16 = generator.to(torch.bfloat16)(torch.randn(1, 1, 32, 32, 32, dtype=torch.bfloat16)).sample
    assert bf16.dtype == torch.bfloat16


def test_cyclegan_dropout_is_seeded_noise_at_inference_and_keeps_the_weight_names():
    """The residual blocks' dropout: on in training, off in eval mode unless a ``dropout_generator`` is given (same
    seed, same output); a network with dropout has the weight names of one without, so either loads the other's."""
    torch.manual_seed(0)
    plain = CycleGAN3DGenerator(ngf=4, n_blocks=2).eval()
    dropped = CycleGAN3DGenerator(ngf=4, n_blocks=2, dropout=0.5).eval()
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(dropped(x).sample, plain(x).sample)  # eval: no dropout
        seeded = [dropped(x, dropout_generator=torch.Generator().manual_seed(1)).sample for _ in range(2)]
        other = dropped(x, dropout_generator=torch.Generator().manual_seed(2)).sample
        per_item = dropped(x, dropout_generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).sample
        unchanged = plain(x, dropout_generator=torch.Generator().manual_seed(1)).sample
    assert torch.equal(*seeded) and (seeded[0] - other).abs().max() > 1e-3
    assert not torch.equal(per_item, seeded[0])
    torch.testing.assert_close(unchanged, plain(x).sample)  # no dropout: the generator changes nothing
    with torch.no_grad():
        trained = dropped.train()(x).sample
    assert (trained - plain(x).sample).abs().max() > 1e-3


def nyquist_power_fraction(cube: np.ndarray) -> float:
    """Share of a cube's power spectrum (mean removed) at the Nyquist frequency of any axis."""
    power = np.abs(np.fft.fftn(cube - cube.mean())) ** 2
    n = cube.shape[0]
    index = np.rint(np.fft.fftfreq(n) * n)
    at_nyquist = (np.abs(np.stack(np.meshgrid(index, index, index, indexing="ij"))) == n // 2).any(0)
    return float(power[at_nyquist].sum() / power.sum())


def test_cyclegan_upsampling_prints_no_checkerboard():
    """A random CycleGAN generator on a smooth cube: the output's period-2 power is tiny (resize +
    conv upsampling). With CycleGAN's stride-2 ConvTranspose3d(3^3) in its place it is 0.27."""
    torch.manual_seed(0)
    generator = CycleGAN3DGenerator(ngf=8, n_blocks=1).eval()
    axis = torch.linspace(-1, 1, 32)
    smooth = 0.5 * axis[:, None, None] + 0.3 * torch.sin(3 * axis)[None, :, None] + 0.05 * torch.randn(32, 32, 32)
    with torch.no_grad():
        out = generator(smooth[None, None]).sample[0, 0, 4:-4, 4:-4, 4:-4].numpy()  # away from the padding
    assert nyquist_power_fraction(out) < 0.02


def test_cyclegan_skip_connections_add_wiring_not_weights(tmp_path):
    """``skip_connections`` keeps CycleGAN's parameters (the plain generator's state dict loads) and changes what
    the generator computes; the option round-trips through save/load."""
    torch.manual_seed(0)
    plain = CycleGAN3DGenerator(ngf=4, n_blocks=1, in_channels=3).eval()
    skipped = CycleGAN3DGenerator(ngf=4, n_blocks=1, in_channels=3, skip_connections=True).eval()
    skipped.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 32, 32, 32)
    assert (skipped(x).sample - plain(x).sample).abs().max() > 1e-3
    skipped.save_pretrained(tmp_path / "skipped")
    loaded = CycleGAN3DGenerator.from_pretrained(tmp_path / "skipped").eval()
    assert loaded.config.skip_connections is True and torch.allclose(loaded(x).sample, skipped(x).sample)


def test_pix2pix_trilinear_upsampling_halves_the_period_2_texture():
    """One random Pix2Pix generator's weights on a smooth cube: with CT-GAN's nearest-neighbour
    upsampling the output holds over twice the period-2 power it holds with trilinear upsampling
    (the demo and default presets)."""
    torch.manual_seed(0)
    nearest = Pix2Pix3DGenerator(gf=8, dropout=0.0).eval()
    trilinear = Pix2Pix3DGenerator(gf=8, dropout=0.0, upsample_mode="trilinear").eval()
    trilinear.load_state_dict(nearest.state_dict())
    axis = torch.linspace(-1, 1, 32)
    smooth = 0.5 * axis[:, None, None] + 0.3 * torch.sin(3 * axis)[None, :, None] + 0.05 * torch.randn(32, 32, 32)
    with torch.no_grad():
        fractions = [
            nyquist_power_fraction(g(smooth[None, None]).sample[0, 0, 4:-4, 4:-4, 4:-4].numpy())
            for g in (nearest, trilinear)
        ]
    assert fractions[0] > 2 * fractions[1]


def test_pix2pix_rejects_unknown_upsample_mode():
    with pytest.raises(ValueError, match="upsample_mode must be one of"):
        Pix2Pix3DGenerator(upsample_mode="bicubic")


def test_network_round_trip(tmp_path):
    for model in (Pix2Pix3DGenerator(gf=4), PatchDiscriminator3D(df=4), CycleGAN3DDiscriminator(df=4)):
        randomize(model).eval()
        model.save_pretrained(tmp_path / type(model).__name__)
        loaded = type(model).from_pretrained(tmp_path / type(model).__name__).eval()
        public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
        assert public(loaded.config) == public(model.config)
        x = torch.randn(2, model.config.in_channels, 32, 32, 32)
        with torch.no_grad():
            assert torch.equal(_out(loaded, x), _out(model, x))


def _out(model, x):
    result = model(x)
    return result.sample if hasattr(result, "sample") else result


# -- pipelines -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(PIPELINES))
def test_pipeline_round_trip_from_saved_folder(kind, saved_folders):
    cls, component, module_path = PIPELINES[kind]
    folder, reference = saved_folders[kind]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["m3d_pipeline", cls.__name__] and index[component] == module_path
    assert index["task"] == "remove"
    for loaded in (cls.from_pretrained(folder), load_pipeline(folder)):
        assert type(loaded) is cls and loaded.config.task == "remove"
        loaded.set_progress_bar_config(disable=True)
        again = call(loaded, random_cubes(), generator=torch.Generator().manual_seed(3)).cubes
        np.testing.assert_array_equal(again, reference)


def test_ddpm_same_seed_same_cube_and_batching_invariance():
    pipe = tiny_pipeline("ddpm")
    cubes = random_cubes(3)
    first = call(pipe, cubes, generator=torch.Generator().manual_seed(0)).cubes
    second = call(pipe, cubes, generator=torch.Generator().manual_seed(0)).cubes
    other = call(pipe, cubes, generator=torch.Generator().manual_seed(1)).cubes
    rebatched = call(pipe, cubes, generator=torch.Generator().manual_seed(0), batch_size=1).cubes
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)
    np.testing.assert_allclose(rebatched, first, atol=1e-4)
    per_cube = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    listed = call(pipe, cubes, generator=per_cube).cubes
    alone = call(pipe, cubes[1:2], generator=[torch.Generator().manual_seed(6)]).cubes
    np.testing.assert_allclose(listed[1:2], alone, atol=1e-4)
    with pytest.raises(ValueError, match="generators"):
        call(pipe, cubes, generator=per_cube[:2])


@pytest.mark.parametrize(
    "scheduler",
    [
        DDPMScheduler.from_config(default_scheduler().config),
        DDIMScheduler.from_config(default_scheduler().config),
        DPMSolverMultistepScheduler.from_config(default_scheduler().config, algorithm_type="dpmsolver++"),
    ],
    ids=["ddpm", "ddim", "dpmsolver++"],
)
def test_every_scheduler_keeps_the_known_region(scheduler):
    pipe = tiny_pipeline("ddpm")
    pipe.scheduler = scheduler
    cubes = random_cubes(2)
    out = call(pipe, cubes, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt")
    filled = out.cubes
    assert isinstance(filled, torch.Tensor) and filled.shape == cubes.shape and filled.dtype == torch.float32
    known = ~HOLE.expand_as(cubes)
    assert torch.equal(filled[known], cubes[known])
    assert not torch.equal(filled[~known], cubes[~known])
    assert torch.isfinite(filled).all() and filled.abs().max() <= 1
    assert all(np.array_equal(mask, hole_mask()) for mask in out.masks)


def test_scheduler_swaps_keep_the_task(saved_folders):
    folder, _ = saved_folders["ddpm"]
    ddim = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    loaded = M3DInpaintPipeline.from_pretrained(folder, scheduler=ddim)
    assert isinstance(loaded.scheduler, DDIMScheduler) and loaded.config.task == "remove"
    piped = M3DInpaintPipeline.from_pipe(loaded, scheduler=DDPMScheduler.from_config(loaded.scheduler.config))
    assert isinstance(piped.scheduler, DDPMScheduler) and piped.config.task == "remove"
    assert default_scheduler().config.num_train_timesteps == 2000


def test_bf16_pipeline_runs(saved_folders):
    folder, _ = saved_folders["ddpm"]
    pipe = M3DInpaintPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    cubes = random_cubes(1)
    out = call(pipe, cubes, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").cubes
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    known = ~HOLE.expand_as(cubes)
    assert torch.equal(out[known], cubes[known])


def test_gan_pipelines_fill_only_the_hole_unless_asked():
    cubes = random_cubes(2)
    for kind in ("pix2pix", "cyclegan"):
        pipe = tiny_pipeline(kind)
        raw = call(pipe, cubes, touch_up=False)
        kept = raw.cubes
        np.testing.assert_array_equal(kept[:, :, ~hole_mask()], cubes.numpy()[:, :, ~hole_mask()])
        whole = call(pipe, cubes, keep_context=False)
        np.testing.assert_array_equal(whole.cubes[:, :, hole_mask()], kept[:, :, hole_mask()])
        assert whole.masks[0].all()
        np.testing.assert_array_equal(raw.replaced[0], hole_mask())
        assert whole.replaced[0].all()
        with pytest.raises(ValueError, match="keep_context"):
            call(pipe, cubes, keep_context=False, touch_up=True)
    pix2pix = tiny_pipeline("pix2pix")
    a, b = (call(pix2pix, cubes, stochastic=True, generator=torch.Generator().manual_seed(s)).cubes for s in (0, 0))
    c = call(pix2pix, cubes, stochastic=True, generator=torch.Generator().manual_seed(1)).cubes
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_cyclegan_with_dropout_samples_with_it_when_stochastic():
    """``stochastic=True`` turns on the residual blocks' dropout, seeded per cube by ``generator``; off, the
    network is deterministic."""
    cubes = random_cubes(2)
    pipe = CycleGAN3DPipeline(network=CycleGAN3DGenerator.from_preset("tiny", dropout=0.5), task="remove")
    randomize(pipe.network)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.stochastic is False
    draws = [call(pipe, cubes, stochastic=True, touch_up=False, generator=torch.Generator().manual_seed(s)).cubes
             for s in (0, 0, 1)]  # fmt: skip
    np.testing.assert_array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], draws[2])
    off = [call(pipe, cubes, touch_up=False, generator=torch.Generator().manual_seed(s)).cubes for s in (0, 1)]
    np.testing.assert_array_equal(*off)


def test_a_folder_saved_stochastic_keeps_its_test_time_dropout_by_default(tmp_path):
    """``stochastic`` saved in the config is the call's default (a call may still turn it off); folders saved
    before it load deterministic."""
    cubes = random_cubes(2)
    deterministic = tiny_pipeline("pix2pix")
    assert deterministic.config.stochastic is False
    pipe = Pix2Pix3DPipeline(network=deterministic.network, task="inject", stochastic=True)
    pipe.save_pretrained(tmp_path / "p2p")
    loaded = Pix2Pix3DPipeline.from_pretrained(tmp_path / "p2p")
    assert loaded.config.stochastic is True
    seeded = [call(loaded, cubes, touch_up=False, generator=torch.Generator().manual_seed(s)).cubes for s in (0, 1)]
    assert not np.array_equal(*seeded)
    off = [call(loaded, cubes, touch_up=False, stochastic=False, generator=torch.Generator().manual_seed(s)).cubes
           for s in (0, 1)]  # fmt: skip
    np.testing.assert_array_equal(*off)
    np.testing.assert_array_equal(off[0], call(deterministic, cubes, touch_up=False).cubes)
    index = json.loads((tmp_path / "p2p" / "model_index.json").read_text())
    del index["stochastic"]  # as a folder saved before the option
    (tmp_path / "p2p" / "model_index.json").write_text(json.dumps(index))
    assert Pix2Pix3DPipeline.from_pretrained(tmp_path / "p2p").config.stochastic is False


def test_gan_pipelines_take_no_sampling_steps():
    """One forward pass: the GANs have no ``num_inference_steps`` to ignore."""
    for kind in ("pix2pix", "cyclegan"):
        with pytest.raises(TypeError, match="num_inference_steps"):
            tiny_pipeline(kind)(random_cubes(1), num_inference_steps=3)


def test_pipelines_touch_up_by_default_seeded_per_cube():
    """CT-GAN's touch-ups are on by default: the hole changes, the context does not, the noise follows each
    cube's seed whatever the batching; the DDPM applies them too (its raw fills leave a seam)."""
    lung_hu = -850 + 20 * torch.randn((3, 1) + (CUBE_SIZE,) * 3, generator=torch.Generator().manual_seed(0))
    cubes = hu_to_unit(lung_hu)
    pipe = tiny_pipeline("pix2pix")
    plain = call(pipe, cubes, touch_up=False, generator=torch.Generator().manual_seed(0)).cubes
    touched = call(pipe, cubes, generator=torch.Generator().manual_seed(0)).cubes
    again = call(pipe, cubes, generator=torch.Generator().manual_seed(0), batch_size=1).cubes
    other = call(pipe, cubes, generator=torch.Generator().manual_seed(1)).cubes
    np.testing.assert_array_equal(touched[:, :, ~hole_mask()], cubes.numpy()[:, :, ~hole_mask()])
    assert not np.array_equal(touched, plain)
    np.testing.assert_allclose(again, touched, atol=1e-6)
    assert not np.array_equal(other, touched)
    ddpm = tiny_pipeline("ddpm")
    default = call(ddpm, cubes, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).cubes
    off = call(ddpm, cubes, num_inference_steps=2, generator=torch.Generator().manual_seed(0), touch_up=False).cubes
    assert not np.array_equal(default, off)
    np.testing.assert_array_equal(default[:, :, ~hole_mask()], off[:, :, ~hole_mask()])


def test_task_mismatch_and_bad_inputs_fail_clearly():
    pipe = tiny_pipeline("pix2pix", task="inject")
    with pytest.raises(ValueError, match="trained for task 'inject'"):
        call(pipe, random_cubes(1), task="remove")
    assert isinstance(call(pipe, random_cubes(1), task="inject"), M3DPipelineOutput)
    with pytest.raises(ValueError, match="task must be one of"):
        Pix2Pix3DPipeline(network=Pix2Pix3DGenerator(gf=4), task="delete")
    with pytest.raises(ValueError, match="either"):
        call(pipe)
    with pytest.raises(ValueError, match="volume"):
        call(pipe, random_cubes(1), output_type="volume")
    with pytest.raises(ValueError, match=r"\(B, 1, 32"):
        call(pipe, torch.zeros(1, 1, 16, 16, 16))


@pytest.mark.parametrize("kind, in_channels", [("pix2pix", 3), ("cyclegan", 3), ("ddpm", 4)])
def test_mask_conditioned_pipelines_draw_where_the_nodule_mask_says(kind, in_channels):
    """A network that sees the target nodule mask (the GANs' ``in_channels=3``, the UNet's 4): given masks change
    the output, drawn ones come from each cube's generator (same seed, same cubes), and the inputs are checked."""
    cls, component, _ = PIPELINES[kind]
    pipe = cls.from_preset("tiny", task="inject", in_channels=in_channels)
    randomize(getattr(pipe, component))
    pipe.set_progress_bar_config(disable=True)
    cubes = random_cubes(2)
    seeded = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    drawn = call(pipe, cubes, generator=seeded()).cubes
    np.testing.assert_array_equal(drawn, call(pipe, cubes, generator=seeded()).cubes)
    assert not np.array_equal(drawn, call(pipe, cubes, generator=seeded(), nodule_diameter_mm=5.0).cubes)
    ball = np.broadcast_to(hole_mask((CUBE_SIZE,) * 3, 8), (2, CUBE_SIZE, CUBE_SIZE, CUBE_SIZE))
    with_ball = call(pipe, cubes, generator=seeded(), nodule_masks=ball).cubes
    without = call(pipe, cubes, generator=seeded(), nodule_masks=np.zeros_like(ball)).cubes
    assert not np.array_equal(with_ball, without)
    np.testing.assert_array_equal(with_ball[:, :, ~hole_mask()], without[:, :, ~hole_mask()])
    with pytest.raises(ValueError, match="nodule_masks must be"):
        call(pipe, cubes, nodule_masks=ball[:1])
    with pytest.raises(ValueError, match="fit the hole"):
        call(pipe, cubes, nodule_diameter_mm=25.0)
    with pytest.raises(ValueError, match="not conditioned on a nodule mask"):
        call(tiny_pipeline(kind), cubes, nodule_masks=ball)


def test_a_saved_nodule_mask_bank_loads_and_is_drawn_from(tmp_path):
    pipe = Pix2Pix3DPipeline.from_preset("tiny", task="inject", in_channels=3)
    randomize(pipe.network)
    pipe.set_progress_bar_config(disable=True)
    cubes, seeded = random_cubes(2), lambda: torch.Generator().manual_seed(5)  # noqa: E731
    bank = np.zeros((1, 20, 20, 20), bool)
    bank[0, 7:13, 7:13, 7:13] = True
    pipe.register_modules(nodule_mask_bank=NoduleMaskBank.from_masks(bank))
    pipe.save_pretrained(tmp_path / "saved")
    loaded = Pix2Pix3DPipeline.from_pretrained(tmp_path / "saved", dtype=torch.float16).to(torch.float32)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(loaded.nodule_mask_bank.masks, bank)  # the bit-packed buffer is no float
    from_bank = call(loaded, cubes, generator=seeded(), touch_up=False).cubes
    cube_mask = np.zeros((2, CUBE_SIZE, CUBE_SIZE, CUBE_SIZE), bool)
    cube_mask[:, 13:19, 13:19, 13:19] = True  # the bank's one cube of 6 mm, in the 32^3 cube (any turn)
    given = call(loaded, cubes, generator=seeded(), nodule_masks=cube_mask, touch_up=False).cubes
    np.testing.assert_array_equal(from_bank, given)
    assert not np.array_equal(
        from_bank, call(pipe.__class__(pipe.network, "inject"), cubes, generator=seeded(), touch_up=False).cubes
    )
    loaded.register_modules(nodule_mask_bank=None)
    loaded.save_pretrained(tmp_path / "saved")  # no bank now: none comes back
    assert Pix2Pix3DPipeline.from_pretrained(tmp_path / "saved").nodule_mask_bank is None


def test_the_nodule_mask_bank_is_a_component_a_hub_download_fetches(tmp_path):
    """diffusers downloads a Hub pipeline's ``model_index.json``, its code file and its components' folders only;
    the bank is one of those components, so a copy of just those files draws from the same masks."""
    pipe = CycleGAN3DPipeline.from_preset("tiny", task="inject", in_channels=3)
    masks = np.random.default_rng(0).random((3, 20, 20, 20)) > 0.7
    pipe.register_modules(nodule_mask_bank=NoduleMaskBank.from_masks(masks))
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["nodule_mask_bank"] == ["m3d.pipelines.nodule_mask_bank", "NoduleMaskBank"]
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    for name in ("model_index.json", "m3d_pipeline.py"):
        shutil.copy(tmp_path / "saved" / name, fetched / name)
    for name, entry in index.items():
        if not name.startswith("_") and isinstance(entry, list) and entry[0]:
            shutil.copytree(tmp_path / "saved" / name, fetched / name)
    np.testing.assert_array_equal(load_pipeline(fetched).nodule_mask_bank.masks, masks)
    with pytest.raises(ValueError, match=r"must be \(N, edge, edge, edge\)"):
        NoduleMaskBank.from_masks(masks[0])


@pytest.mark.parametrize("kind", ["ddpm", "pix2pix"])
def test_volume_path_changes_only_the_cube(kind):
    volume = phantom()
    location = volume.voxel_to_world((20, 48, 26))  # in the left lung
    pipe = tiny_pipeline(kind)
    out = call(
        pipe,
        volume=volume,
        locations_lps_mm=location,
        output_type="volume",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.cubes.shape == (1, 1, 32, 32, 32) and len(out.volumes) == 1 and len(out.masks) == 1
    tampered, changed = out.volumes[0], out.masks[0]
    assert isinstance(tampered, CTVolume) and tampered.shape == volume.shape
    assert tampered.spacing_mm == volume.spacing_mm and tampered.origin_mm == volume.origin_mm
    assert changed.any() and np.array_equal(changed, tampered.hu != volume.hu)
    # the 32 mm cube around the location: +-16 voxels in z (1 mm), +-11 in y, x (1.5 mm)
    footprint = np.zeros(volume.shape, bool)
    footprint[20 - 17 : 20 + 17, 48 - 12 : 48 + 12, 26 - 12 : 26 + 12] = True
    np.testing.assert_array_equal(tampered.hu[~footprint], volume.hu[~footprint])
    assert not changed[~footprint].any()


@pytest.mark.parametrize("kind", ["pix2pix", "ddpm"])
def test_a_remover_replaces_the_scan_where_its_output_says(kind):
    """With CT-GAN's touch-ups a removal replaces the scan over the hole's feather (``replaced``), and the tampered
    scan is its cube pasted with those weights."""
    volume = phantom()
    location = volume.voxel_to_world((20, 48, 26))
    pipe = tiny_pipeline(kind, task="remove")
    out = call(pipe, volume=volume, locations_lps_mm=location, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(out.replaced[0], hole_feather())
    site = extract_cube(volume, location)
    generated_hu = np.where(hole_mask(), unit_to_hu(out.cubes[0, 0]), site.hu).astype(np.float32)
    expected, _ = paste_cube(volume, site, generated_hu, replaced=out.replaced[0], grain_rng=None)
    np.testing.assert_array_equal(out.volumes[0].hu, expected.hu)


def test_volume_path_two_locations_and_bad_locations():
    volume = phantom()
    pipe = tiny_pipeline("cyclegan")
    locations = [volume.voxel_to_world((20, 48, 26)), volume.voxel_to_world((20, 48, 70))]
    out = call(pipe, volume=volume, locations_lps_mm=locations, batch_size=1)
    assert out.cubes.shape[0] == 2 and out.masks[0][:, :, :48].any() and out.masks[0][:, :, 48:].any()
    with pytest.raises(TamperLocationError, match="outside the scan"):
        call(pipe, volume=volume, locations_lps_mm=volume.voxel_to_world((20, 48, 200)))
    with pytest.raises(TamperLocationError, match="beyond the scan"):
        call(pipe, volume=volume, locations_lps_mm=volume.voxel_to_world((3, 48, 26)))
    with pytest.raises(TamperLocationError, match="lungs"):
        call(pipe, volume=volume, locations_lps_mm=volume.voxel_to_world((20, 48, 48)))
    forced = call(pipe, volume=volume, locations_lps_mm=volume.voxel_to_world((20, 48, 48)), allow_outside_lung=True)
    assert forced.masks[0].any()
    with pytest.raises(ValueError, match="locations_lps_mm"):
        call(pipe, volume=volume)


def test_saved_sampler_and_default_steps(tmp_path):
    for name, cls in (("ddpm", DDPMScheduler), ("ddim", DDIMScheduler), ("dpmsolver++", DPMSolverMultistepScheduler)):
        scheduler = inference_scheduler(name)
        assert type(scheduler) is cls and scheduler.config.num_train_timesteps == 2000
    with pytest.raises(ValueError, match="sampler must be one of"):
        inference_scheduler("euler")
    pipe = tiny_pipeline("ddpm")
    pipe = M3DInpaintPipeline(unet=pipe.unet, scheduler=inference_scheduler("dpmsolver++"), num_inference_steps=4)
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(tmp_path)
    assert isinstance(loaded.scheduler, DPMSolverMultistepScheduler) and loaded.config.num_inference_steps == 4
    loaded(random_cubes(1), progress=False)  # no steps named: the saved default
    assert len(loaded.scheduler.timesteps) == 4
    with pytest.raises(ValueError, match="num_inference_steps must be positive"):
        M3DInpaintPipeline(unet=pipe.unet, scheduler=default_scheduler(), num_inference_steps=0)
