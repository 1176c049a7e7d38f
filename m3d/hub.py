"""`m3d push`: upload an m3d folder — an M3Dsynth dataset, a saved pipeline or a saved detector / CAD
model — to the Hugging Face Hub as it is, after checking what it is and that it has its card."""
from __future__ import annotations

from pathlib import Path

KINDS = {"dataset": "dataset", "pipeline": "model", "model": "model"}  # folder kind -> Hub repo type


def folder_kind(path: str | Path) -> str:
    """"dataset" (``manifest.json`` + ``data/``), "pipeline" (``model_index.json``) or "model"
    (``config.json``); a clear error for anything else or a folder without its ``README.md`` card."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder")
    if (path / "manifest.json").is_file() and (path / "data").is_dir():
        kind = "dataset"
    elif (path / "model_index.json").is_file():
        kind = "pipeline"
    elif (path / "config.json").is_file():
        kind = "model"
    else:
        raise ValueError(
            f"{path} is not an m3d dataset (manifest.json + data/), pipeline (model_index.json) or model (config.json) folder"
        )
    if not (path / "README.md").is_file():
        card = "m3d build writes it" if kind == "dataset" else f"write it with `m3d card {path}`"
        raise FileNotFoundError(f"{path} has no README.md card ({card})")
    if kind == "dataset" and (path / ".build").exists():
        raise ValueError(f"{path} is an unfinished build (.build/ journals left): run the same `m3d build` again to finish it")
    return kind


def push_folder(path: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Create ``repo_id`` (dataset or model repo, by the folder's kind) if needed and upload the folder;
    returns the URL of the commit."""
    from huggingface_hub import HfApi

    kind = folder_kind(path)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--repo-id must be ORG/NAME; got {repo_id!r}")
    api = HfApi(token=token)
    repo_type = KINDS[kind]
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(path), repo_id=repo_id, repo_type=repo_type, commit_message=f"Upload m3d {kind} folder",
    )
    return str(getattr(commit, "commit_url", commit))
