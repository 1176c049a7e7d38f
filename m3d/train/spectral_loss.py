"""The spectral loss of the GAN generators: how far the texture of a generated hole is from a real one's.

A GAN remover fills its hole with tissue too smooth for a thick-slice scan: near the slice frequency along z,
the demo GAN removers' holes held 10-43x less power than real holes, which is what made their slice-period
bin stand out in `benchmarks/eval_demo_pipelines.spectral_peak` (``benchmarks/slice_phase.py``). After Durall
et al. 2020 ("Watch your up-convolution", their spectral regularization), the loss compares power spectra, not
voxels, so it asks for the real texture at every frequency without asking for the real phase; as there, the
spectrum is averaged before it is compared (a batch's mean 3-D spectrum of a few holes varies from batch to
batch as much as a smooth fill differs from real tissue): over the bins of one (|k_z|, in-plane radius) pair,
which keeps the slices' z axis apart from the in-plane ones. A ring average can be met by a lattice: trained with
it, the demo CycleGAN remover drew one (a peak of 33 at period 3.3 voxels in plane;
``benchmarks/results/generator_experiments_removers_texture_cpu.json``). `spectral_peak_excess` is the term that
sees one: the measure's own spectral peak (a bin over the median of its neighbours) of the generated holes' mean
spectrum, against the real holes'. Measured against the real holes' ring means instead, a first version let a
smoother fill lower it, and the CycleGAN remover trained with it lost its texture again (texture loss 1.9 against 0.8
at step 250; stopped). On batches of 8 validation holes, real against real scores 0-0.65, the lattice remover
1.0-1.6, the shipped CycleGAN remover 0.17-1.0: noisy on a batch, so check the spectral peak of what it trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HIGHPASS_SIGMA_VOXELS = 1.0  # as the measure: the residual of a 1 mm Gaussian blur (nodule and vessels left out)
_BLUR_RADIUS_VOXELS = 4
PEAK_BACKGROUND_BINS = 5  # as the measure: a bin against the median of its 5^3 neighbouring bins ...
PEAK_MIN_RADIUS = 2.0  # ... over the bins at least this far (frequency index units) from DC


def gaussian_blur(cubes: torch.Tensor, sigma: float = HIGHPASS_SIGMA_VOXELS) -> torch.Tensor:
    """``(N, C, D, H, W)`` cubes blurred with a separable Gaussian (edges replicated)."""
    offsets = torch.arange(-_BLUR_RADIUS_VOXELS, _BLUR_RADIUS_VOXELS + 1, dtype=cubes.dtype, device=cubes.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = cubes.shape[1]
    for axis in range(3):
        shape = [channels, 1, 1, 1, 1]
        shape[2 + axis] = len(kernel)
        padding = [0] * 6
        padding[2 * (2 - axis)] = padding[2 * (2 - axis) + 1] = _BLUR_RADIUS_VOXELS
        cubes = F.conv3d(F.pad(cubes, padding, mode="replicate"), kernel.view(shape), groups=channels)
    return cubes


def _frequency_index(shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The integer frequency index (z, y, x) of each bin of a spectrum of ``shape`` (``torch.fft`` order)."""
    return torch.meshgrid(*[torch.fft.fftfreq(n, device=device) * n for n in shape], indexing="ij")


