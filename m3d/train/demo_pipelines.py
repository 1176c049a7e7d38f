"""Train and ship the six demo pipelines, ``pipelines/demo/<generator>-<task>/`` (`m3d.pipelines`), on phantom data.

    python -m m3d.train.demo_pipelines --runs-dir runs/demo              # train the six (CPU) and ship them
    python -m m3d.train.demo_pipelines --runs-dir runs/demo --only pix2pix-inject
    python benchmarks/eval_demo_pipelines.py                             # measure them (quality JSON, montage)
    python -m m3d.train.demo_pipelines --cards-only                      # the figures into the shipped cards

Each recipe is an `m3d train-generator` command line (`RECIPES`, `command_line`): the "demo" network
sizes, synthetic scans made as the dataset builder makes them (the real series' pixel and slice
spacing, 320^2 in-plane, 48 slices) seeded 0, weights saved as fp16 safetensors (`load_pipeline` gives
fp32). A run checkpoints every 200 steps and a repeated command resumes it (raise ``--max-steps`` in
the recipe to train on). Shipping copies ``RUNS/<name>/pipeline`` into the package and writes its model
card (`m3d.model_cards.write_model_card`): the exact command, the steps, the seed, the first and last
logged losses. A recipe of `FINE_TUNES` has later stages, each fine-tuning the previous one's pipeline; the last
ships, and its card gives every stage's command (each stage's facts from its run, or from the card of the weights
the next stage started from); the card's "Measured quality" section comes from
``benchmarks/results/demo_pipelines_quality.json`` (`update_quality_section`, also ``--cards-only`` after a new
measurement).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from m3d.dataset_builder.generate import DEMO_PIPELINES_DIR

QUALITY_JSON = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "demo_pipelines_quality.json"

COMMON = ["--preset", "demo", "--phantom-size", "320", "--phantom-max-slices", "48", "--phantom-spacing", "native",
          "--seed", "0", "--checkpointing-steps", "200", "--resume-from-checkpoint", "latest",
          "--save-dtype", "fp16"]  # fmt: skip
# What each demo pipeline is trained with (see the README's "Demo pipelines" for why). The shipped folders
# whose cards show another command were made by an earlier recipe: their card is what made them. The
# CycleGAN remover's cycle weight is 2: at CycleGAN's 10 the full -> masked -> full cycle, which asks G to
# redraw the removed nodule from a masked cube, left 31 % of held-out nodules >= 8 mm (0 % at 2); the
# injector keeps 10 (at 2 it grew no nodule at all). The injectors train on the sites whose nodule the
# builder would keep (--only-kept-sites, of 80 phantoms): half of the phantoms' malignant nodules are
# part-solid or ground glass, and on all of them the Pix2Pix injector learnt to grow none (kept 0.00-0.18 on
# held-out sites; 0.62 on the kept sites only); see the README's "Demo pipelines". Both GAN injectors also see the
# mask of the nodule to draw (in_channels=3; the pipeline draws it from its training nodules' masks): unconditioned,
# they grew a nodule > 10 mm at 0.62 (Pix2Pix, trilinear) and 0.18 (CycleGAN) of held-out sites. The CycleGAN
# remover has one stride-2 stage, so its residual blocks run at 16^3: at the preset's two (8^3) this narrow
# generator, which has no skip connections, drew each hole from 8^3 cells and left a blotchy period-4 lattice
# (spectral peak 24, pristine 7.9; 12 at one stage). The injector keeps two (at one it grew blurred slabs, not
# nodules: real-looking 0.09) and has skip connections instead: without them it left the same lattice (peak 19).
# It learns from 160 phantoms (69 kept sites) and ships the EMA of its generator after 450 steps: its last weights
# swung from checkpoint to checkpoint (real-looking 0.17-0.97 on validation sites) and after 750 steps got worse;
# at 900 steps on 80 phantoms without the average: kept 0.97, real-looking 0.71, spectral peak 6.1 (pristine 4.4),
# two-sample 0.92; this recipe: 0.90, 0.88, 4.6, 0.88 (three draws of the validation sites' masks;
# `generator_experiments_cyclegan_ema_cpu.json`). Any --ema-decay >= 0.98 is the same here: the warm-up
# (1 + n) / (10 + n) sets the decay below 1,790 steps.
# The Pix2Pix remover generates with pix2pix's test-time dropout (--test-time-dropout): with it off, as CT-GAN
# predicts, its holes held 14 % of the real holes' high-pass power and their slice-period bin stood out (spectral peak
# 7.6 on validation sites, 9.0 held out). With it on, it draws benign nodules like its training sites', which measure
# up to 8.8 mm, and left some >= 8 mm that the builder drops (kept 0.86), so it learns only from the sites whose nodule
# measures <= 6 mm (--site-diameter-mm 0 6: 29 of 39). Seeds 0-2 on validation sites: kept 1.00, peak 3.2-4.1 (pristine
# injection sites 4.4), two-sample 0.74-0.83 (before: 0.95, 7.6, 0.77;
# `generator_experiments_pix2pix_remove_sites_cpu.json`).
_GAN = ["--d-learning-rate", "2e-4", "--lambda-l1", "10", "--hole-only"]
_DDPM = ["--learning-rate", "5e-4", "--hole-only", "--prediction-type", "v_prediction",
         "--noise-schedule", "squaredcos_cap_v2", "--num-train-timesteps", "1000", "--snr-gamma", "5",
         "--sampler", "dpmsolver++", "--inference-steps", "25"]  # fmt: skip
RECIPES: dict[str, list[str]] = {
    "pix2pix-inject": ["--model", "pix2pix", "--task", "inject", "--phantoms", "80", "--only-kept-sites",
                       "--max-steps", "1200", "--batch-size", "8", *_GAN, "--config-overrides", "in_channels=3"],
    "pix2pix-remove": ["--model", "pix2pix", "--task", "remove", "--phantoms", "60", "--site-diameter-mm", "0", "6",
                       "--max-steps", "1200", "--batch-size", "8", *_GAN, "--test-time-dropout"],
    "cyclegan-inject": ["--model", "cyclegan", "--task", "inject", "--phantoms", "160", "--only-kept-sites",
                        "--max-steps", "450", "--batch-size", "4", "--hole-only", "--ema-decay", "0.995",
                        "--config-overrides", "in_channels=3,skip_connections=true"],
    "cyclegan-remove": ["--model", "cyclegan", "--task", "remove", "--phantoms", "60", "--max-steps", "900",
                        "--batch-size", "4", "--hole-only", "--lambda-cycle", "2",
                        "--config-overrides", "n_downsampling=1"],
    "ddpm-inject": ["--model", "ddpm", "--task", "inject", "--phantoms", "40",
                    "--max-steps", "2000", "--batch-size", "4", *_DDPM],
    "ddpm-remove": ["--model", "ddpm", "--task", "remove", "--phantoms", "60",
                    "--max-steps", "2000", "--batch-size", "4", *_DDPM],
}  # fmt: skip
# Later stages: each fine-tunes the previous stage's pipeline (``--init-from``) with its options set on top of the
# previous stage's; the folder that ships is the last stage's (``RUNS/<name>-finetune``, ``-finetune2``, ...). The
# DDPMs' second stage learns from more phantoms (160: 69 kept injection sites, 98 removal sites) at a lower rate than a
# first run can afford; their third adds the nodule-mask input (the UNet widened, the new channel starting at zero).
# The remover draws, unless told a size, its benign training nodules of 3-7 mm (the task's target): 40 of its bank's 88
# masks are empty (removal sites with no solid nodule), and from those it drew blobs the builder dropped as >= 8 mm
# (validation sites: kept 0.95 -> 1.00, two-sample 0.77 -> 0.75; `generator_experiments_ddpm_remove_size_cpu.json`).
FINE_TUNES: dict[str, list[list[str]]] = {
    "ddpm-inject": [
        ["--phantoms", "160", "--only-kept-sites", "--max-steps", "2000", "--learning-rate", "2e-4"],
        ["--config-overrides", "in_channels=4", "--max-steps", "1000"],
    ],
    "ddpm-remove": [
        ["--phantoms", "160", "--max-steps", "2000", "--learning-rate", "2e-4"],
        ["--config-overrides", "in_channels=4", "--max-steps", "1000", "--nodule-diameter-mm", "3", "7"],
    ],
}
FINE_TUNE_SUFFIX = "-finetune"


def stage_count(name: str) -> int:
    """How many stages recipe ``name`` trains in (1 + its `FINE_TUNES`)."""
    return 1 + len(FINE_TUNES.get(name, []))


def _with_options(argv: list[str], options: list[str]) -> list[str]:
    """``argv`` with each option of ``options`` (``--name`` and its values, or a ``--flag``) set: its values replaced
    where ``argv`` has the option, the rest appended."""
    argv, extra, i = list(argv), [], 0
    while i < len(options):
        end = i + 1
        while end < len(options) and not options[end].startswith("--"):
            end += 1
        name, values = options[i], options[i + 1 : end]
        if name in argv:
            start = argv.index(name) + 1
            argv[start : start + len(values)] = values
        else:
            extra += options[i:end]
        i = end
    return [*argv, *extra]


def run_dir(name: str, runs_dir: str | Path, stage: int = 0) -> Path:
    """Where stage ``stage`` of recipe ``name`` trains (0: the recipe itself)."""
    suffix = "" if stage == 0 else FINE_TUNE_SUFFIX + (str(stage) if stage > 1 else "")
    return Path(runs_dir) / (name + suffix)


def command_line(name: str, runs_dir: str | Path, cube_cache: str | Path, stage: int = 0) -> list[str]:
    """The `m3d train-generator` arguments of stage ``stage`` of recipe ``name`` (0: the recipe; later: its
    `FINE_TUNES`, each starting from the previous stage's pipeline), writing to `run_dir`."""
    if not 0 <= stage < stage_count(name):
        raise ValueError(f"{name} trains in {stage_count(name)} stage(s); no stage {stage}")
    argv = [*RECIPES[name], *COMMON, "--cube-cache", str(cube_cache)]
    for options in FINE_TUNES.get(name, [])[:stage]:
        argv = _with_options(argv, options)
    if stage:
        argv += ["--init-from", str(run_dir(name, runs_dir, stage - 1) / "pipeline")]
    return [*argv, "--output-dir", str(run_dir(name, runs_dir, stage))]


def _losses(run: Path) -> tuple[dict, dict, float]:
    """The first and last logged losses and the training time (s, over every resumed run)."""
    from .common import training_seconds

    records = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]
    keep = lambda r: {k: round(v, 4) for k, v in r.items() if k.startswith("loss")} | {"step": r["step"]}  # noqa: E731
    return keep(records[0]), keep(records[-1]), training_seconds(records)


