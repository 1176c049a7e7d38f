"""Read speed of a DICOM CT series: m3d's `read_dicom_series` vs SimpleITK's ImageSeriesReader (GDCM)
on the same files in the same run. Goal: m3d within 1.5x of SimpleITK.

    python benchmarks/bench_io.py [--slices 300] [--size 512] [--repeats 3]

Writes benchmarks/results/io_<machine>.json with the device named.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from m3d.data.ct import CTVolume
from m3d.data.dicom import read_dicom_series, write_dicom_series
from m3d.devices import cpu_model
from m3d.files import write_json_atomic


def best_of_interleaved(repeats: int, *functions) -> list[float]:
    """Best time of each function over ``repeats`` rounds, the functions taking turns in every round
    (so that a change in machine load during the run affects both alike)."""
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for index, function in enumerate(functions):
            start = time.perf_counter()
            function()
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300, help="number of slices (default 300)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, best kept (default 3)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results folder")
    args = parser.parse_args()

    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 1500, (args.slices, args.size, args.size), dtype=np.int16)
    volume = CTVolume(hu, (1.25, 0.7, 0.7), (-180.0, -180.0, -300.0))
    with tempfile.TemporaryDirectory() as folder:
        series = Path(folder) / "series"
        start = time.perf_counter()
        write_dicom_series(volume, series, uid_seed="bench")
        write_seconds = time.perf_counter() - start

        def read_simpleitk():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
            return sitk.GetArrayFromImage(reader.Execute())

        # one untimed read each warms the page cache and checks that both give the written HU
        assert np.array_equal(read_dicom_series(series).hu, hu) and np.array_equal(read_simpleitk(), hu)
        m3d_seconds, sitk_seconds = best_of_interleaved(
            args.repeats, lambda: read_dicom_series(series), read_simpleitk
        )
    result = {
        "benchmark": "read a DICOM CT series (best of repeats, warm page cache)",
        "device": f"{cpu_model()} ({os.cpu_count()} logical cores)",
        "n_slices": args.slices,
        "shape": [args.slices, args.size, args.size],
        "repeats": args.repeats,
        "write_seconds": round(write_seconds, 3),
        "m3d_seconds": round(m3d_seconds, 3),
        "simpleitk_seconds": round(sitk_seconds, 3),
        "ratio": round(m3d_seconds / sitk_seconds, 3),  # m3d / SimpleITK: lower is better
        "goal": 1.5,
    }
    out = Path(args.out)
    path = out / f"io_{platform.node() or 'machine'}.json"
    write_json_atomic(path, result, sort_keys=False, trailing_newline=True)
    print(f"{'reader':<28}{'seconds':>10}")
    print(f"{'m3d read_dicom_series':<28}{m3d_seconds:>10.3f}")
    print(f"{'SimpleITK ImageSeriesReader':<28}{sitk_seconds:>10.3f}")
    print(
        f"ratio {result['ratio']:.2f} (goal <= {result['goal']}), shape {tuple(result['shape'])}, {result['device']}"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
