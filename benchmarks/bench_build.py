"""Speed and storage of the M3Dsynth build, on this machine: samples/s per generator (the whole path of
one sample: pipeline, paste, quality check, NIfTI encoding), the NIfTI encoding cost and compressed size
of a full-resolution scan, and the projected time and size of the full 8,577-sample build.

    python benchmarks/bench_build.py [--pipelines DIR] [--repeats 3] [--steps 50]

Pipelines: the shipped demo pipelines if present (else ``--pipelines``, else the "default" presets with
random weights, which cost the same to run). Writes benchmarks/results/build_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from m3d.data.nifti import nifti_image
from m3d.constants import FAKE_GENERATORS
from m3d.devices import cpu_model
from m3d.files import write_json_atomic
from m3d.dataset_builder.generate import DEMO_PIPELINES_DIR, nifti_bytes, pipeline_folder, phantom_jobs, scan_examples
from m3d.pipelines import CycleGAN3DPipeline, M3DInpaintPipeline, Pix2Pix3DPipeline, load_pipeline

FULL_BUILD = {"fakes": 8577, "sites": 2235 + 1016}  # official release; one pristine sample per site
LIDC_SCAN = (250, 512, 512)  # a typical LIDC-IDRI series (slices, rows, columns)
CLASSES = {"pix2pix": Pix2Pix3DPipeline, "cyclegan": CycleGAN3DPipeline, "ddpm": M3DInpaintPipeline}


def pipelines_for(root: Path | None, device: str) -> tuple[dict, str]:
    pipelines, origin = {}, str(root)
    for generator in FAKE_GENERATORS:
        for task in ("inject", "remove"):
            folder = pipeline_folder(root, generator, task) if root else None
            if folder is not None and (folder / "model_index.json").is_file():
                pipelines[generator, task] = load_pipeline(folder)
            else:
                pipelines[generator, task], origin = (
                    CLASSES[generator].from_preset("default", task=task),
                    "default presets",
                )
            pipelines[generator, task].to(device)
    return pipelines, origin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipelines", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50, help="DDPM sampling steps")
    parser.add_argument("--repeats", type=int, default=2, help="phantom scans per measurement")
    parser.add_argument(
        "--lidc-slices", type=int, default=64, help="slices of the 512x512 scan encoded for the size estimate"
    )
    args = parser.parse_args()
    root = Path(args.pipelines) if args.pipelines else DEMO_PIPELINES_DIR
    pipelines, origin = pipelines_for(root, args.device)
    jobs = phantom_jobs(args.repeats + 1, seed=0, size=128, max_slices=96, spacing="scaled", progress=False)
    volumes = {job.series_instance_uid: job.load() for job in jobs}
    per_generator = {}
    for generator in FAKE_GENERATORS:
        samples, seconds = 0, 0.0
        for index, job in enumerate(jobs):
            started = time.perf_counter()
            outcomes = [
                o
                for _, o in scan_examples(
                    job,
                    volumes[job.series_instance_uid],
                    generators=[generator],
                    tasks=["inject", "remove"],
                    pipelines=pipelines,
                    quality=None,
                    num_inference_steps=args.steps,
                )
                if o.generator == generator
            ]
            if index:  # the first scan warms up
                samples, seconds = samples + len(outcomes), seconds + time.perf_counter() - started
        per_generator[generator] = {
            "samples": samples,
            "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 4),
        }
        print(generator, per_generator[generator])

    from m3d.data.phantom import make_phantom

    big = make_phantom(0, size=512, max_slices=args.lidc_slices).volume
    started = time.perf_counter()
    encoded = nifti_bytes(nifti_image(big))
    encode_s = time.perf_counter() - started
    bytes_per_voxel = len(encoded) / big.hu.size
    scan_mb = bytes_per_voxel * np.prod(LIDC_SCAN) / 1e6
    encode_scan_s = encode_s * np.prod(LIDC_SCAN) / big.hu.size
    samples = FULL_BUILD["fakes"] + FULL_BUILD["sites"]
    # generation cost per fake is the cube's (independent of the scan size); the mix of the release
    mix = {"pix2pix": 2009 + 509, "cyclegan": 2220 + 1016, "ddpm": 2009 + 814}
    generation_s = sum(n / per_generator[g]["samples_per_s"] for g, n in mix.items())
    result = {
        "device": cpu_model() if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(),
        "pipelines": origin,
        "ddpm_steps": args.steps,
        "phantom_scan": "128x128 in-plane, <= 96 slices",
        "per_generator": per_generator,
        "nifti_gzip": {
            "scan": list(big.shape),
            "seconds": round(encode_s, 3),
            "bytes_per_voxel": round(bytes_per_voxel, 4),
        },
        "projected_full_build": {
            "samples": samples,
            "generation_hours_one_device": round(generation_s / 3600, 2),
            "nifti_encoding_hours_one_core": round(samples * 2 * encode_scan_s / 3600, 2),  # volume + (cheap) mask
            "lidc_scan_mb": round(scan_mb, 1),
            "total_gb": round(samples * scan_mb / 1e3, 1),
        },
    }
    print(json.dumps(result, indent=1))
    out = (
        Path(__file__).parent
        / "results"
        / f"build_{re.sub(r'[^a-z0-9]+', '_', result['device'].lower()).strip('_')}.json"
    )
    write_json_atomic(out, result, indent=1, sort_keys=False, trailing_newline=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
