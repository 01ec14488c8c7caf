"""Click-centred refinement: the network run on a window around the clicks at a fine, physical spacing.

The whole scan is resized to one coarse grid (cpu 64x64x32: ~6x6x12 mm on a 400 mm scan), so a click
answered there can only move the mask by whole grid voxels. Here a second view is kept for each scan:
the **fine volume**, the windowed scan in RAS order at the profile's window spacing
(`Profile.window_mm` over its grid: 2x2x4 mm for cpu; area-downsampled, or linearly upsampled where
the scan is coarser), so a window means the same millimetres on every scan, in training and at
inference. A **window** is a box of that fine volume holding every click with a margin, resized
(area) to the profile's grid; the network answers it with the clicks inside as guidance, and its answer
replaces the automatic mask inside the box, blended over a ramp at its faces (`blend_into`).

Training draws the same windows (`trainer.transforms.RandWindowd`) from the same fine volume
(`fine_volume`), so the network learns both views; only checkpoints trained with windows
(`window_prob > 0` in their config) refine by default (`Predictor(refine=...)`).

Coordinates: scan voxel j (RAS order, N along an axis) is the continuous point j + 0.5; fine voxel f
covers [f N / F, (f + 1) N / F) of it (area pooling); window grid voxel g covers fine
[lo + g L / G, lo + (g + 1) L / G). Every resampling here is separable along the RAS axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai import transforms as mt

from .geometry import ras_index
from .transforms import RAS_LABELS, ResizeBeforeOrientd

#: The blend ramp at the window's faces, in window grid voxels: the window's answer has weight 0 at a
#: face, 1 from this far inside (its border voxels see zero padding or cut anatomy).
BLEND_RAMP = 3.0
#: Fine volumes hold [0, 1] values in this many steps (uint8).
FINE_LEVELS = 255
#: Most voxels a fine volume reaches by upsampling a scan coarser than the window spacing (16 MB as
#: bytes; cpu's 2x2x4 mm: a 512x512x1000 mm extent). Downsampled axes are bounded by the scan itself.
FINE_MAX_VOXELS = 1 << 24
#: Clicks within this many window grids of each other (every axis) share one window; farther ones get
#: their own, so a click far from the others does not coarsen their window.
CLUSTER_REACH = 0.5
#: Most windows one prediction runs: when clicks form more clusters, the closest clusters merge until
#: this many are left (`cluster_clicks(most=)`: wider windows), so a request's cost is bounded whatever
#: its clicks (up to `max_clicks_per_label` a label at the service) and every window fits the cache.
MAX_WINDOWS = 8
#: How far each click lies at least from the window's faces, as a fraction of the grid: one click sits
#: in the middle; clicks spread wider than half the grid make the window (and its spacing) larger.
CLICK_MARGIN = 0.25


def trained_with_windows(config: Mapping[str, Any], profile: Any) -> bool:
    """Whether a checkpoint's stored training config drew refinement windows (absent: an older or
    model-zoo checkpoint, which never did; None: the profile's default)."""
    if "window_prob" not in config:
        return False
    value = config["window_prob"]
    return bool((profile.window_prob if value is None else value) > 0)


def ras_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) of an affine's array, in RAS axis order."""
    affine = np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(affine)
    sizes = nib.affines.voxel_sizes(affine)
    out = np.empty(3)
    for axis, (ras_axis, _flip) in enumerate(ornt):
        out[int(ras_axis)] = sizes[axis]
    return out


def fine_shape(
    ras_shape: Sequence[int], spacing: Sequence[float] | np.ndarray, window_spacing: Sequence[float]
) -> tuple[int, ...]:
    """The fine volume's shape: each axis at the window spacing (the scan's extent over it, rounded).

    Exactly that spacing, not merely no finer: a network trained on 3.5 mm scans whose fine volumes
    kept 3.5 mm learnt windows of 224 mm, and on 0.7 mm scans was asked about 128 mm windows; its
    first click then lowered the mean dice (docs/evaluation.md, "The clinical geometry").

    Upsampling is bounded: where it would make more than `FINE_MAX_VOXELS` voxels (a scan over
    ~500x500x1000 mm coarser than the window spacing, or a small upload declaring huge voxels), the
    upsampled axes shrink by one common factor, never below the scan's own size: a fine volume is
    never much larger than the scan that the service has admitted and priced.
    """
    target = [max(1, int(round(n * s / w))) for n, s, w in zip(ras_shape, spacing, window_spacing)]
    up = [t > int(n) for t, n in zip(target, ras_shape)]
    if any(up) and math.prod(target) > FINE_MAX_VOXELS:
        kept = math.prod(t for t, u in zip(target, up) if not u)
        grown = math.prod(t for t, u in zip(target, up) if u)
        factor = (FINE_MAX_VOXELS / kept / grown) ** (1.0 / sum(up))
        target = [max(int(n), int(t * factor)) if u else t for t, n, u in zip(target, ras_shape, up)]
    return tuple(target)


