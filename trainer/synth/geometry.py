"""Scan geometry of a phantom: voxel grid, spacing and field of view, and the file orientation.

Two geometries (`GEOMETRIES`):

- ``compact`` (the default; tests and the demo): 80-128 voxels in-plane, 36-64 slices, the field of
  view roughly centred on the spleen and sometimes cutting it;
- ``clinical``: what a scanner writes for an abdominal CT: in-plane spacing 0.6-1.0 mm (a 384-512
  matrix over a 300-500 mm field of view), slices 1.25-5 mm over 300-500 mm in z, from the lung
  bases to the pelvis, so that the spleen sits high in a long scan.

World space is RAS+ millimetres with the spleen's centre at z = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import nibabel as nib
import numpy as np

GEOMETRIES: tuple[str, ...] = ("compact", "clinical")

# Slice thicknesses of clinical abdominal CT reconstructions and how often each is drawn.
_CLINICAL_SLICES_MM = (1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
_CLINICAL_SLICES_P = (0.15, 0.15, 0.15, 0.2, 0.15, 0.2)


@dataclass(frozen=True, kw_only=True, slots=True)
class ScanGeometry:
    """A RAS-ordered voxel grid: `shape` voxels of `spacing` mm starting at `origin` (mm)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = self.origin
        return affine


def check_geometry(geometry: str) -> str:
    if geometry not in GEOMETRIES:
        raise ValueError(
            f"geometry {geometry!r} is not one of {GEOMETRIES}: use 'compact' (small, fast) "
            "or 'clinical' (scanner-like 0.6-1.0 mm in-plane, 300-500 mm long)"
        )
    return geometry


def check_shape(shape: tuple[int, int, int] | None) -> None:
    if shape is not None and (len(shape) != 3 or min(shape) < 1):
        raise ValueError(f"shape {tuple(shape)!r} must be three positive voxel counts, e.g. (96, 96, 48)")


def sample_geometry(
    rng: np.random.Generator, geometry: str, shape: tuple[int, int, int] | None, body_a: float, spleen_half_z: float
) -> ScanGeometry:
    """Draw the grid for a body of left-right semi-axis `body_a` mm around a spleen centred at z = 0.

    A given `shape` fixes the matrix; the field of view is drawn as for that geometry and the spacing
    follows from it.
    """
    if check_geometry(geometry) == "compact":
        return _compact(rng, shape, body_a)
    return _clinical(rng, shape, body_a, spleen_half_z)


def _compact(rng: np.random.Generator, shape: tuple[int, int, int] | None, body_a: float) -> ScanGeometry:
    if shape is None:
        n = int(rng.choice([80, 96, 112, 128]))
        shape = (n, n, int(rng.integers(36, 64)))
    fov_xy = 2 * body_a + rng.uniform(30, 90)
    sx = fov_xy / shape[0]
    sz = rng.uniform(1.5, 5.0) * max(1.0, 48.0 / shape[2]) if shape[2] < 96 else rng.uniform(1.5, 3.0)
    fov_z = sz * shape[2]
    # The field of view is placed around the spleen, sometimes so that it cuts it.
    if rng.random() < 0.15:
        z_center = rng.choice([-1, 1]) * rng.uniform(0.35, 0.5) * fov_z
    else:
        z_center = rng.uniform(-0.15, 0.15) * fov_z
    origin = (-fov_xy / 2 + rng.uniform(-10, 10), -fov_xy / 2 + rng.uniform(-10, 10), z_center - fov_z / 2)
    return ScanGeometry(shape=(int(shape[0]), int(shape[1]), int(shape[2])), spacing=(sx, sx, sz), origin=origin)


def _clinical(
    rng: np.random.Generator, shape: tuple[int, int, int] | None, body_a: float, spleen_half_z: float
) -> ScanGeometry:
    n = int(rng.choice([384, 448, 512], p=[0.15, 0.15, 0.7]))
    lo, hi = max(300.0, 0.6 * n, 2 * body_a + 20), min(500.0, 1.0 * n)
    if lo > hi:  # this body does not fit that matrix at <= 1 mm: the usual 512
        n, lo, hi = 512, max(307.2, 2 * body_a + 20), 500.0
    fov_xy = rng.uniform(lo, hi)
    sz = float(rng.choice(_CLINICAL_SLICES_MM, p=_CLINICAL_SLICES_P))
    # Lung bases above, pelvis below: the top of the scan is a few cm above the spleen's top, and
    # the scan reaches at least 12 cm below its lower pole (the spleen sits high, always whole).
    top = spleen_half_z + rng.uniform(50, max(50.0, min(130.0, 330.0 - 2 * spleen_half_z)))
    fov_z = rng.uniform(min(max(300.0, top + spleen_half_z + 120), 500.0), 500.0)
    nz = max(1, int(round(fov_z / sz)))
    if shape is None:
        shape = (n, n, nz)
    else:
        sz = fov_z / shape[2]
    sx = fov_xy / shape[0]
    origin = (-fov_xy / 2 + rng.uniform(-10, 10), -fov_xy / 2 + rng.uniform(-10, 10), top - sz * shape[2])
    return ScanGeometry(shape=(int(shape[0]), int(shape[1]), int(shape[2])), spacing=(sx, sx, sz), origin=origin)


class Grid:
    """World coordinates (RAS mm) of a RAS-ordered voxel grid, evaluated lazily per bounding box."""

    def __init__(self, geo: ScanGeometry):
        self.shape = geo.shape
        self.spacing = np.asarray(geo.spacing, dtype=np.float64)
        self.origin = np.asarray(geo.origin, dtype=np.float64)
        self.axes = [(self.origin[d] + np.arange(self.shape[d]) * self.spacing[d]).astype(np.float32) for d in range(3)]
        self.center_z = float(self.origin[2] + (self.shape[2] - 1) * self.spacing[2] / 2)

    def box_extent(self, center, half) -> tuple[slice, ...] | None:
        """Index slices of the axis-aligned box of half-sizes `half` (mm) around `center`."""
        out = []
        for d in range(3):
            lo = int(math.floor((center[d] - half[d] - self.origin[d]) / self.spacing[d]))
            hi = int(math.ceil((center[d] + half[d] - self.origin[d]) / self.spacing[d])) + 1
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

    def z_index(self, z_mm: float) -> int:
        """The slice index nearest to height `z_mm`, clipped to the grid."""
        return int(np.clip(round((z_mm - self.origin[2]) / self.spacing[2]), 0, self.shape[2] - 1))


def reorient(image: np.ndarray, label: np.ndarray, affine: np.ndarray, code: str):
    """Store a RAS-ordered array in the orientation `code` (flips only), keeping world positions."""
    src = nib.orientations.axcodes2ornt("RAS")
    dst = nib.orientations.axcodes2ornt(code)
    transform = nib.orientations.ornt_transform(src, dst)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, image.shape)
    image = np.ascontiguousarray(nib.orientations.apply_orientation(image, transform))
    label = np.ascontiguousarray(nib.orientations.apply_orientation(label, transform))
    return image, label, new_affine
