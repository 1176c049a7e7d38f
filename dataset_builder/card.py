"""The dataset card (``README.md``) of an M3Dsynth folder: YAML ``configs:`` whose ``data_files`` select
the shards of each config (`CONFIGS`), so that ``load_dataset(folder, config)`` works without a loading
script, plus the content table, fields and citation (template ``templates/README.md.jinja``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..constants import FAKE_GENERATORS, SPLITS
from .features import CONFIGS

if TYPE_CHECKING:
    from .writer import BuildState

TEMPLATE = Path(__file__).with_name("templates") / "README.md.jinja"
SOURCES = {
    "phantom": "Synthetic chest CT (m3d's phantom: real LIDC-IDRI scan geometry and nodule contours, synthetic "
    "anatomy) tampered by the shipped phantom-trained demo pipelines: a demonstration of the layout, not M3Dsynth.",
    "lidc": "LIDC-IDRI scans (CC BY 3.0, The Cancer Imaging Archive), sites from m3d's plan over the LIDC-IDRI "
    "annotations, tampered by the generator pipelines named in `manifest.json`.",
    "official": "The official M3Dsynth release (tampered scans and masks) on its LIDC-IDRI source scans (CC BY 3.0), "
    "imported with `m3d import-official`.",
}


def config_data_files(shards: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    """Per config, per split: the shard globs (``data/<generator>/<task>/<split>-*.parquet``) it reads;
    configs and splits without shards are left out, as are generator configs without fakes."""

    present = {tuple(relative.split("/")[1:3]) + (relative.split("/")[3].split("-")[0],) for relative in shards}
    files: dict[str, dict[str, list[str]]] = {}
    for name, (generators, tasks) in CONFIGS.items():
        if name in FAKE_GENERATORS and not any(g == name for g, _, _ in present):
            continue
        by_split = {
            split: [f"data/{g}/{t}/{split}-*.parquet" for g in generators for t in tasks if (g, t, split) in present]
            for split in SPLITS
        }
        by_split = {split: paths for split, paths in by_split.items() if paths}
        if by_split:
            files[name] = by_split
    return files


def _rows(state: "BuildState", patterns: list[str]) -> int:
    from fnmatch import fnmatch

    return sum(
        entry["rows"] for relative, entry in state.shards.items() if any(fnmatch(relative, p) for p in patterns)
    )


def write_dataset_card(out: str | Path, state: "BuildState", *, pretty_name: str = "M3Dsynth") -> Path:
    """Write ``<out>/README.md`` from the manifest state."""
    import jinja2

    out = Path(out)
    files = config_data_files(state.shards)
    if not files:
        raise ValueError(f"{out} holds no shard: nothing to describe (did every sample fail?)")
    configs = [
        {
            "config_name": name,
            **({"default": True} if name == "all" else {}),
            "data_files": [{"split": split, "path": paths} for split, paths in by_split.items()],
        }
        for name, by_split in files.items()
    ]
    total = sum(entry["rows"] for entry in state.shards.values())
    metadata = {
        "pretty_name": pretty_name,
        "license": "cc-by-3.0",
        "task_categories": ["image-classification", "image-segmentation"],
        "tags": ["medical", "ct", "lung-nodule", "forensics", "deepfake-detection", "nifti", "m3d"],
        "size_categories": ["n<1K" if total < 1000 else "1K<n<10K" if total < 10000 else "10K<n<100K"],
        "configs": configs,
    }
    config = state.config or {}
    rows = [(name, [_rows(state, by_split.get(split, [])) for split in SPLITS]) for name, by_split in files.items()]
    template = jinja2.Template(TEMPLATE.read_text(), trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    text = template.render(
        metadata_yaml=yaml.safe_dump(metadata, sort_keys=False),
        pretty_name=pretty_name,
        command=config.get("command", "m3d build"),
        source_text=SOURCES.get(config.get("source", ""), ""),
        splits=list(SPLITS),
        config_rows=rows,
        repo_hint=out.name,
    )
    path = out / "README.md"
    temporary = path.with_name(".README.md.tmp")
    temporary.write_text(text)
    temporary.replace(path)
    return path
