"""Build an M3Dsynth folder: ``m3d build ...`` or, over several processes / GPUs,
``accelerate launch -m m3d.build --out ./m3dsynth ...``.

Without ``--lidc-root``: a mini M3Dsynth from synthetic chest CT (`m3d.data.phantom`) tampered by the
shipped phantom-trained demo pipelines (`DEMO_PIPELINES_DIR`). With ``--lidc-root``: the plan of
`m3d.tamper.plan` over the LIDC-IDRI annotations, on the series found under that folder. Scans are
dealt to the processes; each writes its own shards; a killed build resumes where it stopped (see
`m3d.dataset_builder.writer`). A summary table ends the run.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Mapping, Sequence

from .errors import run_guarded
from .data.phantom import phantom_workers
from .constants import FAKE_GENERATORS, TASKS
from .dataset_builder.generate import DEFAULT_PHANTOMS, DEMO_PIPELINES_DIR, PHANTOM_SPACINGS, pipeline_folder
from .dataset_builder.writer import (
    BuildState,
    build_lock,
    finalize,
    folder_digest,
    format_summary,
    prepare_folder,
    summarize,
    write_shards,
)
from .tamper.plan import OFFICIAL_SPLIT_PATIENTS
from .tamper.quality import QualityCriteria


def build_dataset(
    out: str | Path,
    *,
    lidc_root: str | Path | None = None,
    generators: Sequence[str] = FAKE_GENERATORS,
    tasks: Sequence[str] = TASKS,
    limit: int | None = None,
    pipelines_dir: str | Path | None = None,
    seed: int = 0,
    device: str | None = None,
    phantoms: int = DEFAULT_PHANTOMS["n"],
    size: int = DEFAULT_PHANTOMS["size"],
    max_slices: int | None = DEFAULT_PHANTOMS["max_slices"],
    phantom_spacing: str = DEFAULT_PHANTOMS["spacing"],
    split_proportions: Mapping[str, int] = OFFICIAL_SPLIT_PATIENTS,
    scans_per_shard: int = 4,
    num_inference_steps: int | None = None,
    quality: QualityCriteria | None = QualityCriteria(),
    cad_model: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    command: str = "m3d build",
) -> BuildState:
    """Build (or resume) the folder ``out`` from this process's share of the scans; the main process
    then writes ``manifest.json`` and the card. ``cad_model``: a saved CAD scorer (`m3d train-cad`) whose
    rating at the site fills every example's ``malignancy_after``. Returns the folder's final state (on
    every process). Launched processes form one group (`m3d.train.common.process_state`; on the CPU where
    there is no GPU) and together write what one process would."""
    from .dataset_builder.generate import lidc_jobs, load_pipelines, phantom_jobs, scan_examples
    from .dataset_builder.writer import read_state
    from .train.common import process_state

    unknown = sorted(set(generators) - set(FAKE_GENERATORS)) + sorted(set(tasks) - set(TASKS))
    if unknown or not generators or not tasks:
        raise ValueError(
            f"generators must be among {FAKE_GENERATORS} and tasks among {TASKS}; got "
            f"{list(generators)}, {list(tasks)}"
        )
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be positive; got {limit}")
    generators = [g for g in FAKE_GENERATORS if g in generators]
    tasks = [t for t in TASKS if t in tasks]
    process = process_state()
    pipelines_root = Path(pipelines_dir) if pipelines_dir is not None else DEMO_PIPELINES_DIR
    pipelines = load_pipelines(pipelines_root, generators, tasks, device=device or str(process.device))
    cad = None
    if cad_model is not None:
        from .cad.scoring import load_cad

        cad = load_cad(cad_model, device=device or str(process.device))
    config = {
        "source": "phantom" if lidc_root is None else "lidc",
        "lidc_root": None if lidc_root is None else str(Path(lidc_root).resolve()),
        "phantoms": None
        if lidc_root is not None
        else {
            "n": phantoms,
            "size": size,
            "max_slices": max_slices,
            "spacing": phantom_spacing,
            "split_patients": dict(split_proportions),
        },
        "generators": generators,
        "tasks": tasks,
        "limit": limit,
        "seed": seed,
        "scans_per_shard": scans_per_shard,
        "num_inference_steps": num_inference_steps,
        "quality": None if quality is None else vars(quality),
        "pipelines": str(pipelines_root.resolve()),
        # the weights themselves: the same path may hold other weights when the build is resumed
        "pipeline_digests": {
            f"{g}-{t}": folder_digest(pipeline_folder(pipelines_root, g, t)) for g in generators for t in tasks
        },
        "cad_model": None if cad_model is None else str(Path(cad_model).resolve()),
        "cad_digest": None if cad_model is None else folder_digest(cad_model),
        "command": command,
    }
    out = Path(out)
    with ExitStack() as held:
        if process.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(build_lock(out))  # a second build into out at the same time is refused
            prepare_folder(out, config, overwrite=overwrite)
        process.wait_for_everyone()
        state = prepare_folder(out, config)
        if lidc_root is None:
            jobs = phantom_jobs(
                phantoms,
                seed=seed,
                size=size,
                max_slices=max_slices,
                spacing=phantom_spacing,
                split_proportions=split_proportions,
                workers=phantom_workers(phantoms, process.num_processes),
                progress=progress and process.is_main_process,
            )
        else:
            jobs = lidc_jobs(lidc_root, seed=seed)
        jobs = jobs[:limit] if limit is not None else jobs

        def examples(job):
            return scan_examples(
                job,
                job.load(),
                generators=generators,
                tasks=tasks,
                pipelines=pipelines,
                seed=seed,
                quality=quality,
                num_inference_steps=num_inference_steps,
                cad_model=cad,
            )

        write_shards(
            out,
            jobs,
            examples,
            config,
            scans_per_shard=scans_per_shard,
            rank=process.process_index,
            world_size=process.num_processes,
            progress=progress,
            state=state,
        )
        process.wait_for_everyone()
        if process.is_main_process:
            finalize(out)
        process.wait_for_everyone()
    return read_state(out)


def _split_proportions(text: str) -> dict[str, int]:
    try:
        train, val, test = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three whole numbers TRAIN,VAL,TEST; got {text!r}") from None
    return {"train": train, "val": val, "test": test}


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default="m3dsynth",
        help="output folder (Hub-ready: README.md, data/, manifest.json); default ./m3dsynth, so that "
        'load_dataset("m3dsynth") reads it from here',
    )
    parser.add_argument("--lidc-root", default=None, help="a LIDC-IDRI download (DICOM + XML); default: phantom scans")
    parser.add_argument(
        "--generators",
        nargs="+",
        default=list(FAKE_GENERATORS),
        choices=FAKE_GENERATORS,
        help="generators that make the fakes (each tampers every site)",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(TASKS),
        choices=TASKS,
        help="inject (fake nodules at empty lung sites) and/or remove (real malignant nodules)",
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N scans of the plan")
    parser.add_argument(
        "--pipelines",
        default=None,
        metavar="DIR",
        help=f"folder of saved pipelines <generator>-<task>/ (default: the demo pipelines in {DEMO_PIPELINES_DIR})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantoms, the split and the generation")
    parser.add_argument("--device", default=None, help="torch device (default: this process's accelerator device)")
    parser.add_argument("--phantoms", type=int, default=DEFAULT_PHANTOMS["n"], help="number of phantom scans")
    parser.add_argument("--size", type=int, default=DEFAULT_PHANTOMS["size"], help="phantom in-plane matrix (pixels)")
    parser.add_argument(
        "--max-slices",
        type=int,
        default=DEFAULT_PHANTOMS["max_slices"],
        help="phantom slab: at most this many consecutive slices through the lungs",
    )
    parser.add_argument(
        "--phantom-spacing",
        choices=PHANTOM_SPACINGS,
        default=DEFAULT_PHANTOMS["spacing"],
        help="native: the real LIDC series' pixel spacing (0.46-0.98 mm) on --size pixels; "
        "scaled: the real field of view on --size pixels (coarser pixels)",
    )
    parser.add_argument(
        "--split-patients",
        type=_split_proportions,
        default=OFFICIAL_SPLIT_PATIENTS,
        metavar="TRAIN,VAL,TEST",
        help="phantom patients per split, as proportions (default: the official 488,100,150)",
    )
    parser.add_argument("--scans-per-shard", type=int, default=4, help="scans per Parquet shard")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps of the diffusion pipelines")
    parser.add_argument("--keep-all", action="store_true", help="skip the quality check: keep every generated sample")
    parser.add_argument(
        "--cad-model",
        default=None,
        metavar="DIR",
        help="a saved CAD scorer (m3d train-cad): its rating at the site fills malignancy_after",
    )
    parser.add_argument("--overwrite", action="store_true", help="delete a previous build in --out first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (as every other command)")


def run(args: argparse.Namespace) -> None:
    """Build from parsed arguments and print the summary table (main process)."""
    from accelerate import PartialState

    if args.no_progress:  # the libraries' own loading bars too
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

    state = build_dataset(
        args.out,
        lidc_root=args.lidc_root,
        generators=args.generators,
        tasks=args.tasks,
        limit=args.limit,
        pipelines_dir=args.pipelines,
        seed=args.seed,
        device=args.device,
        phantoms=args.phantoms,
        size=args.size,
        max_slices=args.max_slices,
        phantom_spacing=args.phantom_spacing,
        split_proportions=args.split_patients,
        scans_per_shard=args.scans_per_shard,
        num_inference_steps=args.steps,
        quality=None if args.keep_all else QualityCriteria(),
        cad_model=args.cad_model,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if PartialState().is_main_process:
        print(format_summary(summarize(state)))
        print(f"wrote {Path(args.out) / 'README.md'}: load it with datasets.load_dataset({str(args.out)!r})")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or "m3d.build", description=__doc__.split("\n\n")[0])
    add_build_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``m3d build`` and ``python -m m3d.build``: 0 done, 2 bad input, 130 interrupted."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    return run_guarded(parser.prog, lambda: run(args), on_interrupt="run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