def window_spacing(grid: Sequence[int], window_mm: float) -> tuple[float, float, float]:
    """The spacing at which `grid` spans `window_mm` on every axis (cpu 64x64x32 over 128 mm: 2x2x4 mm)."""
    return tuple(float(window_mm) / int(g) for g in grid)  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Window:
    """A box of the fine volume: `size` fine voxels from `lo` on each RAS axis (may reach outside it)."""

    lo: tuple[int, int, int]
    size: tuple[int, int, int]

    @classmethod
    def centred(cls, centre: np.ndarray, size: np.ndarray) -> Window:
        """The box of `size` fine voxels whose middle lies nearest `centre` (continuous fine coordinates:
        voxel f spans [f, f + 1)); inference (`window_around`) and training (`draw_window`) both cut so."""
        size = np.asarray(size).astype(int)
        lo = np.floor(np.asarray(centre, dtype=np.float64) - size / 2 + 0.5).astype(int)
        return cls(lo=tuple(int(v) for v in lo), size=tuple(int(v) for v in size))  # type: ignore[arg-type]


def window_around(points: np.ndarray, grid: Sequence[int]) -> Window:
    """The window holding fine-volume points (K, 3), each at least `CLICK_MARGIN` of the grid from a face.

    One scale for all axes (the window keeps the training windows' aspect); at least the grid itself.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    grid_arr = np.asarray(grid, dtype=np.float64)
    lo_pt, hi_pt = points.min(axis=0), points.max(axis=0)
    scale = max(1.0, float(np.max((hi_pt - lo_pt + 1 + 2 * CLICK_MARGIN * grid_arr) / grid_arr)))
    size = np.ceil(grid_arr * scale - 1e-9).astype(int)
    return Window.centred((lo_pt + hi_pt + 1) / 2, size)


def cluster_clicks(
    points: np.ndarray, grid: Sequence[int], reach: float = CLUSTER_REACH, most: int | None = None
) -> list[np.ndarray]:
    """Clicks that share a window: single linkage, two clicks linked when they lie within `reach`
    grids of each other on every axis. With `most`, where that gives more clusters, the closest ones
    merge until `most` are left (the spanning tree's shortest links kept; ties broken by position).
    Each cluster is an array of row indices into `points`; the clusters are ordered by their smallest
    point, so neither the order of the clicks nor their labels change the windows."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if not np.isfinite(points).all():
        raise ValueError("click coordinates must be finite")
    n = len(points)
    if n <= 1:
        return [np.arange(n)] if n else []
    order = np.lexsort(points.T[::-1])  # one order whatever the clicks' order: ties break alike
    unit = points[order] / np.asarray(grid, dtype=np.float64)
    dist = np.abs(unit[:, None, :] - unit[None, :, :]).max(axis=2) + 1e-12  # + eps: 0 means "no edge"
    np.fill_diagonal(dist, 0.0)
    tree = minimum_spanning_tree(dist).tocoo()
    rank = np.argsort(tree.data, kind="stable")
    keep = int(np.sum(tree.data <= reach + 1e-12))
    if most is not None:
        keep = max(keep, n - most)
    chosen = rank[:keep]
    links = coo_matrix((np.ones(keep), (tree.row[chosen], tree.col[chosen])), shape=(n, n))
    _, sorted_labels = connected_components(links, directed=False)
    labels = np.empty(n, dtype=np.intp)
    labels[order] = sorted_labels
    clusters = [np.flatnonzero(labels == k) for k in range(labels.max() + 1)]
    return sorted(clusters, key=lambda rows: tuple(points[rows].min(axis=0)))


def plan_windows(prepared: Any, clicks: Mapping[str, list], grid: Sequence[int]) -> list[tuple[tuple, Window, dict]]:
    """Per cluster of `clicks` (original voxel indices) on a prepared volume: (cache key, window, its
    guidance: every click inside the window, in window grid voxels). At most `MAX_WINDOWS` clusters."""
    if prepared.fine is None:
        raise ValueError("this volume was prepared without refinement: prepare it with the refining predictor")
    fine = tuple(prepared.fine.shape)
    names = [name for name, pts in clicks.items() for _ in pts]
    points = scan_to_fine(
        np.array([ras_index(q, prepared) for pts in clicks.values() for q in pts]).reshape(-1, 3),
        prepared.ras_shape,
        fine,
    )
    plans = []
    for rows in cluster_clicks(points, grid, most=MAX_WINDOWS):
        window = window_around(points[rows], grid)
        guidance: dict[str, list] = {name: [] for name in clicks}
        for name, point in zip(names, points):
            guidance[name] += to_window(point, window, grid)
        key = (window, tuple((name, tuple(sorted(pts))) for name, pts in sorted(guidance.items())))
        plans.append((key, window, guidance))
    return plans


def crop(volume: torch.Tensor, window: Window, grid: Sequence[int]) -> torch.Tensor:
    """(F...) fine volume (uint8, `fine_volume`) -> (1, G...) float32 in [0, 1]: the window's box (zero
    outside the volume), area-resized (PyTorch's own: the box is small and contiguous)."""
    box = torch.zeros(window.size, dtype=torch.float32)
    src, dst = [], []
    for lo, size, n in zip(window.lo, window.size, volume.shape):
        a, b = max(lo, 0), min(lo + size, n)
        if a >= b:
            return torch.zeros((1, *grid))
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    box[tuple(dst)] = volume[tuple(src)].float() / FINE_LEVELS
    return F.interpolate(box[None, None], size=tuple(grid), mode="area")[0]


def to_window(points: np.ndarray, window: Window, grid: Sequence[int]) -> list[tuple[int, int, int]]:
    """Fine-volume points (K, 3) -> window grid voxels (rounded; those outside the window dropped)."""
    out = []
    for p in np.asarray(points, dtype=np.float64).reshape(-1, 3):
        g = (p + 0.5 - np.asarray(window.lo)) * np.asarray(grid) / np.asarray(window.size) - 0.5
        idx = np.rint(g).astype(int)
        if np.all(idx >= 0) and np.all(idx < np.asarray(grid)):
            out.append((int(idx[0]), int(idx[1]), int(idx[2])))
    return out


def scan_to_fine(points: np.ndarray, ras_shape: Sequence[int], fine: Sequence[int]) -> np.ndarray:
    """RAS scan indices (K, 3) -> continuous fine indices (voxel centre j + 0.5 mapped, minus 0.5)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return (points + 0.5) * np.asarray(fine) / np.asarray(ras_shape) - 0.5


def scan_box(window: Window, ras_shape: Sequence[int], fine: Sequence[int]) -> tuple[slice, slice, slice] | None:
    """The RAS scan voxels whose centres lie inside the window (None: none do)."""
    out = []
    for lo, size, n, f in zip(window.lo, window.size, ras_shape, fine):
        a = max(0, math.ceil(lo * n / f - 0.5))
        b = min(n, math.ceil((lo + size) * n / f - 0.5))
        if a >= b:
            return None
        out.append(slice(a, b))
    return tuple(out)  # type: ignore[return-value]


def _coords(box: slice, n: int, f: int, lo: float, size: float, g: int) -> torch.Tensor:
    """Continuous grid coordinates (align_corners=False) of scan voxels `box` on a grid of g over fine [lo, lo + size)."""
    j = torch.arange(box.start, box.stop, dtype=torch.float64)
    return ((j + 0.5) * f / n - lo) * g / size - 0.5


def _linear_matrix(coords: torch.Tensor, g: int) -> torch.Tensor:
    """(n, g) trilinear weights at `coords`, clamped to the grid as `F.interpolate(align_corners=False)`."""
    c = coords.clamp(0, g - 1)
    i0 = c.floor().long().clamp(max=g - 1)
    i1 = (i0 + 1).clamp(max=g - 1)
    frac = (c - i0).float()
    m = torch.zeros(len(c), g)
    rows = torch.arange(len(c))
    m[rows, i0] += 1 - frac
    m[rows, i1] += frac
    return m


def sample(
    values: torch.Tensor, box: Sequence[slice], ras_shape: Sequence[int], fine: Sequence[int], window: Window | None
) -> torch.Tensor:
    """Trilinear values of a grid (G...) at the centres of scan voxels `box`; window None: the whole-scan grid."""
    weights = []
    for axis in range(3):
        g = values.shape[axis]
        if window is None:
            coords = _coords(box[axis], ras_shape[axis], ras_shape[axis], 0.0, ras_shape[axis], g)
        else:
            coords = _coords(box[axis], ras_shape[axis], fine[axis], window.lo[axis], window.size[axis], g)
        weights.append(_linear_matrix(coords, g))
    # One axis at a time, each product contiguous in (x, y, z) order: the blend's element-wise steps
    # on a permuted result (tensordot + movedim) ran several times slower.
    g0, g1, g2 = values.shape
    out = (weights[0] @ values.float().reshape(g0, g1 * g2)).reshape(-1, g1, g2)
    out = torch.matmul(weights[1], out)
    return out @ weights[2].T


def taper(
    box: Sequence[slice],
    ras_shape: Sequence[int],
    fine: Sequence[int],
    window: Window,
    grid: Sequence[int],
    ramp: float = BLEND_RAMP,
) -> torch.Tensor:
    """The window's blend weight at scan voxels `box`: 0 at its faces, 1 from `ramp` grid voxels inside."""
    weights = []
    for axis in range(3):
        g = grid[axis]
        c = _coords(box[axis], ras_shape[axis], fine[axis], window.lo[axis], window.size[axis], g) + 0.5
        weights.append(torch.minimum(c, g - c).div(ramp).clamp(0, 1).float())
    return torch.minimum(torch.minimum(weights[0][:, None, None], weights[1][None, :, None]), weights[2][None, None, :])


def _union(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, slice, slice]:
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))  # type: ignore[return-value]


