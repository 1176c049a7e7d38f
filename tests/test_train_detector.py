import json

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from m3d.cli import main as cli_main
from m3d.metrics import detection_metrics
from m3d.dataset_builder import ScanResolver
from m3d.detectors import DETECTORS
from m3d.detectors.volume import slices_to_input
from m3d.train import train_detector
from m3d.train.detector_data import (
    AIR_HU,
    TrainingSlices,
    crop_window,
    decode_crop,
    evaluation_crops,
    extract_crop,
    filter_examples,
    full_scan_shape,
    generators_present,
    load_split,
    parse_crop_size,
)
from m3d.train.evaluation import evaluate_detector, summarize
from m3d.train.nonmedical import make_standin_images
from m3dsynth_mini import make_mini_m3dsynth

CROP = (16, 64, 64)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def mini_m3dsynth(tmp_path_factory):
    datasets.disable_progress_bars()
    return make_mini_m3dsynth(tmp_path_factory.mktemp("m3dsynth"))


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(scope="session")
def test_split(mini_m3dsynth, hf_cache):
    return load_split(mini_m3dsynth, "test", hf_cache)


def train_args(data, out, cache, *extra):
    argv = [
        "--detector",
        "unet",
        "--preset",
        "tiny",
        "--data",
        str(data),
        "--crop-size",
        ",".join(map(str, CROP)),
        "--output-dir",
        str(out),
        "--batch-size",
        "4",
        "--no-progress",
        "--dataset-cache-dir",
        cache,
        "--log-every",
        "1",
        "--generators",
        "pix2pix",
        "--tasks",
        "inject",
        *extra,
    ]
    return train_detector.parse_arguments(argv)


# -- crops --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "center, size, length, expected",
    [
        (50, 16, 100, (42, 58)),
        (3, 16, 100, (0, 16)),
        (98, 16, 100, (84, 100)),
        (5, 16, 10, (0, 10)),
        (0, 16, 16, (0, 16)),
    ],
)
def test_crop_window_stays_inside(center, size, length, expected):
    assert crop_window(center, size, length) == expected


def test_extract_crop_pads_short_axes_with_air_and_keeps_the_site():
    hu = np.arange(8 * 40 * 50, dtype=np.int16).reshape(8, 40, 50)
    crop, start = extract_crop(hu, (4, 2, 49), (16, 32, 32), AIR_HU)
    assert crop.shape == (16, 32, 32) and start == (0, 0, 18)
    np.testing.assert_array_equal(crop[:8], hu[:, :32, 18:])
    assert (crop[8:] == AIR_HU).all()
    assert crop[4, 2, 49 - 18] == hu[4, 2, 49]  # the site near the corner is inside the shifted window


def test_parse_crop_size():
    assert parse_crop_size("16,64,96") == (16, 64, 96)
    assert parse_crop_size("full") is None
    for bad in ("16,64", "a,b,c", "16,60,64", "0,64,64"):
        with pytest.raises(ValueError):
            parse_crop_size(bad)
    assert full_scan_shape((5, 100, 64)) == (5, 128, 64)


def test_decode_crop_full_and_at_border(test_split):
    example = test_split[0]
    assert example["site_voxel_zyx"][2] == 4  # the fixture's first test site sits at the scan edge
    scans = ScanResolver(test_split)
    crop = decode_crop(example, CROP, scans=scans)
    assert crop.hu.shape == CROP and crop.valid == CROP
    z, y, x = crop.info["site_in_crop_zyx"]
    assert 0 <= z < CROP[0] and 0 <= y < CROP[1] and x == 4
    full = decode_crop(example, None, scans=scans)
    assert full.hu.shape == (24, 64, 64) and full.valid == (24, 64, 64)
    if crop.info["label"] == "fake":
        assert full.mask.sum() == crop.mask.sum() > 0


# -- filters and sampling -----------------------------------------------------------------------


