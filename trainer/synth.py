"""Synthetic abdominal CT phantoms in the Medical Segmentation Decathlon layout.

The only training data the project can rely on offline. Each case is an axial CT-like volume in
Hounsfield units (int16) with a spleen label (uint8):

- body outline (elliptical, varying along z) with subcutaneous fat and an abdominal muscle wall;
- liver (patient's right), spleen (patient's left, posterior; ellipsoid or crescent, 50-600 ml,
  sometimes touching the left kidney or the stomach), kidneys with renal sinus, stomach with a gas
  cap, bowel gas, aorta and IVC, vertebra with spinal canal, paraspinal muscles, ribs;
- per-case contrast (spleen vs liver vs kidney), noise level and partial-volume blur;
- varied field of view (partial spleens at the volume edge), spacing, size and orientation
  (RAS, LPS and LAS affines).

Anatomy is defined in millimetres in RAS+ world space (NIfTI convention: +x towards the patient's
right, +y anterior, +z superior) and then sampled on the voxel grid, so spacing and size can vary
freely. The spleen, on the patient's left, therefore has x < 0 and the liver x > 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS")


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    """One generated case: array in the file's orientation, affine, label and facts for tests."""

    image: np.ndarray  # int16 HU, file orientation
    label: np.ndarray  # uint8 {0,1}, file orientation
    affine: np.ndarray  # 4x4, voxel -> RAS mm
    orientation: str
    spleen_ml: float


class _Grid:
    """World coordinates (RAS mm) of a RAS-ordered voxel grid, evaluated lazily per bounding box."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], origin: np.ndarray):
        self.shape = shape
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.origin = origin
        self.axes = [origin[d] + np.arange(shape[d]) * spacing[d] for d in range(3)]

    def box(self, center: np.ndarray, radius: float) -> tuple[slice, ...] | None:
        """Index slices of the axis-aligned box of half-size `radius` mm around `center`."""
        out = []
        for d in range(3):
            lo = int(math.floor((center[d] - radius - self.origin[d]) / self.spacing[d]))
            hi = int(math.ceil((center[d] + radius - self.origin[d]) / self.spacing[d])) + 1
            lo, hi = max(lo, 0), min(hi, self.shape[d])
            if lo >= hi:
                return None
            out.append(slice(lo, hi))
        return tuple(out)

    def coords(self, box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = self.axes[0][box[0]][:, None, None]
        y = self.axes[1][box[1]][None, :, None]
        z = self.axes[2][box[2]][None, None, :]
        return x, y, z


def _rotation(rng: np.random.Generator, max_deg_z: float, max_deg_tilt: float) -> np.ndarray:
    """A rotation matrix: random yaw about z plus a small tilt about x."""
    a = math.radians(rng.uniform(-max_deg_z, max_deg_z))
    b = math.radians(rng.uniform(-max_deg_tilt, max_deg_tilt))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


def _ellipsoid(grid: _Grid, center, axes, rot: np.ndarray | None = None):
    """(box, mask) of an ellipsoid with semi-axes `axes` (mm), optionally rotated; None if outside."""
    center = np.asarray(center, dtype=np.float64)
    axes = np.asarray(axes, dtype=np.float64)
    box = grid.box(center, float(axes.max()))
    if box is None:
        return None
    x, y, z = grid.coords(box)
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    if rot is not None:
        # Coordinates in the ellipsoid's own frame: R^T (p - c).
        u = rot[0, 0] * dx + rot[1, 0] * dy + rot[2, 0] * dz
        v = rot[0, 1] * dx + rot[1, 1] * dy + rot[2, 1] * dz
        w = rot[0, 2] * dx + rot[1, 2] * dy + rot[2, 2] * dz
    else:
        u, v, w = dx, dy, dz
    mask = (u / axes[0]) ** 2 + (v / axes[1]) ** 2 + (w / axes[2]) ** 2 <= 1.0
    return box, mask


def _paint(volume: np.ndarray, shape_mask, value: float, label: np.ndarray | None = None, label_value=None):
    if shape_mask is None:
        return
    box, mask = shape_mask
    view = volume[box]
    view[np.broadcast_to(mask, view.shape)] = value
    if label is not None:
        lview = label[box]
        lview[np.broadcast_to(mask, lview.shape)] = label_value


def _cylinder_section(grid: _Grid, cx: float, cy: float, a: float, b: float, taper: float, z0: float):
    """Boolean mask of an elliptical cylinder along z whose semi-axes change linearly with z."""
    x = grid.axes[0][:, None, None]
    y = grid.axes[1][None, :, None]
    z = grid.axes[2][None, None, :]
    scale = 1.0 + taper * (z - z0) / 100.0
    return ((x - cx) / (a * scale)) ** 2 + ((y - cy) / (b * scale)) ** 2 <= 1.0


def _spleen_shape_fraction(axes: np.ndarray, cut_offset: np.ndarray, cut_axes: np.ndarray) -> float:
    """Fraction of the ellipsoid's volume left after the crescent cut (Monte Carlo-free, on a 40^3 grid)."""
    n = 40
    t = (np.arange(n) + 0.5) / n * 2 - 1
    u, v, w = np.meshgrid(t, t, t, indexing="ij")
    inside = u**2 + v**2 + w**2 <= 1
    cu = (u * axes[0] - cut_offset[0]) / cut_axes[0]
    cv = (v * axes[1] - cut_offset[1]) / cut_axes[1]
    cw = (w * axes[2] - cut_offset[2]) / cut_axes[2]
    cut = cu**2 + cv**2 + cw**2 <= 1
    return float((inside & ~cut).sum() / max(inside.sum(), 1))


