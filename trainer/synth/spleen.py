"""The spleen: size (small to splenomegaly), shape, position, and its texture by contrast phase.

It is painted last, so no neighbour ever overwrites its label, and it is clipped to the abdominal
cavity and below the diaphragm, the way a real spleen fills the left upper quadrant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .contrast import Contrast
from .geometry import Grid
from .shapes import Shape, ellipsoid, fraction_after_cut, rotation


@dataclass(frozen=True, kw_only=True, slots=True)
class SpleenPlan:
    """Size and shape of one spleen; `center` is set once the neighbours are placed."""

    target_ml: float
    axes: np.ndarray  # semi-axes, mm
    rot: np.ndarray
    cut_offset: np.ndarray | None  # crescent cut on the hilar side, in the spleen's frame (mm)
    cut_axes: np.ndarray | None

    @property
    def half_extent(self) -> np.ndarray:
        """Half-size of the rotated ellipsoid along x, y and z (mm)."""
        return np.sqrt(((self.rot * self.axes[None, :]) ** 2).sum(axis=1))

    def hilum(self, center: np.ndarray) -> np.ndarray:
        """A point on the medial, slightly anterior (hilar) surface, where the vessels enter."""
        return center + self.rot @ np.array([self.axes[0] * 0.55, self.axes[1] * 0.15, 0.0])


def sample_volume_ml(rng: np.random.Generator) -> float:
    """Small spleens (25-60 ml), normal ones (60-600 ml), and splenomegaly (600-2500 ml)."""
    kind = rng.random()
    lo, hi = (25, 60) if kind < 0.15 else (600, 2500) if kind > 0.82 else (60, 600)
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def plan_spleen(rng: np.random.Generator) -> SpleenPlan:
    target_ml = sample_volume_ml(rng)
    base = np.array([rng.uniform(0.45, 0.7), rng.uniform(0.8, 1.1), rng.uniform(1.0, 1.5)])
    cut_offset: np.ndarray | None = None
    cut_axes: np.ndarray | None = None
    frac = 1.0
    if rng.random() < 0.6:
        cut_offset = np.array([base[0] * rng.uniform(0.9, 1.3), base[1] * rng.uniform(0.1, 0.4), 0.0])
        cut_axes = base * np.array([rng.uniform(0.8, 1.1), rng.uniform(0.6, 0.8), rng.uniform(0.6, 0.85)])
        frac = fraction_after_cut(base, cut_offset, cut_axes)
    unit_ml = 4.0 / 3.0 * math.pi * float(np.prod(base)) * frac / 1000.0
    k = (target_ml / unit_ml) ** (1.0 / 3.0)
    return SpleenPlan(
        target_ml=target_ml,
        axes=base * k,
        rot=rotation(rng, 35, 12),
        cut_offset=None if cut_offset is None else cut_offset * k,
        cut_axes=None if cut_axes is None else cut_axes * k,
    )


def place_spleen(
    rng: np.random.Generator, plan: SpleenPlan, ca: float, cb: float, kidney_c: np.ndarray, kidney_ax
) -> tuple[np.ndarray, bool]:
    """Centre (mm) against the left lateral wall, posterior; sometimes moved onto the left kidney."""
    half = plan.half_extent
    sp_x = min(-ca + half[0] + rng.uniform(2, 12), -10.0)
    sp_y = -cb * rng.uniform(0.15, 0.45) + rng.uniform(-5, 5)
    center = np.array([sp_x, sp_y, 0.0])
    touching = bool(rng.random() < 0.35)
    if touching:
        direction = kidney_c - center
        dist = float(np.linalg.norm(direction))
        gap = dist - (plan.axes.max() * 0.6 + max(kidney_ax) * 0.6)
        if gap > 0:
            center = center + direction / dist * gap * 0.8
    return center, touching


def spleen_shape(grid: Grid, plan: SpleenPlan, center: np.ndarray, cavity: np.ndarray, ceiling: np.ndarray) -> Shape:
    """The spleen's voxels: ellipsoid less the hilar cut, inside the cavity, below `ceiling`.

    `ceiling` is the height (mm) of the diaphragm's underside over each (x, y) column.
    """
    shape = ellipsoid(grid, center, plan.axes, plan.rot)
    if shape is None:
        return None
    box, mask = shape
    x, y, z = grid.coords(box)
    if plan.cut_offset is not None and plan.cut_axes is not None:
        d = [x - center[0], y - center[1], z - center[2]]
        q: np.ndarray = np.zeros((1, 1, 1), np.float32)
        for j in range(3):
            uj = plan.rot[0, j] * d[0] + plan.rot[1, j] * d[1] + plan.rot[2, j] * d[2]
            q = q + ((uj - plan.cut_offset[j]) / plan.cut_axes[j]) ** 2
        mask = mask & (q > 1.0)
    mask = mask & cavity[box] & (z < ceiling[box[0], box[1]][:, :, None])
    return box, mask


def spleen_texture(
    rng: np.random.Generator, grid: Grid, shape: Shape, contrast: Contrast, center: np.ndarray, axes: np.ndarray
) -> np.ndarray | float:
    """HU over the spleen's box: flat, or arterial-phase arcs and bands (a moire of two patterns)."""
    if shape is None or contrast.spleen_zebra <= 0:
        return contrast.spleen
    box, _ = shape
    x, y, z = grid.coords(box)
    # Concentric arcs around a point off the spleen, crossed by straight bands: the zebra look.
    q = center + rng.uniform(-1.5, 1.5, 3) * axes
    r = np.sqrt((x - q[0]) ** 2 + (y - q[1]) ** 2 + (z - q[2]) ** 2)
    n = rng.normal(size=3)
    n /= np.linalg.norm(n)
    arcs = np.sin(2 * math.pi * r / rng.uniform(15, 35) + rng.uniform(0, 2 * math.pi))
    bands = np.sin(2 * math.pi * (n[0] * x + n[1] * y + n[2] * z) / rng.uniform(20, 40) + rng.uniform(0, 2 * math.pi))
    w = rng.uniform(0.3, 0.7)
    return (contrast.spleen + contrast.spleen_zebra * ((1 - w) * arcs + w * bands)).astype(np.float32)


def paint_lesion(
    rng: np.random.Generator,
    grid: Grid,
    hu: np.ndarray,
    label: np.ndarray,
    center: np.ndarray,
    axes: np.ndarray,
    spleen_hu: float,
) -> bool:
    """Sometimes a hypodense lesion inside the spleen: still spleen in the label. True if painted."""
    if rng.random() >= 0.2:
        return False
    les = ellipsoid(grid, center + rng.uniform(-0.3, 0.3, 3) * axes, axes * rng.uniform(0.1, 0.25))
    if les is None:
        return False
    box, mask = les
    keep = label[box].astype(bool) & mask
    hu[box][keep] = spleen_hu - rng.uniform(40, 80)
    return bool(keep.any())
