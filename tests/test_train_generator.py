"""Generator training (m3d.train): site selection, training cubes and augmentations, the three models'
losses, and the Accelerate entry point (checkpoints, exact resumption, Ctrl-C, the saved pipeline).
CPU, tiny preset, synthetic scans built here (the synthetic-phantom source is swapped for them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from m3d.data.ct import CTVolume
from m3d.tamper.cube import CUBE_SIZE, extract_cube, hole_mask, hu_to_unit, unit_to_hu
from m3d.tamper.quality import check_quality, equivalent_diameter_mm, nodule_mask
from m3d.train import cubes as cubes_module
from m3d.train import train_generator as tg
from m3d.train.common import STATE_FILE, complete_checkpoints
from m3d.train.spectral_loss import hole_spectral_loss, spectral_peak_excess
from m3d.train.cubes import (
    Augmentation,
    CubeDataset,
    TrainingCase,
    center_crop,
    passes_quality_check,
    site_matches,
    sites_for_task,
)
from m3d.data.lidc_discovery import lidc_series, xml_series_uid
from m3d.tamper.cube import cut_training_cube

SPACING = (1.25, 0.8, 0.8)
SHAPE = (48, 84, 84)  # 60 x 67 x 67 mm
ORIGIN = (-33.6, -33.6, -30.0)
# (voxel z, y, x), diameter mm, median malignancy, selected for
NODULES = [
    ((24, 30, 30), 14.0, 4.5, "inject"),
    ((24, 30, 54), 12.0, 4.0, "inject"),
    ((24, 54, 30), 12.0, 3.0, None),  # indeterminate
    ((24, 54, 54), 9.0, 5.0, None),  # malignant but not > 10 mm
    ((24, 42, 42), 10.0, 4.0, None),  # exactly 10 mm: not > 10
    ((18, 42, 30), 5.0, 1.5, "remove"),
    ((30, 42, 54), 6.0, 2.0, "remove"),
    ((18, 30, 42), 8.0, 1.0, None),  # exactly 8 mm: not < 8
    ((30, 54, 42), 5.0, 2.5, None),  # not benign enough
    ((30, 30, 42), 11.0, None, None),  # no rating
    ((3, 42, 42), 15.0, 5.0, None),  # cube reaches beyond the scan (z)
]


def synthetic_case(seed: int = 0, case_id: str = "synth", nodules=NODULES) -> TrainingCase:
    """Lung-like noise with a bright sphere per nodule (diameter as given)."""
    rng = np.random.default_rng(seed)
    hu = -850 + rng.normal(0, 25, SHAPE)
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, SPACING)], indexing="ij")
    records = []
    for (cz, cy, cx), diameter, malignancy, _ in nodules:
        inside = (z - cz * SPACING[0]) ** 2 + (y - cy * SPACING[1]) ** 2 + (x - cx * SPACING[2]) ** 2 < (
            diameter / 2
        ) ** 2
        hu[inside] = 40 + rng.normal(0, 25, int(inside.sum()))
        records.append(SimpleNamespace(centroid_zyx=(cz, cy, cx), diameter_mm=diameter, malignancy=malignancy))
    return TrainingCase(case_id, CTVolume(hu, SPACING, ORIGIN), records)


def fake_phantoms(n, *, seed=0, size=128, max_slices=None, task=None, workers=1, native_spacing=False):
    for i in range(n):
        yield synthetic_case(seed + i, f"synth{seed + i}", NODULES[:2] + NODULES[5:7])


@pytest.fixture(scope="module")
def case() -> TrainingCase:
    return synthetic_case()


# -- sites --------------------------------------------------------------------------------------


def test_site_rules():
    assert site_matches("inject", 10.5, 4.0) and not site_matches("inject", 10.0, 5.0)
    assert not site_matches("inject", 20.0, 3.5) and not site_matches("inject", 20.0, None)
    assert site_matches("remove", 7.9, 2.0) and not site_matches("remove", 8.0, 1.0)
    assert not site_matches("remove", 4.0, 2.5) and not site_matches("remove", 4.0, None)
    with pytest.raises(ValueError):
        site_matches("swap", 5.0, 1.0)


@pytest.mark.parametrize("task", ["inject", "remove"])
def test_sites_for_task_picks_the_papers_nodules(case, task):
    sites = sites_for_task([case], task)
    expected = [f"synth/nodule{i}" for i, spec in enumerate(NODULES) if spec[3] == task]
    assert [site.source for site in sites] == expected
    for site in sites:
        number = int(site.source.rsplit("nodule", 1)[1])
        assert np.allclose(site.center_lps_mm, case.volume.voxel_to_world(NODULES[number][0]))
        assert site.volume is case.volume


# -- cubes and augmentations --------------------------------------------------------------------


def test_training_cube_is_the_tamper_cube_grown_by_4mm(case):
    center = case.volume.voxel_to_world((24, 30, 30))
    cube40 = cut_training_cube(case.volume, center)
    assert cube40.shape == (40, 40, 40) and cube40.dtype == np.float32
    cube32 = extract_cube(case.volume, center, allow_outside_lung=True).hu
    np.testing.assert_allclose(center_crop(cube40), cube32, atol=1e-4)
    # near a face: no NaN / air, the nearest scan voxel is repeated
    edge = cut_training_cube(case.volume, case.volume.voxel_to_world((13, 42, 42)))
    assert np.isfinite(edge).all() and edge.min() > -1000


def test_only_kept_sites_train_on_nodules_the_builder_keeps():
    """A solid 14 mm nodule passes the injection keep rule, a ground-glass one of the same size (-600 HU)
    and a solid 6 mm one do not; the subset keeps the records and options of the passing cubes."""
    grid = np.indices((40, 40, 40)) - 19.5
    radius = np.sqrt((grid**2).sum(0))
    lung = np.full((40, 40, 40), -850.0, np.float32)
    solid, ground_glass, small = (
        np.where(radius < r, hu, lung).astype(np.float32) for r, hu in [(7.0, -50.0), (7.0, -600.0), (3.0, -50.0)]
    )
    cubes = np.stack([solid, ground_glass, small])
    assert passes_quality_check(cubes, "inject").tolist() == [True, False, False]
    assert passes_quality_check(cubes, "remove").tolist() == [False, True, True]
    dataset = CubeDataset.from_cubes(cubes, records=[{"source": s} for s in "abc"], seed=3, augment=False)
    kept = dataset.subset(passes_quality_check(cubes, "inject"))
    assert [r["source"] for r in kept.records] == ["a"] and kept.seed == 3 and not kept.augment
    assert np.array_equal(kept.cubes_hu[0], solid)
    with pytest.raises(ValueError, match="none of the sites' nodules passes the quality check"):
        dataset.subset(np.zeros(3, bool))


def test_augmentation_geometry():
    cube = np.arange(40**3, dtype=np.float32).reshape(40, 40, 40)
    np.testing.assert_array_equal(Augmentation(shift=(1, -2, 3)).apply(cube), cube[5:37, 2:34, 7:39])
    turned = Augmentation(shift=(0, 0, -4), flips=(True, False, True), quarter_turns=1).apply(cube)
    np.testing.assert_array_equal(turned, np.rot90(np.flip(cube[4:36, 4:36, 0:32], axis=(0, 2)), 1, axes=(1, 2)))
    with pytest.raises(ValueError):
        Augmentation(shift=(5, 0, 0)).apply(cube)


def test_dataset_items(case):
    dataset = CubeDataset(sites_for_task([case], "inject"), seed=3)
    assert len(dataset) == 2 and dataset.cubes_hu.shape == (2, 40, 40, 40)
    hole = torch.from_numpy(hole_mask())[None]
    for index in range(len(dataset)):
        item = dataset[index]
        assert set(item) == {"full", "masked", "mask", "nodule_mask"}
        crop_hu = dataset.crop(index)
        assert torch.equal(item["nodule_mask"][0], torch.from_numpy(nodule_mask(crop_hu)).float())
        assert item["nodule_mask"].sum() > 500  # the 12-14 mm sphere, as the quality check measures it
        for value in item.values():
            assert value.shape == (1, CUBE_SIZE, CUBE_SIZE, CUBE_SIZE) and value.dtype == torch.float32
        assert item["full"].min() >= -1 and item["full"].max() <= 1
        assert torch.equal(item["mask"], hole.float())
        assert torch.all(item["masked"][hole] == 0)
        assert torch.equal(item["masked"][~hole], item["full"][~hole])
    plain = CubeDataset.from_cubes(dataset.cubes_hu, augment=False)[1]["full"][0].numpy()
    np.testing.assert_allclose(plain, hu_to_unit(center_crop(dataset.cubes_hu[1])), atol=1e-6)


def test_augmentation_is_deterministic_by_seed_epoch_index(case):
    cubes = CubeDataset(sites_for_task([case], "inject")).cubes_hu

    def draw(seed, epoch, shuffle=True):
        dataset = CubeDataset.from_cubes(cubes, seed=seed, shuffle=shuffle, samples_per_epoch=6)
        dataset.set_epoch(epoch)
        return torch.stack([dataset[i]["full"] for i in range(len(dataset))])

    assert torch.equal(draw(0, 0), draw(0, 0))
    assert torch.equal(draw(5, 2), draw(5, 2))
    assert not torch.equal(draw(0, 0), draw(1, 0))
    assert not torch.equal(draw(0, 0), draw(0, 1))
    dataset = CubeDataset.from_cubes(cubes, seed=0, shuffle=True, samples_per_epoch=6)
    assert sorted(dataset.cube_index(i) for i in range(6)) == [0, 0, 0, 1, 1, 1]  # every cube equally often
    assert dataset.augmentation(2) == dataset.augmentation(2) != Augmentation()


# -- case sources -------------------------------------------------------------------------------


def test_phantom_sites_sit_on_their_nodules():
    """The in-memory synthetic scans: sites are the nodules' consensus-mask centroids, in LPS."""
    pytest.importorskip("m3d.data.phantom")
    try:
        (training_case,) = list(cubes_module.iter_phantom_cases(1, seed=0, size=64, max_slices=48, task="inject"))
    except (LookupError, OSError) as error:  # no LIDC annotation database here
        pytest.skip(f"no phantom: {error}")
    volume = training_case.volume
    sites = sites_for_task([training_case], "inject")
    assert sites, [(n.diameter_mm, n.malignancy) for n in training_case.nodules]
    for site in sites:
        nodule = training_case.nodules[int(site.source.rsplit("nodule", 1)[1])]
        assert site.diameter_mm > 10 and site.malignancy >= 4
        mask = nodule.mask_for_volume(volume)
        centroid = volume.voxel_to_world(np.argwhere(mask).mean(axis=0))
        assert np.abs(centroid - site.center_lps_mm).max() < max(volume.spacing_mm)


