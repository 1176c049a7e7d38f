"""Model cards (README.md with Hub metadata) for saved m3d folders: tampering pipelines, detectors and
the CAD scorer, filled from the folder's own config and, when given, benchmark results (as Hub
``model-index`` entries, which feed the Hub's evaluation widget). The dataset card is the builder's
(`m3d.dataset_builder`).

`write_model_card(path, results=...)` writes ``<path>/README.md``; `folder_kind(path)` says what a
folder holds; `m3d card PATH [--results RESULTS/cells/<cell>.json]` is the command line.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import jinja2
import yaml

from ..remote_code import missing_code

TEMPLATES = Path(__file__).with_name("templates")
LICENSE = "apache-2.0"
PHANTOM_NOTE = "phantom"  # a folder whose training data is m3d's synthetic CT says so in its config/logs


@dataclass(frozen=True)
class CardResult:
    """One evaluated setting, written as a Hub ``model-index`` result and a row of the card's table.

    ``task_type``: a Hub task id ("image-classification" for detection, "image-segmentation" for
    localization); ``metrics``: metric name -> value; ``setting``: e.g. "train pix2pix / test ddpm".
    """

    task_type: str
    task_name: str
    dataset_name: str
    split: str
    metrics: dict[str, float]
    setting: str = ""
    dataset_type: str = "m3dsynth"


@dataclass
class FolderInfo:
    kind: str  # "pipeline" | "detector" | "cad"
    class_name: str
    parameters: int
    path_hint: str
    task: str = ""
    components: dict[str, str] = field(default_factory=dict)
    model_type: str = ""
    input_mode: str = ""
    localizes: bool = False
    remote_code: bool = False  # the folder holds the code its config's auto_map names (trust_remote_code loads it)
    nodule_mask: bool = False  # a pipeline whose network also sees the mask of the nodule to draw
    stochastic: bool = False  # a GAN pipeline that keeps its network's dropout on when it generates


def folder_kind(path: str | Path) -> str:
    """ "pipeline" (diffusers ``model_index.json``), "detector" or "cad" (transformers ``config.json``
    with an m3d ``model_type``), or "dataset" (an M3Dsynth folder: ``manifest.json`` + ``data/``); a
    clear error for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder")
    if (path / "model_index.json").is_file():
        return "pipeline"
    config = path / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text()).get("model_type", "")
        if model_type == "m3d_cad":
            return "cad"
        if model_type.startswith("m3d_"):
            return "detector"
        raise ValueError(f"{config} has model_type {model_type!r}, not an m3d model")
    if (path / "manifest.json").is_file() and (path / "data").is_dir():
        return "dataset"
    raise ValueError(
        f"{path} is not an m3d dataset (manifest.json + data/), pipeline (model_index.json) or model "
        "(config.json) folder"
    )


def count_parameters(path: str | Path) -> int:
    """Trainable-parameter count of the saved pipeline (all its models) or model at ``path`` (loads it)."""
    path = Path(path)
    kind = folder_kind(path)
    if kind == "pipeline":
        from ..pipelines import load_pipeline

        return _pipeline_parameters(load_pipeline(path))
    from transformers import AutoModel

    importlib.import_module("m3d.cad" if kind == "cad" else "m3d.detectors")  # registers them with the Auto classes
    return AutoModel.from_pretrained(path).num_parameters()


def _pipeline_parameters(pipeline) -> int:
    """Trainable-parameter count of all the models of a loaded pipeline."""
    import torch

    return sum(
        p.numel() for c in pipeline.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters()
    )


def _folder_info(path: Path, kind: str) -> FolderInfo:
    hint = path.name
    if kind == "pipeline":
        index = json.loads((path / "model_index.json").read_text())
        from ..pipelines import load_pipeline
        from ..pipelines.common import pipeline_class_name

        pipeline = load_pipeline(path)
        return FolderInfo(
            kind,
            pipeline_class_name(index),
            _pipeline_parameters(pipeline),
            hint,
            task=str(index.get("task", "")),
            components={name: type(c).__name__ for name, c in pipeline.components.items() if c is not None},
            nodule_mask=pipeline.mask_conditioned,
            stochastic=bool(index.get("stochastic", False)),
        )
    config = json.loads((path / "config.json").read_text())
    architectures = config.get("architectures") or [config["model_type"]]
    return FolderInfo(
        kind,
        architectures[0],
        count_parameters(path),
        hint,
        model_type=config["model_type"],
        input_mode=str(config.get("input_mode", "")),
        localizes=kind == "detector" and _localizes(config["model_type"]),
        remote_code=bool(config.get("auto_map")) and not missing_code(path, config),
    )


