import pytest
import yaml

from m3d.cli import main
from m3d.detectors import UNetConfig, UNetForForgeryDetection, XceptionConfig, XceptionForForgeryDetection
from m3d.model_cards import CardResult, folder_kind, render_model_card, write_model_card
from m3d.pipelines import CycleGAN3DPipeline, Pix2Pix3DPipeline


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    pipeline = Pix2Pix3DPipeline.from_preset("tiny", task="remove")
    pipeline.save_pretrained(root / "pix2pix-remove")
    unet = UNetForForgeryDetection(UNetConfig(base_channels=4, depth=3))
    unet.save_pretrained(root / "unet")
    xception = XceptionForForgeryDetection(
        XceptionConfig(stem_channels=(4, 8), entry_channels=(8, 8, 16), middle_blocks=1, exit_channels=(16, 16, 16))
    )
    xception.save_pretrained(root / "xception")
    return root, sum(p.numel() for p in pipeline.network.parameters()), unet.num_parameters()


def test_pipeline_card_metadata_and_facts(folders):
    root, pipeline_parameters, _ = folders
    text = render_model_card(root / "pix2pix-remove")
    metadata = front_matter(text)
    assert metadata["library_name"] == "diffusers" and "remove" in metadata["tags"]
    assert "model-index" not in metadata  # no results given: no empty evaluation entries
    assert f"{pipeline_parameters:,}" in text
    assert "Dual use" in text and "Demonstration weights" in text and "zingarini2024m3dsynth" in text
    assert "nodule_masks" not in text
    assert "| components | `network`: Pix2Pix3DGenerator |" in text  # no absent optional component (the mask bank)


def test_pipeline_card_says_a_mask_conditioned_network_draws_a_nodule_mask(tmp_path):
    Pix2Pix3DPipeline.from_preset("tiny", task="inject", in_channels=3).save_pretrained(tmp_path / "pix2pix-inject")
    text = render_model_card(tmp_path / "pix2pix-inject")
    assert "nodule_masks=" in text and "nodule_mask_bank" in text


@pytest.mark.parametrize("pipeline_class", [Pix2Pix3DPipeline, CycleGAN3DPipeline])
def test_pipeline_card_says_a_stochastic_gan_samples_with_its_dropout(folders, tmp_path, pipeline_class):
    root, _, _ = folders
    plain = render_model_card(root / "pix2pix-remove")
    assert "| sampling |" not in plain and "[-1, 1] |\n\n```python" in plain  # the table ends before the code
    network = pipeline_class.from_preset("tiny", task="remove").network
    pipeline_class(network=network, task="remove", stochastic=True).save_pretrained(tmp_path / "stochastic")
    text = render_model_card(tmp_path / "stochastic")
    assert "| sampling | the network's dropout on, as pix2pix's test-time noise" in text
    assert "(CT-GAN's way) |\n\n```python" in text


def test_detector_card_results_become_model_index(folders):
    root, _, unet_parameters = folders
    results = [
        CardResult(
            "image-classification",
            "Tampering detection",
            "M3Dsynth",
            "test",
            {"pd_at_1pct": 0.25, "balanced_accuracy": 0.75},
            "train pix2pix / test ddpm",
        ),
        CardResult("image-segmentation", "Tampering localization", "M3Dsynth", "test", {"f1": 0.5}),
    ]
    card = write_model_card(root / "unet", results, name="m3d-unet", phantom_trained=False)
    text = card.read_text()
    metadata = front_matter(text)
    assert metadata["pipeline_tag"] == "image-segmentation"
    index = metadata["model-index"][0]
    assert index["name"] == "m3d-unet" and len(index["results"]) == 2
    detection = index["results"][0]
    assert detection["task"]["type"] == "image-classification" and detection["dataset"]["split"] == "test"
    assert {m["type"]: m["value"] for m in detection["metrics"]} == {"pd_at_1pct": 0.25, "balanced_accuracy": 0.75}
    assert "| Tampering detection | M3Dsynth | test | train pix2pix / test ddpm | pd_at_1pct | 0.2500 |" in text
    assert "Demonstration weights" not in text
    assert f"{unet_parameters:,}" in text


def test_classifier_card_is_image_classification(folders):
    root, _, _ = folders
    assert front_matter(render_model_card(root / "xception"))["pipeline_tag"] == "image-classification"


def test_detector_card_names_trust_remote_code_only_where_the_code_is(folders, tmp_path):
    """A detector saved by m3d carries its code and its card says trust_remote_code loads it; a copy without the
    modules its auto_map names (as the package's demo starting weights) does not claim it."""
    import json
    import shutil

    root, _, _ = folders
    assert "trust_remote_code=True)` loads the same model" in render_model_card(root / "unet")
    bare = tmp_path / "unet-weights-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(root / "unet" / name, bare / name)
    assert "trust_remote_code" not in render_model_card(bare)
    assert json.loads((bare / "config.json").read_text())["auto_map"]  # named, but the modules are not there


def test_folder_kind_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        folder_kind(tmp_path / "missing")
    with pytest.raises(ValueError, match="not an m3d dataset"):
        folder_kind(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="not an m3d model"):
        folder_kind(tmp_path)


def test_dataset_folder_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "manifest.json").write_text("{}")
    assert folder_kind(tmp_path) == "dataset"
    with pytest.raises(ValueError, match="dataset folder"):
        render_model_card(tmp_path)


def test_cli_card(folders, capsys):
    root, _, _ = folders
    assert main(["card", str(root / "pix2pix-remove"), "--name", "demo-remover"]) == 0
    assert "# demo-remover" in (root / "pix2pix-remove" / "README.md").read_text()
    assert main(["card", str(root / "nothing-here")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_benchmark_cell_becomes_card_results():
    from m3d.model_cards import benchmark_card_results

    metrics = {
        "auc": 0.9,
        "balanced_accuracy": 0.75,
        "pd_at_1pct": 0.5,
        "f1": 0.4,
        "iou": 0.25,
        "f1_best": None,
        "iou_best": 0.3,
    }
    cell = {
        "train_data": "pix2pix",
        "localizes": True,
        "metrics": {"ddpm": {"all": metrics, "inject": {"auc": 0.1}}, "all": {"all": {"auc": float("nan")}}},
    }
    results = benchmark_card_results(cell, "M3Dsynth (phantom mini)")
    detection, localization = results[0], results[1]
    assert detection.setting == "train pix2pix / test ddpm" and detection.task_type == "image-classification"
    assert detection.metrics == {
        "auc": 0.9,
        "balanced_accuracy": 0.75,
        "pd_at_1pct": 0.5,
    }  # per test generator, both tasks
    assert localization.metrics == {"f1": 0.4, "iou": 0.25, "iou_best": 0.3}  # undefined values left out
    assert len(results) == 2  # the "all" column holds only NaN: no entry
    cell["localizes"] = False
    assert all(r.task_type == "image-classification" for r in benchmark_card_results(cell))


def test_cli_card_with_benchmark_cell(folders, tmp_path):
    import json

    root, _, _ = folders
    cell = {"train_data": "cyclegan", "localizes": True, "metrics": {"pix2pix": {"all": {"auc": 0.875, "f1": 0.5}}}}
    (tmp_path / "cell.json").write_text(json.dumps(cell))
    assert main(["card", str(root / "unet"), "--results", str(tmp_path / "cell.json")]) == 0
    index = front_matter((root / "unet" / "README.md").read_text())["model-index"][0]["results"]
    values = {m["type"]: m["value"] for r in index for m in r["metrics"]}
    assert values == {"auc": 0.875, "f1": 0.5}