def _write_dicom(path: Path, series_uid: str) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SeriesInstanceUID = series_uid
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.save_as(path, enforce_file_format=True)


def _write_xml(path: Path, series_uid: str) -> None:
    path.write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n<LidcReadMessage xmlns="http://www.nih.gov">\n<ResponseHeader>\n'
        f"<SeriesInstanceUid>{series_uid}</SeriesInstanceUid>\n</ResponseHeader>\n</LidcReadMessage>\n"
    )


def test_lidc_root_pairs_series_with_their_xml(tmp_path):
    good = tmp_path / "LIDC-IDRI-0001" / "1.2.3" / "1.2.3.4"
    other = tmp_path / "LIDC-IDRI-0001" / "1.2.3" / "1.2.3.5"  # e.g. the CR series with someone else's XML
    for folder in (good, other):
        folder.mkdir(parents=True)
    _write_dicom(good / "000001.dcm", "1.2.3.4")
    _write_xml(good / "069.xml", "1.2.3.4")
    _write_dicom(other / "000001.dcm", "1.2.3.5")
    _write_xml(other / "070.xml", "9.9.9")
    assert xml_series_uid(good / "069.xml") == "1.2.3.4"
    assert lidc_series(tmp_path) == [(good, good / "069.xml", "1.2.3.4")]
    with pytest.raises(FileNotFoundError):
        lidc_series(other.parent.parent.parent / "nothing-here")


# -- losses ------------------------------------------------------------------------------------


def _fixed_batch(case, size: int, count: int) -> dict[str, torch.Tensor]:
    dataset = CubeDataset(sites_for_task([case], "inject") + sites_for_task([case], "remove"), augment=False)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(count)])
    if size == CUBE_SIZE:
        return batch
    window = slice(4, 4 + size)  # 16^3 corner of the cube: some context, mostly hole
    return {k: v[:, :, window, window, window].contiguous() for k, v in batch.items()}


# the demo DDPM's recipe: v-prediction on a 1,000-step cosine schedule, min-SNR-5, hole-only loss
DDPM_CPU_RECIPE = dict(
    prediction_type="v_prediction",
    beta_schedule="squaredcos_cap_v2",
    num_train_timesteps=1000,
    snr_gamma=5.0,
    hole_only=True,
)