def _overlap(a: tuple[slice, ...], b: tuple[slice, ...]) -> bool:
    return all(x.start < y.stop and y.start < x.stop for x, y in zip(a, b))


def _groups(boxes: list[tuple[slice, ...]]) -> list[list[int]]:
    """Indices of boxes grouped by overlap (transitively), each group in the boxes' order."""
    groups: list[list[int]] = []
    for k, box in enumerate(boxes):
        touching = [g for g in groups if any(_overlap(box, boxes[i]) for i in g)]
        merged = sorted([k, *(i for g in touching for i in g)])
        groups = [g for g in groups if g not in touching] + [merged]
    return groups


def click_sign(guidance: Mapping[str, list]) -> int:
    """+1: a window guided by spleen clicks only (it may only add spleen), -1: background clicks only (it
    may only remove spleen), 0: both (it may do either), as users expect of a click."""
    spleen, background = bool(guidance.get("spleen")), bool(guidance.get("background"))
    return 0 if spleen == background else (1 if spleen else -1)


def window_to_scan(
    points: Sequence[Sequence[int]], window: Window, grid: Sequence[int], ras_shape: Sequence[int], fine: Sequence[int]
) -> np.ndarray:
    """Window grid voxels -> continuous RAS scan indices of their centres (the inverse of `to_window`)."""
    g = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    f = np.asarray(window.lo) + (g + 0.5) * np.asarray(window.size) / np.asarray(grid) - 0.5
    return (f + 0.5) * np.asarray(ras_shape) / np.asarray(fine) - 0.5


