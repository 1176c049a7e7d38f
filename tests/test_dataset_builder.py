"""The M3Dsynth builder on tiny phantoms with tiny random pipelines (never the shipped demo weights)."""

import re
from fnmatch import fnmatch
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml

from m3d.build import build_dataset, main as build_main
from m3d.dataset_builder import CONFIGS, FEATURES, M3Dsynth, ScanResolver, example_mask, example_volume
from m3d.dataset_builder import writer as writer_module
from m3d.dataset_builder.generate import phantom_jobs, scan_examples
from m3d.dataset_builder.writer import finalize, prepare_folder, read_state, write_shards

PHANTOMS = dict(size=64, max_slices=40, phantom_spacing="scaled")  # tiny scans: the real field of view on 64 pixels
JOB_PHANTOMS = dict(size=64, max_slices=40, spacing="scaled")
SHARD = re.compile(r"data/(real|pix2pix|cyclegan|ddpm)/(inject|remove)/(train|validation|test)-\d{5}-\d{5}\.parquet")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_pipelines_dir):
    """All generators, quality check off (tiny random networks would fail it), one scan per shard."""
    out = tmp_path_factory.mktemp("build") / "m3dsynth"
    build_dataset(
        out,
        pipelines_dir=tiny_pipelines_dir,
        phantoms=4,
        **PHANTOMS,
        num_inference_steps=1,
        scans_per_shard=1,
        quality=None,
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def loaded(built, tmp_path_factory):
    return datasets.load_dataset(str(built), cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_layout_manifest_and_card(built):
    state = read_state(built)
    files = sorted(p.relative_to(built).as_posix() for p in (built / "data").rglob("*") if p.is_file())
    assert files == sorted(state.shards) and all(SHARD.fullmatch(f) for f in files)
    for relative, entry in state.shards.items():
        assert writer_module.sha256_file(built / relative) == entry["sha256"]
    assert not (built / ".build").exists()
    metadata = yaml.safe_load((built / "README.md").read_text().split("---")[1])
    configs = {c["config_name"]: c for c in metadata["configs"]}
    assert set(configs) == set(CONFIGS) and configs["all"]["default"] is True


def test_every_field_and_masks_exactly_where_tampered(loaded):
    assert set(loaded) == {"train", "validation", "test"}
    img_ids = []
    for split in loaded.values():
        assert split.features == FEATURES
        scans = ScanResolver(split)
        for example in split:
            img_ids.append(example["img_id"])
            volume, mask = scans.volume(example), example_mask(example)
            assert volume.shape == mask.shape == tuple(example["scan_shape_zyx"]) and volume.hu.dtype == np.int16
            fake = example["label"] == 1
            assert mask.any() == fake
            if fake:  # stored as the changed box over the site's pristine scan: the two differ only there
                assert example["base_img_id"] == f"{example['site_id']}_real"
                pristine = scans.base(example["base_img_id"])
                assert not np.any((volume.hu != pristine.hu) & ~mask)
                assert example_volume(example, pristine).hu.tobytes() == volume.hu.tobytes()
                with pytest.raises(ValueError, match="pass base="):
                    example_volume(example)
            else:
                assert example["base_img_id"] is None and example["box_start_zyx"] == [0, 0, 0]
            assert (example["generator"] == 0) == (not fake)
            assert example["img_id"] == f"{example['site_id']}_{FEATURES['generator'].int2str(example['generator'])}"
            assert example["test_crop_center_zyx"] == example["site_voxel_zyx"]
            assert np.allclose(
                volume.voxel_to_world(example["site_voxel_zyx"]), example["site_lps_mm"], atol=max(volume.spacing_mm)
            )
            assert example["spacing_mm"] == pytest.approx(volume.spacing_mm)
            assert example["nodule_diameter_mm"] > 0 and example["malignancy_after"] is None
    assert len(img_ids) == len(set(img_ids))
    generators = {g for split in loaded.values() for g in split["generator"]}
    assert generators == {0, 1, 2, 3}


def test_configs_select_the_right_rows(built, tmp_path):
    state = read_state(built)
    for name, (generators, tasks) in CONFIGS.items():
        ds = datasets.load_dataset(str(built), name, cache_dir=str(tmp_path))
        for split, rows in ds.items():
            assert {FEATURES["generator"].int2str(g) for g in rows["generator"]} <= set(generators)
            assert {FEATURES["task"].int2str(t) for t in rows["task"]} <= set(tasks)
            expected = sum(
                e["rows"]
                for r, e in state.shards.items()
                if r.split("/")[1] in generators
                and r.split("/")[2] in tasks
                and r.split("/")[3].startswith(split + "-")
            )
            assert len(rows) == expected


def test_load_by_name_from_parent_folder(built, tmp_path, monkeypatch):
    monkeypatch.chdir(built.parent)
    ds = datasets.load_dataset("m3dsynth", "pristine", split="test", cache_dir=str(tmp_path))
    assert len(ds) and set(ds["label"]) == {0} and not any(example_mask(e).any() for e in ds)


def test_a_patient_is_never_in_two_splits(loaded):
    patients = {split: set(rows["patient_id"]) for split, rows in loaded.items()}
    assert not (patients["train"] & patients["validation"]) and not (patients["train"] & patients["test"])
    assert not (patients["validation"] & patients["test"])


@pytest.fixture(scope="module")
def jobs():
    return phantom_jobs(3, seed=0, **JOB_PHANTOMS, progress=False)


def _build(out: Path, jobs, tiny_pipelines_dir) -> dict:
    """pix2pix only, quality check on; returns the manifest's shards."""
    from m3d.dataset_builder.generate import load_pipelines

    pipelines = load_pipelines(tiny_pipelines_dir, ["pix2pix"], ["inject", "remove"])
    config = {"test": True}
    state = prepare_folder(out, config)

    def examples(job):
        return scan_examples(job, job.load(), generators=["pix2pix"], tasks=["inject", "remove"], pipelines=pipelines)

    write_shards(out, jobs, examples, config, scans_per_shard=1, progress=False, state=state)
    return finalize(out)


@pytest.mark.parametrize("fail_in", ["_ShardWriter.close", "write_json_atomic"])
def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path, jobs, tiny_pipelines_dir, monkeypatch, fail_in):
    reference = _build(tmp_path / "reference", jobs, tiny_pipelines_dir)
    assert any(c["outcomes"].get("pix2pix/remove/dropped") for c in reference.chunks.values())  # the quality check ran
    assert not any("/pix2pix/remove/" in r for r in reference.shards)

    owner, _, name = fail_in.rpartition(".")
    target = getattr(writer_module, owner) if owner else writer_module
    original, calls = getattr(target, name), []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies in the middle of the second chunk's bookkeeping
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, killed)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "resumed", jobs, tiny_pipelines_dir)
    monkeypatch.setattr(target, name, original)
    with pytest.raises(Exception, match="data files|resume"):  # the unfinished folder is not a dataset yet
        datasets.load_dataset(str(tmp_path / "resumed"))
    resumed = _build(tmp_path / "resumed", jobs, tiny_pipelines_dir)
    assert resumed.shards == reference.shards  # same files, rows, img_ids and SHA-256: nothing lost or duplicated
    files = sorted(
        p.relative_to(tmp_path / "resumed").as_posix() for p in (tmp_path / "resumed").rglob("*") if p.is_file()
    )
    assert files == sorted(["README.md", "manifest.json", *reference.shards])


