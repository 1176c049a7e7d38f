"""`m3d push`: the folder checks and the upload call, offline (HfApi replaced)."""

import json
from pathlib import Path

import pytest

from m3d.cli import main
from m3d.hub import check_uploadable


class FakeApi:
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/0"})()


@pytest.fixture
def dataset_folder(tmp_path):
    folder = tmp_path / "m3dsynth"
    (folder / "data").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format": 1}))
    (folder / "README.md").write_text("---\nconfigs: []\n---\n")
    return folder


def test_kinds_and_card_required(tmp_path, dataset_folder):
    assert check_uploadable(dataset_folder) == "dataset"
    pipeline = tmp_path / "pipe"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="m3d card"):
        check_uploadable(pipeline)
    (pipeline / "README.md").write_text("card")
    assert check_uploadable(pipeline) == "pipeline"
    with pytest.raises(ValueError, match="not an m3d dataset"):
        check_uploadable(tmp_path)
    (dataset_folder / ".build").mkdir()
    with pytest.raises(ValueError, match="unfinished build"):
        check_uploadable(dataset_folder)


def test_push_uploads_the_folder_as_a_dataset_repo(dataset_folder, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    FakeApi.calls = []
    assert main(["push", str(dataset_folder), "--repo-id", "org/m3dsynth", "--private", "--token", "hf_x"]) == 0
    (_, repo_id, create), (_, upload) = FakeApi.calls
    assert repo_id == "org/m3dsynth" and create == {"repo_type": "dataset", "private": True, "exist_ok": True}
    assert upload["folder_path"] == str(dataset_folder) and upload["repo_type"] == "dataset"
    assert "commit/0" in capsys.readouterr().out


def test_push_errors_are_one_line(tmp_path, dataset_folder, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    assert main(["push", str(tmp_path / "missing"), "--repo-id", "org/x"]) == 2
    assert main(["push", str(dataset_folder), "--repo-id", "a/b/c"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and "is not a folder" in errors[0] and "ORG/NAME or NAME" in errors[1]


def test_shipped_configs_name_no_local_path(tmp_path):
    """Shipped folders load anywhere: no config.json records where it was loaded from on the machine
    that made it (the shipping copy drops that key) or names modeling code that is not beside it."""
    import m3d
    from m3d.dataset_builder.generate import DEMO_PIPELINES_DIR
    from m3d.remote_code import missing_code
    from m3d.train.common import replace_folder

    configs = sorted([*Path(m3d.__file__).parent.rglob("config.json"), *DEMO_PIPELINES_DIR.rglob("config.json")])
    assert len(configs) > 20  # detectors, pipelines' models, the CAD scorer
    assert not [str(c) for c in configs if "_name_or_path" in json.loads(c.read_text())]
    # an auto_map names code beside the config (trust_remote_code would fail on a missing module)
    missing = {str(c): missing_code(c.parent, json.loads(c.read_text())) for c in configs}
    assert not {config: references for config, references in missing.items() if references}
    source = tmp_path / "run"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"_name_or_path": "/home/someone/run", "model_type": "x"}))
    shipped = replace_folder(source, tmp_path / "shipped")
    assert json.loads((shipped / "config.json").read_text()) == {"model_type": "x"}
    # a copy of only some files drops the auto_map whose code it leaves behind, and keeps one whose code it takes
    (source / "config.json").write_text(json.dumps({"model_type": "x", "auto_map": {"AutoModel": "modeling_x.X"}}))
    (source / "modeling_x.py").write_text("")
    assert "auto_map" not in json.loads(
        (replace_folder(source, tmp_path / "bare", files=("config.json",)) / "config.json").read_text()
    )
    kept = replace_folder(source, tmp_path / "with_code", files=("config.json", "modeling_x.py"))
    assert json.loads((kept / "config.json").read_text())["auto_map"] == {"AutoModel": "modeling_x.X"}