@pytest.mark.parametrize(
    "model, size, count, steps, options",
    [
        ("pix2pix", 32, 4, 30, {}),
        ("cyclegan", 32, 2, 10, {}),
        ("cyclegan", 32, 2, 10, {"config_overrides": {"in_channels": 3, "skip_connections": True}}),
        ("ddpm", 16, 4, 30, {}),
        ("ddpm", 16, 4, 30, DDPM_CPU_RECIPE),
        ("ddpm", 16, 4, 30, {**DDPM_CPU_RECIPE, "config_overrides": {"in_channels": 4}}),
    ],
    ids=["pix2pix", "cyclegan", "cyclegan-nodule-mask-skips", "ddpm", "ddpm-v-min-snr", "ddpm-nodule-mask"],
)
def test_a_tiny_models_loss_falls(case, model, size, count, steps, options):
    """A few steps on a fixed batch (fixed dropout, noise and timesteps too) make the loss fall. The
    CycleGAN's discriminators need 32^3 cubes, so it takes fewer, smaller steps (CPU time)."""
    from accelerate import Accelerator

    trainer = tg.make_trainer(model, "inject", "tiny", learning_rate=2e-3, **options)
    trainer.prepare(Accelerator(cpu=True))
    trainer.train()
    batch = _fixed_batch(case, size, count)
    losses = []
    for _ in range(steps):
        torch.manual_seed(0)
        losses.append(float(trainer.step(batch)["loss"]))
        trainer.after_optimizer_step()
    assert all(np.isfinite(losses))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.8 * first, f"{model}: loss {first:.4f} -> {last:.4f}"


def test_a_tiny_mask_conditioned_pix2pix_learns_to_draw_its_nodule_in_the_mask(case):
    """Trained through the real step on two injection and two removal cubes, each with its own nodule's mask, the
    network draws nodule tissue inside each mask and lung outside it: the HU contrast between the two, near 0 before
    training, becomes that of a nodule on lung; and a mask moved elsewhere in the hole moves the nodule."""
    from accelerate import Accelerator

    from m3d.pipelines.common import network_input

    trainer = tg.make_trainer(
        "pix2pix", "inject", "tiny", learning_rate=2e-3, hole_only=True, config_overrides={"in_channels": 3}
    )
    trainer.prepare(Accelerator(cpu=True))
    batch = _fixed_batch(case, CUBE_SIZE, 4)
    inside = batch["nodule_mask"].bool()

    def contrast_hu(nodule_mask: torch.Tensor, where: torch.Tensor) -> float:
        network = trainer.unwrap("generator").eval()
        with torch.no_grad():
            hu = unit_to_hu(network(network_input(batch["masked"], batch["mask"], 3, nodule_mask)).sample)
        trainer.train()
        return float(hu[where].mean() - hu[batch["mask"].bool() & ~where].mean())

    before = contrast_hu(batch["nodule_mask"], inside)
    trainer.train()
    for _ in range(60):
        torch.manual_seed(0)
        trainer.step(batch)
    after = contrast_hu(batch["nodule_mask"], inside)
    assert abs(before) < 100 and after > 400, f"contrast {before:.0f} -> {after:.0f} HU"
    moved = torch.roll(batch["nodule_mask"], shifts=4, dims=4)  # 4 mm along x, still in the hole
    assert contrast_hu(moved, moved.bool() & ~inside) > 200


def test_a_tiny_ddpms_samples_move_toward_its_training_nodules(case, monkeypatch):
    """The demo recipe (v-prediction, cosine schedule, min-SNR-5, hole-only loss) trained 40 steps on the
    two injection cubes; its EMA pipeline, sampled with DPM-Solver++ in 10 steps on the same contexts,
    fills the hole closer to the training nodules than the untrained one does (HU, voxel by voxel). A
    UNet without attention and at half the tiny width keeps it to seconds at 32^3."""
    from accelerate import Accelerator

    from m3d.models import UNet3DModel
    from m3d.pipelines import inference_scheduler

    monkeypatch.setitem(
        UNet3DModel.presets,
        "tiny",
        dict(
            block_out_channels=(4, 8),
            layers_per_block=1,
            attention_levels=(False, False),
            norm_num_groups=4,
            num_head_channels=8,
        ),
    )
    torch.manual_seed(0)
    trainer = tg.make_trainer("ddpm", "inject", "tiny", learning_rate=5e-3, ema_decay=0.9, **DDPM_CPU_RECIPE)
    trainer.prepare(Accelerator(cpu=True))
    trainer.train()
    batch = _fixed_batch(case, CUBE_SIZE, 2)
    hole = torch.from_numpy(hole_mask())
    nodules_hu = unit_to_hu(batch["full"][:, 0][:, hole].numpy())

    def sampled_hole_hu() -> np.ndarray:
        pipe = trainer.pipeline()
        pipe.scheduler = inference_scheduler("dpmsolver++", trainer.scheduler)
        out = pipe(
            batch["full"],
            num_inference_steps=10,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
            progress=False,
        )
        return unit_to_hu(out.cubes[:, 0][:, hole].numpy())

    before = sampled_hole_hu()
    for _ in range(40):
        trainer.step(batch)
        trainer.after_optimizer_step()
    after = sampled_hole_hu()
    error_before, error_after = np.abs(before - nodules_hu).mean(), np.abs(after - nodules_hu).mean()
    assert error_after < 0.7 * error_before, f"hole HU error {error_before:.0f} -> {error_after:.0f}"
    gap_before, gap_after = abs(before.mean() - nodules_hu.mean()), abs(after.mean() - nodules_hu.mean())
    assert gap_after < 0.5 * gap_before, f"hole mean HU gap {gap_before:.0f} -> {gap_after:.0f}"


# -- the entry point ----------------------------------------------------------------------------


def _argv(model: str, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--model", model, "--task", "inject", "--preset", "tiny", "--phantoms", "2", "--output-dir", str(out),
        "--max-steps", str(steps), "--checkpointing-steps", "2", "--batch-size", "2", "--log-every", "1",
        "--no-progress", *extra,
    ]  # fmt: skip


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "logs.jsonl").read_text().splitlines()]


