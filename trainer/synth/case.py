"""One phantom: the case builder that places and paints everything in order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .artefacts import StreakSource, add_streaks, blur_with_correlated_noise
from .body import paint_arms, paint_body, paint_spine_and_vessels, paint_table, sample_body, sample_spine
from .contrast import sample_contrast
from .geometry import Grid, check_geometry, check_shape, reorient, sample_geometry
from .organs import (
    paint_ascites,
    paint_bladder,
    paint_bowel,
    paint_colon,
    paint_kidneys,
    paint_liver,
    paint_pancreas_and_splenic_vessels,
    paint_stomach,
)
from .shapes import paint
from .spleen import paint_lesion, place_spleen, plan_spleen, spleen_shape, spleen_texture
from .thorax import paint_thorax, sample_diaphragm

ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS")


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    """One generated case: array in the file's orientation, affine, label and facts for tests."""

    image: np.ndarray  # int16 HU, file orientation
    label: np.ndarray  # uint8 {0,1}, file orientation
    affine: np.ndarray  # 4x4, voxel -> RAS mm
    orientation: str
    spleen_ml: float
    geometry: str = "compact"
    phase: str = "portal-venous"
    liver_hu: float = float("nan")  # the liver's HU before blur and noise (the spleen's is in the image)
    features: tuple[str, ...] = ()  # optional findings present: ascites, oral-contrast, arms, streaks, lesion


def generate_case(
    rng: np.random.Generator,
    shape: tuple[int, int, int] | None = None,
    orientation: str | None = None,
    geometry: str = "compact",
) -> Case:
    """Generate one phantom. Deterministic for a given generator state and arguments.

    Args:
        rng: the random generator (seed it for reproducible data).
        shape: voxel grid (RAS order before reorientation); drawn from the geometry when None. A given
            shape keeps the geometry's field of view, so the spacing follows from it.
        orientation: one of ORIENTATIONS; random when None.
        geometry: "compact" (small grids around the spleen) or "clinical" (scanner-like spacing and
            a 300-500 mm long scan); see `trainer.synth.geometry`.
    """
    check_geometry(geometry)
    if orientation is not None and orientation not in ORIENTATIONS:
        raise ValueError(f"orientation {orientation!r} is not one of {ORIENTATIONS}")
    check_shape(shape)

    # --- what is drawn before the grid: body, contrast, spleen size; then the scan around them ---
    body = sample_body(rng)
    contrast = sample_contrast(rng)
    plan = plan_spleen(rng)
    geo = sample_geometry(rng, geometry, shape, body.a, float(plan.half_extent[2]))
    if orientation is None:
        orientation = str(rng.choice(ORIENTATIONS))
    grid = Grid(geo)
    hu = np.full(geo.shape, -1000.0, dtype=np.float32)
    label = np.zeros(geo.shape, dtype=np.uint8)
    features: list[str] = []
    oral = float(rng.uniform(200, 600)) if rng.random() < 0.3 else None
    if oral is not None:
        features.append("oral-contrast")

    # --- body wall, then the abdominal organs around the spleen's place ---
    outline, cavity = paint_body(rng, grid, hu, body, contrast.muscle)
    spine = sample_spine(rng, body)
    liver_c = paint_liver(rng, grid, hu, body, contrast)
    kidneys = paint_kidneys(rng, grid, hu, spine, contrast)
    sp_c, touching = place_spleen(rng, plan, body.ca, body.cb, *kidneys[0])
    st_c, st_ax = paint_stomach(rng, grid, hu, sp_c, plan.axes, touching, oral, contrast.spleen)
    paint_pancreas_and_splenic_vessels(rng, grid, hu, spine, plan, sp_c, contrast)
    paint_colon(rng, grid, hu, body, plan, sp_c, contrast, oral)
    paint_bowel(rng, grid, hu, body, oral)
    paint_bladder(rng, grid, hu, body, float(sp_c[2] - plan.half_extent[2]))
    if paint_ascites(rng, grid, hu, cavity, body, plan, sp_c, liver_c):
        features.append("ascites")

    # --- above: diaphragm just over the spleen, lungs and heart; skeleton and vessels through all ---
    diaphragm = sample_diaphragm(rng, grid, body, sp_c, float(sp_c[2] + plan.half_extent[2]))
    paint_thorax(rng, grid, hu, cavity, body, spine, diaphragm, contrast)
    paint_spine_and_vessels(rng, grid, hu, body, spine, contrast)

    # --- the spleen last, so that no neighbour overwrites its label ---
    spleen = spleen_shape(grid, plan, sp_c, cavity, diaphragm.ceiling)
    paint(hu, spleen, spleen_texture(rng, grid, spleen, contrast, sp_c, plan.axes), label=label)
    if paint_lesion(rng, grid, hu, label, sp_c, plan.axes, contrast.spleen):
        features.append("lesion")
    del cavity

    # --- outside the body: air, then the couch and sometimes the arms ---
    outside = np.logical_not(outline, out=outline)
    hu[outside] = -1000.0
    label[outside] = 0
    del outline, outside
    humeri = paint_arms(rng, grid, hu, body, contrast.muscle)
    if humeri:
        features.append("arms")
    paint_table(rng, grid, hu, body)

    # --- scanner: blur with correlated noise, then streaks from dense objects ---
    hu = blur_with_correlated_noise(rng, hu, rng.uniform(6, 25))
    sources = _streak_sources(rng, grid, humeri, st_c, st_ax, oral)
    if add_streaks(rng, grid, hu, sources):
        features.append("streaks")
    np.rint(hu, out=hu)
    np.clip(hu, -1024, 3071, out=hu)
    image = hu.astype(np.int16)
    del hu

    image, label, affine = reorient(image, label, geo.affine, orientation)
    spleen_ml = float(np.count_nonzero(label)) * float(np.prod(geo.spacing)) / 1000.0
    return Case(
        image=image,
        label=label,
        affine=affine,
        orientation=orientation,
        spleen_ml=spleen_ml,
        geometry=geometry,
        phase=contrast.phase,
        liver_hu=contrast.liver,
        features=tuple(features),
    )


def _streak_sources(
    rng: np.random.Generator, grid: Grid, humeri: list[np.ndarray], st_c: np.ndarray, st_ax, oral: float | None
) -> list[StreakSource]:
    """Streaks between the humeri when the arms are down, and from a stomach full of dense contrast."""
    z0, z1 = float(grid.axes[2][0]), float(grid.axes[2][-1])
    sources = []
    if len(humeri) == 2 and rng.random() < 0.7:
        mid = (humeri[0] + humeri[1]) / 2
        d = humeri[1] - humeri[0]
        base = float(np.arctan2(d[1], d[0]))
        angles = tuple(base + rng.uniform(-0.08, 0.08) for _ in range(int(rng.integers(2, 5))))
        sources.append(
            StreakSource(x=float(mid[0]), y=float(mid[1]), z0=z0, z1=z1, angles=angles, amplitude=(20.0, 80.0))
        )
    if oral is not None and oral > 350 and rng.random() < 0.6:
        sources.append(
            StreakSource(
                x=float(st_c[0]),
                y=float(st_c[1]),
                z0=float(st_c[2] - st_ax[2] * 0.7),
                z1=float(st_c[2] + st_ax[2] * 0.7),
            )
        )
    return sources
