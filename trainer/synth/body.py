"""The body wall, skeleton and great vessels: what surrounds every organ in every slice."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .contrast import Contrast
from .geometry import Grid
from .shapes import column, ellipsoid, paint, smooth_planes


@dataclass(frozen=True, kw_only=True, slots=True)
class Body:
    """Semi-axes (mm) of the outline and of the abdominal cavity inside fat and muscle."""

    a: float
    b: float
    taper: float  # relative change of the outline per 100 mm in z
    fat: float
    muscle: float

    @property
    def ca(self) -> float:
        return self.a - self.fat - self.muscle

    @property
    def cb(self) -> float:
        return self.b - self.fat - self.muscle


def sample_body(rng: np.random.Generator) -> Body:
    return Body(
        a=rng.uniform(135, 180),
        b=rng.uniform(95, 130),
        taper=rng.uniform(-0.08, 0.08),
        fat=rng.uniform(8, 30),
        muscle=rng.uniform(6, 14),
    )


def _section(grid: Grid, a: float, b: float, taper: float) -> np.ndarray:
    """Elliptical cylinder along z whose semi-axes change linearly with z (full volume, bool)."""
    x, y, z = grid.axes[0][:, None, None], grid.axes[1][None, :, None], grid.axes[2][None, None, :]
    s2 = (1.0 + taper * z / 100.0) ** 2
    return ((x / a) ** 2 + (y / b) ** 2) <= s2


def paint_body(
    rng: np.random.Generator, grid: Grid, hu: np.ndarray, body: Body, muscle_hu: float
) -> tuple[np.ndarray, np.ndarray]:
    """Fat, muscle wall and textured visceral fat. Returns the (body, cavity) masks."""
    outline = _section(grid, body.a, body.b, body.taper)
    hu[outline] = rng.uniform(-120, -80)  # subcutaneous fat
    hu[_section(grid, body.a - body.fat, body.b - body.fat, body.taper)] = muscle_hu
    cavity = _section(grid, body.ca, body.cb, body.taper)
    # Mesentery: visceral fat with a smooth random texture about 25 mm across, slice by slice.
    sx, sy, sz = (max(2, int(round(25.0 / s))) for s in grid.spacing)
    planes, i0, w = smooth_planes(rng, grid.shape, (sx, sy, sz))
    base = np.float32(rng.uniform(-90, -40))
    for k in range(0, grid.shape[2], 16):  # slabs of slices: bounded temporaries
        ks = slice(k, k + 16)
        wk = w[ks][:, None, None]
        tex = planes[i0[ks]] * (1 - wk) + planes[i0[ks] + 1] * wk
        np.copyto(hu[:, :, ks], np.moveaxis(base + 25.0 * tex, 0, 2), where=cavity[:, :, ks])
    return outline, cavity


@dataclass(frozen=True, kw_only=True, slots=True)
class Spine:
    center: np.ndarray  # vertebral body centre (x, y; z unused)
    radius: float
    aorta: np.ndarray
    ivc: np.ndarray


def sample_spine(rng: np.random.Generator, body: Body) -> Spine:
    vert_c = np.array([0.0, -body.cb + rng.uniform(20, 35), 0.0])
    vert_r = rng.uniform(14, 20)
    aorta = vert_c + np.array([rng.uniform(-12, -4), vert_r + 14, 0])
    ivc = vert_c + np.array([rng.uniform(18, 28), vert_r + 12, 0])
    return Spine(center=vert_c, radius=vert_r, aorta=aorta, ivc=ivc)


def paint_spine_and_vessels(
    rng: np.random.Generator, grid: Grid, hu: np.ndarray, body: Body, spine: Spine, contrast: Contrast
) -> None:
    """Vertebrae with canal, paraspinal muscles, ribs, aorta and IVC along the whole scan."""
    c, r = spine.center, spine.radius
    paint(hu, column(grid, c[0], c[1], r, r * 0.9), rng.uniform(700, 900))  # cortical bone
    paint(hu, column(grid, c[0], c[1], r - 3, r * 0.9 - 3), rng.uniform(180, 320))  # cancellous
    disc_hu, level = rng.uniform(60, 110), rng.uniform(28, 36)  # intervertebral discs, a level apart
    for zc in np.arange(grid.axes[2][0] + rng.uniform(0, level), grid.axes[2][-1], level):
        paint(hu, ellipsoid(grid, (c[0], c[1], zc), (r, r * 0.9, rng.uniform(3, 5))), disc_hu)
    canal = c + np.array([0, -r - 8, 0])
    paint(hu, column(grid, canal[0], canal[1], 9, 8), rng.uniform(700, 900))
    paint(hu, column(grid, canal[0], canal[1], 6, 5), rng.uniform(10, 30))
    for side in (-1, 1):
        paint(hu, column(grid, c[0] + side * 38, c[1] - 22, 26, 22), contrast.muscle)
    paint_ribs(rng, grid, hu, body)
    paint(hu, column(grid, spine.aorta[0], spine.aorta[1], 11, 11), contrast.artery)
    paint(hu, column(grid, spine.ivc[0], spine.ivc[1], 12, 9), contrast.vein)


def paint_ribs(rng: np.random.Generator, grid: Grid, hu: np.ndarray, body: Body) -> None:
    """Rib sections just inside the muscle wall: short arcs at a few heights, both sides."""
    ca, cb = body.ca, body.cb
    bone = rng.uniform(500, 900)
    for zc in np.arange(grid.axes[2][0], grid.axes[2][-1], rng.uniform(25, 35)):
        for side in (-1, 1):
            for ang in (rng.uniform(0.4, 0.9), rng.uniform(1.0, 1.5)):
                rib_c = np.array([side * (ca + 4) * math.cos(ang), -(cb + 4) * math.sin(ang) * 0.8, zc])
                paint(hu, ellipsoid(grid, rib_c, (6, 6, 5)), bone)


def paint_arms(rng: np.random.Generator, grid: Grid, hu: np.ndarray, body: Body, muscle_hu: float) -> list[np.ndarray]:
    """Arms down beside the body (a third of scans). Returns the humeri centres (streak sources)."""
    if rng.random() >= 0.33:
        return []
    humeri = []
    a, b = rng.uniform(35, 50), rng.uniform(40, 55)
    y = rng.uniform(-0.2, 0.3) * body.b
    for side in (-1, 1):
        x = side * (body.a + a + rng.uniform(3, 25))
        paint(hu, column(grid, x, y, a, b), rng.uniform(-110, -80))
        paint(hu, column(grid, x, y, a - 8, b - 8), muscle_hu)
        hx, hy = x + rng.uniform(-8, 8), y + rng.uniform(-8, 8)
        paint(hu, column(grid, hx, hy, 12, 12), rng.uniform(900, 1400))
        paint(hu, column(grid, hx, hy, 7, 7), rng.uniform(0, 80))  # marrow
        humeri.append(np.array([hx, hy]))
    return humeri


def paint_table(rng: np.random.Generator, grid: Grid, hu: np.ndarray, body: Body) -> None:
    """The couch under the patient: a curved carbon-fibre shell around a foam core, all along z."""
    x = grid.axes[0][:, None]
    y = grid.axes[1][None, :]
    top = -body.b - rng.uniform(1, 15) + (x / 1000.0) ** 2 * rng.uniform(100, 400)
    depth = top - y
    half_width = rng.uniform(180, 260)
    shell = rng.uniform(1.5, 3.0)
    thick = rng.uniform(20, 50)
    inside = (depth >= 0) & (depth <= thick) & (np.abs(x) <= half_width)
    skin = inside & ((depth <= shell) | (depth >= thick - shell))
    hu[inside & ~skin] = rng.uniform(-900, -600)  # foam (2D mask: the same on every slice)
    hu[skin] = rng.uniform(150, 450)