class _SavedScanDiffers:
    """An injector whose returned cube holds a 12 mm nodule while the scan it returns holds the nodule of
    ``pasted_radius_mm`` (0: nothing pasted), as a resampling that loses or grows a nodule would."""

    task = "inject"

    def __init__(self, pasted_radius_mm: float):
        self.pasted_radius_mm = pasted_radius_mm
        self.saved = []  # (location, tampered scan) per call

    def __call__(self, *, volume, locations_lps_mm, **_):
        from m3d.pipelines.common import M3DPipelineOutput
        from m3d.tamper.cube import extract_cube, hu_to_unit, paste_cube

        cube = extract_cube(volume, locations_lps_mm[0], allow_outside_lung=True)
        radius = np.linalg.norm(np.indices(cube.hu.shape) - 15.5, axis=0)
        returned = np.where(radius <= 6.0, -100.0, cube.hu).astype(np.float32)
        pasted = np.where(radius <= self.pasted_radius_mm, -100.0, cube.hu).astype(np.float32)
        tampered, mask = paste_cube(
            volume, cube, pasted, replaced=(pasted != cube.hu).astype(np.float32), grain_rng=None
        )
        self.saved.append((locations_lps_mm[0], tampered))
        return M3DPipelineOutput(cubes=hu_to_unit(returned)[None, None], volumes=[tampered], masks=[mask])