def generate_case(
    rng: np.random.Generator,
    shape: tuple[int, int, int] | None = None,
    orientation: str | None = None,
) -> Case:
    """Generate one phantom. Deterministic for a given generator state and arguments.

    Args:
        rng: the random generator (seed it for reproducible data).
        shape: voxel grid (RAS order before reorientation); random moderate size when None.
        orientation: one of ORIENTATIONS; random when None.
    """
    if shape is None:
        n = int(rng.choice([80, 96, 112, 128]))
        shape = (n, n, int(rng.integers(36, 64)))
    if orientation is None:
        orientation = str(rng.choice(ORIENTATIONS))
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation {orientation!r} is not one of {ORIENTATIONS}")

    # --- body and field of view (mm, RAS world) ---
    body_a = rng.uniform(135, 180)  # left-right semi-axis
    body_b = rng.uniform(95, 130)  # antero-posterior semi-axis
    fov_xy = 2 * body_a + rng.uniform(30, 90)
    sx = sy = fov_xy / shape[0]
    sz = rng.uniform(1.5, 5.0) * max(1.0, 48.0 / shape[2]) if shape[2] < 96 else rng.uniform(1.5, 3.0)
    fov_z = sz * shape[2]
    # The spleen's centre height; the FOV is placed around it, sometimes so that it is cut.
    spleen_z = 0.0
    if rng.random() < 0.15:
        z_center = spleen_z + rng.choice([-1, 1]) * rng.uniform(0.35, 0.5) * fov_z
    else:
        z_center = spleen_z + rng.uniform(-0.15, 0.15) * fov_z
    origin = np.array([-fov_xy / 2 + rng.uniform(-10, 10), -fov_xy / 2 + rng.uniform(-10, 10), z_center - fov_z / 2])
    grid = _Grid(shape, (sx, sy, sz), origin)

    hu = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)

    taper = rng.uniform(-0.08, 0.08)
    body = _cylinder_section(grid, 0.0, 0.0, body_a, body_b, taper, 0.0)
    fat_t = rng.uniform(8, 30)
    muscle_t = rng.uniform(6, 14)
    inner_muscle = _cylinder_section(grid, 0.0, 0.0, body_a - fat_t, body_b - fat_t, taper, 0.0)
    cavity = _cylinder_section(grid, 0.0, 0.0, body_a - fat_t - muscle_t, body_b - fat_t - muscle_t, taper, 0.0)
    body, inner_muscle, cavity = np.broadcast_arrays(body, inner_muscle, cavity)
    hu[body] = rng.uniform(-120, -80)  # subcutaneous fat
    hu[inner_muscle] = rng.uniform(35, 60)  # abdominal wall muscle
    hu[cavity] = rng.uniform(-90, -40)  # visceral fat / mesentery

    # Mesenteric texture: smooth random field inside the cavity.
    coarse = rng.normal(0, 1, size=tuple(max(2, s // 8) for s in shape)).astype(np.float32)
    texture = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=1)[
        : shape[0], : shape[1], : shape[2]
    ]
    tex = np.zeros(shape, np.float32)
    tex[: texture.shape[0], : texture.shape[1], : texture.shape[2]] = texture
    hu[cavity] += 25.0 * tex[cavity]

    cb = body_b - fat_t - muscle_t  # cavity semi-axes
    ca = body_a - fat_t - muscle_t

    # --- spine, paraspinal muscles, ribs ---
    vert_c = np.array([0.0, -cb + rng.uniform(20, 35), 0.0])
    vert_r = rng.uniform(14, 20)
    col = _ellipsoid(grid, vert_c, (vert_r, vert_r * 0.9, 1e4))
    _paint(hu, col, rng.uniform(700, 900))  # cortical bone
    _paint(hu, _ellipsoid(grid, vert_c, (vert_r - 3, vert_r * 0.9 - 3, 1e4)), rng.uniform(180, 320))
    canal_c = vert_c + np.array([0, -vert_r - 8, 0])
    _paint(hu, _ellipsoid(grid, canal_c, (9, 8, 1e4)), rng.uniform(700, 900))
    _paint(hu, _ellipsoid(grid, canal_c, (6, 5, 1e4)), rng.uniform(10, 30))
    for side in (-1, 1):
        _paint(hu, _ellipsoid(grid, vert_c + np.array([side * 38, -22, 0]), (26, 22, 1e4)), rng.uniform(40, 60))
    # Ribs: short bright arcs just inside the muscle wall, at a few heights.
    for zc in np.arange(grid.axes[2][0], grid.axes[2][-1], rng.uniform(25, 35)):
        for side in (-1, 1):
            ang = rng.uniform(0.6, 1.4)
            rib_c = np.array([side * (ca + 2) * math.cos(ang) * 0.95, -(cb + 2) * math.sin(ang) * 0.6, zc])
            _paint(hu, _ellipsoid(grid, rib_c, (6, 6, 5)), rng.uniform(500, 900))

    # --- vessels ---
    aorta_c = vert_c + np.array([rng.uniform(-12, -4), vert_r + 14, 0])
    vessel_hu = rng.uniform(130, 220)
    _paint(hu, _ellipsoid(grid, aorta_c, (11, 11, 1e4)), vessel_hu)
    ivc_c = vert_c + np.array([rng.uniform(18, 28), vert_r + 12, 0])
    _paint(hu, _ellipsoid(grid, ivc_c, (12, 9, 1e4)), vessel_hu - rng.uniform(10, 50))

    # --- per-case contrast of solid organs (portal-venous phase) ---
    liver_hu = rng.uniform(85, 135)
    spleen_hu = liver_hu + rng.uniform(-15, 35)
    kidney_hu = rng.uniform(140, 220)

    # --- liver (patient's right: x > 0), anterior-superior ---
    liver_c = np.array([ca * rng.uniform(0.35, 0.5), rng.uniform(-10, 20), rng.uniform(20, 70)])
    liver_ax = (ca * rng.uniform(0.55, 0.7), cb * rng.uniform(0.7, 0.85), rng.uniform(80, 110))
    _paint(hu, _ellipsoid(grid, liver_c, liver_ax, _rotation(rng, 20, 5)), liver_hu)
    # Left lobe reaching across the midline.
    _paint(hu, _ellipsoid(grid, liver_c + np.array([-ca * 0.5, cb * 0.3, 10]), (ca * 0.35, cb * 0.3, 45)), liver_hu)

    # --- kidneys (posterior, either side of the spine) ---
    kid_z = rng.uniform(-60, -10)
    kidneys = []
    for side in (-1, 1):
        kc = np.array([side * rng.uniform(55, 80), vert_c[1] + rng.uniform(5, 25), kid_z + side * rng.uniform(0, 20)])
        kax = (rng.uniform(22, 30), rng.uniform(20, 28), rng.uniform(45, 60))
        krot = _rotation(rng, 25, 10)
        _paint(hu, _ellipsoid(grid, kc, kax, krot), kidney_hu)
        _paint(hu, _ellipsoid(grid, kc + np.array([-side * 8, 4, 0]), np.array(kax) * 0.45, krot), rng.uniform(-40, 20))
        kidneys.append((kc, kax))

    # --- spleen (patient's left: x < 0, posterior), 50-600 ml ---
    target_ml = float(math.exp(rng.uniform(math.log(50), math.log(600))))
    base_axes = np.array([rng.uniform(0.45, 0.7), rng.uniform(0.8, 1.1), rng.uniform(1.0, 1.5)])
    crescent = rng.random() < 0.6
    cut_offset: np.ndarray | None
    cut_axes: np.ndarray | None
    if crescent:
        cut_offset = np.array([base_axes[0] * rng.uniform(0.9, 1.3), base_axes[1] * rng.uniform(0.1, 0.4), 0.0])
        cut_axes = base_axes * np.array([rng.uniform(0.8, 1.1), rng.uniform(0.6, 0.8), rng.uniform(0.6, 0.85)])
        frac = _spleen_shape_fraction(base_axes, cut_offset, cut_axes)
    else:
        cut_offset = cut_axes = None
        frac = 1.0
    unit_ml = 4.0 / 3.0 * math.pi * float(np.prod(base_axes)) * frac / 1000.0
    k = (target_ml / unit_ml) ** (1.0 / 3.0)
    sp_axes = base_axes * k
    touching = rng.random() < 0.35
    left_kidney_c, left_kidney_ax = kidneys[0]
    sp_x = -ca + sp_axes[0] + rng.uniform(2, 12)
    sp_y = -cb * rng.uniform(0.15, 0.45) + rng.uniform(-5, 5)
    sp_c = np.array([sp_x, sp_y, spleen_z])
    if touching:
        # Move towards the left kidney until the two nearly touch.
        direction = left_kidney_c - sp_c
        dist = np.linalg.norm(direction)
        gap = dist - (sp_axes.max() * 0.6 + max(left_kidney_ax) * 0.6)
        if gap > 0:
            sp_c = sp_c + direction / dist * gap * 0.8
    sp_rot = _rotation(rng, 35, 12)
    spleen = _ellipsoid(grid, sp_c, sp_axes, sp_rot)
    if spleen is not None and crescent:
        box, mask = spleen
        x, y, z = grid.coords(box)
        d = np.stack(np.broadcast_arrays(x - sp_c[0], y - sp_c[1], z - sp_c[2]))
        uvw = np.tensordot(sp_rot.T, d, axes=1)
        # The cut sits on the medial-anterior (hilar) side: +u points towards the midline.
        co, ca_ = cut_offset * k, cut_axes * k
        cut = ((uvw[0] - co[0]) / ca_[0]) ** 2 + ((uvw[1] - co[1]) / ca_[1]) ** 2 + ((uvw[2] - co[2]) / ca_[2]) ** 2 <= 1
        spleen = (box, mask & ~cut)
    # Stomach: left anterior of the spleen, fluid with a gas cap; sometimes touching the spleen.
    st_gap = rng.uniform(-2, 4) if touching else rng.uniform(8, 25)
    st_c = sp_c + np.array([rng.uniform(35, 55) + sp_axes[0] * 0.3, sp_axes[1] * 0.6 + st_gap + 25, rng.uniform(0, 30)])
    st_ax = (rng.uniform(30, 45), rng.uniform(25, 35), rng.uniform(35, 55))
    _paint(hu, _ellipsoid(grid, st_c, st_ax), rng.uniform(25, 45) if rng.random() < 0.5 else spleen_hu - rng.uniform(10, 30))
    _paint(hu, _ellipsoid(grid, st_c + np.array([0, st_ax[1] * 0.5, 0]), np.array(st_ax) * 0.5), rng.uniform(-1000, -900))
    # Spleen painted last so neighbours never overwrite the label.
    _paint(hu, spleen, spleen_hu, label, 1)
    # Occasional splenic lesion (hypodense): still spleen in the label.
    if spleen is not None and rng.random() < 0.2:
        les_c = sp_c + rng.uniform(-0.3, 0.3, 3) * sp_axes
        les = _ellipsoid(grid, les_c, sp_axes * rng.uniform(0.1, 0.25))
        if les is not None:
            box, mask = les
            keep = label[box].astype(bool) & mask
            hu[box][keep] = spleen_hu - rng.uniform(40, 80)

    # --- bowel gas pockets and fluid-filled loops in the anterior abdomen ---
    for _ in range(int(rng.integers(3, 9))):
        c = np.array([rng.uniform(-0.6, 0.6) * ca, rng.uniform(0.0, 0.7) * cb, rng.uniform(grid.axes[2][0], grid.axes[2][-1])])
        ax = rng.uniform(6, 18, 3)
        if rng.random() < 0.5:
            _paint(hu, _ellipsoid(grid, c, ax), rng.uniform(-1000, -700))
        else:
            _paint(hu, _ellipsoid(grid, c, ax * 1.5), rng.uniform(0, 60))
    # Nothing outside the body but air.
    hu[~body] = -1000.0
    label[~body] = 0

    # --- partial-volume blur and noise ---
    blur = rng.uniform(0.4, 0.9)
    hu = ndimage.gaussian_filter(hu, sigma=blur, truncate=2.0)
    hu += rng.normal(0.0, rng.uniform(6, 22), size=shape).astype(np.float32)
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = origin
    image, label, affine = _reorient(image, label, affine, orientation)
    spleen_ml = float(label.sum()) * sx * sy * sz / 1000.0
    return Case(image=image, label=label, affine=affine, orientation=orientation, spleen_ml=spleen_ml)


def _reorient(image: np.ndarray, label: np.ndarray, affine: np.ndarray, code: str):
    """Store a RAS-ordered array in the orientation `code` (flips only), keeping world positions."""
    src = nib.orientations.axcodes2ornt("RAS")
    dst = nib.orientations.axcodes2ornt(code)
    transform = nib.orientations.ornt_transform(src, dst)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, image.shape)
    image = np.ascontiguousarray(nib.orientations.apply_orientation(image, transform))
    label = np.ascontiguousarray(nib.orientations.apply_orientation(label, transform))
    return image, label, new_affine


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def write_dataset(
    out: str | Path,
    cases: int,
    *,
    seed: int = 0,
    test_cases: int | None = None,
    shape: tuple[int, int, int] | None = None,
) -> dict:
    """Write a complete Decathlon-layout dataset and return its `dataset.json` content.

    Args:
        out: output directory (created).
        cases: number of labelled training cases (imagesTr/labelsTr).
        seed: seed; the same seed gives the same files.
        test_cases: number of unlabelled test images (imagesTs); default max(1, cases // 4).
        shape: fixed voxel grid for every case (default: random moderate sizes).
    """
    if cases < 1:
        raise ValueError(f"cases must be at least 1, got {cases}")
    out = Path(out)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    n_test = max(1, cases // 4) if test_cases is None else test_cases
    training, test, facts = [], [], {}
    for idx in range(cases + n_test):
        # One generator per case: case i is the same whatever the number of cases.
        rng = np.random.default_rng([seed, idx])
        case = generate_case(rng, shape=shape)
        name = f"spleen_{idx + 1:03d}.nii.gz"
        if idx < cases:
            write_nifti(out / "imagesTr" / name, case.image, case.affine)
            write_nifti(out / "labelsTr" / name, case.label, case.affine)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            write_nifti(out / "imagesTs" / name, case.image, case.affine)
            # Held-out labels are kept apart so evaluation on the test split stays possible.
            (out / "labelsTs").mkdir(exist_ok=True)
            write_nifti(out / "labelsTs" / name, case.label, case.affine)
            test.append(f"./imagesTs/{name}")
        facts[name] = {"orientation": case.orientation, "spleen_ml": round(case.spleen_ml, 1), "shape": list(case.image.shape)}
    meta = {
        "name": "SyntheticSpleen",
        "description": "Synthetic abdominal CT phantoms with spleen labels (spleen-deepedit synth)",
        "reference": "generated by spleen-deepedit; not patient data",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
        "synthetic": {"seed": seed, "cases": facts},
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return meta