def test_two_folders_of_one_name_never_share_a_cache(tmp_path, hf_cache):
    """`datasets` caches a local folder by its card's configs, the same for every M3Dsynth folder: a
    second folder (another seed, a rebuild) must load its own examples, not the first one's."""
    first = make_mini_m3dsynth(tmp_path / "a" / "m3dsynth", sites={"train": 1, "test": 1}, seed=1)
    second = make_mini_m3dsynth(tmp_path / "b" / "m3dsynth", sites={"train": 1, "test": 1}, seed=2)
    volumes = [load_split(folder, "test", hf_cache)[0]["volume"].get_fdata() for folder in (first, second)]
    assert volumes[0].shape != volumes[1].shape or not np.array_equal(volumes[0], volumes[1])
    assert load_split(first, "test", hf_cache)[0]["volume"].get_fdata().tolist() == volumes[0].tolist()  # cached, same


def test_filters_by_generator_and_task(mini_m3dsynth, hf_cache):
    train = load_split(mini_m3dsynth, "train", hf_cache)
    assert len(train) == 18 and generators_present(train) == ["pix2pix", "cyclegan"]
    kept = filter_examples(train, ["cyclegan"], ["remove"])
    rows = [(row["generator"], row["task"]) for row in kept.select_columns(["generator", "task"])]
    names = train.features["generator"].names
    assert sorted({names[g] for g, _ in rows}) == ["cyclegan", "real"] and {t for _, t in rows} == {1}
    assert len(kept) == 6
    with pytest.raises(ValueError, match="unknown generator"):
        filter_examples(train, ["stylegan"])
    with pytest.raises(ValueError, match="no 'nope' split"):
        load_split(mini_m3dsynth, "nope", hf_cache)


def test_every_detector_and_the_cad_scorer_have_the_cli_presets():
    """One preset mechanism: each detector config's ``presets`` are train-detector's --preset choices, the
    tiny ones build their (small) models, the CAD config has the same names, and an unknown name is a
    one-line error naming the choices."""
    from m3d.cad import CADConfig
    from m3d.detectors import DETECTORS

    for name, (config_class, model_class) in DETECTORS.items():
        assert set(config_class.presets) == set(train_detector.PRESET_CHOICES), name
        config = train_detector.detector_config(name, "tiny")
        assert all(
            getattr(config, key) == value or list(getattr(config, key)) == list(value)
            for key, value in config_class.presets["tiny"].items()
        ), name
        assert sum(p.numel() for p in model_class(config).parameters()) < 1_000_000, name
        with pytest.raises(
            ValueError, match=f"{config_class.__name__}: preset must be one of tiny, default; got 'huge'"
        ):
            train_detector.detector_config(name, "huge")
    assert set(CADConfig.presets) == set(train_detector.PRESET_CHOICES)


def test_training_slices_are_balanced_deterministic_and_labelled_by_the_mask(mini_m3dsynth, hf_cache):
    train = load_split(mini_m3dsynth, "train", hf_cache)
    config = train_detector.detector_config("unet", "tiny")
    slices = TrainingSlices(train, CROP, config, seed=3, multiple=8)
    assert len(slices) % 8 == 0
    labels = [float(slices[i]["labels"]) for i in range(len(slices))]
    assert sum(labels) == len(slices) // 2
    item = slices[0]
    assert item["pixel_values"].shape == (3, 64, 64) and item["masks"].shape == (1, 64, 64)
    assert float(item["labels"]) == float(item["masks"].any())
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    plan0, starts0 = list(slices.plan), list(slices.starts)
    slices.set_epoch(1)
    assert slices.starts != starts0
    again = TrainingSlices(train, CROP, config, seed=3, multiple=8)
    assert again.plan == plan0 and again.starts == starts0


