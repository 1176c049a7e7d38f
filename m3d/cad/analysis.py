"""Does a tampering flip the diagnosis? The CAD scorer applied at every site of an M3Dsynth dataset.

`run_cad_analysis(model, data, results_dir)` scores the nodule at ``site_lps_mm`` of every example (a
tampered scan or the pristine scan of the same site) and writes, into ``<results_dir>/cad/``:

``cad_scores.csv``
    one row per example: ``img_id, site_id, split, generator, task, label, group, patient_id,
    site_x_mm, site_y_mm, site_z_mm, nodule_diameter_mm, malignancy_before, cad_probability, cad_logit,
    cad_rating, cad_malignant`` (``cad_malignant``: probability >= the threshold, 0.5).
``cad_scores.json``
    ``{"summary": {...}, "examples": [the CSV's rows]}``; the summary holds ``model``, ``threshold``,
    ``n_examples``, ``groups`` (per group: ``n``, ``mean``, ``median``, ``std`` of the probability,
    ``fraction_malignant``, ``mean_rating``), ``pristine_auc`` (pristine malignant vs benign nodules:
    does the scorer itself work? NaN unless both occur), ``by_generator`` (``generator -> task -> {n,
    mean_probability, fraction_malignant, attack_success, pairs, flip_rate, mean_change}``:
    ``attack_success`` is the fraction of fakes that get the attacker's verdict — malignant after an
    injection, benign after a removal; ``flip_rate`` the fraction of fakes whose verdict differs from
    the pristine scan of the same site, over the ``pairs`` that have one; ``mean_change`` the mean
    probability change fake - pristine) and ``figures`` (file names).
``hist_inject.png``, ``hist_remove.png``
    the paper's histograms: the malignancy probability at the pristine sites of the task beside the
    tampered ones, one outline per generator.
``hist_pristine.png``
    the probability at the pristine benign (median rating <= 2) and malignant (>= 4) nodules.

Groups: ``injected`` / ``removed`` (fakes by task), ``pristine_malignant`` / ``pristine_benign`` (pristine
examples by the readers' median rating at the site, the scorer's own thresholds) and
``pristine_indeterminate`` (rating between, or unrated). ``data`` is an M3Dsynth folder
(``data/<generator>/<task>/<split>-*.parquet``, the builder's layout; read row by row, masks never
decoded), a `datasets.Dataset` / `DatasetDict` / `IterableDataset` with the M3Dsynth features, or an
iterable of such examples. `m3d cad-analysis --model DIR --data DIR --out RESULTS_DIR` is the CLI.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..files import write_atomic
from .modeling_cad import CADForMalignancyScoring
from .scoring import load_cad, score_locations

SUBFOLDER = "cad"
CSV_NAME = "cad_scores.csv"
JSON_NAME = "cad_scores.json"
GROUPS = ("pristine_benign", "pristine_malignant", "pristine_indeterminate", "injected", "removed")
COLUMNS = (
    "img_id",
    "site_id",
    "split",
    "generator",
    "task",
    "label",
    "group",
    "patient_id",
    "site_x_mm",
    "site_y_mm",
    "site_z_mm",
    "nodule_diameter_mm",
    "malignancy_before",
    "cad_probability",
    "cad_logit",
    "cad_rating",
    "cad_malignant",
)
READ_COLUMNS = (
    "img_id",
    "site_id",
    "volume",
    "label",
    "task",
    "generator",
    "patient_id",
    "site_lps_mm",
    "nodule_diameter_mm",
    "malignancy_before",
    "base_img_id",
    "box_start_zyx",
    "scan_shape_zyx",
)
ATTACK_VERDICT = {"inject": True, "remove": False}  # the verdict the attacker wants: malignant after an injection


@dataclass
class CADAnalysis:
    """What `run_cad_analysis` wrote: the folder, its files, the summary and the per-example rows."""

    folder: Path
    files: dict[str, Path]
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(repr=False)


# -- reading examples ---------------------------------------------------------------------------


def _class_name(features, column: str, value: Any) -> str:
    """A ClassLabel value as its name (datasets decodes ClassLabel columns to ints)."""
    feature = features.get(column) if features is not None else None
    if isinstance(value, (int, np.integer)) and hasattr(feature, "int2str"):
        return feature.int2str(int(value))
    return str(value)


def _normalise(example: dict[str, Any], features, split: str) -> dict[str, Any]:
    row = {key: example.get(key) for key in READ_COLUMNS}
    for column in ("label", "task", "generator"):
        row[column] = _class_name(features, column, row[column])
    row["split"] = split
    return row


def iter_folder_examples(folder: str | Path) -> Iterator[dict[str, Any]]:
    """Examples of an M3Dsynth folder (``data/<generator>/<task>/<split>-*.parquet``), one row at a time
    in site order (each site's pristine scan first), decoded with each file's own features (the mask
    column is not read). A fake stored as its box comes with its whole scan in ``"scan"``."""
    import datasets
    import pyarrow.parquet as pq

    from ..dataset_builder.features import example_volume, is_box

    files = sorted(Path(folder, "data").glob("*/*/*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"{folder} is not an M3Dsynth folder: no data/<generator>/<task>/<split>-*.parquet files"
        )
    order = []  # (site_id, not pristine, img_id, file, row group, row): each site's pristine example first
    for path in files:
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=["img_id", "site_id"])
            for row, (img_id, site_id) in enumerate(zip(table["img_id"].to_pylist(), table["site_id"].to_pylist())):
                order.append((site_id, not img_id.endswith("_real"), img_id, path, group, row))
    order.sort(key=lambda entry: entry[:3])
    features_of: dict[Path, Any] = {}  # each file's features, parsed once
    group_rows: dict[tuple, list] = {}  # the last row group read (the builder writes one example per group)
    current_site, site_scans = None, {}  # the current site's whole scans, the bases of its boxes
    for site_id, _, img_id, path, group, row in order:
        if (path, group) not in group_rows:
            parquet = pq.ParquetFile(path)
            if path not in features_of:
                features_of[path] = datasets.Features.from_arrow_schema(parquet.schema_arrow)
            columns = [c for c in READ_COLUMNS if c in features_of[path]]
            group_rows = {(path, group): parquet.read_row_group(group, columns=columns).to_pylist()}
        features = features_of[path]
        raw = features.decode_example(group_rows[path, group][row])
        example = _normalise(raw, features, path.name.split("-", 1)[0])
        if site_id != current_site:
            current_site, site_scans = site_id, {}
        if is_box(raw):
            base = site_scans.get(raw["base_img_id"])
            if base is None:
                raise ValueError(
                    f"{folder}: the fake {img_id} is stored over {raw['base_img_id']}, which the folder lacks"
                )
            example["scan"] = example_volume(raw, base)
        else:
            example["scan"] = site_scans[img_id] = example_volume(raw)
        yield example


def iter_examples(data: Any) -> Iterator[dict[str, Any]]:
    """Normalised examples (class names, ``split``, the whole ``scan``) of a folder path, a `DatasetDict`,
    a `Dataset` / `IterableDataset` or an iterable of M3Dsynth example dicts."""
    if isinstance(data, (str, os.PathLike)):
        yield from iter_folder_examples(data)
        return
    if hasattr(data, "keys") and all(hasattr(data[k], "features") for k in data.keys()):  # a DatasetDict
        for split in data.keys():
            yield from _iter_dataset(data[split], split)
        return
    yield from _iter_dataset(data, "")


def _iter_dataset(dataset: Any, split: str) -> Iterator[dict[str, Any]]:
    from ..dataset_builder.features import ScanResolver, example_volume

    features = getattr(dataset, "features", None)
    split = split or str(getattr(dataset, "split", "") or "")
    if features is not None and hasattr(dataset, "select_columns"):
        dataset = dataset.select_columns([c for c in READ_COLUMNS if c in features])  # masks are not decoded
        scans = ScanResolver(dataset)
        sites = dataset.select_columns(["site_id"])["site_id"] if len(dataset) else []
        for index in sorted(range(len(sites)), key=lambda i: sites[i]):  # a site's examples together: one decode
            example = dataset[index]
            yield {**_normalise(example, features, split), "scan": scans.volume(example)}
        return
    for example in dataset:  # plain dicts or an IterableDataset: whole scans only
        yield {**_normalise(example, features, split), "scan": example_volume(example)}


# -- scoring ------------------------------------------------------------------------------------


def site_group(label: str, task: str, malignancy: float | None, config) -> str:
    """The analysis group of an example (see the module doc)."""
    if label == "fake":
        return "injected" if task == "inject" else "removed"
    if malignancy is not None and math.isfinite(malignancy):
        if malignancy >= config.malignant_min_rating:
            return "pristine_malignant"
        if malignancy <= config.benign_max_rating:
            return "pristine_benign"
    return "pristine_indeterminate"


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def score_examples(
    model: CADForMalignancyScoring,
    examples: Iterable[dict[str, Any]],
    *,
    threshold: float = 0.5,
    progress: bool = True,
    total: int | None = None,
) -> list[dict[str, Any]]:
    """One row (`COLUMNS`) per normalised example: the scorer's verdict at its site."""
    from tqdm.auto import tqdm

    rows = []
    for example in tqdm(examples, desc="CAD scores", unit="scan", disable=not progress, total=total):
        site = np.asarray(example["site_lps_mm"], float)
        malignancy = example.get("malignancy_before")
        (score,) = score_locations(model, example["scan"], [site])
        rows.append(
            {
                "img_id": example["img_id"],
                "site_id": example["site_id"],
                "split": example["split"],
                "generator": example["generator"],
                "task": example["task"],
                "label": example["label"],
                "group": site_group(example["label"], example["task"], malignancy, model.config),
                "patient_id": example.get("patient_id") or "",
                "site_x_mm": float(site[0]),
                "site_y_mm": float(site[1]),
                "site_z_mm": float(site[2]),
                "nodule_diameter_mm": _float(example.get("nodule_diameter_mm")),
                "malignancy_before": _float(malignancy),
                "cad_probability": score.probability,
                "cad_logit": score.logit,
                "cad_rating": score.rating,
                "cad_malignant": bool(score.probability >= threshold),
            }
        )
    return rows


# -- summary ------------------------------------------------------------------------------------


def _stats(values: np.ndarray, threshold: float) -> dict[str, float]:
    if not len(values):
        return {"n": 0}
    return {
        "n": int(len(values)),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "std": float(values.std()),
        "fraction_malignant": float((values >= threshold).mean()),
    }


def summarize(rows: list[dict[str, Any]], threshold: float = 0.5) -> dict[str, Any]:
    """The summary of `cad_scores.json` (see the module doc) from `score_examples` rows."""
    from ..metrics.detection import roc_auc

    groups = {}
    for group in GROUPS:
        selected = [r for r in rows if r["group"] == group]
        stats = _stats(np.array([r["cad_probability"] for r in selected], float), threshold)
        ratings = np.array([r["cad_rating"] for r in selected], float)
        if len(selected) and np.isfinite(ratings).any():
            stats["mean_rating"] = float(np.nanmean(ratings))
        groups[group] = stats
    pristine = [r for r in rows if r["group"] in ("pristine_benign", "pristine_malignant")]
    labels = np.array([r["group"] == "pristine_malignant" for r in pristine], int)
    auc = (
        roc_auc(labels, np.array([r["cad_probability"] for r in pristine])) if len(set(labels)) == 2 else float("nan")
    )

    pristine_by_site = {r["site_id"]: r for r in rows if r["label"] == "pristine"}
    by_generator: dict[str, dict[str, Any]] = {}
    for generator in sorted({r["generator"] for r in rows if r["label"] == "fake"}):
        for task in sorted({r["task"] for r in rows if r["generator"] == generator and r["label"] == "fake"}):
            fakes = [r for r in rows if r["generator"] == generator and r["task"] == task and r["label"] == "fake"]
            probabilities = np.array([r["cad_probability"] for r in fakes], float)
            pairs = [(pristine_by_site[r["site_id"]], r) for r in fakes if r["site_id"] in pristine_by_site]
            entry = {
                "n": len(fakes),
                "mean_probability": float(probabilities.mean()),
                "fraction_malignant": float((probabilities >= threshold).mean()),
                "attack_success": float(np.mean([r["cad_malignant"] == ATTACK_VERDICT[task] for r in fakes])),
                "pairs": len(pairs),
            }
            if pairs:
                entry["flip_rate"] = float(np.mean([p["cad_malignant"] != f["cad_malignant"] for p, f in pairs]))
                entry["mean_change"] = float(np.mean([f["cad_probability"] - p["cad_probability"] for p, f in pairs]))
            by_generator.setdefault(generator, {})[task] = entry
    return {
        "threshold": threshold,
        "n_examples": len(rows),
        "groups": groups,
        "pristine_auc": float(auc),
        "by_generator": by_generator,
    }


# -- figures ------------------------------------------------------------------------------------


def _png_bytes(figure) -> bytes:
    """PNG of a `Figure` drawn with Agg (pyplot and its global backend are never touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def histogram_figures(rows: list[dict[str, Any]], threshold: float = 0.5) -> dict[str, bytes]:
    """PNG bytes of ``hist_inject.png``, ``hist_remove.png`` and ``hist_pristine.png`` (Agg backend)."""
    from matplotlib.figure import Figure

    bins = np.linspace(0, 1, 21)
    figures = {}
    titles = {
        "inject": "Injection: pristine sites vs injected nodules",
        "remove": "Removal: pristine nodules vs removed sites",
    }
    for task, title in titles.items():
        figure = Figure(figsize=(6, 3.6))
        axes = figure.subplots()
        pristine = [r["cad_probability"] for r in rows if r["task"] == task and r["label"] == "pristine"]
        axes.hist(pristine, bins=bins, color="0.6", alpha=0.7, label=f"pristine (n={len(pristine)})")
        for generator in sorted({r["generator"] for r in rows if r["task"] == task and r["label"] == "fake"}):
            values = [
                r["cad_probability"]
                for r in rows
                if r["task"] == task and r["generator"] == generator and r["label"] == "fake"
            ]
            axes.hist(values, bins=bins, histtype="step", linewidth=2, label=f"{generator} (n={len(values)})")
        _decorate(axes, title, threshold)
        figures[f"hist_{task}.png"] = _png_bytes(figure)
    figure = Figure(figsize=(6, 3.6))
    axes = figure.subplots()
    for group, color in (("pristine_benign", "tab:green"), ("pristine_malignant", "tab:red")):
        values = [r["cad_probability"] for r in rows if r["group"] == group]
        axes.hist(values, bins=bins, color=color, alpha=0.6, label=f"{group.split('_')[1]} (n={len(values)})")
    _decorate(axes, "Pristine nodules by the readers' median rating", threshold)
    figures["hist_pristine.png"] = _png_bytes(figure)
    return figures


def _decorate(axes, title: str, threshold: float) -> None:
    axes.axvline(threshold, color="k", linestyle="--", linewidth=1)
    axes.set_xlim(0, 1)
    axes.set_xlabel("CAD malignancy probability")
    axes.set_ylabel("sites")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)


# -- writing ------------------------------------------------------------------------------------


def _csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue().encode()


def _json_safe(value: Any) -> Any:
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def run_cad_analysis(
    model: CADForMalignancyScoring | str | Path,
    data: Any,
    results_dir: str | Path,
    *,
    threshold: float = 0.5,
    device: str = "cpu",
    progress: bool = True,
) -> CADAnalysis:
    """Score every example of ``data`` at its site and write ``<results_dir>/cad/`` (layout: module doc).

    ``model``: a `CADForMalignancyScoring` or a saved folder; ``data``: an M3Dsynth folder, a `datasets`
    (dict of) dataset(s) or an iterable of example dicts.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1); got {threshold}")
    model_name = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    if isinstance(model, (str, Path)):
        model = load_cad(model, device)
    model.eval()
    total = len(data) if hasattr(data, "__len__") and not isinstance(data, (str, os.PathLike, dict)) else None
    rows = score_examples(model, iter_examples(data), threshold=threshold, progress=progress, total=total)
    if not rows:
        raise ValueError("the dataset holds no examples to score")
    folder = Path(results_dir) / SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"model": model_name, **summarize(rows, threshold)}
    figures = histogram_figures(rows, threshold)
    summary["figures"] = sorted(figures)
    files = {"csv": folder / CSV_NAME, "json": folder / JSON_NAME}
    for name, payload in figures.items():
        write_atomic(folder / name, payload)
        files[Path(name).stem] = folder / name
    write_atomic(files["csv"], _csv_bytes(rows))
    write_atomic(files["json"], json.dumps(_json_safe({"summary": summary, "examples": rows}), indent=2).encode())
    return CADAnalysis(folder=folder, files=files, summary=summary, rows=rows)
