"""The design card's top level: `pipelines/`, `dataset_builder/` and `model_cards/` at the repository's root,
installed as `m3d.pipelines`, `m3d.dataset_builder` and `m3d.model_cards`; every package folder listed in
pyproject.toml; `train_detector.py` at the root; pipeline folders saved before the move still load."""

import importlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import m3d.dataset_builder
import m3d.model_cards
import m3d.pipelines
from m3d.dataset_builder.generate import DEMO_PIPELINES_DIR

REPOSITORY = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_three_parts_live_at_the_root_under_their_m3d_names():
    for module, folder in (
        (m3d.pipelines, "pipelines"),
        (m3d.dataset_builder, "dataset_builder"),
        (m3d.model_cards, "model_cards"),
    ):
        assert Path(module.__file__).resolve() == REPOSITORY / folder / "__init__.py"
        assert SETUPTOOLS["package-dir"][module.__name__] == folder
        assert not (REPOSITORY / "m3d" / folder).exists()


def test_every_package_folder_is_in_the_distribution():
    folders = {
        "m3d": REPOSITORY / "m3d",
        **{name: REPOSITORY / folder for name, folder in SETUPTOOLS["package-dir"].items()},
    }
    found = set()
    for name, root in folders.items():
        for init in root.rglob("__init__.py"):
            found.add(".".join([name, *init.parent.relative_to(root).parts]))
    assert found == set(SETUPTOOLS["packages"])


def test_train_detector_script_at_the_root():
    scripted = subprocess.run(
        [sys.executable, str(REPOSITORY / "train_detector.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=REPOSITORY.parent,
        check=True,
    ).stdout
    module = subprocess.run(
        [sys.executable, "-m", "m3d.train.train_detector", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert scripted.startswith("usage: train_detector.py") and "--detector" in scripted
    assert scripted.split("options:")[1] == module.split("options:")[1]


def test_pipeline_folders_saved_before_the_move_name_importable_modules():
    """The shipped folders were saved when the pipelines lived in m3d/pipelines/: every module path their
    model_index.json records still imports, and they load."""
    folders = sorted(p for p in DEMO_PIPELINES_DIR.iterdir() if (p / "model_index.json").is_file())
    assert len(folders) == 6
    for folder in folders:
        for name, entry in json.loads((folder / "model_index.json").read_text()).items():
            if isinstance(entry, list) and entry[0] and entry[0].split(".")[0] == "m3d":  # [None, None]: absent
                assert hasattr(importlib.import_module(entry[0]), entry[1]), (folder.name, name)
    assert type(m3d.pipelines.load_pipeline(DEMO_PIPELINES_DIR / "ddpm-remove")).__name__ == "M3DInpaintPipeline"
