"""Abdominal organs around the spleen: liver, kidneys and left adrenal, stomach, pancreatic tail and
splenic vessels at the hilum, splenic flexure and descending colon, bowel loops, bladder, ascites.

All are painted before the spleen, which is painted last and so never loses a voxel of its label.
"""

from __future__ import annotations

import numpy as np

from .body import Body, Spine
from .contrast import Contrast
from .geometry import Grid
from .shapes import capsule, ellipsoid, paint, paint_all, rotation, tube, wiggly_path
from .spleen import SpleenPlan


def paint_liver(rng: np.random.Generator, grid: Grid, hu: np.ndarray, body: Body, contrast: Contrast) -> np.ndarray:
    """Liver on the patient's right (x > 0), high, with a left lobe across the midline. Returns its centre."""
    ca, cb = body.ca, body.cb
    center = np.array([ca * rng.uniform(0.35, 0.5), rng.uniform(-10, 20), rng.uniform(20, 70)])
    axes = (ca * rng.uniform(0.55, 0.7), cb * rng.uniform(0.7, 0.85), rng.uniform(80, 110))
    paint(hu, ellipsoid(grid, center, axes, rotation(rng, 20, 5)), contrast.liver)
    paint(hu, ellipsoid(grid, center + np.array([-ca * 0.5, cb * 0.3, 10]), (ca * 0.35, cb * 0.3, 45)), contrast.liver)
    # Portal vein branches: darker or brighter tubes inside the liver, by phase.
    hilum = center + np.array([-axes[0] * 0.5, -axes[1] * 0.1, -axes[2] * 0.3])
    for _ in range(3):
        end = center + rng.uniform(-0.5, 0.5, 3) * np.array(axes)
        paint_all(hu, tube(grid, wiggly_path(rng, hilum, end, 3, 6), rng.uniform(3, 6)), contrast.portal)
    return center


def paint_kidneys(
    rng: np.random.Generator, grid: Grid, hu: np.ndarray, spine: Spine, contrast: Contrast
) -> list[tuple[np.ndarray, tuple]]:
    """Kidneys either side of the spine, with sinus fat and medulla; the left adrenal above-medial."""
    kid_z = rng.uniform(-60, -10)
    kidneys = []
    for side in (-1, 1):
        kc = np.array(
            [side * rng.uniform(55, 80), spine.center[1] + rng.uniform(5, 25), kid_z + side * rng.uniform(0, 20)]
        )
        kax = (rng.uniform(22, 30), rng.uniform(20, 28), rng.uniform(45, 60))
        krot = rotation(rng, 25, 10)
        paint(hu, ellipsoid(grid, kc, kax, krot), contrast.kidney_cortex)
        paint(hu, ellipsoid(grid, kc + np.array([-side * 4, 2, 0]), np.array(kax) * 0.7, krot), contrast.kidney_medulla)
        paint(hu, ellipsoid(grid, kc + np.array([-side * 8, 4, 0]), np.array(kax) * 0.4, krot), rng.uniform(-40, 20))
        kidneys.append((kc, kax))
    # Left adrenal: an inverted Y of thin limbs, anteromedial to the upper pole of the left kidney.
    kc, kax = kidneys[0]
    apex = kc + np.array([rng.uniform(10, 22), rng.uniform(12, 25), kax[2] * rng.uniform(0.6, 0.9)])
    for yaw in (rng.uniform(-40, -15), rng.uniform(15, 40)):
        a = np.radians(yaw)
        limb = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        ax = (rng.uniform(2.5, 4), rng.uniform(10, 18), rng.uniform(10, 16))
        paint(hu, ellipsoid(grid, apex - limb @ np.array([0, ax[1] * 0.8, ax[2] * 0.5]), ax, limb), contrast.adrenal)
    return kidneys


