import csv
import json
import math

import datasets
import pytest

from m3d.cli import main as cli_main
from m3d.train import benchmark, train_detector
from m3dsynth_mini import make_mini_m3dsynth


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mini_m3dsynth(tmp_path_factory):
    datasets.disable_progress_bars()
    return make_mini_m3dsynth(tmp_path_factory.mktemp("m3dsynth"), sites={"train": 2, "validation": 1, "test": 2})


def bench_argv(data, out, cache, *extra):
    return [
        "--data",
        str(data),
        "--out",
        str(out),
        "--preset",
        "demo",
        "--max-steps",
        "2",
        "--detectors",
        "unet",
        "--train-generators",
        "pix2pix",
        "--no-progress",
        "--dataset-cache-dir",
        cache,
        *extra,
    ]


@pytest.fixture(scope="module")
def results(mini_m3dsynth, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    cache = str(tmp_path_factory.mktemp("hf_cache"))
    assert cli_main(["bench", *bench_argv(mini_m3dsynth, out, cache)]) == 0
    return out, cache


def test_bench_writes_every_output_with_finite_numbers(results):
    out, _ = results
    cells = [
        "cross_generator__unet__pix2pix",
        "preliminary__resnet_gp__m3dsynth",
        "preliminary__resnet_gp__nonmedical",
    ]
    assert sorted(p.stem for p in (out / "cells").glob("*.json")) == cells
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["experiment"], r["detector"], r["train_data"]) for r in rows} == {tuple(c.split("__")) for c in cells}
    assert {r["test_generator"] for r in rows} == {"all", "pix2pix", "cyclegan"}
    for row in rows:
        for key in ("auc", "balanced_accuracy", "pd_at_1pct"):
            assert math.isfinite(float(row[key]))
        localizing = row["detector"] == "unet"
        assert (
            all(math.isfinite(float(row[k])) for k in ("f1", "iou", "f1_best", "iou_best"))
            if localizing
            else row["f1"] == ""
        )
    summary = json.loads((out / "results.json").read_text())
    assert "STAND-IN" in summary["meta"]["nonmedical"] and len(summary["rows"]) == len(rows)
    assert len(summary["samples"]["cross_generator__unet__pix2pix"]) == 12  # 2 sites x 2 tasks x (pristine + 2 fakes)
    tables = (out / "tables.md").read_text()
    for title in (
        "F1 / IoU (threshold 0.5)",
        "F1 / IoU (best threshold",
        "Acc / Pd@1%",
        "AUC",
        "Preliminary",
        "STAND-IN",
    ):
        assert title in tables
    assert "| unet | pix2pix |" in tables and "nan" not in tables.lower()
    plots = {p.relative_to(out / "plots").as_posix() for p in (out / "plots").rglob("*.png")}
    assert {
        "roc_unet.png",
        "roc_preliminary.png",
        "hist_cross_generator__unet__pix2pix.png",
        "examples/cross_generator__unet__pix2pix.png",
    } <= plots
    assert (out / "nonmedical_standin" / "README.md").is_file()


def test_rerun_skips_finished_cells_and_redoes_only_missing_ones(results, mini_m3dsynth, monkeypatch):
    out, cache = results
    trained = []
    original = train_detector.train

    def counting_train(args, dataset=None):
        trained.append(args.output_dir)
        return original(args, dataset)

    monkeypatch.setattr(train_detector, "train", counting_train)
    assert benchmark.main(bench_argv(mini_m3dsynth, out, cache)) == 0
    assert trained == []
    # an interruption after the training of a cell, before its result: only that cell runs again
    (out / "cells" / "preliminary__resnet_gp__m3dsynth.json").unlink()
    before = (out / "cells" / "cross_generator__unet__pix2pix.json").read_bytes()
    assert benchmark.main(bench_argv(mini_m3dsynth, out, cache)) == 0
    assert [p.split("/")[-1] for p in trained] == ["preliminary__resnet_gp__m3dsynth"]
    assert (out / "cells" / "cross_generator__unet__pix2pix.json").read_bytes() == before
    assert (out / "cells" / "preliminary__resnet_gp__m3dsynth.json").is_file()


def test_interrupted_bench_keeps_finished_cells(mini_m3dsynth, tmp_path, monkeypatch, capsys):
    cache = str(tmp_path / "cache")
    calls = []

    def interrupted_train(args, dataset=None):
        calls.append(args.output_dir)
        if len(calls) == 2:
            return 130  # what train() returns after Ctrl-C (a checkpoint was saved)
        return original(args, dataset)

    original = train_detector.train
    monkeypatch.setattr(train_detector, "train", interrupted_train)
    argv = bench_argv(
        mini_m3dsynth,
        tmp_path / "out",
        cache,
        "--experiments",
        "cross_generator",
        "--train-generators",
        "pix2pix",
        "cyclegan",
        "--cell-workers",
        "1",
    )  # the patched train() runs in this process
    assert benchmark.main(argv) == 130
    assert "re-run the same command" in capsys.readouterr().err
    assert [p.stem for p in (tmp_path / "out" / "cells").glob("*.json")] == ["cross_generator__unet__pix2pix"]
    assert benchmark.main(argv) == 0
    assert len(calls) == 3 and calls[-1].endswith("cross_generator__unet__cyclegan")