def test_the_quality_check_and_label_measure_the_saved_scan_not_the_returned_cube():
    from m3d.tamper.cube import extract_cube
    from m3d.tamper.quality import check_quality

    job = phantom_jobs(1, seed=0, progress=False)[0]  # the real pixel and slice spacing
    volume = job.load()

    def run(pipeline):
        pipelines = {("pix2pix", "inject"): pipeline}
        return [
            (example, outcome)
            for example, outcome in scan_examples(
                job, volume, generators=["pix2pix"], tasks=["inject"], pipelines=pipelines
            )
            if outcome.generator == "pix2pix"
        ]

    nothing_pasted = run(_SavedScanDiffers(0.0))
    assert nothing_pasted and all(o.status == "dropped" and "<= 10 mm" in o.reason for _, o in nothing_pasted)

    pipeline = _SavedScanDiffers(9.0)
    examples = run(pipeline)
    assert examples and all(outcome.status == "kept" for _, outcome in examples)
    for (example, _), (location, scan) in zip(examples, pipeline.saved):
        saved_hu = extract_cube(scan, location, allow_outside_lung=True).hu
        pristine_hu = extract_cube(volume, location, allow_outside_lung=True).hu
        saved = check_quality(saved_hu, "inject", pristine_hu=pristine_hu).measurement
        # the 18 mm nodule of the saved scan, not the returned cube's 12 mm
        assert example["nodule_diameter_mm"] == saved.diameter_mm > 15


