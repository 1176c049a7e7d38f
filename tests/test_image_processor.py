"""M3DCTImageProcessor, the detectors' HU -> pixel_values transform: the reference numbers of every input mode,
the round trip through AutoImageProcessor, detect_volume through it, the shipped demo folders and the
image-segmentation pipeline on one HU slice."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, pipeline

from m3d.data.ct import CTVolume
from m3d.detectors import (
    Slab3DConfig,
    Slab3DForForgeryDetection,
    UNetConfig,
    UNetForForgeryDetection,
    XceptionConfig,
    XceptionForForgeryDetection,
    detect_volume,
)
from m3d.detectors.image_processing_m3d import M3DCTImageProcessor, register_image_processors
from m3d.detectors.slice_segmentation import M3DSliceSegmentationPipeline
from m3d.detectors.volume import slices_to_input

pytestmark = pytest.mark.usefixtures("one_thread")
DEMO_DIR = Path(__file__).resolve().parents[1] / "m3d" / "detectors" / "demo"
MODES = ("hu_windows", "percentile", "adjacent_slices", "slab")


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_image_processors()


def tiny(mode: str) -> UNetForForgeryDetection | Slab3DForForgeryDetection:
    torch.manual_seed(0)
    if mode == "slab":
        return Slab3DForForgeryDetection(Slab3DConfig.from_preset("tiny", slab_slices=3, widths=(4, 8, 8))).eval()
    return UNetForForgeryDetection(UNetConfig(input_mode=mode, base_channels=4, depth=2)).eval()


def scan(depth: int = 5, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(-1500, 1500, (depth, size, size)).astype(np.int16)


def reference(hu: np.ndarray, indices: list[int], config) -> np.ndarray:
    """The detectors' input written out in numpy float32: each channel a plane scaled between (low, high),
    clipped to [0, 1], mapped to [-1, 1]."""

    def scaled(plane: np.ndarray, low: float, high: float) -> np.ndarray:
        value = (plane.astype(np.float32) - np.float32(low)) / np.float32(high - low)
        return np.clip(value, 0, 1) * np.float32(2) - np.float32(1)

    last = len(hu) - 1
    channels = []
    for k in indices:
        if config.input_mode == "hu_windows":
            channels.append([scaled(hu[k], low, high) for low, high in config.hu_windows])
        elif config.input_mode == "percentile":
            low, high = np.percentile(hu, config.percentiles)
            channels.append([scaled(hu[k], low, max(high, low + 1.0))] * 3)
        else:
            half = (3 if config.input_mode == "adjacent_slices" else config.slab_slices) // 2
            neighbours = [hu[min(max(j, 0), last)] for j in range(k - half, k + half + 1)]
            channels.append([scaled(plane, *config.hu_windows[0]) for plane in neighbours])
    return np.asarray(channels, np.float32)


@pytest.mark.parametrize("mode", MODES)
def test_pixel_values_are_the_reference_numbers(mode):
    config = tiny(mode).config
    processor = M3DCTImageProcessor.from_detector_config(config)
    hu = scan()
    indices = [0, 2, 4]
    pixel_values = processor(hu, indices)["pixel_values"]
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == (3, config.num_channels, 32, 32)
    np.testing.assert_array_equal(pixel_values.numpy(), reference(hu, indices, config))
    assert torch.equal(slices_to_input(hu, indices, config), pixel_values)
    volume = CTVolume(hu, (1.0, 1.0, 1.0))
    assert torch.equal(processor(volume, indices)["pixel_values"], pixel_values)
    assert torch.equal(processor(hu)["pixel_values"][indices], pixel_values)
    one = processor(hu[2])["pixel_values"]  # one slice: its own neighbours and its own percentiles
    np.testing.assert_array_equal(one.numpy(), reference(hu[2:3], [0], config))


@pytest.mark.parametrize("mode", MODES)
def test_saved_and_loaded_with_auto_image_processor(mode, tmp_path):
    model = tiny(mode)
    model.save_pretrained(tmp_path)
    processor = M3DCTImageProcessor.from_detector_config(model.config)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "M3DCTImageProcessor" and saved["input_mode"] == mode
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is M3DCTImageProcessor and loaded.to_dict() == processor.to_dict()
    hu = scan()
    assert torch.equal(loaded(hu, [1, 3])["pixel_values"], processor(hu, [1, 3])["pixel_values"])
    assert AutoImageProcessor.from_pretrained(tmp_path, percentiles=[1, 99]).percentiles == [1.0, 99.0]


def test_detect_volume_through_the_processor_is_unchanged(tmp_path):
    model = tiny("adjacent_slices")
    hu = scan(depth=6)
    with torch.no_grad():
        output = model(pixel_values=torch.from_numpy(reference(hu, list(range(6)), model.config)))
    expected_scores = torch.sigmoid(output.logits).numpy()
    expected_map = torch.sigmoid(output.localization_logits)[:, 0].numpy()
    model.save_pretrained(tmp_path)
    M3DCTImageProcessor.from_detector_config(model.config).save_pretrained(tmp_path)
    for processor in (None, AutoImageProcessor.from_pretrained(tmp_path)):
        result = detect_volume(model, hu, batch_size=6, image_processor=processor)
        assert result.score == pytest.approx(expected_scores.max(), abs=1e-6)
        np.testing.assert_allclose(result.slice_scores, expected_scores, atol=1e-6, rtol=0)
        np.testing.assert_allclose(result.localization, expected_map, atol=1e-6, rtol=0)


def test_shipped_demo_folders_carry_the_processor_of_their_config():
    from transformers import AutoConfig

    folders = sorted(path for path in DEMO_DIR.iterdir() if (path / "config.json").is_file())
    assert folders
    for folder in folders:
        expected = M3DCTImageProcessor.from_detector_config(AutoConfig.from_pretrained(folder)).to_dict()
        assert AutoImageProcessor.from_pretrained(folder).to_dict() == expected, folder.name


def test_image_segmentation_pipeline_on_one_hu_slice(tmp_path):
    model = tiny("hu_windows")
    model.save_pretrained(tmp_path)
    M3DCTImageProcessor.from_detector_config(model.config).save_pretrained(tmp_path)
    segmenter = pipeline("image-segmentation", model=str(tmp_path), pipeline_class=M3DSliceSegmentationPipeline)
    hu = scan(depth=1)
    segments = {segment["label"]: np.asarray(segment["mask"]) for segment in segmenter(hu[0])}
    expected = detect_volume(model, hu).localization[0] >= 0.5
    assert set(segments) <= {"pristine", "manipulated"} and segments
    manipulated = segments.get("manipulated", np.zeros((32, 32), np.uint8))
    assert manipulated.shape == (32, 32)
    np.testing.assert_array_equal(manipulated == 255, expected)


def test_what_it_cannot_use_is_refused():
    with pytest.raises(ValueError, match="input_mode"):
        M3DCTImageProcessor(input_mode="rgb")
    with pytest.raises(ValueError, match="no setting do_resize"):
        M3DCTImageProcessor(do_resize=True)
    processor = M3DCTImageProcessor()
    with pytest.raises(ValueError, match="HU slice"):
        processor(np.zeros((2, 2, 8, 8), np.int16))
    with pytest.raises(ValueError, match="slice indices"):
        processor(scan(), [5])
    classifier = XceptionForForgeryDetection(
        XceptionConfig(stem_channels=(4, 8), entry_channels=(8, 8, 16), middle_blocks=0, exit_channels=(16, 16, 16))
    )
    with pytest.raises(ValueError, match="does not localize"):
        pipeline(
            "image-segmentation",
            model=classifier,
            image_processor=processor,
            pipeline_class=M3DSliceSegmentationPipeline,
        )