def test_other_settings_are_refused(results, mini_m3dsynth, capsys):
    out, cache = results
    assert benchmark.main(bench_argv(mini_m3dsynth, out, cache, "--crop-size", "8,64,64")) == 2
    assert "other settings (crop_size)" in capsys.readouterr().err


def _cell(detector, train_data, score_of, localizes=True):
    """A finished cross-generator cell over a fixed test set: 20 pristine crops, 20 fakes per generator."""
    samples = [
        {
            "img_id": f"p{i}",
            "site_id": i,
            "label": "pristine",
            "generator": "real",
            "task": "inject",
            "score": score_of("real", i),
        }
        for i in range(20)
    ]
    for generator in ("pix2pix", "cyclegan"):
        samples += [
            {
                "img_id": f"{generator}{i}",
                "site_id": i,
                "label": "fake",
                "generator": generator,
                "task": "inject",
                "score": score_of(generator, i),
                "f1_best": 0.8 if generator == train_data else 0.4,
            }
            for i in range(20)
        ]
    return {
        "experiment": "cross_generator",
        "detector": detector,
        "train_data": train_data,
        "localizes": localizes,
        "samples": samples,
        "metrics": {"all": {}, "pix2pix": {}, "cyclegan": {}},
    }


def test_cross_generator_summary_separates_same_and_other_generators_with_paired_intervals():
    """A detector perfect on every generator against one perfect only on its own (chance elsewhere):
    means of the right cells, intervals around them, and a paired difference whose interval excludes 0."""
    import numpy as np

    from m3d.train.evaluation import cross_generator_summary

    chance = 0.5 + 0.2 * np.random.default_rng(0).random((3, 20))  # as the pristine scores: 0.50-0.69
    perfect = lambda generator, i: 0.5 + 0.01 * i if generator == "real" else 1.0 + 0.01 * i  # noqa: E731
    cells = [_cell("ours", g, perfect) for g in ("pix2pix", "cyclegan")]
    for train in ("pix2pix", "cyclegan"):

        def own(generator, i, t=train):
            if generator in ("real", t):
                return perfect(generator, i)
            return chance[("real", "pix2pix", "cyclegan").index(generator), i]

        cells.append(_cell("trufor", train, own))
    summary = cross_generator_summary(cells, reference="trufor", resamples=200)
    assert summary["ours"]["same"]["auc"] == [1.0, 1.0, 1.0] and summary["ours"]["other"]["auc"] == [1.0, 1.0, 1.0]
    value, low, high = summary["trufor"]["other"]["auc"]
    assert value < 0.8 and low < value < high
    assert summary["ours"]["same"]["f1_best"][0] == pytest.approx(0.8) and summary["ours"]["other"]["f1_best"][
        0
    ] == pytest.approx(0.4)
    difference = summary["ours"]["minus_reference"]["other"]["auc"]
    assert difference[0] == pytest.approx(1.0 - value) and difference[1] > 0
    assert (
        summary["ours"]["minus_reference"]["same"]["auc"] == [0.0, 0.0, 0.0]
        and "minus_reference" not in summary["trufor"]
    )
    table = "\n".join(benchmark.generalization_markdown(summary))
    assert "| ours | 1.00 (1.00–1.00) | 1.00 (1.00–1.00) | 0.80" in table and "AUC other − trufor" in table


def test_benchmark_arguments_are_the_command_line_and_full_crops_override_the_preset():
    """`BenchmarkArguments` (what `m3d demo` calls `run` with) has the parser's defaults, and ``--crop-size
    full`` means whole scans rather than "not given" (the preset's crops)."""
    parsed = benchmark.build_parser().parse_args(["--data", "d", "--out", "o"])
    assert benchmark.BenchmarkArguments(**vars(parsed)) == benchmark.BenchmarkArguments(data="d", out="o")
    assert benchmark.settings_of(benchmark.BenchmarkArguments(data="d", out="o"))["crop_size"] != "full"
    full = benchmark.BenchmarkArguments(data="d", out="o", crop_size="full")
    assert benchmark.settings_of(full)["crop_size"] == "full"
    with pytest.raises(ValueError, match="crop size must be Z,Y,X voxels or 'full'"):
        benchmark.settings_of(benchmark.BenchmarkArguments(data="d", out="o", crop_size="big"))
