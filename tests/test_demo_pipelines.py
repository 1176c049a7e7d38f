"""The demo pipelines shipped in `pipelines/demo/`: each folder loads offline, holds the weights of
its task, and tampers a small phantom at a nodule site (one cube, a few sampler steps)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from m3d.data.lidc import group_nodules
from m3d.data.phantom import make_phantom
from m3d.dataset_builder.generate import DEMO_PIPELINES_DIR
from m3d.pipelines import PIPELINE_CLASSES, load_pipeline
from m3d.tamper.cube import TamperLocationError, check_location

DEMO_DIR = DEMO_PIPELINES_DIR
CLASSES = {"pix2pix": "Pix2Pix3DPipeline", "cyclegan": "CycleGAN3DPipeline", "ddpm": "M3DInpaintPipeline"}
FOLDERS = [f"{generator}-{task}" for generator in CLASSES for task in ("inject", "remove")]
MAX_TOTAL_MB = 15.0


@pytest.fixture(scope="module")
def phantom_site():
    """A small phantom and the centre (LPS mm) of a nodule whose cube fits inside the scan and lungs."""
    case = make_phantom(3, size=96, max_slices=64, n_nodules=(3, 4))
    for nodule in group_nodules(case.lidc):
        location = case.volume.voxel_to_world(nodule.centroid_zyx)
        try:
            check_location(case.volume, location, lung_mask=case.lung_mask)
        except TamperLocationError:
            continue
        return case, location
    pytest.fail("the test phantom has no nodule whose cube fits in its lungs")


def test_every_demo_folder_is_shipped_and_small():
    assert sorted(p.name for p in DEMO_DIR.iterdir() if p.is_dir()) == sorted(FOLDERS)
    total = sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file())
    assert total / 2**20 < MAX_TOTAL_MB
    for name in FOLDERS:
        assert (DEMO_DIR / name / "README.md").is_file()


@pytest.mark.parametrize("name", FOLDERS)
def test_demo_pipeline_tampers_a_phantom(name, phantom_site, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    generator, task = name.split("-")
    pipe = load_pipeline(DEMO_DIR / name)
    assert type(pipe) is PIPELINE_CLASSES[CLASSES[generator]] and pipe.config.task == task
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            assert all(p.dtype == torch.float32 for p in module.parameters())  # stored fp16, loaded fp32

    case, location = phantom_site
    steps = {"num_inference_steps": 3} if generator == "ddpm" else {}
    out = pipe(
        volume=case.volume,
        locations_lps_mm=[location],
        task=task,
        output_type="volume",
        lung_mask=case.lung_mask,
        generator=torch.Generator().manual_seed(0),
        progress=False,
        **steps,
    )
    assert np.isfinite(out.cubes).all()
    tampered, changed = out.volumes[0], out.masks[0]
    assert tampered.shape == case.volume.shape and changed.any()
    assert np.array_equal(tampered.hu != case.volume.hu, changed)


def test_cards_get_the_measured_quality_section(tmp_path):
    """`update_quality_section` writes the measured figures before the citation, once, replacing an older
    section; a pipeline the JSON does not hold is left alone."""
    from m3d.train.demo_pipelines import QUALITY_HEADING, update_quality_section

    card = tmp_path / "README.md"
    card.write_text("# card\n\n## How it was made\ntext\n\n## Citation\nbib\n")
    entry = {
        "task": "remove",
        "n": 12,
        "kept_fraction": 0.92,
        "kept_fraction_range": [0.89, 0.94],
        "diameter_mm_median": 0.0,
        "diameter_mm_iqr": [0.0, 1.0],
        "seam_ratio_mean": 1.1,
        "seam_ratio_raw": 1.8,
        "spectral_peak_ratio": 9.0,
        "vessel_continuity": 0.9,
        "two_sample_accuracy": 0.6,
    }
    pristine = {"seam_ratio_mean": 1.0, "spectral_peak_ratio": 10.0}
    quality = {
        "held_out": {"phantoms": 20, "seed": 2024},
        "draws": 3,
        "pristine": {"remove": pristine},
        "pipelines": {"pix2pix-remove": entry},
    }
    assert update_quality_section(tmp_path, "pix2pix-remove", quality)
    entry["seam_ratio_mean"] = 1.05
    assert update_quality_section(tmp_path, "pix2pix-remove", quality)
    text = card.read_text()
    assert text.count(QUALITY_HEADING) == 1 and "| 1.05 |" in text and "| 1.1 |" not in text
    assert text.index("## How it was made") < text.index(QUALITY_HEADING) < text.index("## Citation")
    assert "| left < 8 mm | 92% (draws 89%-94%) |" in text and "touch_up=False" in text
    assert "the mean of 3 draws (generation seeds 0-2" in text
    assert not update_quality_section(tmp_path, "ddpm-remove", quality)


def test_broken_pipeline_folders_are_one_clear_error(tmp_path):
    """A pipeline folder that is not whole and consistent never loads with random weights: each case is
    one error naming the folder or file."""
    import json
    import shutil

    def folder(name):
        copy = tmp_path / name
        shutil.copytree(DEMO_DIR / "pix2pix-inject", copy)
        return copy

    swapped = folder("swapped")
    shutil.rmtree(swapped / "network")
    shutil.copytree(DEMO_DIR / "cyclegan-inject" / "network", swapped / "network")
    cut = folder("cut")
    weights = cut / "network" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    pickled = folder("pickled")
    (pickled / "network" / "diffusion_pytorch_model.safetensors").rename(
        pickled / "network" / "diffusion_pytorch_model.bin"
    )
    misfit = folder("misfit")
    config = json.loads((misfit / "network" / "config.json").read_text())
    (misfit / "network" / "config.json").write_text(json.dumps({**config, "in_channels": 2}))
    broken = folder("broken")
    (broken / "model_index.json").write_text("{oops")
    cases = {
        swapped: "holds a CycleGAN3DGenerator, but model_index.json names Pix2Pix3DGenerator",
        cut: "truncated or not safetensors",
        pickled: "is pickle, which m3d never loads",
        misfit: "do not fit their config.json",
        broken: "model_index.json is not a JSON object",
    }
    for path, message in cases.items():
        with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
            load_pipeline(path)
        assert str(path) in str(error.value)


def test_fine_tune_stages_start_from_the_previous_one_and_the_card_gives_all(tmp_path):
    """A recipe with later stages: each command sets its options on top of the previous stage's (no option twice)
    and starts from the previous stage's pipeline; the card shows every command, the facts of stages whose run is
    not there taken from the card of the weights the next stage started from."""
    from m3d.train import demo_pipelines as demo

    name = next(iter(demo.FINE_TUNES))
    count = demo.stage_count(name)
    assert count == 1 + len(demo.FINE_TUNES[name]) >= 3
    commands = [demo.command_line(name, tmp_path, tmp_path / "cache", stage) for stage in range(count)]
    for stage, argv in enumerate(commands):
        options = [a for a in argv if a.startswith("--")]
        assert len(options) == len(set(options))
        assert argv[argv.index("--output-dir") + 1] == str(demo.run_dir(name, tmp_path, stage))
        if stage:
            assert argv[argv.index("--init-from") + 1] == str(demo.run_dir(name, tmp_path, stage - 1) / "pipeline")
            for option, value in zip(demo.FINE_TUNES[name][stage - 1][::2], demo.FINE_TUNES[name][stage - 1][1::2]):
                if not value.startswith("--"):
                    assert argv[argv.index(option) + 1] == value
    assert "--init-from" not in commands[0]
    assert commands[0][commands[0].index("--phantoms") + 1] != commands[1][commands[1].index("--phantoms") + 1]
    assert commands[2][commands[2].index("--phantoms") + 1] == commands[1][commands[1].index("--phantoms") + 1]
    assert len({str(demo.run_dir(name, tmp_path, stage)) for stage in range(count)}) == count
    with pytest.raises(ValueError, match="no stage"):
        demo.command_line(name, tmp_path, tmp_path / "cache", count)

    last = demo.run_dir(name, tmp_path, count - 1)
    last.mkdir()
    (last / "training_summary.json").write_text('{"steps": 30, "args": {"seed": 0}, "sites": ["a", "b"]}')
    (last / "logs.jsonl").write_text(
        '{"loss": 0.5, "step": 10, "elapsed_s": 6.0}\n{"loss": 0.25, "step": 30, "elapsed_s": 18.0}\n'
    )
    old_card = tmp_path / "README.md"
    old_card.write_text(
        "# card\n\n## How it was made\ntext\n\n```bash\nm3d train-generator --old\n```\n\n"
        "- 2000 optimizer steps, first stage;\n- losses: first stage.\n\n```bash\nm3d train-generator --older\n```\n\n"
        "- 1000 optimizer steps, second stage.\n\n## Citation\n"
    )
    facts = demo._card_facts(old_card)
    assert facts == [
        ["- 2000 optimizer steps, first stage;", "- losses: first stage."],
        ["- 1000 optimizer steps, second stage."],
    ]
    card = demo.provenance(name, tmp_path, earlier_facts=facts)
    assert card.count("```bash") == count and f"in {count} stages" in card
    assert (
        card.index("- 2000 optimizer steps, first stage;")
        < card.index("- 1000 optimizer steps, second stage.")
        < card.index("- 30 optimizer")
    )
    with pytest.raises(FileNotFoundError, match="no finished run"):
        demo.provenance(name, tmp_path, earlier_facts=facts[:1])
    assert demo._card_facts(tmp_path / "missing.md") == []


def test_injection_cards_give_the_real_looking_ceiling():
    """An injector's quality section gives the share of real nodules inside the real-looking range beside its own,
    when the measurement has it, and its own at the sites at the chest wall and away from it."""
    from m3d.train.demo_pipelines import quality_section

    entry = {
        "task": "inject",
        "n": 34,
        "kept_fraction": 0.88,
        "real_looking_fraction": 0.53,
        "diameter_mm_median": 15.0,
        "diameter_mm_iqr": [13.0, 17.0],
        "seam_ratio_mean": 0.85,
        "spectral_peak_ratio": 12.0,
        "vessel_continuity": 0.9,
        "two_sample_accuracy": 0.65,
        "real_looking_by_site": {
            "at_chest_wall": {"n": 11, "fraction": 0.364},
            "away_from_chest_wall": {"n": 23, "fraction": 0.609},
        },
    }
    quality = {
        "held_out": {"phantoms": 20, "seed": 2024},
        "pristine": {"inject": {"seam_ratio_mean": 0.96, "spectral_peak_ratio": 3.8}},
        "real_nodule_mean_hu_range": [-181.8, -40.5],
        "real_looking_ceiling": {
            "phantoms": 80,
            "seed": 2025,
            "n": 43,
            "fraction": 0.791,
            "by_site": {
                "at_chest_wall": {"n": 0, "fraction": None},
                "away_from_chest_wall": {"n": 43, "fraction": 0.791},
            },
        },
        "pipelines": {"ddpm-inject": entry},
    }
    text = quality_section("ddpm-inject", quality)
    assert "| ... and mean HU within real nodules' [-181.8, -40.5] | 53% |" in text
    assert "43 real nodules > 10 mm of other phantoms" in text and text.rstrip().endswith("| 0.65 |")
    assert "| 79% |" in text and "(43 away from the chest wall)" in text
    assert "| ... at the 11 sites at the chest wall | 36% |" in text
    assert "| ... at the 23 sites away from the chest wall | 61% |" in text
    quality["two_sample_oracle"] = {
        "inject": {"accuracy": 0.7, "accuracy_range": [0.69, 0.71], "draws": 3, "real_nodules": 43}
    }
    assert (
        quality_section("ddpm-inject", quality)
        .rstrip()
        .endswith(
            "| ... the same for 43 real nodules > 10 mm of other phantoms pasted at these sites "
            "(what the sites' surroundings give away) | 0.7 |"
        )
    )
    entry["two_sample_vs_oracle"] = 0.64
    quality["two_sample_oracle_control"] = {"inject": {"accuracy": 0.51}}
    assert (
        quality_section("ddpm-inject", quality)
        .rstrip()
        .endswith("(folds by site: only the nodules differ; two halves of the real nodules: 0.51) | 0.64 |")
    )
    del quality["real_looking_ceiling"], quality["two_sample_oracle"], quality["two_sample_oracle_control"]
    assert "other phantoms" not in quality_section("ddpm-inject", quality)
    assert "(folds by site: only the nodules differ) | 0.64 |" in quality_section("ddpm-inject", quality)


def test_a_later_stage_sets_its_options_and_all_their_values_on_top_of_the_previous_ones():
    from m3d.train import demo_pipelines as demo

    argv = ["--a", "1", "--b", "2", "3", "--flag"]
    assert demo._with_options(argv, ["--b", "4", "5", "--flag", "--c", "6", "7", "--d", "-1"]) == [
        "--a", "1", "--b", "4", "5", "--flag", "--c", "6", "7", "--d", "-1",
    ]  # fmt: skip
    last = demo.command_line("ddpm-remove", "runs", "cache", demo.stage_count("ddpm-remove") - 1)
    start = last.index("--nodule-diameter-mm")
    assert last[start + 1 : start + 3] == ["3", "7"] and last.count("--nodule-diameter-mm") == 1