def near_clicks(
    box: Sequence[slice], clicks: np.ndarray, spacing: Sequence[float], radius_mm: float, changed: np.ndarray
) -> torch.Tensor:
    """Where a window may change the mask: click locality in mm (`locality.piece_weight` with the scan's
    spacing): exp(-d^2 / 2 r^2) with d the distance in mm to the nearest click, and 1 on each connected
    piece of `changed` (the voxels the window flips) that holds a click, so a click in a missed spleen
    or a false-positive blob takes all of it. `clicks`: RAS scan indices (K, 3); `box`: where `changed` lies."""
    from .locality import piece_weight

    local = np.asarray(clicks, dtype=np.float64).reshape(-1, 3) - np.array([b.start for b in box])
    return piece_weight(list(local), torch.from_numpy(changed), radius_mm, opening=False, spacing=spacing)


def blend_into(
    global_logit: torch.Tensor,
    answers: Sequence[tuple[Window, torch.Tensor, int, np.ndarray]],
    ras_shape: Sequence[int],
    fine: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    radius_mm: float = 0.0,
) -> list[tuple[tuple[slice, slice, slice], np.ndarray]]:
    """The refined mask inside the windows: a list of (RAS box, uint8 mask of the box).

    Per box voxel, starting from the whole-scan probability, each window in turn (the clusters'
    order) sets p = w sigmoid(window) + (1 - w) p, each logit interpolated trilinearly to the scan
    voxel centres, w = `taper`; spleen where p > 0.5. A window with a `click_sign` only raises (+1) or
    only lowers (-1) p. With `radius_mm` > 0 a window changes p only near its clicks (`near_clicks`: the
    answer's 4th item, RAS scan indices; `spacing`: the scan's voxel size in RAS order). Overlapping
    windows are blended on the union of their boxes, so the later one's ramp fades into the earlier one's.
    """
    found = [
        (w, logit, sign, box, pts)
        for w, logit, sign, pts in answers
        if (box := scan_box(w, ras_shape, fine)) is not None
    ]
    out = []
    for group in _groups([f[3] for f in found]):
        union = _union([found[k][3] for k in group])
        p = sample(global_logit, union, ras_shape, fine, None).sigmoid_()
        for k in group:
            window, logit, sign, box, points = found[k]
            sub = tuple(slice(b.start - u.start, b.stop - u.start) for b, u in zip(box, union))
            old = p[sub]
            # In place on the window's own buffers: a 128 mm box of a 0.7 mm scan is ~3.4 M voxels, and
            # each temporary of that size costs a few ms of a click's round trip.
            new = sample(logit, box, ras_shape, fine, window).sigmoid_()
            new = torch.lerp(old, new, taper(box, ras_shape, fine, window, tuple(logit.shape)), out=new)
            if sign:
                (torch.maximum if sign > 0 else torch.minimum)(new, old, out=new)
            if radius_mm > 0:
                near = near_clicks(box, points, spacing, radius_mm, ((new > 0.5) != (old > 0.5)).numpy())
                new = torch.lerp(old, new, near, out=new)
            old.copy_(new)
        out.append((union, (p > 0.5).to(torch.uint8).numpy()))
    return out


