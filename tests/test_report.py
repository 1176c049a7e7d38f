import base64
import json
import re

import numpy as np
import pytest
from PIL import Image

from m3d.data.ct import CTVolume
from m3d.report.figures import planes_through, save_figure, triplanar_figure
from m3d.report.html import Figure, Section, markdown_to_html, write_report


def small_volume() -> CTVolume:
    hu = np.full((20, 32, 40), -800, dtype=np.int16)
    hu[8:12, 10:20, 15:25] = 40
    return CTVolume(hu=hu, spacing_mm=(2.5, 0.7, 0.7), origin_mm=(0.0, 0.0, 0.0), direction=np.eye(3))


def test_planes_through_orientation():
    array = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    planes = planes_through(array, (1, 2, 3))
    assert planes["axial"].shape == (5, 6) and np.array_equal(planes["axial"], array[1])
    assert planes["coronal"].shape == (4, 6) and np.array_equal(planes["coronal"][0], array[3, 2])  # last slice on top
    assert planes["sagittal"].shape == (4, 5) and np.array_equal(planes["sagittal"][-1], array[0, :, 3])
    assert np.array_equal(planes_through(array, (99, -5, 3))["axial"], array[3])  # clipped into the volume


def test_triplanar_figure_draws_overlays(tmp_path):
    volume = small_volume()
    mask = np.zeros(volume.shape, dtype=bool)
    mask[8:12, 10:20, 15:25] = True
    detector_map = mask.astype(np.float32) * 0.9
    path = save_figure(
        triplanar_figure(volume, (10, 15, 20), mask, {"unet": detector_map}, title="sample"), tmp_path / "fig.png"
    )
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert image.shape[0] > 200 and image.shape[1] > 300
    coloured = (np.abs(image[..., 0] - image[..., 1]) > 60) | (np.abs(image[..., 1] - image[..., 2]) > 60)
    assert coloured.sum() > 100  # the overlays are there, not only grey scan pixels
    with pytest.raises(ValueError, match="differs from the scan"):
        triplanar_figure(volume, (10, 15, 20), mask[:, :, :5])


def test_markdown_subset():
    text = (
        "### Scores\n\n| model | F1 |\n|---|---|\n| `unet` | 0.50 |\n\n"
        "- one **bold**\n- two\n\n> careful <here>\n\nplain\ntext"
    )
    converted = markdown_to_html(text)
    assert "<h4>Scores</h4>" in converted
    assert "<th>model</th>" in converted and "<td><code>unet</code></td>" in converted and "<td>0.50</td>" in converted
    assert "<li>one <strong>bold</strong></li>" in converted
    assert '<p class="note">careful &lt;here&gt;</p>' in converted
    assert "<p>plain text</p>" in converted


def test_write_report_is_self_contained(tmp_path):
    figure_path = save_figure(triplanar_figure(small_volume(), (10, 15, 20)), tmp_path / "figures" / "scan.png")
    sections = [Section("Tables", "| a | b |\n|---|---|\n| 1 | 2 |", [Figure(figure_path, "a scan")])]
    html_path, md_path = write_report(sections, tmp_path / "out", "m3d report")
    page = html_path.read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == 1 and base64.b64decode(embedded[0]) == figure_path.read_bytes()
    assert not re.search(r'src="(?!data:)', page) and "<link" not in page  # nothing to fetch
    assert "![a scan](../figures/scan.png)" in md_path.read_text()
    with pytest.raises(FileNotFoundError):
        write_report([Section("x", "", [Figure(tmp_path / "missing.png", "gone")])], tmp_path / "out", "t")


def test_build_report_from_a_results_folder(tmp_path):
    from m3d.cli import main
    from m3d.detectors import UNetConfig, UNetForForgeryDetection
    from m3dsynth_mini import make_mini_m3dsynth

    data = make_mini_m3dsynth(tmp_path / "m3dsynth", sites={"train": 1, "test": 1}, generators=("pix2pix",))
    results = tmp_path / "results"
    (results / "plots" / "examples").mkdir(parents=True)
    (results / "tables.md").write_text(
        "# M3Dsynth benchmark\n\n## Detection: AUC\n\n| Detector | pix2pix |\n|---|---|\n| unet | 0.875 |\n"
    )
    (results / "bench_config.json").write_text(json.dumps({"data": str(data), "preset": "demo", "seed": 0}))
    save_figure(triplanar_figure(small_volume(), (10, 15, 20)), results / "plots" / "roc_unet.png")
    cell = "cross_generator__unet__pix2pix"
    (results / "cells").mkdir()
    (results / "cells" / f"{cell}.json").write_text(json.dumps({"detector": "unet", "train_data": "pix2pix"}))
    UNetForForgeryDetection(UNetConfig(base_channels=4, depth=3)).save_pretrained(results / "runs" / cell / "best")

    assert main(["report", str(results)]) == 0
    page = (results / "report.html").read_text()
    markdown = (results / "report.md").read_text()
    assert "<td>0.875</td>" in page and "### Detection: AUC" in markdown  # tables nested under their section
    assert "ROC: unet" in page
    triplanar = sorted((results / "report_figures").glob("triplanar_*.png"))
    assert [p.name for p in triplanar] == [
        "triplanar_test-inject-0_pix2pix.png",
        "triplanar_test-remove-0_pix2pix.png",
    ]
    assert Image.open(triplanar[0]).size[0] > 700  # three columns: scan, ground truth, the unet map (two: ~570 px)
    assert "No CAD analysis" in page  # a missing step is said, not silently skipped
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 3