def test_training_slabs_are_the_slices_around_the_labelled_one(mini_m3dsynth, hf_cache):
    """Slab3D's training items hold the slab_slices slices centred on the one the label and mask are of,
    taken as `slices_to_input` takes them from a whole crop (the same window at evaluation)."""
    train = load_split(mini_m3dsynth, "train", hf_cache)
    config = train_detector.detector_config("slab3d", "tiny")
    slices = TrainingSlices(train, CROP, config, seed=3, multiple=8)
    for index in range(8):
        item = slices[index]
        assert item["pixel_values"].shape == (5, 64, 64) and item["masks"].shape == (1, 64, 64)
        example, z = slices.plan[index]
        crop, start = slices.cache[example], slices.starts[example]
        window = crop.hu[:, start[1] : start[1] + 64, start[2] : start[2] + 64]
        torch.testing.assert_close(item["pixel_values"], slices_to_input(window, [z], config)[0])


# -- evaluation ---------------------------------------------------------------------------------


def test_evaluate_detector_scores_every_sample(test_split):
    model = train_detector.build_detector("unet", "tiny")
    result = evaluate_detector(model, test_split, CROP, keep_maps=1)
    assert len(result["samples"]) == len(test_split) == 12
    assert set(result["metrics"]) == {"all", "pix2pix", "cyclegan"}
    assert set(result["metrics"]["all"]) == {"all", "inject", "remove"}
    overall = result["metrics"]["all"]["all"]
    assert overall["n_fake"] == 8 and overall["n_pristine"] == 4
    assert all(
        np.isfinite(overall[k]) for k in ("auc", "balanced_accuracy", "pd_at_1pct", "f1", "iou", "f1_best", "iou_best")
    )
    assert result["metrics"]["pix2pix"]["all"]["n_fake"] == 4
    assert result["examples"][0]["map"].shape == result["examples"][0]["mask"].shape
    # the same numbers from reused crops, and a classifier has no localization metrics
    crops = evaluation_crops(test_split, CROP)
    again = evaluate_detector(model, crops)
    assert [s["score"] for s in again["samples"]] == pytest.approx([s["score"] for s in result["samples"]], abs=1e-6)
    classifier = train_detector.build_detector("xception", "tiny")
    assert evaluate_detector(classifier, crops)["metrics"]["all"]["all"]["f1"] is None


def test_summarize_needs_both_classes():
    records = [{"label": "fake", "generator": "ddpm", "task": "inject", "score": 0.9}]
    metrics = summarize(records)["ddpm"]["all"]
    assert metrics["auc"] is None and metrics["n_fake"] == 1 and metrics["f1"] is None


# -- training -----------------------------------------------------------------------------------


def test_train_validates_saves_best_and_pushes(mini_m3dsynth, hf_cache, tmp_path, monkeypatch):
    pushed = {}

    class FakeApi:
        def __init__(self, token=None):
            pushed["token"] = token

        def create_repo(self, repo_id, **kwargs):
            pushed["repo"] = repo_id
            return type("Url", (str,), {"repo_id": f"user/{repo_id}"})(f"https://hub/user/{repo_id}")

        def upload_folder(self, folder_path, repo_id, **kwargs):
            pushed["files"] = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())
            pushed["to"] = repo_id

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    out = tmp_path / "run"
    args = train_args(
        mini_m3dsynth, out, hf_cache, "--max-steps", "3", "--push-to-hub", "--hub-model-id", "m3d-unet-test"
    )
    assert train_detector.train(args) == 0
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3]
    validation = [r for r in logs if "val/auc" in r]
    assert len(validation) == 1 and np.isfinite(validation[0]["val/auc"])
    best = out / "best"
    model = AutoModel.from_pretrained(best)
    assert type(model).__name__ == "UNetForForgeryDetection"
    assert (best / "README.md").is_file() and json.loads((best / "validation.json").read_text())["step"] == 3
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 3
    calibration = summary["calibration"]  # the validation split set the saved volume threshold
    assert calibration["split"] == "validation" and calibration["n_fake"] > 0 and calibration["n_pristine"] > 0
    assert model.config.volume_threshold == pytest.approx(calibration["threshold"])
    assert calibration["balanced_accuracy"] >= calibration["balanced_accuracy_before"]
    assert pushed["to"] == "user/m3d-unet-test"
    assert {"model.safetensors", "preprocessor_config.json"} <= set(pushed["files"])


