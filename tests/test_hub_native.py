"""The ecosystem's generic entry points on what m3d saves: `import m3d` registers every architecture with
transformers' Auto classes (without importing them at `import m3d`), detector and CAD folders carry their
code (`trust_remote_code=True` works where m3d cannot be imported), pipeline folders load through
`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`, and folders saved before keep loading (older
class names, no code file, the GANs' network under its old component name)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m3d.pipelines import Pix2Pix3DPipeline, load_pipeline
from m3d.dataset_builder.generate import DEMO_PIPELINES_DIR as DEMO_DIR

BLOCK_M3D = """
import sys
class BlockM3D:
    def find_spec(self, name, path=None, target=None):
        if name == "m3d" or name.startswith("m3d."):
            raise ImportError("m3d is not importable in this process")
sys.meta_path.insert(0, BlockM3D())
"""


def run_python(code: str, tmp_path: Path) -> str:
    """Run ``code`` in a fresh offline interpreter (its own Hub module cache); its stdout, or the test fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    from m3d.cad import CADConfig, CADForMalignancyScoring
    from m3d.detectors import HPFCNConfig, HPFCNForForgeryDetection, XceptionConfig, XceptionForForgeryDetection

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    HPFCNForForgeryDetection(HPFCNConfig()).save_pretrained(root / "hpfcn")  # imports another detector's code
    XceptionForForgeryDetection(XceptionConfig()).save_pretrained(root / "xception")  # an image-level classifier
    CADForMalignancyScoring(CADConfig.from_preset("tiny")).save_pretrained(root / "cad")
    return root


def test_import_m3d_registers_every_architecture_lazily(saved_models, tmp_path):
    """`import m3d` alone is enough for the Auto classes, in either import order, and does not itself load
    the detectors (it stays fast)."""
    for first, second in (
        ("import m3d", "from transformers import AutoModel"),
        ("from transformers import AutoModel", "import m3d"),
    ):
        out = run_python(
            f"""
import sys
{first}
{second}
print("m3d.detectors" in sys.modules)
for name in ("hpfcn", "xception", "cad"):
    print(type(AutoModel.from_pretrained({str(saved_models)!r} + "/" + name)).__module__)
""",
            tmp_path,
        )
        lines = out.split()
        assert lines[1:] == [
            "m3d.detectors.hpfcn.modeling_hpfcn",
            "m3d.detectors.xception.modeling_xception",
            "m3d.cad.modeling_cad",
        ]
    out = run_python("import sys, m3d; print('transformers' in sys.modules, 'm3d.detectors' in sys.modules)", tmp_path)
    assert out.split() == ["False", "False"]
    from m3d.detectors import M3DCTImageProcessor, load_detector

    M3DCTImageProcessor.from_detector_config(load_detector(saved_models / "hpfcn").config).save_pretrained(
        saved_models / "hpfcn"
    )
    out = run_python(
        f"import m3d\nfrom transformers import AutoImageProcessor\n"
        f"print(type(AutoImageProcessor.from_pretrained({str(saved_models / 'hpfcn')!r})).__name__)",
        tmp_path,
    )
    assert out.split()[-1] == "M3DCTImageProcessor"  # the first Auto module imported may be the processors'