def _stage_facts(run: Path) -> list[str]:
    """The steps, seed, sites, training time and losses of a finished run, as card bullets."""
    summary = json.loads((run / "training_summary.json").read_text())
    first, last, seconds = _losses(run)
    return [
        f"- {summary['steps']} optimizer steps, seed {summary['args']['seed']}, {len(summary['sites'])} training "
        f"nodule sites, {seconds / 60:.1f} min of training on one CPU thread;",
        f"- losses (mean over the logging window): step {first['step']}: "
        + ", ".join(f"{k} {v}" for k, v in first.items() if k != "step")
        + f"; step {last['step']}: "
        + ", ".join(f"{k} {v}" for k, v in last.items() if k != "step")
        + ".",
    ]


def provenance(name: str, runs_dir: Path, earlier_facts: Sequence[list[str]] = ()) -> str:
    """The card's "How it was made": each stage's command, steps, seed, losses (``earlier_facts[k]``: those of stage
    k when its run is not in ``runs_dir``, as the card of the weights the next stage started from gave them)."""
    count = stage_count(name)
    stages = f", in {count} stages (each fine-tunes the previous one's pipeline):" if count > 1 else ":"
    lines = [
        "Trained on m3d's synthetic chest CT only (phantoms on real LIDC-IDRI geometry with real LIDC nodule",
        "contours and ratings; no patient images), on a CPU" + stages,
    ]
    for stage in range(count):
        argv = " ".join(command_line(name, "runs/demo", "runs/demo/cache", stage))
        run = run_dir(name, runs_dir, stage)
        if (run / "training_summary.json").is_file():
            facts = _stage_facts(run)
        elif stage < len(earlier_facts) and earlier_facts[stage]:
            facts = earlier_facts[stage]
        else:
            raise FileNotFoundError(f"{run} holds no finished run of {name}")
        lines += ["", "```bash", f"m3d train-generator {argv}", "```", "", *facts]
    return "\n".join(lines)


