"""`M3Dsynth`: the dataset as a `datasets.GeneratorBasedBuilder`, for building it straight into the
`datasets` cache (``M3Dsynth(config_name="pix2pix", pipelines_dir=...).download_and_prepare()``).
It generates the same examples as ``m3d build`` (`scan_examples`); ``m3d build`` is the way to make the
shareable Parquet folder that ``load_dataset`` reads without a loading script."""

from __future__ import annotations

from dataclasses import dataclass

import datasets

from ..tamper.quality import QualityCriteria
from ..constants import FAKE_GENERATORS, SPLITS
from .features import FEATURES
from .generate import DEFAULT_PHANTOMS, lidc_jobs, load_pipelines, phantom_jobs, scan_examples
from .features import CONFIGS

_CITATION = """@inproceedings{zingarini2024m3dsynth,
  title     = {M3Dsynth: A dataset of medical 3D images with AI-generated local manipulations},
  author    = {Zingarini, Giada and Cozzolino, Davide and Corvi, Riccardo and Poggi, Giovanni and Verdoliva, Luisa},
  booktitle = {IEEE International Conference on Acoustics, Speech and Signal Processing (ICASSP)},
  year      = {2024}
}"""


@dataclass
class M3DsynthConfig(datasets.BuilderConfig):
    """A config (which generators and tasks, `writer.CONFIGS`) and where the scans and pipelines come
    from: ``lidc_root`` (default: ``phantoms`` synthetic scans), ``pipelines_dir`` (default: the demo
    pipelines; phantoms of ``size`` pixels, ``max_slices``, ``phantom_spacing``), ``limit`` scans, ``seed``,
    ``num_inference_steps``, ``keep_all`` (no quality check)."""

    lidc_root: str | None = None
    pipelines_dir: str | None = None
    phantoms: int = DEFAULT_PHANTOMS["n"]
    size: int = DEFAULT_PHANTOMS["size"]
    max_slices: int | None = DEFAULT_PHANTOMS["max_slices"]
    phantom_spacing: str = DEFAULT_PHANTOMS["spacing"]
    limit: int | None = None
    seed: int = 0
    num_inference_steps: int | None = None
    keep_all: bool = False


class M3Dsynth(datasets.GeneratorBasedBuilder):
    """AI-manipulated chest CT (M3Dsynth): whole scans with injected / removed nodules, their 3-D masks,
    and the pristine scan of every site."""

    BUILDER_CONFIG_CLASS = M3DsynthConfig
    BUILDER_CONFIGS = [M3DsynthConfig(name=name, description=f"M3Dsynth, config {name!r}") for name in CONFIGS]
    DEFAULT_CONFIG_NAME = "all"

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=self.__doc__,
            features=FEATURES,
            citation=_CITATION,
            license="cc-by-3.0",
            homepage="https://grip-unina.github.io/M3Dsynth/",
        )

    def _split_generators(self, dl_manager):
        config = self.config
        if config.lidc_root is None:
            jobs = phantom_jobs(
                config.phantoms,
                seed=config.seed,
                size=config.size,
                max_slices=config.max_slices,
                spacing=config.phantom_spacing,
            )
        else:
            jobs = lidc_jobs(config.lidc_root, seed=config.seed)
        jobs = jobs[: config.limit] if config.limit is not None else jobs
        return [
            datasets.SplitGenerator(name=split, gen_kwargs={"jobs": [job for job in jobs if job.split == split]})
            for split in SPLITS
        ]

    def _generate_examples(self, jobs):
        config = self.config
        generators, tasks = CONFIGS[config.name]
        fakes = [g for g in FAKE_GENERATORS if g in generators]
        pipelines = load_pipelines(config.pipelines_dir, fakes, tasks)
        for job in jobs:
            for example, _ in scan_examples(
                job,
                job.load(),
                generators=fakes,
                tasks=tasks,
                pipelines=pipelines,
                seed=config.seed,
                quality=None if config.keep_all else QualityCriteria(),
                num_inference_steps=config.num_inference_steps,
            ):
                if example is not None:
                    yield example["img_id"], example
