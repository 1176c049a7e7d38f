"""Throughput of the DDPM denoiser `m3d.models.UNet3DModel` (train step and sampling step), variant by
variant, beside MONAI's `DiffusionModelUNet` at the same configuration when `monai` is importable, plus
the cubes/s of full generation of each m3d pipeline.

    python benchmarks/bench_unet3d.py                       # CUDA: reference config, batch 128, bf16
    python benchmarks/bench_unet3d.py --device cpu --preset demo --batch-size 2 --steps 3

Variants (each measured on its own, a fresh model each time):

* ``eager``: as written (SDPA attention with PyTorch's automatic backend choice);
* ``sdpa_math`` / ``sdpa_flash`` / ``sdpa_efficient`` / ``sdpa_cudnn``: attention forced to one
  `torch.nn.attention.SDPBackend` (skipped with the reason when the device/dtype lacks it);
* ``channels_last_3d``: model and inputs in ``torch.channels_last_3d``;
* ``compile``: ``torch.compile(model)`` (compile time reported apart); ``compile_channels_last_3d``.

Train step = forward + epsilon MSE + backward + AdamW step, under autocast in ``--dtype`` (weights fp32,
as `accelerate --mixed-precision bf16` trains). Sampling step = one denoiser forward under
``torch.inference_mode`` (weights cast to ``--dtype``), as in the pipeline's loop. Full generation =
the pipeline's ``__call__`` on ``--batch-size`` cubes: DDPM with ``--inference-steps`` scheduler steps,
pix2pix and CycleGAN one forward pass each, all at the ``--preset`` sizes.

Results: ``benchmarks/results/unet3d_<device>.json`` (``<device>``: the CUDA device name or the CPU
model, as a slug) unless ``--output`` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from m3d.devices import cpu_model, describe_device  # noqa: E402
from m3d.files import write_json_atomic  # noqa: E402
from m3d.models import UNet3DModel  # noqa: E402
from m3d.presets import lookup_preset  # noqa: E402

CUBE = 32
SDPA_VARIANTS = {
    "sdpa_math": "MATH",
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
}
ALL_VARIANTS = ["eager", *SDPA_VARIANTS, "channels_last_3d", "compile", "compile_channels_last_3d"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def slug(text: str) -> str:
    text = re.sub(r"\((?:R|TM|tm|r)\)", "", text)
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "device"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> dict[str, float]:
    """Median / min seconds per call of ``fn`` after ``warmup`` calls (the first call's time apart)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        fn()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"first_call_s": first, "median_s": statistics.median(times), "min_s": min(times), "runs": steps}


def unet_config(preset: str) -> dict[str, Any]:
    return lookup_preset(UNet3DModel.presets, preset, "UNet3DModel")


def build_m3d_unet(config: dict[str, Any]) -> torch.nn.Module:
    return UNet3DModel(**config)


def build_monai_unet(config: dict[str, Any]) -> torch.nn.Module:
    """MONAI's DiffusionModelUNet at the same sizes (3 input channels, 1 output)."""
    from monai.networks.nets import DiffusionModelUNet

    full = {**UNet3DModel().config, **config}
    kwargs = dict(
        spatial_dims=3,
        in_channels=full["in_channels"],
        out_channels=full["out_channels"],
        num_res_blocks=full["layers_per_block"],
        attention_levels=tuple(full["attention_levels"]),
        norm_num_groups=full["norm_num_groups"],
        num_head_channels=full["num_head_channels"],
        with_conditioning=False,
    )
    try:  # MONAI >= 1.4 names it `channels`; older generative releases `num_channels`
        return DiffusionModelUNet(channels=tuple(full["block_out_channels"]), **kwargs)
    except TypeError:
        return DiffusionModelUNet(num_channels=tuple(full["block_out_channels"]), **kwargs)


def call_unet(model: torch.nn.Module, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    out = model(sample, timesteps)
    return out.sample if hasattr(out, "sample") else out


@contextlib.contextmanager
def sdpa_backend(name: str | None):
    if name is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, name)):
        yield


