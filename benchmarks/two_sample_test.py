"""Classifier two-sample test: can a small 3-D CNN tell two sets of 32^3 cubes apart?

    .venv/bin/python benchmarks/two_sample_test.py                # self-check on synthetic cubes
    .venv/bin/python benchmarks/two_sample_test.py --phantoms 4   # control: two halves of real phantom cubes

`two_sample_accuracy(cubes_a_hu, cubes_b_hu, seed)` trains a 3-conv CNN (8-16 channels, stride 2,
global mean and max pooling, linear) on the generator's 20^3 centre hole of each cube, clipped to the
lung window [-1000, 400] HU and scaled to [-1, 1], with random flips along each axis as augmentation,
and reports the held-out *balanced* accuracy (mean recall of the two sets: chance is 0.5 whatever the
set sizes) of a stratified k-fold cross-validation, repeated with other splits and initial weights and
averaged (one split's figure moves by 0.02-0.03 from seed to seed on 35 + 21 cubes). Only the hole is
shown, so the test asks whether the generated content itself looks like the reference set, not whether
the seam is visible (the seam ratio measures that). Seeded and on the CPU: the same inputs and seed give
the same figures.

``paired=True`` is for two sets made at the same sites (cube *i* of each set at site *i*): the folds are drawn
over the sites, so the two cubes of a site always fall on the same side of a split and the site's context, which
both show around the hole, tells the classifier nothing.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from torch import nn

from m3d.tamper.cube import HOLE_SIZE, hole_mask

LUNG_WINDOW_HU = (-1000.0, 400.0)
FOLDS = 5
EPOCHS = 20
REPEATS = 5
BATCH_SIZE = 16
LEARNING_RATE = 3e-3


def hole_inputs(cubes_hu: np.ndarray) -> torch.Tensor:
    """The 20^3 hole of each 32^3 cube, lung window scaled to [-1, 1], as ``(n, 1, 20, 20, 20)``."""
    cubes = np.asarray(cubes_hu, np.float32)
    hole = cubes[:, hole_mask(cubes.shape[1:])].reshape(len(cubes), 1, HOLE_SIZE, HOLE_SIZE, HOLE_SIZE)
    low, high = LUNG_WINDOW_HU
    return torch.from_numpy((np.clip(hole, low, high) - low) / (high - low) * 2 - 1)


class SmallCNN(nn.Module):
    """Three stride-2 3-D convolutions, global mean and max pooling, one logit."""

    def __init__(self, channels: tuple[int, int, int] = (8, 16, 16)):
        super().__init__()
        layers, previous = [], 1
        for width in channels:
            layers += [nn.Conv3d(previous, width, 3, stride=2, padding=1), nn.LeakyReLU(0.1)]
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * previous, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x).flatten(2)
        return self.head(torch.cat([features.mean(-1), features.amax(-1)], 1))[:, 0]


def stratified_folds(labels: np.ndarray, folds: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Test indices of ``folds`` folds, each class shuffled and dealt out as evenly as possible."""
    parts: list[list[np.ndarray]] = [[] for _ in range(folds)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        for fold, chunk in enumerate(np.array_split(members, folds)):
            parts[fold].append(chunk)
    return [np.concatenate(part) for part in parts]


def site_folds(sites: int, folds: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Test indices of ``folds`` folds for paired sets (``sites`` cubes of set A, then their ``sites`` partners
    of set B): the sites shuffled and dealt out, each fold holding both cubes of its sites."""
    return [np.concatenate([chunk, chunk + sites]) for chunk in np.array_split(rng.permutation(sites), folds)]


def _balanced_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    predicted = logits > 0
    recalls = [(predicted[labels == c] == bool(c)).float().mean().item() for c in (0, 1) if (labels == c).any()]
    return float(np.mean(recalls))


def _train(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, epochs: int) -> SmallCNN:
    """Fit a fresh `SmallCNN` with class-balanced BCE, Adam and random flips."""
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    positives = float(y.sum())
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(y) - positives) / max(positives, 1.0)))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH_SIZE):
            batch = x[order[start : start + BATCH_SIZE]]
            for axis in (2, 3, 4):
                flip = torch.rand(len(batch), generator=generator) < 0.5
                batch = torch.where(flip[:, None, None, None, None], batch.flip(axis), batch)
            loss = loss_fn(model(batch), y[order[start : start + BATCH_SIZE]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def two_sample_accuracy(
    cubes_a_hu: np.ndarray,
    cubes_b_hu: np.ndarray,
    seed: int = 0,
    *,
    folds: int = FOLDS,
    epochs: int = EPOCHS,
    repeats: int = REPEATS,
    paired: bool = False,
) -> dict:
    """Held-out balanced accuracy of a small 3-D CNN telling cubes A (label 0) from cubes B (label 1).

    Stratified ``folds``-fold cross-validation (fewer folds when a set has fewer cubes; at least 2 per
    set are needed; ``paired``: the sets hold the same sites in the same order, and the folds keep each
    site's two cubes together, `site_folds`), a fresh model per fold, run ``repeats`` times with the seeds
    ``seed``, ``seed`` + 1, ... (other splits, initial weights and flips). Returns ``accuracy`` (mean over every
    fold of every repeat; chance 0.5), ``repeat_accuracies`` (each repeat's mean), ``fold_accuracies`` (repeat by
    repeat), ``n_a``, ``n_b``, ``folds`` and ``repeats``; ``accuracy`` is None when a set is too small.
    """
    n_a, n_b = len(cubes_a_hu), len(cubes_b_hu)
    if paired and n_a != n_b:
        raise ValueError(f"paired sets hold one cube per site each; got {n_a} and {n_b} cubes")
    folds = min(folds, n_a, n_b)
    result: dict = {
        "accuracy": None,
        "repeat_accuracies": [],
        "fold_accuracies": [],
        "n_a": n_a,
        "n_b": n_b,
        "folds": folds,
        "repeats": repeats,
    }
    if folds < 2:
        return result
    x = torch.cat([hole_inputs(cubes_a_hu), hole_inputs(cubes_b_hu)])
    y = torch.cat([torch.zeros(n_a), torch.ones(n_b)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses time to intra-op threads
    try:
        for repeat_seed in range(seed, seed + repeats):
            torch.manual_seed(repeat_seed)
            generator = torch.Generator().manual_seed(repeat_seed)
            accuracies = []
            rng = np.random.default_rng(repeat_seed)
            splits = site_folds(n_a, folds, rng) if paired else stratified_folds(y.numpy(), folds, rng)
            for test in splits:
                train = np.setdiff1d(np.arange(len(y)), test)
                model = _train(x[train], y[train], generator, epochs)
                with torch.no_grad():
                    accuracies.append(round(_balanced_accuracy(model(x[test]), y[test]), 3))
            result["fold_accuracies"].append(accuracies)
            result["repeat_accuracies"].append(round(float(np.mean(accuracies)), 3))
    finally:
        torch.set_num_threads(threads)
    result["accuracy"] = round(float(np.mean(result["fold_accuracies"])), 3)
    return result


def synthetic_cubes(n: int, rng: np.random.Generator, sphere_radius_mm: float = 0.0) -> np.ndarray:
    """``n`` 32^3 cubes of lung-like noise (-850 +- 40 HU), with a 0 HU sphere at the centre when
    ``sphere_radius_mm`` > 0."""
    cubes = rng.normal(-850.0, 40.0, (n, 32, 32, 32)).astype(np.float32)
    if sphere_radius_mm > 0:
        grid = np.indices((32, 32, 32)) - 15.5
        cubes[:, np.sqrt((grid**2).sum(0)) <= sphere_radius_mm] = 0.0
    return cubes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--phantoms",
        type=int,
        default=0,
        help="run the control on two random halves of the injection-site cubes of this many held-out "
        "phantoms (eval_demo_pipelines' sites) instead of the synthetic self-check",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    if args.phantoms:
        from eval_demo_pipelines import held_out_cubes  # this folder is on sys.path when run as a script

        cubes = held_out_cubes(args.phantoms, seed=2024)[0]["inject"]
        halves = np.array_split(rng.permutation(len(cubes)), 2)
        report = {"control_halves": two_sample_accuracy(cubes[halves[0]], cubes[halves[1]], args.seed)}
    else:
        plain, other = synthetic_cubes(40, rng), synthetic_cubes(40, rng)
        report = {
            "noise_vs_noise": two_sample_accuracy(plain, other, args.seed),
            "noise_vs_sphere": two_sample_accuracy(plain, synthetic_cubes(40, rng, 4.0), args.seed),
        }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