def test_saved_detector_and_cad_load_with_their_own_code_where_m3d_cannot_be_imported(saved_models, tmp_path):
    from m3d.cad import load_cad
    from m3d.detectors import load_detector

    config = json.loads((saved_models / "hpfcn" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSemanticSegmentation"] == "modeling_hpfcn.HPFCNForForgeryDetection"
    assert "from .modeling_unet import pool_logits" in (saved_models / "hpfcn" / "modeling_hpfcn.py").read_text()
    x = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    expected = {
        "hpfcn": load_detector(saved_models / "hpfcn").eval()(pixel_values=x).logits,
        "xception": load_detector(saved_models / "xception").eval()(pixel_values=x).logits,
    }
    out = run_python(
        BLOCK_M3D
        + f"""
import json, torch
from transformers import AutoModel, AutoModelForImageClassification, AutoModelForSemanticSegmentation
x = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
root = {str(saved_models)!r}
logits = {{}}
for name, auto in (("hpfcn", AutoModelForSemanticSegmentation), ("xception", AutoModelForImageClassification)):
    model = auto.from_pretrained(root + "/" + name, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    logits[name] = model(pixel_values=x).logits.tolist()
cad = AutoModel.from_pretrained(root + "/cad", trust_remote_code=True)
print(json.dumps({{"logits": logits, "cad": type(cad).__name__, "m3d": "m3d" in sys.modules}}))
""",
        tmp_path,
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["cad"] == "CADForMalignancyScoring" and result["m3d"] is False
    for name, logits in expected.items():
        torch.testing.assert_close(torch.tensor(result["logits"][name]), logits, atol=1e-5, rtol=1e-5)
    assert type(load_cad(saved_models / "cad")).__module__ == "m3d.cad.modeling_cad"  # m3d's own loader: its classes


def test_every_shipped_pipeline_loads_with_diffusers_generic_entry_point(tmp_path):
    """`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` in a process that never imports m3d
    itself: diffusers runs the folder's one-line `m3d_pipeline.py`, which takes m3d's class."""
    folders = sorted(str(path) for path in DEMO_DIR.iterdir() if (path / "model_index.json").is_file())
    assert len(folders) == 6
    out = run_python(
        f"""
from diffusers import DiffusionPipeline
for folder in {folders!r}:
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    masks = 0 if pipe.nodule_mask_bank is None else len(pipe.nodule_mask_bank.masks)
    print(folder.rsplit("/", 1)[-1], type(pipe).__name__, pipe.task, pipe.mask_conditioned, masks)
""",
        tmp_path,
    )
    names = {"pix2pix": "Pix2Pix3DPipeline", "cyclegan": "CycleGAN3DPipeline", "ddpm": "M3DInpaintPipeline"}
    rows = [line.split() for line in out.strip().splitlines()[-6:]]
    assert [row[:3] for row in rows] == [[f, names[f.split("-")[0]], f.split("-")[1]] for f, *_ in rows]
    for folder, _, _, conditioned, masks in rows:  # a mask-conditioned folder's bank of training masks comes along
        assert (conditioned == "True") == (int(masks) > 0), folder


def test_a_folder_saved_before_the_code_file_still_loads(tmp_path):
    """Older folders name their class as a string and carry no `m3d_pipeline.py`."""
    torch.manual_seed(0)
    pipeline = Pix2Pix3DPipeline.from_preset("tiny", task="remove")
    pipeline.save_pretrained(tmp_path / "new")
    old = tmp_path / "old"
    pipeline.save_pretrained(old)
    (old / "m3d_pipeline.py").unlink()
    index = json.loads((old / "model_index.json").read_text())
    (old / "model_index.json").write_text(json.dumps({**index, "_class_name": "Pix2Pix3DPipeline"}))
    for folder in (old, tmp_path / "new"):
        for loaded in (load_pipeline(folder), Pix2Pix3DPipeline.from_pretrained(folder)):
            assert type(loaded) is Pix2Pix3DPipeline and loaded.task == "remove"
            assert all(
                torch.equal(a, b)
                for a, b in zip(loaded.network.state_dict().values(), pipeline.network.state_dict().values())
            )


@pytest.mark.parametrize("name", ["pix2pix-remove", "cyclegan-inject"])
def test_a_folder_saved_before_the_network_was_renamed_still_loads(name, tmp_path):
    """The GANs' network was the ``generator`` component (subfolder and ``model_index.json`` key) when the shipped
    folders were trained: m3d's loaders map the old name, to the same fp32 weights and the same output; a folder
    saved again has the name now."""
    old = tmp_path / name
    shutil.copytree(DEMO_DIR / name, old)
    (old / "network").rename(old / "generator")
    index = json.loads((old / "model_index.json").read_text())
    index["generator"] = index.pop("network")
    (old / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    current = load_pipeline(DEMO_DIR / name)
    cubes = torch.rand((2, 1, 32, 32, 32), generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = current(cubes, generator=torch.Generator().manual_seed(1), progress=False).cubes
    for loaded in (load_pipeline(old), type(current).from_pretrained(old)):
        assert (
            type(loaded) is type(current)
            and loaded.components.keys() == current.components.keys()
            and "generator" not in loaded.config
        )
        assert loaded.network.dtype == torch.float32
        assert all(
            torch.equal(a, b)
            for a, b in zip(loaded.network.state_dict().values(), current.network.state_dict().values())
        )
        assert (loaded(cubes, generator=torch.Generator().manual_seed(1), progress=False).cubes == expected).all()
    loaded.save_pretrained(tmp_path / "saved-again")
    assert "network" in json.loads((tmp_path / "saved-again" / "model_index.json").read_text())
    assert (tmp_path / "saved-again" / "network" / "diffusion_pytorch_model.safetensors").is_file()


def test_m3d_never_runs_code_a_folder_brings_but_its_own_line(tmp_path):
    torch.manual_seed(0)
    Pix2Pix3DPipeline.from_preset("tiny").save_pretrained(tmp_path / "p")
    marker = tmp_path / "ran"
    (tmp_path / "p" / "m3d_pipeline.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom m3d.pipelines import Pix2Pix3DPipeline\n"
    )
    with pytest.raises(ValueError, match="not m3d's own one-line code file"):
        load_pipeline(tmp_path / "p")
    assert not marker.exists()


def test_pipeline_code_is_copied_under_a_lock_other_processes_respect(monkeypatch):
    """diffusers copies every local folder's m3d_pipeline.py to one path of its modules cache and imports it
    from there: m3d's loads hold a file lock across that copy, so that two processes (two ranks of a build)
    never import each other's half-written copy."""
    import fcntl

    from diffusers.utils import dynamic_modules_utils
    from diffusers.utils.constants import HF_MODULES_CACHE

    copy, held = dynamic_modules_utils.shutil.copyfile, []

    def copy_while_checking_the_lock(source, target):
        with open(Path(HF_MODULES_CACHE) / ".m3d-pipeline-code.lock", "a") as other:  # as another process would
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return copy(source, target)

    monkeypatch.setattr(dynamic_modules_utils.shutil, "copyfile", copy_while_checking_the_lock)
    load_pipeline(DEMO_DIR / "pix2pix-inject")
    assert held and all(held)