def paint_stomach(
    rng: np.random.Generator,
    grid: Grid,
    hu: np.ndarray,
    sp_c: np.ndarray,
    sp_axes: np.ndarray,
    touching: bool,
    oral: float | None,
    spleen_hu: float,
) -> tuple[np.ndarray, tuple]:
    """Stomach anterior-medial to the spleen: fluid, food or oral contrast, with a gas cap."""
    gap = rng.uniform(-2, 4) if touching else rng.uniform(8, 25)
    c = sp_c + np.array([rng.uniform(35, 55) + sp_axes[0] * 0.3, sp_axes[1] * 0.6 + gap + 25, rng.uniform(0, 30)])
    ax = (rng.uniform(30, 45), rng.uniform(25, 35), rng.uniform(35, 55))
    content = (
        oral if oral is not None else rng.uniform(25, 45) if rng.random() < 0.5 else spleen_hu - rng.uniform(10, 30)
    )
    paint(hu, ellipsoid(grid, c, np.array(ax) + 3), rng.uniform(30, 60))  # wall
    paint(hu, ellipsoid(grid, c, ax), content)
    paint(hu, ellipsoid(grid, c + np.array([0, ax[1] * 0.5, 0]), np.array(ax) * 0.5), rng.uniform(-1000, -900))
    return c, ax


def paint_pancreas_and_splenic_vessels(
    rng: np.random.Generator,
    grid: Grid,
    hu: np.ndarray,
    spine: Spine,
    plan: SpleenPlan,
    sp_c: np.ndarray,
    contrast: Contrast,
) -> None:
    """Pancreas from head to a tail that reaches the splenic hilum; splenic vein behind it and a
    tortuous splenic artery from the aorta, both entering the hilum."""
    hilum = plan.hilum(sp_c)
    pre = spine.aorta + np.array([0.0, 0.0, hilum[2] - spine.aorta[2]])  # aorta at the hilum's height
    head = pre + np.array([rng.uniform(25, 45), rng.uniform(30, 45), rng.uniform(-40, -20)])
    body = pre + np.array([rng.uniform(-25, -5), rng.uniform(30, 45), rng.uniform(-15, 0)])
    tail = hilum + np.array([rng.uniform(-4, 2), rng.uniform(4, 12), rng.uniform(-10, 5)])
    path = np.vstack([wiggly_path(rng, head, body, 2, 4), wiggly_path(rng, body, tail, 3, 5)[1:]])
    for i, r in enumerate(np.linspace(rng.uniform(11, 15), rng.uniform(7, 10), len(path) - 1)):
        paint_all(hu, tube(grid, path[i : i + 2], r), contrast.pancreas)
    # Splenic vein: along the back of the pancreas to the confluence behind its neck.
    vein = path + np.array([0.0, -rng.uniform(9, 13), 0.0])
    vein[-1] = hilum
    paint_all(hu, tube(grid, vein, rng.uniform(4, 6)), contrast.vein)
    # Splenic artery: from the coeliac trunk above, looping.
    coeliac = pre + np.array([0.0, 12.0, rng.uniform(5, 25)])
    paint_all(hu, tube(grid, wiggly_path(rng, coeliac, hilum, 6, 10), rng.uniform(2.5, 4)), contrast.artery)


def paint_colon(
    rng: np.random.Generator,
    grid: Grid,
    hu: np.ndarray,
    body: Body,
    plan: SpleenPlan,
    sp_c: np.ndarray,
    contrast: Contrast,
    oral: float | None,
) -> None:
    """Transverse colon to the splenic flexure beside the spleen's lower pole, then down the left flank."""
    ca, cb = body.ca, body.cb
    low = sp_c[2] - plan.half_extent[2]
    flexure = np.array([-ca * rng.uniform(0.6, 0.8), sp_c[1] + rng.uniform(25, 50), low + rng.uniform(-10, 30)])
    transverse = np.array([rng.uniform(-10, 30), cb * rng.uniform(0.4, 0.6), low - rng.uniform(10, 50)])
    descending = np.array([-ca * rng.uniform(0.7, 0.85), rng.uniform(-0.2, 0.2) * cb, grid.axes[2][0] - 20.0])
    path = np.vstack([wiggly_path(rng, transverse, flexure, 3, 8), wiggly_path(rng, flexure, descending, 4, 8)[1:]])
    r = rng.uniform(14, 24)
    paint_all(hu, tube(grid, path, r + 2.5), contrast.bowel_wall)
    # Each stretch holds its own content (gas, mottled stool or contrast), as colons do.
    for i in range(len(path) - 1):
        content = _colon_content(rng, oral)
        paint(hu, capsule(grid, path[i], path[i + 1], r), content)
        if content > -900:
            for _ in range(int(rng.integers(1, 4))):
                p = path[i] + (path[i + 1] - path[i]) * rng.random() + rng.uniform(-r * 0.6, r * 0.6, 3)
                paint(hu, ellipsoid(grid, p, rng.uniform(2, 7, 3)), rng.uniform(-1000, -700))