def _weights(out: Path, model: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    component = "unet" if model == "ddpm" else "network"
    return load_file(str(out / "pipeline" / component / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("model", ["pix2pix", "cyclegan", "ddpm"])
def test_checkpoints_resume_and_pipeline(tmp_path, monkeypatch, model):
    from m3d.pipelines import PIPELINE_CLASSES, load_pipeline

    monkeypatch.setattr(cubes_module, "iter_phantom_cases", fake_phantoms)
    run = tmp_path / "run"
    assert tg.main(_argv(model, run, 2)) == 0  # "interrupted" after step 2 ...
    assert tg.main(_argv(model, run, 4, "--resume-from-checkpoint", "latest")) == 0  # ... and resumed
    checkpoints = complete_checkpoints(run)
    assert [p.name for p in checkpoints] == ["checkpoint_0", "checkpoint_1"]
    assert [json.loads((p / STATE_FILE).read_text())["global_step"] for p in checkpoints] == [2, 4]
    assert _steps(run) == [1, 2, 3, 4]
    if model == "ddpm":
        assert (checkpoints[0] / "ema_unet" / "ema.safetensors").is_file()

    if model != "cyclegan":  # the resumed run ends exactly where an uninterrupted one does
        straight = tmp_path / "straight"
        assert tg.main(_argv(model, straight, 4, "--checkpointing-steps", "0")) == 0
        assert not (straight / "checkpoints").exists()
        resumed, reference = _weights(run, model), _weights(straight, model)
        assert resumed.keys() == reference.keys()
        for key in reference:
            assert torch.equal(resumed[key], reference[key]), key

    pipe = load_pipeline(run / "pipeline")
    expected = {"pix2pix": "Pix2Pix3DPipeline", "cyclegan": "CycleGAN3DPipeline", "ddpm": "M3DInpaintPipeline"}[model]
    assert isinstance(pipe, PIPELINE_CLASSES[expected]) and pipe.config.task == "inject"
    cube = torch.rand((1, 1, 32, 32, 32), generator=torch.Generator().manual_seed(0)) * 2 - 1
    kwargs = {"num_inference_steps": 2} if model == "ddpm" else {}
    out = pipe(cube, progress=False, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).cubes
    hole = torch.from_numpy(hole_mask())
    assert out.shape == cube.shape and torch.isfinite(out).all()
    assert torch.equal(out[0, 0][~hole], cube[0, 0][~hole])


def test_gan_ema_is_checkpointed_resumed_and_saved(tmp_path, monkeypatch):
    """--ema-decay gives a GAN's generator an EMA: checkpointed (``ema_generator/``) and restored, so a resumed
    run ends where an uninterrupted one does; the saved pipeline holds its weights (BatchNorm statistics from
    the trained network). Another decay on resume, or one outside (0, 1), is one clear error."""
    from safetensors.torch import load_file

    monkeypatch.setattr(cubes_module, "iter_phantom_cases", fake_phantoms)
    run, straight, ema = tmp_path / "run", tmp_path / "straight", ["--ema-decay", "0.5"]
    assert tg.main(_argv("pix2pix", run, 2, *ema)) == 0
    assert tg.main(_argv("pix2pix", run, 4, *ema, "--resume-from-checkpoint", "latest")) == 0
    assert tg.main(_argv("pix2pix", straight, 4, *ema, "--checkpointing-steps", "0")) == 0
    saved, uninterrupted = _weights(run, "pix2pix"), _weights(straight, "pix2pix")
    assert saved.keys() == uninterrupted.keys()
    assert all(torch.equal(saved[key], uninterrupted[key]) for key in saved)

    last = complete_checkpoints(run)[-1]
    shadow = load_file(str(last / "ema_generator" / "ema.safetensors"))
    trained = load_file(str(last / "model.safetensors"))
    assert {k for k in saved if k not in shadow} == {k for k in trained if "running" in k or "batches" in k}
    for key, value in saved.items():
        assert torch.equal(value, (shadow if key in shadow else trained)[key]), key
    assert any(not torch.equal(shadow[key], trained[key]) for key in shadow)  # an average, not the last weights

    assert tg.main(_argv("pix2pix", run, 6, "--ema-decay", "0.9", "--resume-from-checkpoint", "latest")) == 2
    assert tg.main(_argv("pix2pix", run, 6, "--resume-from-checkpoint", "latest")) == 2
    assert tg.main(_argv("cyclegan", tmp_path / "bad", 2, "--ema-decay", "1")) == 2


def test_lr_decay_steps_lower_every_rate_linearly_over_the_last_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cubes_module, "iter_phantom_cases", fake_phantoms)
    run = tmp_path / "run"
    assert tg.main(_argv("pix2pix", run, 4, "--lr-decay-steps", "2")) == 0
    base, d_base = tg.DEFAULT_LR["pix2pix"], tg.DEFAULT_D_LR["pix2pix"]
    logged = [json.loads(line)["lr"] for line in (run / "logs.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([base, base, base, base / 2])
    last = complete_checkpoints(run)[-1]  # the optimisers as saved at step 4: both rates halved
    rates = sorted(
        group["lr"]
        for path in last.glob("optimizer*.bin")
        for group in torch.load(path, weights_only=True)["param_groups"]
    )
    assert rates == pytest.approx(sorted([base / 2, d_base / 2]))
    assert tg.main(_argv("pix2pix", tmp_path / "bad", 4, "--lr-decay-steps", "5")) == 2
    assert "--lr-decay-steps must be between 0 and --max-steps (4); got 5" in capsys.readouterr().err


def test_saved_pipeline_dtype_and_sampler(tmp_path, monkeypatch):
    from diffusers import DPMSolverMultistepScheduler

    from m3d.pipelines import load_pipeline

    monkeypatch.setattr(cubes_module, "iter_phantom_cases", fake_phantoms)
    out = tmp_path / "run"
    extra = (
        "--checkpointing-steps",
        "0",
        "--save-dtype",
        "fp16",
        "--sampler",
        "dpmsolver++",
        "--inference-steps",
        "3",
    )
    assert tg.main(_argv("ddpm", out, 1, *extra)) == 0
    assert {v.dtype for v in _weights(out, "ddpm").values()} == {torch.float16}
    pipe = load_pipeline(out / "pipeline")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and pipe.config.num_inference_steps == 3
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float32}


def test_test_time_dropout_and_the_spectral_loss_on_the_command_line(tmp_path, monkeypatch):
    """--lambda-spectral and --lambda-spectral-peak train and log their losses; --test-time-dropout saves a
    pix2pix pipeline that generates with its dropout on by default."""
    from m3d.pipelines import load_pipeline

    monkeypatch.setattr(cubes_module, "iter_phantom_cases", fake_phantoms)
    out = tmp_path / "run"
    extra = ("--checkpointing-steps", "0", "--lambda-spectral", "1", "--lambda-spectral-peak", "1")
    assert tg.main(_argv("pix2pix", out, 2, *extra, "--test-time-dropout")) == 0
    logged = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert all(np.isfinite(row["loss_spectral"]) and np.isfinite(row["loss_spectral_peak"]) for row in logged)
    assert load_pipeline(out / "pipeline").config.stochastic is True


def test_a_cyclegan_trained_with_dropout_saves_a_stochastic_pipeline(tmp_path, monkeypatch):
    """--test-time-dropout with a cyclegan that has dropout saves a pipeline that samples with it by default."""
    from m3d.pipelines import load_pipeline

    monkeypatch.setattr(cubes_module, "iter_phantom_cases", fake_phantoms)
    out = tmp_path / "run"
    extra = ("--checkpointing-steps", "0", "--config-overrides", "dropout=0.5", "--test-time-dropout")
    assert tg.main(_argv("cyclegan", out, 1, *extra)) == 0
    pipe = load_pipeline(out / "pipeline")
    assert pipe.config.stochastic is True and pipe.network.config.dropout == 0.5


def test_hole_only_losses_ignore_the_generated_context(case):
    from accelerate import Accelerator

    trainer = tg.make_trainer("pix2pix", "inject", "tiny", hole_only=True, lambda_spectral=1.0)
    trainer.prepare(Accelerator(cpu=True))
    batch = next(iter(torch.utils.data.DataLoader(CubeDataset(sites_for_task([case], "inject")), batch_size=2)))
    generator = trainer.networks["generator"]
    perfect_hole = torch.where(batch["mask"].bool(), batch["full"], -1.0).requires_grad_()  # garbage context
    generator.forward = lambda sample, **_: SimpleNamespace(sample=perfect_hole)
    losses = trainer.step(batch)
    assert float(losses["loss_l1"]) == 0.0 and float(losses["loss_spectral"]) == 0.0


def test_hole_spectral_loss_sees_a_smooth_fill_and_a_painted_pattern_but_not_the_phase():
    """`hole_spectral_loss`: zero for the real batch itself; a fill without the real texture, or with a z-stripe
    the real holes lack, costs more than new noise of the real texture; a stripe the real holes have costs as
    little at another phase; the loss has a gradient, within the high-pass blur's reach of the hole only."""
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(hole_mask()).float()[None, None].expand(4, 1, -1, -1, -1)

    def batch(noise_sd: float, stripe: float = 0.0, phase: float = 0.0) -> torch.Tensor:
        cubes = rng.normal(0.0, noise_sd, (4, 1) + (CUBE_SIZE,) * 3)
        cubes += stripe * np.cos(2 * np.pi * np.arange(CUBE_SIZE) / 2.5 + phase)[None, None, :, None, None]
        return torch.tensor(cubes, dtype=torch.float32)

    real, real_striped = batch(0.02), batch(0.02, stripe=0.2)
    assert float(hole_spectral_loss(real, real, mask)) == 0.0
    fresh = float(hole_spectral_loss(batch(0.02), real, mask))
    smooth = float(hole_spectral_loss(batch(0.002), real, mask))
    striped = float(hole_spectral_loss(batch(0.02, stripe=0.2), real, mask))
    other_phase = float(hole_spectral_loss(batch(0.02, stripe=0.2, phase=2.0), real_striped, mask))
    assert fresh < 0.4 and smooth > fresh + 2.0 and striped > fresh + 0.2 and other_phase < fresh + 0.05
    generated = batch(0.002).requires_grad_()
    hole_spectral_loss(generated, real, mask).backward()
    near_the_hole = hole_mask(hole_size=20 + 2 * 4)  # the high-pass blur reaches 4 voxels
    assert generated.grad[:, :, hole_mask()].abs().sum() > 0 and generated.grad[:, :, ~near_the_hole].abs().sum() == 0


def test_spectral_peak_excess_sees_a_lattice_the_ring_average_does_not():
    """`spectral_peak_excess`: zero for the real batch itself; an in-plane lattice on the real texture, which
    leaves the ring average almost as it is, stands far above what fresh noise of the real texture gives, and a
    smoother fill does not lower it (each spectrum is measured against its own rings); the loss pulls on the
    generated holes."""
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(hole_mask()).float()[None, None].expand(8, 1, -1, -1, -1)
    real = torch.tensor(rng.normal(0.0, 0.02, (8, 1) + (CUBE_SIZE,) * 3), dtype=torch.float32)
    fresh = torch.tensor(rng.normal(0.0, 0.02, (8, 1) + (CUBE_SIZE,) * 3), dtype=torch.float32)
    lattice = fresh + 0.01 * torch.cos(2 * np.pi * torch.arange(CUBE_SIZE) / 3.3)[None, None, None, :, None]
    assert float(spectral_peak_excess(real, real, mask)) == 0.0
    fresh_excess, lattice_excess = (float(spectral_peak_excess(x, real, mask)) for x in (fresh, lattice))
    assert fresh_excess < 0.3 and lattice_excess > fresh_excess + 1.0
    assert float(spectral_peak_excess(lattice / 10, real, mask)) == pytest.approx(lattice_excess, rel=1e-3)
    assert float(hole_spectral_loss(lattice, real, mask)) < 0.3  # what the ring average alone sees of it
    generated = lattice.clone().requires_grad_()
    spectral_peak_excess(generated, real, mask).backward()
    assert generated.grad[:, :, hole_mask()].abs().sum() > 0


@pytest.mark.parametrize("full_cycle_weight", [0.0, 1.0])
def test_full_cycle_weight_drops_the_redraw_cycle(case, full_cycle_weight):
    """With a reverse generator that re-masks perfectly, the masked -> full -> masked cycle costs nothing,
    so what is left of the cycle loss is G redrawing a masked-out nodule: none at --full-cycle-weight 0."""
    from accelerate import Accelerator

    trainer = tg.make_trainer(
        "cyclegan",
        "inject",
        "tiny",
        hole_only=True,
        full_cycle_weight=full_cycle_weight,
        lambda_spectral=1.0,
        lambda_spectral_peak=1.0,
    )
    trainer.prepare(Accelerator(cpu=True))
    batch = next(iter(torch.utils.data.DataLoader(CubeDataset(sites_for_task([case], "inject")), batch_size=2)))
    trainer.networks["reverse_generator"].forward = lambda sample, **_: SimpleNamespace(sample=batch["masked"])
    losses = trainer.step(batch)
    loss_cycle = float(losses["loss_cycle"])
    assert loss_cycle == 0.0 if full_cycle_weight == 0 else loss_cycle > 0.01
    assert torch.isfinite(losses["loss_spectral"]) and torch.isfinite(losses["loss_spectral_peak"])  # asked for


@pytest.mark.parametrize("model, in_channels", [("pix2pix", 3), ("cyclegan", 3), ("ddpm", 4)])
def test_init_from_widens_a_trained_network_for_a_nodule_mask(tmp_path, model, in_channels):
    """--init-from a network without the nodule-mask input into one with it: the new input channel starts at zero
    weight, so the widened network computes what the saved one did whatever the mask, and training starts there."""
    from m3d.pipelines import load_pipeline

    trainer = tg.make_trainer(model, "inject", "tiny")
    trainer.pipeline().save_pretrained(tmp_path / "saved")
    saved = getattr(load_pipeline(tmp_path / "saved"), trainer.pipeline_component).eval()
    widened = tg.make_trainer(model, "inject", "tiny", config_overrides={"in_channels": in_channels})
    widened.init_from(tmp_path / "saved")
    network = widened.networks[widened.network_name].eval()
    base = saved.config.in_channels
    assert base < in_channels
    x = torch.rand(2, base, CUBE_SIZE, CUBE_SIZE, CUBE_SIZE)
    extra = () if model != "ddpm" else (torch.tensor([10, 500]),)
    with torch.no_grad():
        expected = saved(x, *extra).sample
        for value in (0.0, 1.0):
            added = torch.full((2, in_channels - base, CUBE_SIZE, CUBE_SIZE, CUBE_SIZE), value)
            torch.testing.assert_close(network(torch.cat([x, added], dim=1), *extra).sample, expected)


@pytest.mark.parametrize("model", ["pix2pix", "ddpm"])
def test_init_from_a_saved_pipeline(tmp_path, model):
    """--init-from starts the pipeline's network (and the DDPM's EMA) from a saved folder's weights, even
    across a config field the weights do not depend on (Pix2Pix's upsample_mode); folders of another
    model, task or size are one clear error."""
    from m3d.pipelines import CycleGAN3DPipeline, M3DInpaintPipeline, Pix2Pix3DPipeline

    torch.manual_seed(1)
    if model == "pix2pix":
        saved = Pix2Pix3DPipeline.from_preset("tiny", task="inject", upsample_mode="trilinear")
        network = saved.network
    else:
        saved = M3DInpaintPipeline.from_preset("tiny", task="inject")
        network = saved.unet
    saved.save_pretrained(tmp_path / "saved")
    trainer = tg.make_trainer(model, "inject", "tiny")
    trainer.init_from(tmp_path / "saved")
    loaded = trainer.networks[trainer.network_name]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in network.state_dict().items())
    if model == "ddpm":
        assert all(torch.equal(e, p) for e, p in zip(trainer.ema.shadow_params, loaded.parameters()))

    CycleGAN3DPipeline.from_preset("tiny", task="inject").save_pretrained(tmp_path / "cyclegan")
    Pix2Pix3DPipeline.from_preset("tiny", task="remove").save_pretrained(tmp_path / "remover")
    Pix2Pix3DPipeline.from_preset("tiny", task="inject", gf=6).save_pretrained(tmp_path / "wider")
    pix2pix = tg.make_trainer("pix2pix", "inject", "tiny")
    with pytest.raises(ValueError, match="holds a CycleGAN3DGenerator for inject; --model pix2pix --task inject"):
        pix2pix.init_from(tmp_path / "cyclegan")
    with pytest.raises(ValueError, match="holds a Pix2Pix3DGenerator for remove"):
        pix2pix.init_from(tmp_path / "remover")
    with pytest.raises(ValueError, match="do not fit --preset tiny"):
        pix2pix.init_from(tmp_path / "wider")


def test_init_from_on_the_command_line(tmp_path, monkeypatch, capsys):
    """A run started --init-from a trained folder begins at that folder's loss, not a fresh network's."""
    monkeypatch.setattr(cubes_module, "iter_phantom_cases", fake_phantoms)
    assert (
        tg.main(_argv("pix2pix", tmp_path / "first", 30, "--checkpointing-steps", "0", "--learning-rate", "2e-3")) == 0
    )
    first = [json.loads(line)["loss_l1"] for line in (tmp_path / "first" / "logs.jsonl").read_text().splitlines()]
    assert (
        tg.main(
            _argv(
                "pix2pix",
                tmp_path / "second",
                1,
                "--checkpointing-steps",
                "0",
                "--init-from",
                str(tmp_path / "first" / "pipeline"),
            )
        )
        == 0
    )
    second = json.loads((tmp_path / "second" / "logs.jsonl").read_text().splitlines()[0])["loss_l1"]
    assert second < first[0] * 0.8, (first[0], first[-1], second)
    assert tg.main(_argv("pix2pix", tmp_path / "third", 1, "--init-from", str(tmp_path / "missing"))) == 2
    assert "missing" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["cyclegan", "ddpm"])
def test_hole_only_trains(tmp_path, monkeypatch, model):
    monkeypatch.setattr(cubes_module, "iter_phantom_cases", fake_phantoms)
    assert tg.main(_argv(model, tmp_path / "run", 2, "--checkpointing-steps", "0", "--hole-only")) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "logs.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_config_overrides_shape_the_generators_and_the_saved_pipeline(tmp_path, monkeypatch, capsys):
    """--config-overrides changes both CycleGAN generators (not the discriminators) from the preset's config; the
    saved pipeline records it and loads; an unknown key or a malformed pair is a one-line error."""
    from m3d.pipelines import load_pipeline

    assert tg.parse_config_overrides("n_downsampling=1, padding_mode=zeros,dropout=0.5") == {
        "n_downsampling": 1,
        "padding_mode": "zeros",
        "dropout": 0.5,
    }
    trainer = tg.make_trainer("cyclegan", "inject", "tiny", config_overrides={"n_downsampling": 1})
    assert [trainer.networks[n].config.n_downsampling for n in ("generator", "reverse_generator")] == [1, 1]
    assert trainer.networks["reverse_generator"].config.in_channels == 1
    assert tg.make_trainer("cyclegan", "inject", "tiny").networks["generator"].config.n_downsampling == 2

    monkeypatch.setattr(cubes_module, "iter_phantom_cases", fake_phantoms)
    argv = _argv(
        "cyclegan", tmp_path / "run", 1, "--checkpointing-steps", "0", "--config-overrides", "n_downsampling=1"
    )
    assert tg.main(argv) == 0
    assert load_pipeline(tmp_path / "run" / "pipeline").network.config.n_downsampling == 1
    capsys.readouterr()
    assert tg.main(_argv("cyclegan", tmp_path / "bad", 1, "--config-overrides", "n_downsample=1")) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "CycleGAN3DGenerator has no n_downsample" in error[0] and "n_downsampling" in error[0]
    assert tg.main(_argv("ddpm", tmp_path / "bad", 1, "--config-overrides", "layers")) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_a_mask_conditioned_pipeline_saves_the_masks_of_its_training_nodules(tmp_path, monkeypatch):
    """A mask-conditioned run saves, as the pipeline's ``nodule_mask_bank`` component, the measured masks of its
    training nodules that pass the task's keep rule (the fake phantoms' 12 and 14 mm spheres), and the loaded pipeline
    draws its nodules from them."""
    from m3d.pipelines import load_pipeline

    monkeypatch.setattr(cubes_module, "iter_phantom_cases", fake_phantoms)
    argv = _argv("pix2pix", tmp_path / "run", 1, "--checkpointing-steps", "0", "--config-overrides", "in_channels=3")
    assert tg.main(argv) == 0
    pipe = load_pipeline(tmp_path / "run" / "pipeline")
    bank = pipe.nodule_mask_bank.masks
    assert bank.shape[1:] == (20, 20, 20) and len(bank) >= 2
    assert ((equivalent_diameter_mm(bank) > 11) & (equivalent_diameter_mm(bank) < 15)).all()
    cubes = torch.full((3, 1, CUBE_SIZE, CUBE_SIZE, CUBE_SIZE), -0.8)
    with torch.no_grad():
        pipe(cubes, generator=torch.Generator().manual_seed(0), progress=False)
    drawn = pipe.cube_processor.nodule_masks(
        pipe.cube_processor.preprocess(cubes), "inject", [torch.Generator().manual_seed(i) for i in range(3)],
        bank=pipe.nodule_mask_bank,
    ).nodule_mask[:, 0].bool().numpy()  # fmt: skip
    volumes = sorted({int(m.sum()) for m in bank})
    assert all(int(m.sum()) in volumes for m in drawn)
    assert tg.main(_argv("pix2pix", tmp_path / "plain", 1, "--checkpointing-steps", "0")) == 0
    assert load_pipeline(tmp_path / "plain" / "pipeline").nodule_mask_bank is None


def test_nodule_diameter_mm_sets_the_size_a_pipeline_draws_by_default(tmp_path, monkeypatch, capsys):
    """``--nodule-diameter-mm LOW HIGH`` is saved in the bank's config, and a call that names no size draws only
    the bank's masks of that size; a range no kept mask lies in, or a network without a nodule mask, is an error."""
    from m3d.pipelines import load_pipeline

    monkeypatch.setattr(cubes_module, "iter_phantom_cases", fake_phantoms)
    masked = ("--checkpointing-steps", "0", "--config-overrides", "in_channels=3")
    assert tg.main(_argv("pix2pix", tmp_path / "any", 1, *masked)) == 0
    diameters = equivalent_diameter_mm(load_pipeline(tmp_path / "any" / "pipeline").nodule_mask_bank.masks)
    largest = float(diameters.max())
    assert float(diameters.min()) < largest - 1  # the 12 and the 14 mm nodules
    sized = ("--nodule-diameter-mm", f"{largest - 0.5}", f"{largest + 0.5}")
    assert tg.main(_argv("pix2pix", tmp_path / "sized", 1, *masked, *sized)) == 0
    pipe = load_pipeline(tmp_path / "sized" / "pipeline")
    assert pipe.nodule_mask_bank.config.diameter_mm == pytest.approx([largest - 0.5, largest + 0.5])
    cubes = torch.full((6, 1, CUBE_SIZE, CUBE_SIZE, CUBE_SIZE), -0.8)
    drawn = pipe.cube_processor.nodule_masks(
        pipe.cube_processor.preprocess(cubes), "inject", [torch.Generator().manual_seed(i) for i in range(6)],
        bank=pipe.nodule_mask_bank,
    ).nodule_mask[:, 0].bool().numpy()  # fmt: skip
    assert equivalent_diameter_mm(drawn) == pytest.approx([largest] * 6)
    capsys.readouterr()
    assert tg.main(_argv("pix2pix", tmp_path / "none", 1, *masked, "--nodule-diameter-mm", "30", "40")) == 2
    assert "no kept training nodule mask measures 30-40 mm (--nodule-diameter-mm)" in capsys.readouterr().err
    assert not (tmp_path / "none" / "checkpoints").exists()  # stopped before training
    assert tg.main(_argv("pix2pix", tmp_path / "plain", 1, "--nodule-diameter-mm", "3", "7")) == 2
    assert "this one sees no nodule mask" in capsys.readouterr().err
    assert tg.main(_argv("pix2pix", tmp_path / "bad", 1, *masked, "--nodule-diameter-mm", "7", "3")) == 2
    assert "--nodule-diameter-mm must be LOW HIGH with 0 <= LOW <= HIGH" in capsys.readouterr().err


def test_the_mask_bank_smooths_out_the_slice_staircase():
    """A nodule drawn on 2.5 mm slices and cut at 1 mm has a staircase along z (its area per slice jumps); the bank's
    mask of it changes along z nearly as smoothly as along y."""
    grid = np.indices((40, 40, 40)).astype(float) - 19.5
    z_slices = np.round(grid[0] / 2.5) * 2.5  # each voxel takes the radius of its 2.5 mm slice
    cube_hu = np.where(np.sqrt(z_slices**2 + grid[1] ** 2 + grid[2] ** 2) <= 8.0, 30.0, -850.0)[None]

    def area_jumps(mask: np.ndarray, axes: tuple[int, int]) -> float:
        return float(np.abs(np.diff(mask.sum(axis=axes), 2)).mean())

    raw = nodule_mask(center_crop(cube_hu[0]))[hole_mask()].reshape(20, 20, 20)
    (smoothed,) = tg.nodule_mask_bank(cube_hu, "inject").masks
    assert area_jumps(raw, (1, 2)) > 1.5 * area_jumps(raw, (0, 2))
    assert area_jumps(smoothed, (1, 2)) < 1.35 * area_jumps(smoothed, (0, 2))
    assert area_jumps(smoothed, (1, 2)) < 0.7 * area_jumps(raw, (1, 2))


def test_the_mask_bank_keeps_the_masks_that_pass_the_keep_rule_once_smoothed():
    """A 10.3 mm nodule passes the injection keep rule (> 10 mm) but its smoothed mask does not: the generator would
    draw a nodule the builder drops, so the bank leaves it out."""
    grid = np.indices((40, 40, 40)).astype(float) - 19.5
    z_slices = np.round(grid[0] / 2.5) * 2.5
    radius = np.sqrt(z_slices**2 + grid[1] ** 2 + grid[2] ** 2)
    borderline, large = (np.where(radius <= r, 30.0, -850.0) for r in (5.25, 6.5))
    assert check_quality(center_crop(borderline), "inject").kept
    bank = tg.nodule_mask_bank(np.stack([borderline, large]), "inject")
    assert len(bank) == 1 and equivalent_diameter_mm(bank.masks)[0] > 12
    with pytest.raises(ValueError, match="no training nodule passes the inject keep rule"):
        tg.nodule_mask_bank(borderline[None], "inject")


def test_the_mask_bank_holds_masks_that_fit_the_hole():
    """A 22 mm nodule: its bank mask is the nodule shrunk to fit the 20 mm hole, not a block cut by the hole's faces;
    a nodule the 32 mm cube cuts gives no mask."""
    grid = np.indices((40, 40, 40)).astype(float) - 19.5
    radius = np.sqrt((grid**2).sum(0))
    large = np.where(radius <= 11.0, 30.0, -850.0)
    too_large = np.where(radius <= 17.5, 30.0, -850.0)
    (fitted,) = tg.nodule_mask_bank(np.stack([large, too_large]), "inject").masks
    assert fitted[0].sum() < 40 and not fitted[0, 0].any()  # it touches the hole's face; a cut block would fill it
    assert 17 < equivalent_diameter_mm(fitted[None])[0] < 20.5
    assert check_quality(center_crop(large), "inject").measurement.diameter_mm >= 18  # cut by the hole: a block


def test_ctrl_c_saves_a_checkpoint_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(cubes_module, "iter_phantom_cases", fake_phantoms)
    calls = []

    def interrupt_once(self):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(tg.Pix2PixTrainer, "after_optimizer_step", interrupt_once)
        assert tg.main(_argv("pix2pix", out, 3, "--checkpointing-steps", "0")) == 130
    assert [json.loads((p / STATE_FILE).read_text())["global_step"] for p in complete_checkpoints(out)] == [1]
    assert not (out / "pipeline").exists()
    assert tg.main(_argv("pix2pix", out, 3, "--checkpointing-steps", "0", "--resume-from-checkpoint", "latest")) == 0
    assert _steps(out) == [1, 2, 3] and (out / "pipeline" / "model_index.json").is_file()


def test_cube_cache_is_reused(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cubes_module, "iter_phantom_cases", fake_phantoms)
    monkeypatch.setattr(tg.logger, "handlers", [*tg.logger.handlers, caplog.handler])  # it does not propagate
    caplog.set_level("INFO", logger=tg.logger.name)
    cache = tmp_path / "cache"
    assert tg.main(_argv("pix2pix", tmp_path / "a", 1, "--cube-cache", str(cache))) == 0
    (stored,) = cache.glob("cubes_inject_*.npz")
    assert "cutting the inject training cubes from" in caplog.text  # said even with no progress bar
    caplog.clear()

    def no_phantoms(*args, **kwargs):
        raise AssertionError("the cached cubes should have been used")

    monkeypatch.setattr(cubes_module, "iter_phantom_cases", no_phantoms)
    assert tg.main(_argv("pix2pix", tmp_path / "b", 1, "--cube-cache", str(cache))) == 0
    assert "cutting the" not in caplog.text and "from the cache" in caplog.text
    assert _weights(tmp_path / "a", "pix2pix").keys() == _weights(tmp_path / "b", "pix2pix").keys()
    for key, value in _weights(tmp_path / "a", "pix2pix").items():
        assert torch.equal(value, _weights(tmp_path / "b", "pix2pix")[key])
    assert json.loads((tmp_path / "b" / "training_summary.json").read_text())["sites"][0]["source"] == "synth0/nodule0"


def test_site_diameter_trains_on_the_sites_whose_nodule_measures_in_range(tmp_path, monkeypatch, capsys):
    """--site-diameter-mm keeps the sites whose real nodule the builder measures in range (the fake phantoms'
    removal sites hold 5 and 6 mm spheres), and no site in range is one error line."""
    monkeypatch.setattr(cubes_module, "iter_phantom_cases", fake_phantoms)
    (five, six) = [synthetic_case(nodules=[((24, 42, 42), d, 2.0, "remove")]) for d in (5.0, 6.0)]
    cubes = np.stack([cut_training_cube(c.volume, c.volume.voxel_to_world((24, 42, 42))) for c in (five, six)])
    diameters = cubes_module.site_nodule_diameters_mm(cubes)
    assert 3.0 < diameters[0] < 5.0 < diameters[1] < 7.0, diameters
    remove = ["--task", "remove", "--model", "pix2pix"]
    out = tmp_path / "small"
    assert tg.main(_argv("pix2pix", out, 1, *remove, "--site-diameter-mm", "0", "5")) == 0
    sources = [site["source"] for site in json.loads((out / "training_summary.json").read_text())["sites"]]
    assert sources == ["synth0/nodule2", "synth1/nodule2"]  # NODULES[5], the 5 mm one, of each phantom
    assert tg.main(_argv("pix2pix", tmp_path / "none", 1, *remove, "--site-diameter-mm", "9", "20")) == 2
    assert "none of the sites' nodules measures 9-20 mm" in capsys.readouterr().err
    assert tg.main(_argv("pix2pix", tmp_path / "bad", 1, *remove, "--site-diameter-mm", "6", "5")) == 2
    assert "--site-diameter-mm must be LOW HIGH" in capsys.readouterr().err


def test_bad_input_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        cubes_module, "iter_phantom_cases", lambda n, **_: iter([synthetic_case(nodules=NODULES[2:5])])
    )
    assert tg.main(_argv("pix2pix", tmp_path / "run", 2)) == 2
    assert "no inject training sites" in capsys.readouterr().err
    assert tg.main(_argv("pix2pix", tmp_path / "run", 2, "--batch-size", "1")) == 2


