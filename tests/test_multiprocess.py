"""Two processes on the CPU, launched as a user would (`accelerate launch --multi_gpu --num_processes 2`, no
``--cpu``, no GPU): one gloo group, each rank doing its share, and the result of one process — the same
shard bytes for the build, the same losses and weights for training (the batch of one process accumulating
two micro-batches is the two processes' micro-batches)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from m3d.build import build_dataset
from m3d.dataset_builder.writer import read_state
from m3d.train import train_detector

from m3dsynth_mini import make_mini_m3dsynth

REPOSITORY = Path(__file__).resolve().parents[1]
PHANTOMS = dict(size=64, max_slices=40, phantom_spacing="scaled")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two(target: list[str], *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 TARGET argv`` on this CPU-only machine (``target``:
    ``["-m", module]`` or ``[script]``)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        *target,
        *argv,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    # each rank's own error comes first; the launcher's traceback after it
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() and "Traceback" not in line]
    assert result.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + result.stderr[-2000:]
    return result


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "logs.jsonl").read_text().splitlines()) if "loss" in r]


def test_two_process_build_writes_the_one_process_bytes(tmp_path, tiny_pipelines_dir, one_thread):
    options = dict(generators=["pix2pix"], tasks=["inject"], phantoms=3, num_inference_steps=1, scans_per_shard=1)
    one = tmp_path / "one"
    build_dataset(one, pipelines_dir=tiny_pipelines_dir, **PHANTOMS, **options, quality=None, progress=False)
    two = tmp_path / "two"
    launch_two(
        ["-m", "m3d.build"],
        "--out",
        str(two),
        "--pipelines",
        str(tiny_pipelines_dir),
        "--generators",
        "pix2pix",
        "--tasks",
        "inject",
        "--phantoms",
        "3",
        "--size",
        "64",
        "--max-slices",
        "40",
        "--phantom-spacing",
        "scaled",
        "--steps",
        "1",
        "--scans-per-shard",
        "1",
        "--keep-all",
        "--no-progress",
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    shards = {name: read_state(folder).shards for name, folder in (("one", one), ("two", two))}
    ranks = {Path(path).stem.split("-")[1] for path in shards["two"]}
    assert ranks == {"00000", "00001"}, "both processes write their share"

    def contents(state):  # the shard files by split and folder, in name order: names differ only by the writer's rank
        return sorted(
            (Path(p).parent.as_posix(), Path(p).stem.split("-")[0], Path(p).stem.split("-")[2], e["sha256"])
            for p, e in state.items()
        )

    assert contents(shards["two"]) == contents(shards["one"])
    assert read_state(two).chunks.keys() == read_state(one).chunks.keys()


def test_two_process_detector_training_equals_one_process_accumulating(tmp_path, one_thread):
    data = make_mini_m3dsynth(tmp_path / "m3dsynth")
    common = [
        "--detector",
        "unet",
        "--preset",
        "tiny",
        "--data",
        str(data),
        "--crop-size",
        "1,32,32",
        "--no-progress",
        "--log-every",
        "1",
        "--generators",
        "pix2pix",
        "--tasks",
        "inject",
        "--validation-split",
        "none",
        "--max-steps",
        "3",
        "--seed",
        "3",
        "--batch-size",
        "2",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    assert (
        train_detector.main(
            [
                *common,
                "--gradient-accumulation-steps",
                "2",
                "--output-dir",
                str(one),
                "--dataset-cache-dir",
                str(tmp_path / "cache1"),
            ]
        )
        == 0
    )
    # the design card's command: `accelerate launch train_detector.py ...` from the repository's root
    launch_two(
        [str(REPOSITORY / "train_detector.py")],
        *common,
        "--output-dir",
        str(two),
        "--dataset-cache-dir",
        str(tmp_path / "cache2"),
        cwd=tmp_path,
    )
    assert len(_losses(two)) == 3 and _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    weights = [load_file(run / "best" / "model.safetensors") for run in (one, two)]
    assert weights[0].keys() == weights[1].keys()
    # BatchNorm's running statistics are not trained: one process follows 6 micro-batches, each of two 3
    for name in (n for n in weights[0] if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))):
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-5)