# ----------------------------------------------------------------------------- the fine volume


def fine_volume(windowed, window_spacing_mm: Sequence[float]) -> torch.Tensor:
    """A windowed channel-first MetaTensor (stored axis order, affine attached) -> (F...) uint8, RAS:
    values in [0, 1] stored as multiples of 1 / FINE_LEVELS (0.8 HU of the CT window; a byte a voxel).

    Area-resized to `fine_shape` in the stored order on the axes it shrinks, then reoriented on the
    small result (as the grid's chain does: `trainer.transforms.ResizeBeforeOrientd`), then linearly
    upsampled on the axes where the scan is coarser than the window spacing (the compact phantoms'
    3.5 mm, for cpu's 2 mm). A label gives soft fractions.
    """
    affine = np.asarray(windowed.affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(affine)
    stored = tuple(int(s) for s in windowed.shape[1:])
    ras_shape = tuple(stored[int(np.flatnonzero(ornt[:, 0] == axis)[0])] for axis in range(3))
    shape = fine_shape(ras_shape, ras_spacing(affine), window_spacing_mm)
    shrunk = tuple(min(n, f) for n, f in zip(ras_shape, shape))
    resized = ResizeBeforeOrientd(keys=["fine"], spatial_size=shrunk).resize(windowed, "area")
    oriented = mt.Orientation(axcodes="RAS", labels=RAS_LABELS)(resized)
    out = oriented.as_tensor() if hasattr(oriented, "as_tensor") else torch.as_tensor(oriented)
    out = out[0].float()
    if shrunk != shape:
        out = F.interpolate(out[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0]
    return (out * FINE_LEVELS).round_().clamp_(0, FINE_LEVELS).to(torch.uint8).contiguous()
