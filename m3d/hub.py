"""`m3d push`: upload an m3d folder — an M3Dsynth dataset, a saved pipeline or a saved detector / CAD
model — to the Hugging Face Hub as it is, after checking what it is and that it has its card."""

from __future__ import annotations

from pathlib import Path

from .model_cards import folder_kind

REPO_TYPES = {
    "dataset": "dataset",
    "pipeline": "model",
    "detector": "model",
    "cad": "model",
}  # folder kind -> Hub repo type


def check_uploadable(path: str | Path) -> str:
    """The folder's kind (`m3d.model_cards.folder_kind`) once it is known to be complete: it has its
    ``README.md`` card and, for a dataset, no unfinished build; a clear error otherwise."""
    path = Path(path)
    kind = folder_kind(path)
    if not (path / "README.md").is_file():
        card = "m3d build writes it" if kind == "dataset" else f"write it with `m3d card {path}`"
        raise FileNotFoundError(f"{path} has no README.md card ({card})")
    if kind == "dataset" and (path / ".build").exists():
        raise ValueError(
            f"{path} is an unfinished build (.build/ journals left): run the same `m3d build` again to finish it"
        )
    return kind


def push_folder(path: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Create ``repo_id`` (``ORG/NAME``, or ``NAME`` in the token owner's namespace; a dataset or model
    repo by the folder's kind) if needed and upload the folder; returns the URL of the commit."""
    from huggingface_hub import HfApi

    kind = check_uploadable(path)
    if repo_id.count("/") > 1 or not all(repo_id.split("/")):
        raise ValueError(f"the repo id must be ORG/NAME or NAME; got {repo_id!r}")
    api = HfApi(token=token)
    repo_type = REPO_TYPES[kind]
    repo = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(path),
        repo_id=getattr(repo, "repo_id", repo_id),
        repo_type=repo_type,
        commit_message=f"Upload m3d {kind} folder",
    )
    return str(getattr(commit, "commit_url", commit))
