"""Scanner effects: partial-volume blur, correlated (low-pass) noise and streaks from dense objects."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .geometry import Grid


def _kernel_gain(sigma: float, truncate: float) -> float:
    """How much a 1-D Gaussian filter scales the standard deviation of white noise."""
    if sigma <= 0:
        return 1.0
    r = int(truncate * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    return float(np.sqrt((k**2).sum()))


def blur_with_correlated_noise(rng: np.random.Generator, hu: np.ndarray, noise_sd: float) -> np.ndarray:
    """Partial-volume blur of the image and, in the same pass, of white noise added before it.

    The filter turns the white noise into the grainy, correlated texture of reconstructed CT; the
    pre-filter amplitude is scaled so that the result has standard deviation `noise_sd` HU. One
    filter for both keeps large volumes affordable.
    """
    sigma_xy, sigma_z = rng.uniform(0.5, 1.1), rng.uniform(0.3, 0.8)
    gain = _kernel_gain(sigma_xy, 2.0) ** 2 * _kernel_gain(sigma_z, 2.0)
    scale = np.float32(noise_sd / gain)
    for k in range(0, hu.shape[2], 16):  # in slabs: no full-volume temporary
        slab = hu[:, :, k : k + 16]
        slab += rng.standard_normal(slab.shape, dtype=np.float32) * scale
    return ndimage.gaussian_filter(hu, sigma=(sigma_xy, sigma_xy, sigma_z), truncate=2.0, output=np.float32)


@dataclass(frozen=True, kw_only=True, slots=True)
class StreakSource:
    """A dense object that throws streaks: its (x, y) centre (mm) and z range (mm)."""

    x: float
    y: float
    z0: float
    z1: float
    # Directions (radians) of the streaks; None: random all round.
    angles: tuple[float, ...] | None = None
    amplitude: tuple[float, float] = (50.0, 200.0)  # HU range of one streak at full resolution


def add_streaks(rng: np.random.Generator, grid: Grid, hu: np.ndarray, sources: list[StreakSource]) -> int:
    """Bright and dark lines through each source over its slices, fading with distance.

    Returns how many sources threw streaks.
    """
    x, y = grid.axes[0][:, None], grid.axes[1][None, :]
    for src in sources:
        k0, k1 = grid.z_index(src.z0), grid.z_index(src.z1) + 1
        if k1 <= k0:
            continue
        angles = src.angles if src.angles is not None else tuple(rng.uniform(0, math.pi, int(rng.integers(3, 9))))
        dx, dy = x - src.x, y - src.y
        fade = 1.0 / (1.0 + np.sqrt(dx**2 + dy**2) / rng.uniform(60, 200))
        pattern = np.zeros((grid.shape[0], grid.shape[1]), np.float32)
        for theta in angles:
            d = np.abs(dx * math.sin(theta) - dy * math.cos(theta))
            # A streak 1-3 mm wide: on coarser voxels, wider and fainter (partial volume).
            width_mm = rng.uniform(1.0, 3.0)
            width = max(width_mm, float(grid.spacing[0]))
            amplitude = rng.uniform(*src.amplitude) * width_mm / width
            pattern += rng.choice([-1.0, 1.0]) * amplitude * np.exp(-((d / width) ** 2))
        hu[:, :, k0:k1] += (pattern * fade)[:, :, None]
    return len(sources)