def _profile_bins(shape: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each bin's (|k_z|, rounded in-plane radius) profile index (flattened) and the bins per index."""
    kz, ky, kx = _frequency_index(shape, device)
    radius = torch.sqrt(ky**2 + kx**2).round().long()
    index = (kz.abs().long() * (int(radius.max()) + 1) + radius).flatten()
    return index, torch.bincount(index)


def hole_power(cubes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The batch's mean 3-D power spectrum of the holes' high-pass residual (the box where ``mask`` is 1; mean
    removed, 3-D Hann window, as `eval_demo_pipelines` measures spectra)."""
    where = mask[0, 0].nonzero()
    low, high = where.min(0).values.tolist(), (where.max(0).values + 1).tolist()
    residual = cubes.float() - gaussian_blur(cubes.float())
    holes = residual[:, 0, low[0] : high[0], low[1] : high[1], low[2] : high[2]]
    holes = holes - holes.mean(dim=(1, 2, 3), keepdim=True)
    hann = [torch.hann_window(b - a, periodic=False, device=cubes.device) for a, b in zip(low, high)]
    window = hann[0][:, None, None] * hann[1][None, :, None] * hann[2][None, None, :]
    return torch.fft.fftn(holes * window, dim=(1, 2, 3)).abs().square().mean(0)


def spectral_profile(cubes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`hole_power` averaged over the bins of each (|k_z|, in-plane radius): a 1-D tensor, one value per occupied
    pair."""
    power = hole_power(cubes, mask)
    index, counts = _profile_bins(tuple(power.shape), cubes.device)
    sums = torch.zeros(len(counts), device=cubes.device).index_add_(0, index, power.flatten())
    occupied = counts > 0
    return sums[occupied] / counts[occupied]


def hole_spectral_loss(generated: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |log| ratio of the `spectral_profile` of the generated holes to the real holes' (``(N, 1, D, H, W)``
    cubes; 0 when the textures match, whatever the phase)."""
    floor = torch.finfo(torch.float32).tiny
    generated_profile = spectral_profile(generated, mask).clamp_min(floor)
    real_profile = spectral_profile(real, mask).clamp_min(floor)
    return (torch.log(generated_profile) - torch.log(real_profile)).abs().mean()


def _sharpest_peak(power: torch.Tensor) -> torch.Tensor:
    """The log of the largest ratio of a bin of ``power`` to the median of its `PEAK_BACKGROUND_BINS`^3
    neighbourhood (wrapping; the median held fixed), over the bins at least `PEAK_MIN_RADIUS` from DC: the
    `eval_demo_pipelines.spectral_peak` of a batch's mean spectrum."""
    reach = PEAK_BACKGROUND_BINS // 2
    padded = F.pad(power.detach()[None, None], [reach] * 6, mode="circular")[0, 0]
    windows = padded.unfold(0, PEAK_BACKGROUND_BINS, 1).unfold(1, PEAK_BACKGROUND_BINS, 1)
    windows = windows.unfold(2, PEAK_BACKGROUND_BINS, 1).reshape(*power.shape, -1)
    background = windows.median(dim=-1).values.clamp_min(torch.finfo(torch.float32).tiny)
    kz, ky, kx = _frequency_index(power.shape, power.device)
    away_from_dc = torch.sqrt(kz**2 + ky**2 + kx**2) >= PEAK_MIN_RADIUS
    return torch.log(power[away_from_dc].clamp_min(torch.finfo(torch.float32).tiny) / background[away_from_dc]).max()


def spectral_peak_excess(generated: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How much sharper the sharpest spectral peak of the generated holes is than the real holes' (`_sharpest_peak`
    of each batch's `hole_power`, as a log ratio; 0 when no sharper): the lattice a ring average cannot see, measured
    against the peaks real tissue has. Each spectrum is measured against its own neighbourhood, so a smoother fill
    does not lower it."""
    return F.relu(_sharpest_peak(hole_power(generated, mask)) - _sharpest_peak(hole_power(real, mask)))


def spectral_losses(
    generated: torch.Tensor, real: torch.Tensor, mask: torch.Tensor, texture_weight: float, peak_weight: float
) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
    """The GAN generators' spectral terms, weighted and summed, and each term (detached) to log: only those whose
    weight is above 0 are computed."""
    total, logged = 0.0, {}
    if texture_weight > 0:
        loss = hole_spectral_loss(generated, real, mask)
        total, logged["loss_spectral"] = total + texture_weight * loss, loss.detach()
    if peak_weight > 0:
        loss = spectral_peak_excess(generated, real, mask)
        total, logged["loss_spectral_peak"] = total + peak_weight * loss, loss.detach()
    return total, logged