def test_help_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "m3d.train.train_generator", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--model", "--task", "--lidc-root", "--phantoms", "--resume-from-checkpoint", "--mixed-precision"):
        assert flag in result.stdout
    parser = tg.build_parser()
    args = parser.parse_args(["--model", "ddpm", "--task", "remove", "--output-dir", "x"])
    assert (
        args.preset == "default"
        and args.phantoms >= 1
        and args.phantom_size == 320
        and args.phantom_spacing == "native"
    )


def test_option_checks_name_the_option_and_allow_none_where_optional(tmp_path):
    """`TrainingArguments.require_positive`, as `check` uses it: a count below 1 is a one-line error naming
    the option; an optional one may be None but not 0."""
    from m3d.train.train_generator import TrainGeneratorArguments, build_parser

    def arguments(*extra: str) -> TrainGeneratorArguments:
        argv = ["--model", "pix2pix", "--task", "inject", "--output-dir", str(tmp_path), *extra]
        return TrainGeneratorArguments.parse(build_parser(), argv)

    arguments().check()
    arguments("--max-scans", "3").check()
    with pytest.raises(ValueError, match="^--max-scans must be positive; got 0$"):
        arguments("--max-scans", "0").check()
    with pytest.raises(ValueError, match="^--phantom-size must be positive; got -2$"):
        arguments("--phantom-size", "-2").check()
    with pytest.raises(ValueError, match="^--lambda-spectral must not be negative; got -1.0$"):
        arguments("--lambda-spectral", "-1").check()
    with pytest.raises(ValueError, match="^--lambda-spectral-peak must not be negative; got -1.0$"):
        arguments("--lambda-spectral-peak", "-1").check()
    with pytest.raises(ValueError, match="^--lambda-spectral-peak is for pix2pix and cyclegan"):
        argv = ["--model", "ddpm", "--task", "inject", "--output-dir", str(tmp_path), "--lambda-spectral-peak", "1"]
        TrainGeneratorArguments.parse(build_parser(), argv).check()
    with pytest.raises(ValueError, match="^--test-time-dropout is for pix2pix and cyclegan"):
        argv = ["--model", "ddpm", "--task", "inject", "--output-dir", str(tmp_path), "--test-time-dropout"]
        TrainGeneratorArguments.parse(build_parser(), argv).check()
    with pytest.raises(ValueError, match="^--test-time-dropout needs a cyclegan with dropout: put dropout=0.5"):
        argv = ["--model", "cyclegan", "--task", "inject", "--output-dir", str(tmp_path), "--test-time-dropout"]
        TrainGeneratorArguments.parse(build_parser(), argv).check()
