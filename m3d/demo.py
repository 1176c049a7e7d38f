"""`m3d demo` (what `make demo` runs): the whole mission on the synthetic default, end to end.

1. ``cad_training``: the CAD malignancy scorer trained on phantom nodules (`m3d.train.train_cad`) ->
   ``OUT/cad_model``;
2. ``dataset``: a mini M3Dsynth from phantom scans, tampered by the shipped phantom-trained generators,
   every example's ``malignancy_after`` rated by the scorer (`m3d.build.build_dataset`) -> ``OUT/m3dsynth``;
3. ``benchmark``: every detector x train generator x test generator, plus the preliminary experiment
   (`m3d.train.benchmark`, preset ``demo``) -> ``OUT/results``;
4. ``cad_analysis``: the scorer at every site, pristine and tampered (`m3d.cad.analysis`) -> ``OUT/results/cad``;
5. ``cards``: model cards of the trained detectors (with their benchmark results) and the CAD scorer;
6. ``report``: ``OUT/results/report.html`` (`m3d.report`).

Every step resumes: the builder and the benchmark skip what they finished, a trained CAD model is kept. A run
made with other m3d code or shipped weights (``OUT/inputs.json``: `inputs_fingerprint`) is not resumed but started
again, so that a report never mixes fakes or detectors of two versions.
Timings and settings go to ``OUT/results/run.json``. ``--device cuda`` runs the same steps on a GPU
with larger settings (`SCALES`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .devices import describe_device
from .files import write_json_atomic
from .presets import lookup_preset

# The demo's scans are at the real LIDC series' pixel and slice spacing (`m3d build` defaults); patients
# are split 1 : 2 between training and test so that each generator has enough test fakes for an AUC to
# mean something. On a CPU the DDPM is left out of the build, for the reason the run's notes give:
DEMO_WITHOUT_DDPM = (
    "the DDPM is not in the CPU demo's build: its sampling costs about 2.5 s per site on a CPU (25 "
    "DPM-Solver++ steps of a 3-D UNet; the GANs take milliseconds) and the demo's detectors have no "
    "starting weights for its fakes (how its shipped weights measure on held-out phantoms: their model cards "
    'and the README, "Demo pipelines"); `m3d demo --device cuda` and `m3d build` include it'
)
# The CPU demo's CAD scorer starts from shipped phantom-trained weights (`m3d train-cad --preset default
# --phantoms 16 --max-steps 400 --seed 0 --cpu`: 430 s on these 2 cores, validation AUC 0.72; its card says
# so) and is fine-tuned briefly: training it from scratch took half of the demo's budget.
DEMO_CAD = Path(__file__).resolve().parent / "cad" / "demo"
INPUTS_RECORD = "inputs.json"  # in --out: the code and weights the run was made with
DEMO_OUTPUTS = ("cad_model", "m3dsynth", "results", "datasets_cache", INPUTS_RECORD)  # what a run writes in --out
# the packages whose files make a run: m3d's code, its shipped detector and CAD weights, the demo pipelines
FINGERPRINTED_PACKAGES = ("m3d", "m3d.pipelines", "m3d.dataset_builder", "m3d.model_cards")
SCALES: dict[str, dict[str, Any]] = {
    # 2 CPU cores: about 12 minutes in all (README, "make demo")
    "cpu": dict(
        build=dict(
            phantoms=32, generators=("pix2pix", "cyclegan"), split_proportions={"train": 1, "val": 0, "test": 2}
        ),
        bench_preset="demo",
        bench_options={},
        cad_preset="default",
        cad_phantoms=16,
        cad_steps=50,
        cad_start=str(DEMO_CAD),
    ),
    # one GPU: more scans, all three generators, the papers' detector sizes, a longer CAD run
    "cuda": dict(
        build=dict(phantoms=96, size=512, max_slices=96),
        bench_preset="default",
        bench_options=dict(mixed_precision="bf16"),
        cad_preset="default",
        cad_phantoms=96,
        cad_steps=2000,
        cad_start=None,
    ),
}


def _step(name: str, timings: dict[str, float], action: Callable[[], Any]) -> Any:
    print(f"[m3d demo] {name} ...", flush=True)
    start = time.perf_counter()
    result = action()
    timings[name] = round(time.perf_counter() - start, 1)
    print(f"[m3d demo] {name} done in {timings[name]:.0f} s", flush=True)
    return result


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} failed (exit status {code}); its messages are above")


def clear_outputs(out: Path) -> None:
    """Delete what an earlier demo run wrote in ``out``; a folder that holds anything else is refused."""
    if not out.exists():
        return
    others = sorted(path.name for path in out.iterdir() if path.name not in DEMO_OUTPUTS)
    if others:
        raise FileExistsError(
            f"{out} holds {', '.join(others[:3])}, which m3d demo does not write: refusing to overwrite it; "
            "pass another --out"
        )
    for name in DEMO_OUTPUTS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        elif (out / name).exists():
            (out / name).unlink()


def inputs_fingerprint(pipelines_dir: str | Path | None = None) -> str:
    """SHA-256 of every file of m3d's packages (`FINGERPRINTED_PACKAGES`: code, shipped weights, card templates) and
    of ``pipelines_dir``'s when given, each named by its path inside its package: what a demo run is made with."""
    roots = {
        name: Path(location)
        for name in FINGERPRINTED_PACKAGES
        for location in importlib.util.find_spec(name).submodule_search_locations
    }
    if pipelines_dir is not None:
        roots["--pipelines"] = Path(pipelines_dir)
    digest = hashlib.sha256()
    for name, root in roots.items():
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(f"{name}/{path.relative_to(root).as_posix()}".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def start_again_if_made_otherwise(out: Path, record: dict[str, Any]) -> bool:
    """Clear ``out`` (`clear_outputs`) when it holds a run that was not made with ``record`` (its `INPUTS_RECORD`
    differs, or a run from before the record); returns whether it did."""
    recorded = out / INPUTS_RECORD
    if not any((out / name).exists() for name in DEMO_OUTPUTS):
        return False
    if recorded.is_file() and json.loads(recorded.read_text()) == record:
        return False
    print(f"[m3d demo] {out} holds a run made with other m3d code or weights: starting again", flush=True)
    clear_outputs(out)
    return True


def run_demo(
    out: str | Path = "demo_output",
    *,
    overwrite: bool = False,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    pipelines_dir: str | Path | None = None,
    scale: dict[str, Any] | None = None,
) -> Path:
    """Run the six steps into ``out`` (resuming an earlier run there, or with ``overwrite`` starting again);
    returns the report's path. ``pipelines_dir``: generators to use
    instead of the shipped ones (`m3d build --pipelines`); ``scale``: keys that replace ``SCALES[device]``'s
    (``build``: `build_dataset` keywords; ``bench_options``: `BenchmarkArguments` fields; ``cad_*``: training)."""
    scale = {**lookup_preset(SCALES, device, "m3d demo --device"), **(scale or {})}
    out = Path(out)
    data, results, cad_model = out / "m3dsynth", out / "results", out / "cad_model"
    cache = out / "datasets_cache"  # `datasets`' copy of the scans: removed with the run, not left in ~/.cache
    device_name = describe_device(device)
    if not progress:  # the libraries' own weight-loading bars too
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    timings: dict[str, float] = {}
    started = time.perf_counter()

    from .constants import TASKS
    from .constants import FAKE_GENERATORS
    from .dataset_builder.generate import check_pipelines

    generators = tuple(scale["build"].get("generators", FAKE_GENERATORS))
    check_pipelines(pipelines_dir, generators, TASKS)  # before any step: a wrong --pipelines fails at once
    if overwrite:
        clear_outputs(out)
    record = {"inputs_sha256": inputs_fingerprint(pipelines_dir)}
    start_again_if_made_otherwise(out, record)
    write_json_atomic(out / INPUTS_RECORD, record)

    def train_scorer() -> None:
        if not (cad_model / "model" / "config.json").is_file():
            from .train import train_cad

            _check(
                train_cad.train(
                    train_cad.TrainCADArguments(
                        output_dir=str(cad_model),
                        preset=scale["cad_preset"],
                        phantoms=scale["cad_phantoms"],
                        model=str(scale["cad_start"]) if scale.get("cad_start") else None,
                        max_steps=scale["cad_steps"],
                        seed=seed,
                        resume_from_checkpoint="latest",
                        cpu=device == "cpu",
                        no_progress=not progress,
                    )
                ),
                "CAD training",
            )

    _step("cad_training", timings, train_scorer)

    from .build import build_dataset

    _step(
        "dataset",
        timings,
        lambda: build_dataset(
            data,
            **scale["build"],
            seed=seed,
            pipelines_dir=pipelines_dir,
            device=device,
            cad_model=cad_model / "model",
            progress=progress,
            command="m3d demo",
        ),
    )

    from .train import benchmark

    _step(
        "benchmark",
        timings,
        lambda: _check(
            benchmark.run(
                benchmark.BenchmarkArguments(
                    data=str(data),
                    out=str(results),
                    preset=scale["bench_preset"],
                    seed=seed,
                    cpu=device == "cpu",
                    no_progress=not progress,
                    dataset_cache_dir=str(cache),
                    **scale["bench_options"],
                )
            ),
            "the benchmark",
        ),
    )

    def cad_analysis() -> None:
        from .cad.analysis import run_cad_analysis

        run_cad_analysis(cad_model / "model", data, results, device=device, progress=progress)

    _step("cad_analysis", timings, cad_analysis)

    def cards() -> None:
        from .model_cards import benchmark_card_results, write_model_card

        for cell_file in sorted((results / "cells").glob("*.json")):
            best = results / "runs" / cell_file.stem / "best"
            if best.is_dir():
                cell = json.loads(cell_file.read_text())
                write_model_card(
                    best, benchmark_card_results(cell, "M3Dsynth (phantom mini)"), name=f"m3d-demo-{cell_file.stem}"
                )
        write_model_card(cad_model / "model", name="m3d-demo-cad")

    _step("cards", timings, cards)

    from .report import build_report

    run = {
        "device": device_name,
        "seed": seed,
        "scale": scale,
        "steps": timings,
        "phantom": True,
        "seconds": round(time.perf_counter() - started, 1),
        "notes": [DEMO_WITHOUT_DDPM] if "ddpm" not in generators else [],
    }
    write_json_atomic(results / "run.json", run, sort_keys=False)
    html_path, _ = _step("report", timings, lambda: build_report(results, device=device, dataset_cache_dir=cache))
    return html_path