def test_resume_continues_exactly(mini_m3dsynth, hf_cache, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--validation-split", "none", "--checkpointing-steps", "2")
    assert train_detector.train(train_args(mini_m3dsynth, straight, hf_cache, "--max-steps", "4", *common)) == 0
    assert train_detector.train(train_args(mini_m3dsynth, resumed, hf_cache, "--max-steps", "2", *common)) == 0
    args = train_args(
        mini_m3dsynth, resumed, hf_cache, "--max-steps", "4", "--resume-from-checkpoint", "latest", *common
    )
    assert train_detector.train(args) == 0
    assert json.loads((resumed / "training_summary.json").read_text())["steps"] == 4
    a, b = load_file(straight / "best" / "model.safetensors"), load_file(resumed / "best" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_train_on_image_folder(tmp_path, hf_cache):
    images = make_standin_images(tmp_path / "images", n_per_class=4, size=64)
    assert "STAND-IN" in (images / "README.md").read_text()
    out = tmp_path / "run"
    argv = [
        "--detector",
        "resnet_gp",
        "--preset",
        "tiny",
        "--train-images",
        str(images),
        "--crop-size",
        "1,32,32",
        "--output-dir",
        str(out),
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--no-progress",
        "--dataset-cache-dir",
        hf_cache,
    ]
    assert train_detector.main(argv) == 0
    assert (out / "best" / "model.safetensors").is_file()


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert (
        cli_main(
            [
                "train-detector",
                "--detector",
                "unet",
                "--data",
                str(tmp_path / "missing"),
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "is not an M3Dsynth folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(
            ["train-detector", "--detector", "unet", "--data", "x", "--output-dir", "y", "--crop-size", "16,60,64"]
        )


# -- learnability: every detector learns the task through the real training path ------------------


@pytest.mark.parametrize("detector", list(DETECTORS))
def test_every_detector_learns_a_tiny_training_set(detector, mini_m3dsynth, hf_cache, tmp_path):
    """150 steps of `m3d train-detector` (tiny config) bring the training loss clearly down and
    separate the tampered training slices from the pristine ones (AUC >= 0.9)."""
    args = train_args(
        mini_m3dsynth,
        tmp_path / "run",
        hf_cache,
        "--validation-split",
        "none",
        "--batch-size",
        "8",
        "--learning-rate",
        "1e-2",
        "--lr-scheduler",
        "cosine",
        "--warmup-steps",
        "10",
        "--max-steps",
        "150",
        "--num-epochs",
        "100",
        "--log-every",
        "10",
        "--slices-per-epoch",
        "32",
    )
    args.detector = detector
    assert train_detector.train(args) == 0
    losses = [
        r["loss"] for r in map(json.loads, (tmp_path / "run" / "logs.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), str(losses)  # means over 10 steps each
    model = train_detector.build_detector(model_path=str(tmp_path / "run" / "best")).eval()
    training_set = filter_examples(load_split(mini_m3dsynth, "train", hf_cache), ["pix2pix"], ["inject"])
    slices = TrainingSlices(training_set, CROP, model.config, seed=0, samples_per_epoch=32)
    items = [slices[i] for i in range(len(slices))]
    with torch.no_grad():
        scores = torch.sigmoid(model(pixel_values=torch.stack([i["pixel_values"] for i in items])).logits).view(-1)
    labels = np.array([int(i["labels"]) for i in items])
    auc = detection_metrics(labels, scores.numpy())["auc"]
    assert auc >= 0.9, auc
    # without validation the training scans set the volume threshold; on them it separates at least as well as 0.5
    calibration = json.loads((tmp_path / "run" / "training_summary.json").read_text())["calibration"]
    assert calibration["split"] == "train" and model.config.volume_threshold == pytest.approx(calibration["threshold"])
    assert calibration["balanced_accuracy"] >= calibration["balanced_accuracy_before"], calibration