def _localizes(model_type: str) -> bool:
    from ..detectors import DETECTORS

    for config_class, model_class in DETECTORS.values():
        if config_class.model_type == model_type:
            return model_class.localizes
    raise ValueError(
        f"unknown m3d detector model_type {model_type!r}; m3d knows "
        f"{sorted(c.model_type for c, _ in DETECTORS.values())}"
    )


def _model_index(name: str, results: Iterable[CardResult]) -> list[dict]:
    entries = [
        {
            "task": {"type": result.task_type, "name": result.task_name},
            "dataset": {"type": result.dataset_type, "name": result.dataset_name, "split": result.split},
            "metrics": [
                {
                    "type": metric,
                    "value": round(float(value), 4),
                    "name": f"{metric} ({result.setting})" if result.setting else metric,
                }
                for metric, value in result.metrics.items()
            ],
        }
        for result in results
    ]
    return [{"name": name, "results": entries}] if entries else []


def benchmark_card_results(cell: dict, dataset_name: str = "M3Dsynth") -> list[CardResult]:
    """`CardResult`s of one finished benchmark cell (``RESULTS_DIR/cells/<cell>.json`` of `m3d bench`):
    detection (AUC, balanced accuracy, Pd@1%) and, for localizing detectors, F1 / IoU, per test
    generator over both tasks; undefined values are left out."""
    results = []
    for test_generator, by_task in cell["metrics"].items():
        metrics = by_task.get("all", {})
        setting = f"train {cell['train_data']} / test {test_generator}"
        groups = [("image-classification", "Tampering detection", ("auc", "balanced_accuracy", "pd_at_1pct"))]
        if cell.get("localizes"):
            groups.append(("image-segmentation", "Tampering localization", ("f1", "iou", "f1_best", "iou_best")))
        for task_type, task_name, keys in groups:
            values = {
                k: float(metrics[k])
                for k in keys
                if isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k])
            }
            if values:
                results.append(CardResult(task_type, task_name, dataset_name, "test", values, setting))
    return results


def render_model_card(
    path: str | Path,
    results: Iterable[CardResult] = (),
    *,
    name: str | None = None,
    provenance: str = "",
    phantom_trained: bool = True,
) -> str:
    """The README.md text for the saved pipeline, detector or CAD folder at ``path``."""
    path = Path(path)
    kind = folder_kind(path)
    if kind == "dataset":
        raise ValueError(f"{path} is a dataset folder: its card is written by `m3d build`")
    info = _folder_info(path, kind)
    results = list(results)
    name = name or path.name
    library = "diffusers" if kind == "pipeline" else "transformers"
    tags = ["m3d", "medical-imaging", "ct", "forensics", "m3dsynth"]
    tags += (
        ["tampering", info.task]
        if kind == "pipeline" and info.task
        else ["image-forensics" if kind == "detector" else "cad"]
    )
    metadata = {"license": LICENSE, "library_name": library, "tags": tags}
    if kind != "pipeline":
        metadata["pipeline_tag"] = (
            "image-segmentation" if info.localizes and kind == "detector" else "image-classification"
        )
    model_index = _model_index(name, results)
    if model_index:
        metadata["model-index"] = model_index
    summaries = {
        "pipeline": (
            f"A {info.class_name} that tampers chest CT scans ({info.task}): part of m3d, a reproduction of M3Dsynth."
        ),
        "detector": (
            f"A {info.class_name} forensic detector of AI-manipulated chest CT, part of m3d (M3Dsynth benchmark)."
        ),
        "cad": f"A {info.class_name} nodule malignancy scorer, the diagnostic check of m3d's M3Dsynth reproduction.",
    }
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return environment.get_template(f"{kind}.md.jinja").render(
        metadata_yaml=yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True),
        title=name,
        summary=summaries[kind],
        info=info,
        results=results,
        phantom_trained=phantom_trained,
        provenance=provenance or "Saved with m3d; see the project README for the training commands.",
    )


def write_model_card(path: str | Path, results: Iterable[CardResult] = (), **kwargs) -> Path:
    """Write `render_model_card`'s text to ``<path>/README.md`` atomically and return its path."""
    text = render_model_card(path, results, **kwargs)
    card = Path(path) / "README.md"
    temporary = card.with_name(f".README.md.tmp-{os.getpid()}")
    temporary.write_text(text)
    temporary.replace(card)
    return card


__all__ = [
    "CardResult",
    "benchmark_card_results",
    "count_parameters",
    "folder_kind",
    "render_model_card",
    "write_model_card",
]
