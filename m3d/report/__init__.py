"""`m3d report RESULTS_DIR`: one self-contained HTML page (and its Markdown twin) of a results folder.

It reads what the other steps wrote there (each optional, each section says when it is missing):

* the benchmark (`m3d.train.benchmark`): ``bench_config.json``, ``tables.md``, ``plots/roc_*.png``,
  ``plots/hist_*.png``, ``plots/examples/*.png`` and the trained detectors ``runs/<cell>/best/``;
* the CAD check (`m3d.cad.analysis`): ``cad/cad_scores.json`` and its histograms;
* the M3Dsynth folder named in ``bench_config.json`` (or ``--data``): tri-planar views of a few test
  fakes (one per task) beside their ground truth and the full-scan map of every detector trained on the
  fake's generator (run here, slice by slice over the whole scan, as a PACS would).

Writes ``report.html``, ``report.md`` and ``report_figures/`` into RESULTS_DIR (or ``--out``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .figures import save_figure, triplanar_figure
from .html import Figure, Section, write_report

TITLE = "m3d: AI-manipulated chest CT, detectors and diagnosis"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _figures(paths: list[Path], caption) -> list[Figure]:
    return [Figure(path, caption(path)) for path in sorted(paths)]


def overview_section(results_dir: Path, data_dir: Path | None) -> Section:
    config = _read_json(results_dir / "bench_config.json") or {}
    run = _read_json(results_dir / "run.json") or {}
    lines = [
        "M3Dsynth reproduction: a generator fills the masked centre of a 32 mm cube around a lung site "
        "(injection: a malignant-looking nodule > 10 mm; removal: a real nodule replaced by a benign-looking one "
        "< 8 mm); forensic detectors look for the tampering slice by slice; a CAD scorer says whether the "
        "diagnosis changed.",
        "",
    ]
    facts = {
        "dataset": str(data_dir) if data_dir else None,
        "benchmark preset": config.get("preset"),
        "device": run.get("device"),
        "seed": config.get("seed", run.get("seed")),
        "total time": f"{run['seconds']:.0f} s" if "seconds" in run else None,
    }
    lines += [f"- {name}: `{value}`" for name, value in facts.items() if value is not None]
    for step, seconds in run.get("steps", {}).items():
        lines.append(f"- step `{step}`: {seconds:.0f} s")
    if run.get("phantom", True):
        lines += [
            "",
            "> Synthetic data: the scans are m3d phantoms (real LIDC-IDRI geometry, pixel and slice spacing, and "
            "nodule contours) and the generators, detectors and CAD scorer were trained on them on a CPU. The "
            "figures show the method end to end on phantoms; they are not the paper's numbers on LIDC-IDRI.",
        ]
    for note in run.get("notes", []):
        lines += ["", f"> Note: {note}."]
    return Section("Overview", "\n".join(lines))


def benchmark_sections(results_dir: Path) -> list[Section]:
    tables = results_dir / "tables.md"
    if not tables.is_file():
        return [Section("Benchmark", "No benchmark results in this folder (run `m3d bench`).")]
    plots = results_dir / "plots"
    text = tables.read_text()
    text = text.split("\n", 1)[1] if text.startswith("# ") else text  # the report has its own title
    text = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())  # under the section
    return [
        Section("Benchmark: train generator x test generator", text),
        Section(
            "ROC curves",
            "Volume-score ROC of each detector, one curve per test generator.",
            _figures(list(plots.glob("roc_*.png")), lambda p: p.stem.replace("roc_", "ROC: ")),
        ),
        Section(
            "Score histograms",
            "Volume scores of pristine crops against each test generator's fakes.",
            _figures(list(plots.glob("hist_*.png")), lambda p: p.stem.replace("hist_", "").replace("__", " / ")),
        ),
        Section(
            "Detector maps on test crops",
            "Axial slices through the site: scan, ground truth, map.",
            _figures(list((plots / "examples").glob("*.png")), lambda p: p.stem.replace("__", " / ")),
        ),
    ]


def cad_section(results_dir: Path) -> Section:
    scores = _read_json(results_dir / "cad" / "cad_scores.json")
    if scores is None:
        return Section("Diagnosis (CAD)", "No CAD analysis in this folder (run `m3d cad-analysis`).")
    summary = scores["summary"]
    lines = [
        f"CAD malignancy probability at every site (threshold {summary['threshold']}); pristine malignant vs benign "
        f"AUC {summary['pristine_auc']:.3f} (does the scorer itself work?).",
        "",
        "| group | n | mean probability | fraction called malignant |",
        "|---|---|---|---|",
    ]
    for group, stats in summary["groups"].items():
        if stats.get("n"):
            lines.append(f"| {group} | {stats['n']} | {stats['mean']:.3f} | {stats['fraction_malignant']:.2f} |")
    lines += [
        "",
        "| generator | task | n | attack success | flip rate vs pristine | mean change |",
        "|---|---|---|---|---|---|",
    ]
    for generator, tasks in summary["by_generator"].items():
        for task, entry in tasks.items():
            flip = f"{entry['flip_rate']:.2f}" if "flip_rate" in entry else "–"
            change = f"{entry['mean_change']:+.3f}" if "mean_change" in entry else "–"
            lines.append(
                f"| {generator} | {task} | {entry['n']} | {entry['attack_success']:.2f} | {flip} | {change} |"
            )
    lines += [
        "",
        "Attack success: the fraction of fakes that get the attacker's verdict (malignant after an "
        "injection, benign after a removal).",
    ]
    figures = [
        Figure(results_dir / "cad" / name, name.removesuffix(".png").replace("_", " "))
        for name in summary.get("figures", [])
    ]
    return Section("Diagnosis (CAD)", "\n".join(lines), figures)


def _trained_detectors(results_dir: Path, generator: str) -> dict[str, Path]:
    """``detector -> best/`` of the cross-generator cells trained on ``generator``."""
    found = {}
    for cell in sorted((results_dir / "cells").glob("cross_generator__*.json")):
        record = json.loads(cell.read_text())
        best = results_dir / "runs" / cell.stem / "best"
        if record.get("train_data") == generator and best.is_dir():
            found[record["detector"]] = best
    return found


def example_section(
    results_dir: Path,
    data_dir: Path | None,
    out_dir: Path,
    per_task: int = 1,
    device: str = "cpu",
    dataset_cache_dir: str | Path | None = None,
) -> Section:
    """Tri-planar views of test fakes with the ground truth and each detector's full-scan map
    (``dataset_cache_dir``: `datasets`' cache folder, default its own)."""
    if data_dir is None or not Path(data_dir).is_dir():
        return Section("Tampered scans", "No M3Dsynth folder given or named in bench_config.json.")
    import datasets
    from transformers.utils import logging as transformers_logging

    from ..dataset_builder import TASKS, ScanResolver, example_mask
    from ..dataset_builder.features import folder_cache_dir
    from ..detectors import detect_volume, load_detector

    split = datasets.load_dataset(
        str(data_dir), split="test", cache_dir=str(folder_cache_dir(data_dir, dataset_cache_dir))
    )
    scans = ScanResolver(split)
    labels, tasks, generators = (split.features[c] for c in ("label", "task", "generator"))
    chosen: list[int] = []
    for task in TASKS:
        matches = [
            i
            for i, (label, t) in enumerate(zip(split["label"], split["task"]))
            if labels.int2str(label) == "fake" and tasks.int2str(t) == task
        ]
        chosen += matches[:per_task]
    figures = []
    transformers_logging.disable_progress_bar()  # one bar per weight file is noise here
    for index in chosen:
        example = split[index]
        volume, mask = scans.volume(example), example_mask(example)
        generator = generators.int2str(example["generator"])
        maps = {}
        for name, folder in _trained_detectors(results_dir, generator).items():
            model = load_detector(folder).to(device).eval()
            detection = detect_volume(model, volume)
            if detection.localization is not None:
                maps[f"{name} (score {detection.score:.2f})"] = detection.localization
        title = f"{example['img_id']}: {tasks.int2str(example['task'])} by {generator}"
        path = save_figure(
            triplanar_figure(volume, tuple(example["site_voxel_zyx"]), mask, maps, title),
            out_dir / "report_figures" / f"triplanar_{example['img_id']}.png",
        )
        figures.append(Figure(path, title + " — scan, ground truth, full-scan detector maps"))
    text = (
        "Whole test scans through the tampered site (axial, coronal, sagittal in physical proportions); "
        "maps of the detectors trained on the same generator, run over every slice."
    )
    return Section("Tampered scans", text if figures else "The test split holds no tampered scan.", figures)


def build_report(
    results_dir: str | Path,
    out_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    device: str = "cpu",
    dataset_cache_dir: str | Path | None = None,
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` for ``results_dir``; returns their paths (``dataset_cache_dir``:
    where `datasets` caches the M3Dsynth folder, default its own cache)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{results_dir} is not a results folder")
    out_dir = Path(out_dir) if out_dir is not None else results_dir
    if data_dir is None:
        config = _read_json(results_dir / "bench_config.json") or {}
        data_dir = Path(config["data"]) if config.get("data") else None
    sections = [
        overview_section(results_dir, data_dir),
        *benchmark_sections(results_dir),
        example_section(results_dir, data_dir, out_dir, device=device, dataset_cache_dir=dataset_cache_dir),
        cad_section(results_dir),
    ]
    return write_report(sections, out_dir, TITLE)


__all__ = ["build_report"]