def test_other_options_are_refused_on_resume(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    writer_module.write_json_atomic(
        out / "manifest.json", {"format": 1, "config": {"seed": 0}, "chunks": {}, "shards": {}}
    )
    with pytest.raises(ValueError, match="seed differ"):
        prepare_folder(out, {"seed": 1})
    for text, message in (
        ("{cut", "manifest.json is not valid JSON"),
        ("[1, 2]", "manifest.json: not an m3d dataset manifest"),
    ):
        (out / "manifest.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            prepare_folder(out, {"seed": 0})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an m3d dataset folder"):
        prepare_folder(tmp_path / "other", {"seed": 0}, overwrite=True)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert build_main(["--out", str(tmp_path / "ds"), "--pipelines", str(tmp_path / "none")], prog="m3d build") == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--pipelines DIR" in error and "pix2pix-inject" in error
    assert not (tmp_path / "ds").exists()


def test_generator_based_builder_pristine_config(tmp_path):
    builder = M3Dsynth(config_name="pristine", cache_dir=str(tmp_path), phantoms=2, **PHANTOMS)
    builder.download_and_prepare()
    ds = builder.as_dataset(split="train")
    assert len(ds) >= 1 and set(ds["label"]) == {0} and ds.features == FEATURES
    assert all(fnmatch(i, "*_real") for i in ds["img_id"])


def test_cad_model_fills_malignancy_after(tmp_path, tiny_pipelines_dir):
    from m3d.cad.configuration_cad import CADConfig
    from m3d.cad.modeling_cad import CADForMalignancyScoring
    from m3d.cad.scoring import load_cad, score_locations

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    CADForMalignancyScoring(CADConfig.from_preset("tiny")).save_pretrained(tmp_path / "cad")
    out = tmp_path / "m3dsynth"
    build_dataset(
        out,
        pipelines_dir=tiny_pipelines_dir,
        generators=["pix2pix"],
        phantoms=2,
        **PHANTOMS,
        quality=None,
        cad_model=tmp_path / "cad",
        progress=False,
    )
    assert read_state(out).config["cad_model"] == str((tmp_path / "cad").resolve())
    rows = [
        row for split in datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache")).values() for row in split
    ]
    assert rows and {row["generator"] for row in rows} == {0, 1}  # pristine and pix2pix examples
    cad = load_cad(tmp_path / "cad")
    scans = {
        split: ScanResolver(rows_)
        for split, rows_ in datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache")).items()
    }
    by_id = {
        row["img_id"]: split
        for split, rows_ in datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache")).items()
        for row in rows_
    }
    for row in rows[:4]:
        expected = score_locations(cad, scans[by_id[row["img_id"]]].volume(row), [row["site_lps_mm"]])[0].rating
        assert row["malignancy_after"] == pytest.approx(expected, abs=1e-3)  # the scorer at the site of that scan


def test_resume_with_other_weights_at_the_same_path_is_refused(tmp_path, tiny_pipelines_dir):
    """The build records a digest of each pipeline's files: new weights at the same --pipelines path
    would mix two generator versions in one dataset, so the re-run is refused."""
    import shutil

    pipelines = tmp_path / "pipelines"
    shutil.copytree(tiny_pipelines_dir, pipelines)
    out = tmp_path / "m3dsynth"
    arguments = dict(
        pipelines_dir=pipelines, generators=["pix2pix"], phantoms=2, **PHANTOMS, quality=None, progress=False
    )
    build_dataset(out, **arguments)
    build_dataset(out, **arguments)  # the same weights: resumes (nothing left to do)
    weights = next((pipelines / "pix2pix-inject").rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="pipeline_digests differ"):
        build_dataset(out, **arguments)


def tiny_build_argv(out: Path, pipelines_dir: Path) -> list[str]:
    """`m3d build` of two tiny phantoms with the test pix2pix pipelines, quality check off, no progress bars."""
    phantoms = ["--size", str(PHANTOMS["size"]), "--max-slices", str(PHANTOMS["max_slices"])]
    return ["--out", str(out), "--pipelines", str(pipelines_dir), "--generators", "pix2pix", "--phantoms", "2",
            *phantoms, "--phantom-spacing", PHANTOMS["phantom_spacing"], "--keep-all", "--no-progress"]  # fmt: skip


def test_no_progress_prints_no_bars(tmp_path, tiny_pipelines_dir, capsys):
    assert build_main(tiny_build_argv(tmp_path / "ds", tiny_pipelines_dir), prog="m3d build") == 0
    captured = capsys.readouterr()
    assert "it/s" not in captured.err and "scan/s" not in captured.err and "%|" not in captured.err, captured.err
    assert "load it with datasets.load_dataset" in captured.out
    import diffusers
    import transformers

    diffusers.utils.logging.enable_progress_bar()  # global switches: leave them as the other tests expect
    transformers.utils.logging.enable_progress_bar()


def test_a_second_build_into_the_same_folder_at_once_is_refused(tmp_path, tiny_pipelines_dir, capsys):
    """While one build writes a folder (another process holding its lock), a second is refused in one
    line naming that process; once the first ends, the same command builds, and no lock file is left."""
    import subprocess
    import sys

    out = tmp_path / "ds"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from m3d.dataset_builder.writer import build_lock\n"
            f"with build_lock(Path({str(out)!r})):\n    print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = tiny_build_argv(out, tiny_pipelines_dir)
        assert build_main(argv, prog="m3d build") == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and f"being written by another build (process {holder.pid})" in error
        assert [path.name for path in out.iterdir()] == [".m3d-build.lock"]  # nothing of the second build
    finally:
        holder.communicate("")
    assert build_main(argv, prog="m3d build") == 0
    assert (out / "manifest.json").is_file() and not (out / ".m3d-build.lock").exists()


def test_build_writes_m3dsynth_here_by_default():
    """`m3d build` with no --out writes ./m3dsynth, the name the card's load_dataset("m3dsynth") uses."""
    from m3d.build import build_parser

    assert build_parser().parse_args([]).out == "m3dsynth"
