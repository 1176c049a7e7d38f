"""`m3d demo` end to end at toy sizes: every step runs, writes its outputs, and a re-run resumes."""

import json

import pytest

from m3d.cli import main
from m3d.dataset_builder.generate import DEFAULT_PHANTOMS, phantom_jobs
from m3d.demo import (
    DEMO_OUTPUTS,
    INPUTS_RECORD,
    SCALES,
    clear_outputs,
    inputs_fingerprint,
    run_demo,
    start_again_if_made_otherwise,
)

TOY_SCALE = dict(
    # tiny scans (the real field of view on 64 pixels); random nets fail the quality check
    build=dict(phantoms=4, size=64, max_slices=40, phantom_spacing="scaled", quality=None, num_inference_steps=1),
    bench_options=dict(
        detectors=["unet"],
        experiments=["cross_generator"],
        train_generators=["pix2pix"],
        max_steps=2,
        crop_size="8,32,32",
    ),
    cad_preset="tiny",
    cad_phantoms=2,
    cad_steps=2,
)


def test_demo_runs_every_step_and_resumes(tmp_path, tiny_pipelines_dir, datasets_cache, capsys):
    out = tmp_path / "demo"
    cached_before = set(datasets_cache.iterdir())
    report = run_demo(out, pipelines_dir=tiny_pipelines_dir, scale=TOY_SCALE, progress=False)
    assert set(datasets_cache.iterdir()) == cached_before  # `datasets` cached the scans in the run's folder
    assert any((out / "datasets_cache").glob("m3dsynth-*"))
    assert report == out / "results" / "report.html" and report.is_file()
    run = json.loads((out / "results" / "run.json").read_text())
    assert list(run["steps"]) == [
        "cad_training",
        "dataset",
        "benchmark",
        "cad_analysis",
        "cards",
    ]  # the report's own time is printed
    assert (out / "m3dsynth" / "manifest.json").is_file()
    import datasets

    rows = datasets.load_dataset(str(out / "m3dsynth"), cache_dir=str(tmp_path / "cache"))["train"]
    assert all(value is not None for value in rows["malignancy_after"])  # rated by the demo's CAD scorer
    assert (out / "results" / "tables.md").is_file() and (out / "results" / "cad" / "cad_scores.json").is_file()
    card = (out / "results" / "runs" / "cross_generator__unet__pix2pix" / "best" / "README.md").read_text()
    assert "model-index" in card and "train pix2pix / test" in card
    assert "# m3d-demo-cad" in (out / "cad_model" / "model" / "README.md").read_text()
    page = report.read_text()
    assert "Benchmark: train generator x test generator" in page and "Diagnosis (CAD)" in page

    kept = [
        out / "cad_model" / "model" / "model.safetensors",
        *sorted((out / "results" / "cells").glob("*.json")),
        *sorted((out / "m3dsynth" / "data").rglob("*.parquet")),
    ]
    before = [path.stat().st_mtime_ns for path in kept]
    record = json.loads((out / INPUTS_RECORD).read_text())
    assert record == {"inputs_sha256": inputs_fingerprint(tiny_pipelines_dir)}
    run_demo(out, pipelines_dir=tiny_pipelines_dir, scale=TOY_SCALE, progress=False)
    assert [path.stat().st_mtime_ns for path in kept] == before  # resumed: nothing finished was redone
    with pytest.raises(ValueError, match="built with other options.*--overwrite"):
        run_demo(out, pipelines_dir=tiny_pipelines_dir, scale=TOY_SCALE, progress=False, seed=1)

    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt, which m3d demo does not write"):
        run_demo(out, overwrite=True, pipelines_dir=tiny_pipelines_dir, scale=TOY_SCALE, progress=False, seed=1)
    assert all((out / name).exists() for name in DEMO_OUTPUTS)  # refused before anything was deleted
    (out / "notes.txt").unlink()
    clear_outputs(out)
    assert not any(out.iterdir())


def test_demo_cli_errors(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--pipelines", str(tmp_path / "none")]) == 2
    assert "m3d: error:" in capsys.readouterr().err


def test_the_cpu_demo_builds_its_scans_at_native_resolution():
    """The CPU demo's scans carry the real LIDC series' pixel spacing (< 1 mm), where generators leave traces."""
    build = {**DEFAULT_PHANTOMS, **SCALES["cpu"]["build"]}
    jobs = phantom_jobs(
        2, size=build["size"], max_slices=build["max_slices"], spacing=build["spacing"], progress=False
    )
    spacings = [job.load().spacing_mm for job in jobs]
    assert spacings and all(0.45 <= min(s[1:]) and max(s[1:]) < 1.0 for s in spacings)
    assert "ddpm" not in SCALES["cpu"]["build"]["generators"]  # left out of the CPU demo, and the report says why


def test_a_run_made_with_other_code_or_weights_starts_again(tmp_path, tiny_pipelines_dir, capsys):
    """The record names the code and weights: another pipelines folder changes it; an out folder whose record
    differs, or that holds a run from before the record, is cleared; one made with the same inputs is kept."""
    record = {"inputs_sha256": inputs_fingerprint(tiny_pipelines_dir)}
    assert record["inputs_sha256"] == inputs_fingerprint(tiny_pipelines_dir) != inputs_fingerprint()
    out = tmp_path / "demo"
    assert not start_again_if_made_otherwise(out, record)  # nothing there yet
    (out / "results").mkdir(parents=True)
    (out / INPUTS_RECORD).write_text(json.dumps(record))
    assert not start_again_if_made_otherwise(out, record) and (out / "results").is_dir()
    (out / INPUTS_RECORD).write_text(json.dumps({"inputs_sha256": "made with other weights"}))
    assert start_again_if_made_otherwise(out, record) and not any(out.iterdir())
    assert "holds a run made with other m3d code or weights: starting again" in capsys.readouterr().out
    (out / "results").mkdir()  # a run from before the record
    assert start_again_if_made_otherwise(out, record) and not any(out.iterdir())