def _colon_content(rng: np.random.Generator, oral: float | None) -> float:
    kind = rng.random()
    if oral is not None and kind < 0.4:
        return oral
    if kind < 0.6:
        return rng.uniform(-1000, -900)  # gas
    return rng.uniform(-120, 40)  # stool, mottled with gas bubbles


def paint_bowel(rng: np.random.Generator, grid: Grid, hu: np.ndarray, body: Body, oral: float | None) -> None:
    """Gas pockets and fluid-filled small-bowel loops in the anterior abdomen, more in long scans."""
    ca, cb = body.ca, body.cb
    z0, z1 = float(grid.axes[2][0]), min(float(grid.axes[2][-1]), 40.0)
    count = int(rng.integers(3, 9) * max(1.0, (z1 - z0) / 80.0))
    for _ in range(count):
        c = np.array([rng.uniform(-0.6, 0.6) * ca, rng.uniform(0.0, 0.7) * cb, rng.uniform(z0, max(z1, z0 + 1))])
        ax = rng.uniform(6, 18, 3)
        roll = rng.random()
        if roll < 0.4:
            paint(hu, ellipsoid(grid, c, ax), rng.uniform(-1000, -700))
        elif oral is not None and roll < 0.7:
            paint(hu, ellipsoid(grid, c, ax * 1.5), oral * rng.uniform(0.6, 1.0))
        else:
            paint(hu, ellipsoid(grid, c, ax * 1.5), rng.uniform(0, 60))


def paint_bladder(rng: np.random.Generator, grid: Grid, hu: np.ndarray, body: Body, spleen_low: float) -> None:
    """Urinary bladder in the pelvis, when the scan reaches that far down."""
    z = spleen_low - rng.uniform(250, 330)
    if z < float(grid.axes[2][0]) - 40:
        return
    c = np.array([rng.uniform(-10, 10), body.cb * rng.uniform(0.2, 0.5), z])
    paint(hu, ellipsoid(grid, c, rng.uniform(25, 55, 3)), rng.uniform(0, 20))


def paint_ascites(
    rng: np.random.Generator,
    grid: Grid,
    hu: np.ndarray,
    cavity: np.ndarray,
    body: Body,
    plan: SpleenPlan,
    sp_c: np.ndarray,
    liver_c: np.ndarray,
) -> bool:
    """Sometimes free fluid (0-20 HU): a rim around spleen and liver, in the flanks and the pelvis.

    It replaces visceral fat only (never an organ or gas), so it can be painted after the organs.
    """
    if rng.random() >= 0.15:
        return False
    fluid = rng.uniform(0, 20)
    rim = rng.uniform(5, 25)
    shapes = [
        ellipsoid(grid, sp_c, plan.axes + rim, plan.rot),
        ellipsoid(grid, liver_c, (body.ca * 0.7 + rim, body.cb * 0.85 + rim, 110 + rim)),
    ]
    for side in (-1, 1):
        c = np.array([side * body.ca * 0.8, 0.0, sp_c[2] - rng.uniform(60, 200)])
        shapes.append(ellipsoid(grid, c, (rim + 10, body.cb * 0.6, rng.uniform(60, 150))))
    for shape in shapes:
        if shape is None:
            continue
        box, mask = shape
        view = hu[box]
        view[mask & cavity[box] & (view > -200) & (view < -20)] = fluid
    return True