def _card_facts(card: Path) -> list[list[str]]:
    """The bullets after each command of an existing card's "How it was made" section: the facts of each stage of
    the weights it describes (none if the card is not there)."""
    text = card.read_text() if card.is_file() else ""
    if "## How it was made" not in text:
        return []
    section = text.split("## How it was made", 1)[1].split("\n## ", 1)[0]
    return [
        [line for line in stage.split("```", 1)[-1].splitlines() if line.startswith("- ")]
        for stage in section.split("```bash")[1:]
    ]


QUALITY_HEADING = "## Measured quality"


def draws_text(draws: int) -> str:
    """How the figures of a quality JSON of ``draws`` draws per pipeline came about."""
    if draws == 1:
        return "one draw (generation seed 0)"
    return f"the mean of {draws} draws (generation seeds 0-{draws - 1}: other nodule masks, other sampling noise)"


def fraction_text(entry: dict, key: str) -> str:
    """A fraction of the quality JSON as a percentage, with its lowest and highest draw when it has several."""
    low, high = entry.get(f"{key}_range", (entry[key], entry[key]))
    spread = f" (draws {low:.0%}-{high:.0%})" if low != high else ""
    return f"{entry[key]:.0%}{spread}"


def quality_section(name: str, quality: dict) -> str | None:
    """The card's "Measured quality" section from the quality JSON (None if it does not hold ``name``)."""
    entry = quality.get("pipelines", {}).get(name)
    if not entry:
        return None
    held_out = quality["held_out"]
    lines = [
        QUALITY_HEADING,
        f"On held-out phantom sites (`benchmarks/eval_demo_pipelines.py`: {held_out['phantoms']} phantoms, seed "
        f"{held_out['seed']}; {entry['n']} {entry['task']} sites), as the pipeline returns cubes by default; "
        f"{draws_text(quality.get('draws', 1))}:",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    if entry["task"] == "inject":
        low, high = quality["real_nodule_mean_hu_range"]
        lines += [
            f"| grown nodule > 10 mm (the site's chest wall left out) | {fraction_text(entry, 'kept_fraction')} |",
            f"| ... and mean HU within real nodules' [{low:g}, {high:g}] | "
            f"{fraction_text(entry, 'real_looking_fraction')} |",
        ]
        for where, sites in entry.get("real_looking_by_site", {}).items():
            if sites["n"]:
                place = where.replace("_", " ").replace("chest", "the chest")
                lines.append(f"| ... at the {sites['n']} sites {place} | {sites['fraction']:.0%} |")
        ceiling = quality.get("real_looking_ceiling")
        if ceiling:
            lines.append(
                f"| ... the same for {ceiling['n']} real nodules > 10 mm of other phantoms "
                f"({ceiling['by_site']['away_from_chest_wall']['n']} away from the chest wall) | "
                f"{ceiling['fraction']:.0%} |"
            )
    else:
        lines.append(f"| left < 8 mm | {fraction_text(entry, 'kept_fraction')} |")
    pristine = quality["pristine"][entry["task"]]
    lines += [
        f"| nodule diameter at the site, median (IQR) | {entry['diameter_mm_median']:.1f} mm "
        f"({entry['diameter_mm_iqr'][0]:.1f}-{entry['diameter_mm_iqr'][1]:.1f}) |",
        f"| seam ratio (across the hole's faces / elsewhere; pristine {pristine['seam_ratio_mean']}) "
        f"| {entry['seam_ratio_mean']} |",
    ]
    if "seam_ratio_raw" in entry:
        lines.append(f"| ... without CT-GAN's touch-ups (`touch_up=False`) | {entry['seam_ratio_raw']} |")
    lines += [
        f"| sharpest spectral peak in the hole (pristine {pristine['spectral_peak_ratio']}) | "
        f"{entry['spectral_peak_ratio']} |",
        f"| vessels kept around the site (pristine 1) | {entry['vessel_continuity']} |",
        "| two-sample test: a 3-D CNN tells these from real nodule cubes (chance 0.5) | "
        f"{entry['two_sample_accuracy']} |",
    ]
    oracle = (quality.get("two_sample_oracle") or {}).get(entry["task"])
    if oracle:
        lines.append(
            f"| ... the same for {oracle['real_nodules']} real nodules > 10 mm of other phantoms pasted at these "
            f"sites (what the sites' surroundings give away) | {oracle['accuracy']} |"
        )
    if "two_sample_vs_oracle" in entry:
        control = (quality.get("two_sample_oracle_control") or {}).get(entry["task"])
        chance = f"; two halves of the real nodules: {control['accuracy']}" if control else ""
        lines.append(
            "| two-sample test against those real nodules pasted at the *same* sites (folds by site: only the "
            f"nodules differ{chance}) | {entry['two_sample_vs_oracle']} |"
        )
    if "num_inference_steps" in entry:
        lines.append(
            f"| sampler | {entry['scheduler']}, {entry['num_inference_steps']} steps (the folder's default) |"
        )
    return "\n".join(lines) + "\n"


def update_quality_section(folder: Path, name: str, quality: dict) -> bool:
    """Put the "Measured quality" section in the card of ``folder`` (before "## Citation", replacing an
    older one); False when the JSON does not hold ``name``."""
    section = quality_section(name, quality)
    card_path = Path(folder) / "README.md"
    if section is None or not card_path.is_file():
        return False
    card = card_path.read_text()
    if QUALITY_HEADING in card:
        start = card.index(QUALITY_HEADING)
        end = card.index("\n## ", start + len(QUALITY_HEADING)) + 1
        card = card[:start] + card[end:]
    anchor = card.index("## Citation") if "## Citation" in card else len(card)
    card_path.write_text(card[:anchor] + section + "\n" + card[anchor:])
    return True


def ship(name: str, runs_dir: str | Path) -> Path:
    """Copy ``runs_dir/name/pipeline`` to ``pipelines/demo/name`` (replacing it) with its model card."""
    from ..model_cards import write_model_card
    from .common import replace_folder

    source = run_dir(name, runs_dir, stage_count(name) - 1) / "pipeline"
    if not (source / "model_index.json").is_file():
        raise FileNotFoundError(f"{source} is not a saved pipeline: train {name} first")
    card = provenance(name, Path(runs_dir), earlier_facts=_card_facts(DEMO_PIPELINES_DIR / name / "README.md"))
    target = replace_folder(source, DEMO_PIPELINES_DIR / name)
    write_model_card(target, name=f"m3d demo {name}", provenance=card)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    from .train_generator import main as train_generator

    parser = argparse.ArgumentParser(prog="python -m m3d.train.demo_pipelines", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default="runs/demo", help="training outputs (and the cube cache) go here")
    parser.add_argument("--only", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--ship-only", action="store_true", help="do not train: ship the runs already there")
    parser.add_argument(
        "--cards-only",
        action="store_true",
        help="only write the measured quality (benchmarks/results/demo_pipelines_quality.json) into the "
        "shipped folders' cards",
    )
    args = parser.parse_args(argv)
    quality = json.loads(QUALITY_JSON.read_text()) if QUALITY_JSON.is_file() else {}
    for name in args.only:
        if not args.cards_only:
            if not args.ship_only:
                for stage in range(stage_count(name)):
                    code = train_generator(command_line(name, args.runs_dir, Path(args.runs_dir) / "cache", stage))
                    if code:
                        return code
            print(f"shipped {ship(name, args.runs_dir)}")
        if update_quality_section(DEMO_PIPELINES_DIR / name, name, quality):
            print(f"measured quality written into {DEMO_PIPELINES_DIR / name / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
