"""Inference speed of the m3d detectors: slices/s and model FLOP utilisation (MFU) per detector at a
given slice size, for eager / channels_last / torch.compile variants, and the time of a full scan.

    python benchmarks/bench_detectors.py --device cuda --size 512 --batch-size 32 --dtype bf16
    python benchmarks/bench_detectors.py --device cpu --size 128 --batch-size 2 --dtype fp32 --steps 2

MFU = (model FLOPs per slice x slices/s) / the device's peak dense throughput for the dtype (pass
--peak-tflops, or known GPUs are looked up). Results: benchmarks/results/detectors_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from m3d.detectors import DETECTORS
from m3d.devices import describe_device
from m3d.files import write_json_atomic

PEAK_TFLOPS = {  # dense bf16 / fp16 tensor-core peaks
    "H100 80GB HBM3": 989.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_slice(model: torch.nn.Module, size: int, device: torch.device, dtype: torch.dtype) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(pixel_values=torch.zeros(1, model.config.num_channels, size, size, device=device, dtype=dtype))
    return float(counter.get_total_flops())


def time_forward(model, batch: torch.Tensor, steps: int, warmup: int) -> float:
    """Seconds per batch, best of ``steps`` after ``warmup`` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            model(pixel_values=batch)
        synchronize(batch.device)
        best = float("inf")
        for _ in range(steps):
            start = time.perf_counter()
            model(pixel_values=batch)
            synchronize(batch.device)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512, help="slice height = width (default 512)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--detectors", nargs="+", default=sorted(DETECTORS), choices=sorted(DETECTORS))
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["eager", "channels_last", "compile"],
        choices=["eager", "channels_last", "compile"],
    )
    parser.add_argument("--steps", type=int, default=10, help="timed batches (best kept)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--scan-slices", type=int, default=300, help="slices of the 'full scan' time")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for the dtype (MFU)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    name = describe_device(device)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    results = []
    for detector in args.detectors:
        config_class, model_class = DETECTORS[detector]
        torch.manual_seed(0)
        base = model_class(config_class()).eval().to(device, dtype)
        flops = flops_per_slice(base, args.size, device, dtype)
        for variant in args.variants:
            model = base.to(memory_format=torch.channels_last) if variant != "eager" else base
            runner = torch.compile(model) if variant == "compile" else model
            batch = torch.randn(
                args.batch_size, model.config.num_channels, args.size, args.size, device=device, dtype=dtype
            )
            if variant != "eager":
                batch = batch.contiguous(memory_format=torch.channels_last)
            try:
                seconds = time_forward(runner, batch, args.steps, args.warmup)
            except Exception as error:  # a variant that does not build on this platform is reported, not fatal
                results.append({"detector": detector, "variant": variant, "error": str(error)[:300]})
                continue
            slices_per_second = args.batch_size / seconds
            row = {
                "detector": detector,
                "variant": variant,
                "params_m": round(sum(p.numel() for p in base.parameters()) / 1e6, 2),
                "gflops_per_slice": round(flops / 1e9, 2),
                "slices_per_s": round(slices_per_second, 2),
                "full_scan_s": round(args.scan_slices / slices_per_second, 3),
                "mfu": None if peak is None else round(flops * slices_per_second / (peak * 1e12), 4),
            }
            results.append(row)
            print(json.dumps(row))
        del base
    report = {
        "benchmark": "detector inference",
        "device": name,
        "dtype": args.dtype,
        "size": args.size,
        "batch_size": args.batch_size,
        "peak_tflops": peak,
        "torch": torch.__version__,
        "results": results,
    }
    out = Path(args.out)
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")[:40]
    path = out / f"detectors_{slug}.json"
    write_json_atomic(path, report, sort_keys=False, trailing_newline=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