def bench_variant(
    build: Callable[[], torch.nn.Module],
    variant: str,
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    steps: int,
    warmup: int,
) -> dict[str, Any]:
    """Train-step and sampling-step throughput of one variant of a freshly built denoiser."""
    channels_last = variant.endswith("channels_last_3d")
    compiled = variant.startswith("compile")
    backend = SDPA_VARIANTS.get(variant)
    autocast = (
        torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    generator = torch.Generator("cpu").manual_seed(0)
    sample = torch.randn((batch, 3, CUBE, CUBE, CUBE), generator=generator).to(device, memory_format=memory_format)
    target = torch.randn((batch, 1, CUBE, CUBE, CUBE), generator=generator).to(device)
    timesteps = torch.randint(0, 2000, (batch,), generator=generator).to(device)
    result: dict[str, Any] = {}

    # train step: fp32 weights, autocast
    model = build().to(device, memory_format=memory_format).train()
    result["parameters"] = sum(p.numel() for p in model.parameters())
    runner = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        with sdpa_backend(backend), autocast:
            prediction = call_unet(runner, sample, timesteps)
        loss = F.mse_loss(prediction.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train = timed(train_step, device, steps, warmup)
    train["cubes_per_s"] = batch / train["median_s"]
    if device.type == "cuda":
        train["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["train_step"] = train
    optimizer = runner = model = None  # free the training copies before the sampling ones (the closures are done)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # sampling step: weights in dtype, inference mode
    model = build().to(device, dtype=dtype, memory_format=memory_format).eval()
    runner = torch.compile(model) if compiled else model
    sample_cast = sample.to(dtype)

    def sample_step():
        with torch.inference_mode(), sdpa_backend(backend):
            call_unet(runner, sample_cast, timesteps)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sampling = timed(sample_step, device, steps, warmup)
    sampling["cubes_per_s"] = batch / sampling["median_s"]
    if device.type == "cuda":
        sampling["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["sampling_step"] = sampling
    runner = model = None  # free them before the cache is emptied
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - a variant that cannot run is recorded, not fatal
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:400]
        return {"skipped": message, "traceback_tail": traceback.format_exc().splitlines()[-3:]}


def bench_pipelines(
    preset: str, device: torch.device, dtype: torch.dtype, batch: int, inference_steps: int, repeats: int
) -> dict[str, Any]:
    """Cubes/s of full generation with each pipeline (random weights: speed only)."""
    from m3d.pipelines import CycleGAN3DPipeline, M3DInpaintPipeline, Pix2Pix3DPipeline

    cubes = torch.rand((batch, 1, CUBE, CUBE, CUBE), generator=torch.Generator().manual_seed(0)) * 2 - 1
    results = {}
    for name, cls, kwargs in (
        ("ddpm", M3DInpaintPipeline, {"num_inference_steps": inference_steps}),
        ("pix2pix", Pix2Pix3DPipeline, {}),
        ("cyclegan", CycleGAN3DPipeline, {}),
    ):

        def run(cls=cls, kwargs=kwargs):
            pipe = cls.from_preset(preset, task="inject").to(device, dtype)
            pipe.set_progress_bar_config(disable=True)

            def call():
                generator = torch.Generator().manual_seed(0)
                return pipe(cubes, batch_size=batch, output_type="pt", progress=False, generator=generator, **kwargs)

            stats = timed(call, device, repeats, 1)
            stats["cubes_per_s"] = batch / stats["median_s"]
            if name == "ddpm":
                stats["inference_steps"] = inference_steps
                stats["seconds_per_scheduler_step"] = stats["median_s"] / inference_steps
            return stats

        results[name] = guarded(run)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:1, cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="cubes per step (default: 128 on CUDA, 2 on CPU)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed iterations per measurement (default: 20 CUDA, 3 CPU)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: 5 CUDA, 2 CPU)")
    parser.add_argument(
        "--preset",
        default=None,
        choices=list(UNet3DModel.presets),
        help="network sizes (default: reference on CUDA, demo on CPU)",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS), help=f"comma-separated subset of {ALL_VARIANTS}")
    parser.add_argument("--inference-steps", type=int, default=50, help="DDPM scheduler steps of a full generation")
    parser.add_argument("--no-monai", action="store_true", help="skip MONAI's DiffusionModelUNet")
    parser.add_argument("--no-pipelines", action="store_true", help="skip the full-generation measurements")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/unet3d_<device>.json)")
    args = parser.parse_args(argv)

    try:  # no "cast with to()" notices from diffusers in the output
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (128 if cuda else 2)
    steps = args.steps or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    preset = args.preset or ("reference" if cuda else "demo")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(ALL_VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {ALL_VARIANTS}")
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = unet_config(preset)
    name = describe_device(device) if cuda else cpu_model()  # the CPU's plain model: the file name's slug
    report: dict[str, Any] = {
        "benchmark": "unet3d",
        "device": name,
        "device_type": device.type,
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "preset": preset,
        "unet_config": {**{k: v for k, v in UNet3DModel(**config).config.items() if not k.startswith("_")}},
        "cube": [CUBE] * 3,
        "batch_size": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "steps": steps,
        "warmup": warmup,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "m3d_unet3d": {},
    }
    try:
        import diffusers

        report["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    print(f"[bench_unet3d] {name} ({device}), preset {preset}, batch {batch}, {report['dtype']}", flush=True)

    output = Path(args.output) if args.output else ROOT / "benchmarks" / "results" / f"unet3d_{slug(name)}.json"
    monai_version = None
    if args.no_monai:
        report["monai"] = {"skipped": "--no-monai"}
    else:
        try:
            import monai

            monai_version = monai.__version__
            report["monai"] = {"version": monai_version}
        except ImportError as error:
            report["monai"] = {
                "skipped": f"monai is not importable here ({error}); install monai (+ einops) to compare"
            }
            print(f"  monai: {report['monai']['skipped']}", flush=True)

    # variant by variant, m3d then MONAI, the file rewritten after each: a run cut short keeps comparable pairs
    for variant in variants:
        report["m3d_unet3d"][variant] = result = guarded(
            lambda: bench_variant(lambda: build_m3d_unet(config), variant, device, dtype, batch, steps, warmup)
        )
        print(f"  m3d  {variant:26s} {_line(result)}", flush=True)
        write_report(report, output)
        if monai_version is not None:
            report["monai"][variant] = result = guarded(
                lambda: bench_variant(lambda: build_monai_unet(config), variant, device, dtype, batch, steps, warmup)
            )
            print(f"  monai {variant:25s} {_line(result)}", flush=True)
            write_report(report, output)

    if not args.no_pipelines:
        report["pipelines"] = bench_pipelines(
            preset, device, dtype, batch, args.inference_steps, max(1, min(steps, 3))
        )
        for key, result in report["pipelines"].items():
            if "skipped" in result:
                print(f"  pipeline {key:10s} skipped: {result['skipped']}", flush=True)
            else:
                print(f"  pipeline {key:10s} {result['cubes_per_s']:.2f} cubes/s (full generation)", flush=True)

    write_report(report, output)
    print(f"[bench_unet3d] wrote {output}", flush=True)
    return 0


def write_report(report: dict[str, Any], output: Path) -> None:
    """Write ``report`` to ``output`` atomically (a temporary file, then a rename)."""
    write_json_atomic(output, report, trailing_newline=True, sort_keys=False)


def _line(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    train, sampling = result["train_step"], result["sampling_step"]
    return (
        f"train {train['cubes_per_s']:8.2f} cubes/s ({train['median_s'] * 1e3:8.1f} ms/step)   "
        f"sampling {sampling['cubes_per_s']:8.2f} cubes/s ({sampling['median_s'] * 1e3:8.1f} ms/step)"
    )


if __name__ == "__main__":
    sys.exit(main())
