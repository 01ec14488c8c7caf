"""Above the spleen: diaphragm domes, lung bases with their posterior recesses, heart and mediastinum.

The diaphragm is the upper envelope of two paraboloid domes (the right one usually higher, over the
liver); the left dome sits a few millimetres above the spleen's top, so the spleen lies right under
it and the lung's costophrenic recess wraps around its upper pole as in real scans.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .body import Body, Spine
from .contrast import Contrast
from .geometry import Grid
from .shapes import column, ellipsoid, paint, rotation


@dataclass(frozen=True, kw_only=True, slots=True)
class Diaphragm:
    """Dome heights over every (x, y) column of the grid (mm) and the muscle's thickness."""

    dome: np.ndarray  # (nx, ny) float32: height of the diaphragm's upper surface
    thickness: float

    @property
    def ceiling(self) -> np.ndarray:
        """Height of the diaphragm's underside: nothing abdominal lies above it."""
        return self.dome - self.thickness


def sample_diaphragm(
    rng: np.random.Generator, grid: Grid, body: Body, sp_c: np.ndarray, spleen_top: float
) -> Diaphragm:
    thickness = rng.uniform(3, 7)
    x, y = grid.axes[0][:, None], grid.axes[1][None, :]
    left = np.array(
        [sp_c[0] + rng.uniform(0, 25), sp_c[1] + rng.uniform(-5, 15), spleen_top + thickness + rng.uniform(2, 20)]
    )
    right = np.array([body.ca * rng.uniform(0.3, 0.5), left[1] + rng.uniform(-10, 10), left[2] + rng.uniform(-5, 30)])
    domes = []
    for apex in (left, right):
        radius = rng.uniform(70, 130)  # curvature: how fast the dome falls away from its apex
        domes.append(apex[2] - ((x - apex[0]) ** 2 + (y - apex[1]) ** 2) / (2 * radius))
    return Diaphragm(dome=np.maximum(domes[0], domes[1]).astype(np.float32), thickness=thickness)


def paint_thorax(
    rng: np.random.Generator,
    grid: Grid,
    hu: np.ndarray,
    cavity: np.ndarray,
    body: Body,
    spine: Spine,
    diaphragm: Diaphragm,
    contrast: Contrast,
) -> None:
    """Diaphragm muscle, lung air above it (denser posteriorly), mediastinal fat and the heart."""
    k0 = grid.z_index(float(diaphragm.ceiling.min())) if diaphragm.ceiling.min() > grid.axes[2][0] else 0
    if diaphragm.ceiling.min() > grid.axes[2][-1]:
        return
    z = grid.axes[2][None, None, k0:]
    sub = hu[:, :, k0:]
    cav = cavity[:, :, k0:]
    above = (z > diaphragm.dome[:, :, None]) & cav
    muscle = (z > diaphragm.ceiling[:, :, None]) & cav & ~above
    # Lung: air, denser towards the back (dependent atelectasis) with a little texture.
    y = grid.axes[1][None, :, None]
    lung = (rng.uniform(-920, -820) + rng.uniform(20, 80) * np.clip(-y / max(body.cb, 1.0), 0, 1)).astype(np.float32)
    np.copyto(sub, lung, where=above)
    sub[muscle] = contrast.muscle
    thorax = np.zeros_like(cavity)
    thorax[:, :, k0:] = above
    for _ in range(int(rng.integers(10, 30))):  # pulmonary vessels
        c = np.array(
            [rng.uniform(-1, 1) * body.ca, rng.uniform(-1, 1) * body.cb, rng.uniform(0, 60) + diaphragm.dome.min()]
        )
        paint(hu, ellipsoid(grid, c, rng.uniform(1.5, 4, 3)), rng.uniform(-50, 60), within=thorax)
    # Mediastinum: fat in front of the spine, between the lungs.
    a = spine.aorta
    paint(
        hu,
        column(grid, a[0] + 5, a[1] + 10, rng.uniform(20, 35), rng.uniform(30, 50)),
        rng.uniform(-110, -70),
        within=thorax,
    )
    # Heart on the central tendon, left of the midline and anterior: myocardium, blood, pericardial fat.
    hx, hy = rng.uniform(-45, -5), body.cb * rng.uniform(0.1, 0.4)
    ix = int(np.clip(np.searchsorted(grid.axes[0], hx), 0, grid.shape[0] - 1))
    iy = int(np.clip(np.searchsorted(grid.axes[1], hy), 0, grid.shape[1] - 1))
    axes = np.array([rng.uniform(55, 70), rng.uniform(45, 60), rng.uniform(45, 60)])
    center = np.array([hx, hy, float(diaphragm.dome[ix, iy]) + axes[2] * rng.uniform(0.8, 1.0)])
    rot = rotation(rng, 30, 15)
    paint(hu, ellipsoid(grid, center, axes + 4, rot), rng.uniform(-110, -70), within=thorax)
    paint(hu, ellipsoid(grid, center, axes, rot), contrast.myocardium, within=thorax)
    paint(hu, ellipsoid(grid, center, axes * 0.72, rot), contrast.heart_blood, within=thorax)
