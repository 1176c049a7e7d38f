"""Fuzz the readers with damaged files: random truncations, bit flips and files of the wrong type, in the
DICOM series, NIfTI, LIDC XML, official tables, pipeline folder and detector / CAD folder readers.

Every case must end in a clean error (one of m3d's user errors, `m3d.errors.USER_ERRORS`, with a one-line
message) or in a correct result: a truncated file reads as the original or not at all; a flipped bit either
is refused or gives a result that passes the reader's own checks (and, where the format protects it, as
in weights, the original content). Never a traceback. The cases are drawn from fixed seeds (reproducible)
and the whole module runs in well under a minute.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from m3d.errors import USER_ERRORS

CASES_PER_KIND = 25  # truncations and bit flips per file; the wrong-type cases are all run
WRONG_TYPES = {
    "empty": b"",
    "text": b"hello, this is not the file you are looking for\n",
    "json": b'{"a": [1, 2, 3]}',
    "xml": b"<?xml version='1.0'?><root><child/></root>",
    "random": np.random.default_rng(0).bytes(3000),
    "gzip of text": b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xcbH\xcd\xc9\xc9\x07\x00\x86\xa6\x106\x05\x00\x00\x00",
}


def outcome(read: Callable[[], Any], case: str) -> tuple[str, Any]:
    """``("error", message)`` for a clean user error, ``("ok", result)`` otherwise; anything else fails the
    test naming the case."""
    try:
        return "ok", read()
    except USER_ERRORS as error:
        message = str(error)
        assert message and "\n" not in message, f"{case}: the error is not one line: {message!r}"
        return "error", message
    except Exception as error:  # noqa: BLE001 - the point of the test: name the case that escaped
        raise AssertionError(f"{case}: {type(error).__name__}: {error}") from error


def damaged_versions(data: bytes, seed: int, header_bytes: int | None = None):
    """``(kind, description, bytes)``: truncations, single-bit flips (in the first ``header_bytes`` when
    given: the part of the format that m3d must check), and files of the wrong type."""
    rng = np.random.default_rng(seed)
    for cut in sorted(set(rng.integers(0, len(data), CASES_PER_KIND).tolist())):
        yield "truncated", f"cut to {cut} of {len(data)} bytes", data[:cut]
    span = len(data) if header_bytes is None else min(header_bytes, len(data))
    for position in sorted(set(rng.integers(0, span, CASES_PER_KIND).tolist())):
        bit = int(rng.integers(0, 8))
        flipped = bytearray(data)
        flipped[position] ^= 1 << bit
        yield "flipped", f"bit {bit} of byte {position} flipped", bytes(flipped)
    for name, content in WRONG_TYPES.items():
        yield "wrong type", f"replaced by {name}", content


def fuzz_file(
    path: Path,
    read: Callable[[], Any],
    check_ok: Callable[[str, Any, Any], None],
    seed: int,
    header_bytes: int | None = None,
    same: Callable[[Any, Any], bool] = lambda a, b: a == b,
    shorter_table: Callable[[Any, Any], bool] | None = None,
) -> dict[str, int]:
    """Damage ``path`` in every way of `damaged_versions`, read it each time, restore it; returns how many
    cases ended in an error and in a result. A truncated file must read as the original (``same``), or,
    for a text table (a cut one is a valid, shorter table), as a part of it (``shorter_table``)."""
    original_bytes = path.read_bytes()
    status, original = outcome(read, f"{path.name} intact")
    assert status == "ok", original
    counts = {"error": 0, "ok": 0}
    try:
        for kind, description, data in damaged_versions(original_bytes, seed, header_bytes):
            path.write_bytes(data)
            case = f"{path.name} {description}"
            status, result = outcome(read, case)
            counts[status] += 1
            if status == "ok":
                assert kind != "wrong type" or data == original_bytes, f"{case}: read as if it were the file"
                if kind != "truncated":
                    check_ok(kind, original, result)
                elif shorter_table is not None:
                    assert shorter_table(original, result), f"{case}: the rows read are not the table's"
                else:
                    assert same(original, result), f"{case}: a shorter file read as a different result, silently"
    finally:
        path.write_bytes(original_bytes)
    return counts


def volumes_equal(a, b) -> bool:
    return (
        a.shape == b.shape
        and np.array_equal(a.hu, b.hu)
        and np.allclose(a.spacing_mm, b.spacing_mm)
        and np.allclose(a.origin_mm, b.origin_mm)
        and np.allclose(a.direction, b.direction)
    )


def check_volume(kind: str, original, volume) -> None:
    """A volume read from a damaged file must still be a CT volume: int16 HU, finite positive spacing, an
    orthonormal direction, finite origin."""
    assert volume.hu.dtype == np.int16 and volume.hu.ndim == 3
    assert np.all(np.isfinite(volume.spacing_mm)) and np.all(np.asarray(volume.spacing_mm) > 0)
    assert np.all(np.isfinite(volume.origin_mm))
    assert np.allclose(volume.direction.T @ volume.direction, np.eye(3), atol=1e-3)


@pytest.fixture(scope="module")
def phantom():
    from m3d.data.phantom import make_phantom

    return make_phantom(5, size=32, max_slices=6, n_nodules=(1, 1))


def test_dicom_series_reader(phantom, tmp_path):
    from m3d.data.dicom import read_dicom_series, write_dicom_series

    folder = tmp_path / "series"
    write_dicom_series(phantom.volume, folder)
    first = sorted(folder.iterdir())[0]
    counts = fuzz_file(
        first, lambda: read_dicom_series(folder), check_volume, seed=1, header_bytes=1200, same=volumes_equal
    )
    assert counts["error"] >= CASES_PER_KIND  # the truncations and wrong types at least


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_reader(phantom, tmp_path, suffix):
    from m3d.data.nifti import read_nifti, write_nifti

    path = write_nifti(phantom.volume, tmp_path / f"scan{suffix}")
    fuzz_file(
        path,
        lambda: read_nifti(path),
        check_volume,
        seed=2,
        header_bytes=352 if suffix == ".nii" else None,
        same=volumes_equal,
    )


def test_lidc_xml_reader(phantom, tmp_path):
    from m3d.data.lidc import read_lidc_xml, write_lidc_xml

    path = write_lidc_xml(phantom.lidc, tmp_path / "annotations.xml")

    def check_scan(kind, original, scan) -> None:
        assert scan.patient_id is not None and np.all(np.isfinite(scan.z_positions_mm))

    fuzz_file(path, lambda: read_lidc_xml(path, phantom.volume), check_scan, seed=3)


def test_official_tables_reader(tmp_path):
    from m3d.tamper.plan import read_official_plan

    release = tmp_path / "release"
    shutil.copytree(Path(__file__).parent / "data" / "official", release)

    def check_sites(kind, original, sites) -> None:
        for site in sites:
            assert site.task in ("inject", "remove") and all(np.isfinite(site.center_zyx))

    def site_keys(sites) -> set:
        return {(site.task, site.series_instance_uid, site.center_zyx, site.split) for site in sites}

    def part_of(original, sites) -> bool:
        """The rows before the cut, and a last row whose last value may be cut short: CSV cannot tell."""
        return site_keys(sites[:-1]) <= site_keys(original)

    for name, seed in (("data.csv", 4), ("sets.csv", 5)):
        fuzz_file(
            release / "data" / name, lambda: read_official_plan(release), check_sites, seed=seed, shorter_table=part_of
        )


def state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def safetensors_header_bytes(path: Path) -> int:
    """The length prefix and JSON header of a safetensors file: the part that says what the bytes are."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_pipeline_folder_reader(tmp_path, tiny_pipelines_dir):
    from m3d.pipelines import load_pipeline

    folder = tmp_path / "pix2pix-inject"
    shutil.copytree(tiny_pipelines_dir / "pix2pix-inject", folder)
    network = next(
        name
        for name in json.loads((folder / "model_index.json").read_text())
        if not name.startswith("_") and (folder / name / "config.json").is_file()
    )

    def check_pipeline(kind, original, pipeline) -> None:
        assert state_dicts_equal(getattr(original, network), getattr(pipeline, network)), "weights changed silently"

    def read():
        return load_pipeline(folder)

    weights = next((folder / network).glob("*.safetensors"))
    for seed, path, header in (
        (6, folder / "model_index.json", None),
        (7, folder / network / "config.json", None),
        (8, weights, safetensors_header_bytes(weights)),
    ):
        fuzz_file(
            path,
            read,
            check_pipeline,
            seed=seed,
            header_bytes=header,
            same=lambda a, b: state_dicts_equal(getattr(a, network), getattr(b, network)),
        )


@pytest.mark.parametrize("kind", ["detector", "cad"])
def test_model_folder_reader(tmp_path, kind):
    if kind == "detector":
        from m3d.detectors import UNetConfig, UNetForForgeryDetection, load_detector as load

        model = UNetForForgeryDetection(UNetConfig(base_channels=4, depth=2))
    else:
        from m3d.cad.configuration_cad import CADConfig
        from m3d.cad.modeling_cad import CADForMalignancyScoring
        from m3d.cad.scoring import load_cad as load

        model = CADForMalignancyScoring(CADConfig.from_preset("tiny"))
    model.save_pretrained(tmp_path / "model")

    def check_model(kind_, original, loaded) -> None:
        assert state_dicts_equal(original, loaded), "weights changed silently"

    weights = tmp_path / "model" / "model.safetensors"
    for seed, path, header in (
        (9, tmp_path / "model" / "config.json", None),
        (10, weights, safetensors_header_bytes(weights)),
    ):
        fuzz_file(
            path, lambda: load(tmp_path / "model"), check_model, seed=seed, header_bytes=header, same=state_dicts_equal
        )
