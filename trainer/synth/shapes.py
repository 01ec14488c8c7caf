"""Primitive shapes in world millimetres, evaluated only inside their bounding boxes.

Every shape is returned as `(box, mask)`: index slices of the voxel grid and a boolean mask that
broadcasts to that box, or None when the shape lies outside the grid. Painting a shape costs the
voxels of its box, not of the volume, which keeps 512x512x400 grids affordable.
"""

from __future__ import annotations

import math

import numpy as np

from .geometry import Grid

Shape = tuple[tuple[slice, ...], np.ndarray] | None


def rotation(rng: np.random.Generator, max_deg_z: float, max_deg_tilt: float) -> np.ndarray:
    """A rotation matrix: random yaw about z plus a small tilt about x."""
    a = math.radians(rng.uniform(-max_deg_z, max_deg_z))
    b = math.radians(rng.uniform(-max_deg_tilt, max_deg_tilt))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


def ellipsoid(grid: Grid, center, axes, rot: np.ndarray | None = None) -> Shape:
    """An ellipsoid with semi-axes `axes` (mm), optionally rotated (columns: its axes in world)."""
    center = np.asarray(center, dtype=np.float64)
    axes = np.asarray(axes, dtype=np.float64)
    if rot is None:
        box = grid.box_extent(center, axes)
    else:
        # Exact half-extent of a rotated ellipsoid along each world axis.
        box = grid.box_extent(center, np.sqrt(((rot * axes[None, :]) ** 2).sum(axis=1)))
    if box is None:
        return None
    x, y, z = grid.coords(box)
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    if rot is None:
        return box, (dx / axes[0]) ** 2 + (dy / axes[1]) ** 2 + (dz / axes[2]) ** 2 <= 1.0
    q: np.ndarray = np.zeros((1, 1, 1), np.float32)
    for j in range(3):
        # Coordinate along the ellipsoid's own axis j: column j of R dotted with (p - c).
        q = q + ((rot[0, j] * dx + rot[1, j] * dy + rot[2, j] * dz) / axes[j]) ** 2
    return box, q <= 1.0


def column(grid: Grid, cx: float, cy: float, a: float, b: float) -> Shape:
    """An elliptical column along the whole z axis (spine, aorta, arms)."""
    return ellipsoid(grid, (cx, cy, grid.center_z), (a, b, 1e6))


def capsule(grid: Grid, p0, p1, radius: float) -> Shape:
    """Points within `radius` mm of the segment p0-p1 (one piece of a tube)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    lo, hi = np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius
    box = grid.box_extent((lo + hi) / 2, (hi - lo) / 2)
    if box is None:
        return None
    x, y, z = grid.coords(box)
    d = p1 - p0
    dd = max(float(d @ d), 1e-9)
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / dd, 0.0, 1.0)
    dist2 = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
    return box, dist2 <= radius * radius


def tube(grid: Grid, points: np.ndarray, radius: float) -> list[Shape]:
    """A tube along a polyline (vessels, pancreas, colon), as one capsule per segment."""
    return [capsule(grid, points[i], points[i + 1], radius) for i in range(len(points) - 1)]


def wiggly_path(rng: np.random.Generator, start, end, pieces: int, amplitude: float) -> np.ndarray:
    """A polyline from start to end with its inner points displaced by up to `amplitude` mm."""
    t = np.linspace(0.0, 1.0, pieces + 1)[:, None]
    pts = np.asarray(start, float) * (1 - t) + np.asarray(end, float) * t
    pts[1:-1] += rng.uniform(-amplitude, amplitude, size=(pieces - 1, 3))
    return pts


def paint(
    volume: np.ndarray, shape: Shape, value, within: np.ndarray | None = None, label: np.ndarray | None = None
) -> None:
    """Set `value` where the shape is (and `within`, a full-volume mask, where given).

    `value` is a number or an array broadcastable to the shape's box (a textured organ).
    """
    if shape is None:
        return
    box, mask = shape
    view = volume[box]
    mask = np.broadcast_to(mask, view.shape)
    if within is not None:
        mask = mask & within[box]
    if np.ndim(value):
        view[mask] = np.broadcast_to(value, view.shape)[mask]
    else:
        view[mask] = value
    if label is not None:
        label[box][mask] = 1


def paint_all(volume: np.ndarray, shapes: list[Shape], value, within: np.ndarray | None = None) -> None:
    for s in shapes:
        paint(volume, s, value, within)


def smooth_planes(rng: np.random.Generator, shape: tuple[int, int, int], cells: tuple[int, int, int]):
    """A smooth random field as in-plane lattice planes plus, per slice, (lower plane, weight).

    Trilinear interpolation of a coarse Gaussian lattice about `cells[d]` voxels apart along axis d:
    slice k of the field is `planes[i0[k]] * (1 - w[k]) + planes[i0[k] + 1] * w[k]`. Only the planes
    (a few 2-D arrays) are built here; callers blend the slices they need, so no full-volume
    temporary is ever allocated (page-faulting fresh memory dominates at 512x512x400).
    """
    lattice = rng.standard_normal(tuple(s // max(c, 1) + 2 for s, c in zip(shape, cells)), dtype=np.float32)
    out = lattice
    for axis in (0, 1):
        out = _interp_axis(out, axis, shape[axis], cells[axis])
    pos = np.linspace(0.0, (shape[2] - 1) / max(cells[2], 1), shape[2])
    i0 = np.minimum(pos.astype(int), lattice.shape[2] - 2)
    return np.moveaxis(out, 2, 0).copy(), i0, (pos - i0).astype(np.float32)


def _interp_axis(a: np.ndarray, axis: int, n: int, cell: int) -> np.ndarray:
    m = a.shape[axis]
    pos = np.linspace(0.0, (n - 1) / max(cell, 1), n)
    i0 = np.minimum(pos.astype(int), m - 2)
    w = (pos - i0).astype(np.float32).reshape([-1 if d == axis else 1 for d in range(a.ndim)])
    return np.take(a, i0, axis=axis) * (1 - w) + np.take(a, i0 + 1, axis=axis) * w


def fraction_after_cut(axes: np.ndarray, cut_offset: np.ndarray, cut_axes: np.ndarray) -> float:
    """Fraction of an ellipsoid's volume left after an ellipsoidal cut, counted on a 40^3 lattice."""
    n = 40
    t = (np.arange(n) + 0.5) / n * 2 - 1
    u, v, w = np.meshgrid(t, t, t, indexing="ij")
    inside = u**2 + v**2 + w**2 <= 1
    cu = (u * axes[0] - cut_offset[0]) / cut_axes[0]
    cv = (v * axes[1] - cut_offset[1]) / cut_axes[1]
    cw = (w * axes[2] - cut_offset[2]) / cut_axes[2]
    cut = cu**2 + cv**2 + cw**2 <= 1
    return float((inside & ~cut).sum() / max(inside.sum(), 1))
