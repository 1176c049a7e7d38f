"""The CAD malignancy scorer: model, training, `m3d cad`, and the analysis of an M3Dsynth folder."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
import torch

from m3d.cad import IGNORE_INDEX, CADConfig, CADForMalignancyScoring, malignancy_labels, score_locations
from m3d.dataset_builder.features import box_fields
from m3d.train.cubes import iter_phantom_cases, sites_for_task


def tiny_model(seed: int = 0, **overrides) -> CADForMalignancyScoring:
    torch.manual_seed(seed)
    return CADForMalignancyScoring(CADConfig.from_preset("tiny", **overrides))


@pytest.fixture(scope="module")
def cases():
    """Three small phantoms with benign, indeterminate and malignant nodules."""
    return list(iter_phantom_cases(3, seed=0, size=64, max_slices=40, task="cad"))


# -- model --------------------------------------------------------------------------------------


def test_forward_shapes_and_loss():
    model = tiny_model()
    x = torch.randn(3, 1, 32, 32, 32)
    out = model(x, labels=torch.tensor([1, 0, IGNORE_INDEX]), ratings=torch.tensor([4.5, 1.0, float("nan")]))
    assert out.logits.shape == (3,) and out.rating.shape == (3,)
    assert torch.all((out.rating >= 1) & (out.rating <= 5))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert model(x).loss is None
    nothing = model(x, labels=torch.full((3,), IGNORE_INDEX), ratings=torch.full((3,), float("nan")))
    assert nothing.loss == 0
    nothing.loss.backward()  # nothing to learn from, but every parameter gets a gradient, as DDP needs
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in model.parameters())
    model.eval()  # the loss over the labelled samples only: as if the others were not in the batch
    kept = model(x[:2], labels=torch.tensor([1, 0]), ratings=torch.tensor([4.5, 1.0]))
    mixed = model(x, labels=torch.tensor([1, 0, IGNORE_INDEX]), ratings=torch.tensor([4.5, 1.0, float("nan")]))
    torch.testing.assert_close(mixed.loss, kept.loss)
    no_rating = tiny_model(rating_head=False)
    assert no_rating(x).rating is None and no_rating.rating_regressor is None
    with pytest.raises(ValueError, match=r"\(batch, 1, 32, 32, 32\)"):
        model(torch.randn(2, 1, 40, 40, 40))


def test_default_preset_and_config_checks():
    config = CADConfig()
    assert config.cube_size == 48 and config.model_type == "m3d_cad"
    model = CADForMalignancyScoring(config).eval()
    assert model(torch.zeros(1, 1, 48, 48, 48)).logits.shape == (1,)
    with pytest.raises(ValueError, match="cube_size"):
        CADConfig(cube_size=24)
    with pytest.raises(ValueError, match="norm_num_groups"):
        CADConfig(block_out_channels=(6, 12), norm_num_groups=4)
    with pytest.raises(ValueError, match="preset"):
        CADConfig.from_preset("huge")


def test_malignancy_labels_exclude_indeterminate():
    ratings = [1, 2, 2.5, 3, 3.5, 4, 5, float("nan")]
    assert malignancy_labels(ratings, CADConfig()).tolist() == [
        0,
        0,
        IGNORE_INDEX,
        IGNORE_INDEX,
        IGNORE_INDEX,
        1,
        1,
        IGNORE_INDEX,
    ]


def test_auto_round_trip_identical_outputs(tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    model = tiny_model(seed=3).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "m3d_cad"
    x = torch.randn(2, 1, 32, 32, 32)
    for auto in (AutoModel, AutoModelForImageClassification):
        loaded = auto.from_pretrained(tmp_path, local_files_only=True).eval()
        assert type(loaded) is CADForMalignancyScoring
        with torch.no_grad():
            expected, got = model(x), loaded(x)
        assert torch.equal(expected.logits, got.logits) and torch.equal(expected.rating, got.rating)


# -- training -----------------------------------------------------------------------------------


def test_loss_falls_on_phantom_cubes(cases):
    from m3d.train.train_cad import CADCubeDataset

    sites = sites_for_task(cases, "cad")
    config = CADConfig.from_preset("tiny")
    dataset = CADCubeDataset(sites, config=config, cut_size=40, augment=False)
    assert {0, 1} <= set(dataset.labels.tolist())  # both classes among the phantoms' real LIDC ratings
    batch = {
        k: torch.stack([dataset[i][k] for i in range(len(dataset))]) for k in ("pixel_values", "labels", "ratings")
    }
    assert batch["pixel_values"].shape == (len(sites), 1, 32, 32, 32)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    model = tiny_model(seed=0, dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_split_by_patient_keeps_patients_whole():
    from m3d.train.train_cad import split_by_patient

    records = [{"source": f"P{p}/nodule{k}"} for p in range(8) for k in range(p % 3 + 1)]
    train, val = split_by_patient(records, 0.25, seed=1)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(records)))
    train_patients = {records[i]["source"].split("/")[0] for i in train}
    val_patients = {records[i]["source"].split("/")[0] for i in val}
    assert len(val_patients) == 2 and not train_patients & val_patients
    assert np.array_equal(split_by_patient(records, 0.25, seed=1)[1], val)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``m3d train-cad`` on three tiny phantoms: the run folder."""
    from m3d.cli import main

    out = tmp_path_factory.mktemp("cad_run")
    argv = [
        "train-cad",
        "--preset",
        "tiny",
        "--phantoms",
        "3",
        "--phantom-size",
        "64",
        "--phantom-max-slices",
        "40",
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--eval-every",
        "2",
        "--checkpointing-steps",
        "2",
        "--log-every",
        "1",
        "--validation-fraction",
        "0.34",
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    return out


def test_train_save_load_and_cli_score(trained, cases, tmp_path, capsys):
    from m3d.cli import main
    from m3d.data.nifti import write_nifti

    logs = [json.loads(line) for line in (trained / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3] and all(
        math.isfinite(r["loss"]) for r in logs if "loss" in r
    )
    assert any("val_auc" in r for r in logs)
    summary = json.loads((trained / "training_summary.json").read_text())
    assert summary["steps"] == 3 and summary["training_data"] == "phantom"
    assert (trained / "checkpoints" / "checkpoint_1" / "training_state.json").is_file()

    case = cases[2]
    scan = write_nifti(case.volume, tmp_path / "scan.nii.gz")
    z, y, x = np.rint(case.nodules[0].centroid_zyx).astype(int)
    capsys.readouterr()
    assert main(["cad", "--model", str(trained / "model"), "--scan", str(scan), "--at", f"{x},{y},{z}"]) == 0
    line = capsys.readouterr().out.strip()
    probability = float(re.search(r"malignancy (\S+)", line).group(1))
    assert 0 <= probability <= 1 and re.search(r"rating [\d.]+/5", line)

    # the same score from Python, at the same location given in mm
    from m3d.cad import load_cad

    center = case.volume.voxel_to_world((z, y, x))
    (score,) = score_locations(load_cad(trained / "model"), case.volume, [center])
    assert abs(score.probability - probability) < 1e-4
    mm = ",".join(f"{v:.4f}" for v in center)
    assert main(["cad", "--model", str(trained / "model"), "--scan", str(scan), "--at", mm, "--mm"]) == 0
    assert f"{probability:.4f}" in capsys.readouterr().out


def test_cli_errors_are_one_line(trained, cases, tmp_path, capsys):
    from m3d.cli import main
    from m3d.data.nifti import write_nifti

    scan = write_nifti(cases[0].volume, tmp_path / "scan.nii.gz")
    capsys.readouterr()
    assert main(["cad", "--model", str(trained / "model"), "--scan", str(scan), "--at", "1,2"]) == 2
    assert capsys.readouterr().err.strip() == "m3d: error: --at expects three comma-separated numbers X,Y,Z; got '1,2'"
    assert main(["cad", "--model", str(trained / "model"), "--scan", str(scan), "--at", "5,5,9999"]) == 2
    assert "outside the scan" in capsys.readouterr().err
    assert main(["cad", "--model", str(tmp_path), "--scan", str(scan), "--at", "1,2,3"]) == 2
    assert "not a saved folder of the CAD scorer" in capsys.readouterr().err
    assert main(["train-cad", "--output-dir", str(tmp_path / "x"), "--max-steps", "0"]) == 2
    assert "--max-steps must be positive" in capsys.readouterr().err


# -- analysis -----------------------------------------------------------------------------------


def _m3dsynth_folder(root, cases, tmp_path):
    """A tiny M3Dsynth folder in the builder's layout: for each case a pristine example at a nodule and
    a 'tampered' copy (a bright blob painted at an injection site, the nodule flattened at a removal)."""
    import datasets

    from m3d.data.nifti import write_mask_nifti, write_nifti
    from m3d.dataset_builder.features import FEATURES

    examples: dict[tuple[str, str], list[dict]] = {}
    for number, case in enumerate(cases):
        nodule = (
            max(case.nodules, key=lambda n: n.diameter_mm)
            if number != 1
            else min(case.nodules, key=lambda n: n.diameter_mm)
        )
        task = "remove" if number != 1 else "inject"
        volume = case.volume
        centre_zyx = np.asarray(nodule.centroid_zyx)
        grid = np.indices(volume.shape).transpose(1, 2, 3, 0) - centre_zyx
        distance_mm = np.linalg.norm(grid * np.asarray(volume.spacing_mm), axis=-1)
        mask = distance_mm < 8
        hu = volume.hu.copy()
        hu[mask] = 40 if task == "inject" else -850
        tampered = volume.with_hu(hu)
        site_id = f"{case.case_id}_{task}_0"
        common = dict(
            site_id=site_id,
            task=task,
            patient_id=case.case_id,
            series_instance_uid=volume.metadata.series_instance_uid or "",
            site_voxel_zyx=np.rint(centre_zyx).astype(int).tolist(),
            site_lps_mm=volume.voxel_to_world(centre_zyx).tolist(),
            test_crop_center_zyx=np.rint(centre_zyx).astype(int).tolist(),
            spacing_mm=list(volume.spacing_mm),
            nodule_diameter_mm=nodule.diameter_mm,
            malignancy_before=nodule.malignancy,
            malignancy_after=None,
            **box_fields((0, 0, 0), volume.shape, None),  # whole scans, fakes included (the schema allows both)
        )
        for generator, label, scan, changed in (
            ("real", "pristine", volume, np.zeros_like(mask)),
            ("pix2pix", "fake", tampered, mask),
        ):
            name = f"{site_id}_{generator}"
            vol_path = write_nifti(scan, tmp_path / f"{name}.nii.gz")
            mask_path = write_mask_nifti(changed, volume, tmp_path / f"{name}_mask.nii.gz")
            example = dict(
                common,
                img_id=name,
                generator=generator,
                label=label,
                volume={"bytes": vol_path.read_bytes(), "path": vol_path.name},
                mask={"bytes": mask_path.read_bytes(), "path": mask_path.name},
            )
            examples.setdefault((generator, task), []).append(example)
    configs = []
    for (generator, task), rows in examples.items():
        target = root / "data" / generator / task / "test-00000-00000.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        columns = {key: [row[key] for row in rows] for key in FEATURES}
        datasets.Dataset.from_dict(columns, features=FEATURES).to_parquet(str(target))
        configs.append(
            f"- config_name: {generator}_{task}\n  data_files:\n  - split: test\n    path: "
            f"data/{generator}/{task}/test-*.parquet"
        )
    (root / "README.md").write_text("---\nconfigs:\n" + "\n".join(configs) + "\n---\n# tiny M3Dsynth\n")
    return [row for rows in examples.values() for row in rows]


def test_analysis_writes_scores_and_histograms(trained, cases, tmp_path, capsys):
    import datasets

    from m3d.cad.analysis import COLUMNS, run_cad_analysis
    from m3d.cli import main
    from m3d.dataset_builder.features import FEATURES

    folder = tmp_path / "m3dsynth"
    examples = _m3dsynth_folder(folder, cases, tmp_path / "nifti")
    results = tmp_path / "results"
    capsys.readouterr()
    assert main(["cad-analysis", "--model", str(trained / "model"), "--data", str(folder), "--out", str(results)]) == 0
    assert "wrote" in capsys.readouterr().out

    out = results / "cad"
    for name in ("cad_scores.csv", "cad_scores.json", "hist_inject.png", "hist_remove.png", "hist_pristine.png"):
        assert (out / name).is_file(), name
    for name in ("hist_inject.png", "hist_remove.png", "hist_pristine.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with open(out / "cad_scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == COLUMNS and len(rows) == len(examples) == 6
    assert all(0 <= float(r["cad_probability"]) <= 1 and math.isfinite(float(r["cad_logit"])) for r in rows)
    assert {r["group"] for r in rows if r["label"] == "fake"} == {"injected", "removed"}
    assert {r["split"] for r in rows} == {"test"}

    payload = json.loads((out / "cad_scores.json").read_text())
    summary = payload["summary"]
    assert summary["n_examples"] == 6 and len(payload["examples"]) == 6
    assert summary["groups"]["injected"]["n"] == 1 and summary["groups"]["removed"]["n"] == 2
    pix2pix = summary["by_generator"]["pix2pix"]
    assert pix2pix["remove"]["pairs"] == 2 and 0 <= pix2pix["remove"]["flip_rate"] <= 1
    assert math.isfinite(pix2pix["inject"]["mean_change"])
    assert sorted(summary["figures"]) == ["hist_inject.png", "hist_pristine.png", "hist_remove.png"]

    # a datasets.Dataset (as load_dataset returns) gives the same scores, in its own order
    dataset = datasets.Dataset.from_dict({key: [e[key] for e in examples] for key in FEATURES}, features=FEATURES)
    again = run_cad_analysis(
        trained / "model", datasets.DatasetDict({"test": dataset}), tmp_path / "again", progress=False
    )
    by_id = {r["img_id"]: float(r["cad_probability"]) for r in rows}
    assert all(abs(by_id[r["img_id"]] - r["cad_probability"]) < 1e-5 for r in again.rows)
    assert {r["split"] for r in again.rows} == {"test"}


def test_analysis_rejects_a_folder_without_parquet(trained, tmp_path, capsys):
    from m3d.cli import main

    assert (
        main(
            ["cad-analysis", "--model", str(trained / "model"), "--data", str(tmp_path), "--out", str(tmp_path / "r")]
        )
        == 2
    )
    assert "not an M3Dsynth folder" in capsys.readouterr().err
