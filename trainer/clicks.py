"""Click simulation and guidance encoding for DeepEdit.

Implements the click model of DeepEdit (Diaz-Pinto et al., MICCAI DALI 2022) as MONAI's
`monai.apps.deepedit` transforms do (spec §4), with the upstream defects of spec §7 fixed:

- fixed channel order: guidance channel 0 = spleen clicks, 1 = background clicks (`CLICK_CHANNELS`);
- background seeds are sampled inside the body, outside the spleen, near its boundary and far from it;
- every random choice comes from an explicit `numpy.random.Generator` (seedable per sample);
- the guidance map is computed locally around each click instead of by a full-volume convolution.

Points are integer voxel indices `(i, j, k)` in the network-resolution grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage

from .config import CLICK_CHANNELS
from .errors import ClickError as ClickError

Point = tuple[int, int, int]
#: A volume's shape as numpy gives it (3D here; numpy types shapes as tuples of any length).
Shape = tuple[int, ...]
Clicks = dict[str, list[Point]]


def as_point(values) -> Point:
    """Three numbers (a list, an array row) as an integer voxel index."""
    i, j, k = (int(v) for v in values)
    return i, j, k


def empty_clicks() -> Clicks:
    return {name: [] for name in CLICK_CHANNELS}


# --------------------------------------------------------------------------- guidance encoding


@lru_cache(maxsize=16)
def gaussian_kernel_1d(sigma: float, truncated: float = 4.0) -> np.ndarray:
    """MONAI's `gaussian_1d(sigma, truncated, approx="erf", normalize=False)`, as float32.

    The discrete kernel integrates the Gaussian over each unit interval; its tail is
    `int(max(sigma * truncated, 0.5) + 0.5)` voxels on each side.
    """
    tail = int(max(float(sigma) * truncated, 0.5) + 0.5)
    x = np.arange(-tail, tail + 1, dtype=np.float64)
    t = 0.70710678 / abs(sigma)
    erf = np.vectorize(math.erf)
    out = 0.5 * (erf(t * (x + 0.5)) - erf(t * (x - 0.5)))
    return np.clip(out, 0, None).astype(np.float32)


def _window(point: Sequence[int], shape: Shape, tail: int | Sequence[int]) -> tuple[slice, ...]:
    """The box of `tail` voxels (one number, or one per axis) on each side of `point`, clipped to the volume."""
    tails = [tail] * len(point) if isinstance(tail, int) else list(tail)
    return tuple(slice(max(v - t, 0), min(v + t + 1, n)) for v, t, n in zip(point, tails, shape))


def encode_guidance(points, shape: Shape, sigma: float = 3.0) -> np.ndarray:
    """One guidance channel: Gaussian blobs at the clicks, min-max normalised to [0, 1].

    Equal (within float rounding) to MONAI's `AddGuidanceSignalDeepEditd._get_signal`: a 1.0 at each
    click voxel (points clamped into the volume, negative points skipped, duplicates count once),
    a separable Gaussian (erf kernel, truncated at 4 sigma, zero padding), min-max normalisation;
    no clicks gives an all-zero channel. Instead of convolving the whole volume, the outer product of
    the 1D kernels is added in the window around each click: O(clicks * (8 sigma)^3) work.
    """
    signal = np.zeros(shape, dtype=np.float32)
    unique: set[Point] = set()
    for p in points:
        p = [int(v) for v in p[-3:]]
        if min(p) < 0:
            continue
        unique.add(tuple(min(max(v, 0), n - 1) for v, n in zip(p, shape)))
    if not unique:
        return signal
    k = gaussian_kernel_1d(float(sigma))
    tail = (len(k) - 1) // 2
    for p in sorted(unique):
        sl = _window(p, shape, tail)
        ks = [k[s.start - v + tail : s.stop - v + tail] for s, v in zip(sl, p)]
        signal[sl] += ks[0][:, None, None] * ks[1][None, :, None] * ks[2][None, None, :]
    lo, hi = float(signal.min()), float(signal.max())
    if hi > lo:
        signal -= lo
        signal /= hi - lo
    return signal


def guidance_channels(clicks: Clicks, shape: Shape, sigma: float = 3.0) -> np.ndarray:
    """The click channels of the network input, shape (2, *shape): spleen, then background."""
    return np.stack([encode_guidance(clicks.get(name, []), shape, sigma) for name in CLICK_CHANNELS])


def click_weight(
    points, shape: Shape, radius: float, *, scales=None, truncate: float = 4.0, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """How strongly a voxel is "near a click": max over clicks of scale * exp(-d^2 / (2 radius^2)).

    d is the Euclidean distance to the click, which may lie between voxels (fractional coordinates):
    in voxels, or in mm with `spacing` (the voxel size per axis; `radius` is then in mm too). Computed
    in a window of `truncate` radius around each click (at 4 the weight beyond is below e^-8), so the
    cost is O(clicks * (2 truncate radius)^3). `scales`: one factor per click (default 1). No clicks:
    all zero.
    """
    weight = np.zeros(shape, dtype=np.float32)
    if radius <= 0:
        return weight
    steps = [1.0] * len(shape) if spacing is None else [float(s) for s in spacing]
    tails = [int(math.ceil(truncate * radius / s)) for s in steps]
    for i, p in enumerate(points):
        centre = [float(x) for x in p[-3:]]
        sl = _window(tuple(int(round(v)) for v in centre), shape, tails)
        if any(s.start >= s.stop for s in sl):
            continue
        d2 = [
            (((np.arange(s.start, s.stop, dtype=np.float32) - v) * np.float32(step)) ** 2)
            / np.float32(2 * radius * radius)
            for s, v, step in zip(sl, centre, steps)
        ]
        window = np.exp(-(d2[0][:, None, None] + d2[1][None, :, None] + d2[2][None, None, :]))
        if scales is not None:
            window *= np.float32(scales[i])
        np.maximum(weight[sl], window, out=weight[sl])
    return weight


# --------------------------------------------------------------------------- sampling


def _sample_deep_point(region: np.ndarray, rng: np.random.Generator) -> tuple[Any, ...] | None:
    """Sample a voxel of `region` with probability proportional to exp(d) - 1.

    d is the chessboard distance to the region's edge (as MONAI's `distance_transform_cdt`), which
    favours the deep interior. Works in 2D and 3D; computed on the region's bounding box grown by one
    voxel (clipped to the array), which gives exactly the full-array distances.
    """
    if not region.any():
        return None
    idx = np.nonzero(region)
    box = tuple(slice(max(int(a.min()) - 1, 0), min(int(a.max()) + 2, n)) for a, n in zip(idx, region.shape))
    crop = region[box]
    dist = ndimage.distance_transform_cdt(crop, metric="chessboard").astype(np.float64)
    weights = np.expm1(dist[crop])
    total = weights.sum()
    flat = np.flatnonzero(crop)
    if total <= 0:  # single-voxel-thick regions: d = 1 everywhere is still > 0; guard anyway
        choice = flat[rng.integers(len(flat))]
    else:
        choice = flat[rng.choice(len(flat), p=weights / total)]
    local = np.unravel_index(choice, crop.shape)
    return tuple(int(i + s.start) for i, s in zip(local, box))


def _seeds_in_slice(mask2d: np.ndarray, rng: np.random.Generator, max_components: int = 5) -> list[tuple[int, int]]:
    """One deep point per connected component (largest first, at most `max_components`)."""
    comps, n = ndimage.label(mask2d)
    if n == 0:
        return []
    sizes = ndimage.sum_labels(np.ones_like(comps), comps, index=np.arange(1, n + 1))
    order = np.argsort(-sizes, kind="stable")[:max_components] + 1
    out = []
    for c in order:
        p = _sample_deep_point(comps == c, rng)
        if p is not None:
            out.append(p)
    return out


#: Probabilities of the background seeds of a click iteration: near the spleen only, far from it
#: only, or both (the rest). Seeds only near the spleen teach "a background click means spleen is
#: near" (MONAI Label #1406: users' background clicks added spleen).
BACKGROUND_NEAR_ONLY, BACKGROUND_FAR_ONLY = 1 / 3, 1 / 3


def initial_seeds(
    label: np.ndarray,
    body: np.ndarray | None,
    rng: np.random.Generator,
    *,
    background_margin: int | None = None,
) -> Clicks:
    """Initial clicks from the ground truth (spec §4, with spec §7.2 fixed).

    Spleen: a random axial slice containing spleen; one deep point per connected component (the
    largest five; MONAI takes them in label order, which differs only past five components).
    Background, one or two seeds: near the spleen (in the same slice, inside the body, outside the
    spleen, within `background_margin` voxels of it: where the spleen stops) and/or far from it
    (anywhere in the body beyond twice the margin: liver, stomach, body wall), so the background
    channel does not tell where the spleen is. Falls back to anywhere in the body.

    Args:
        label: boolean spleen mask at network resolution, shape (X, Y, Z).
        body: boolean body mask (same shape) or None (then the whole volume counts as body).
        rng: random generator.
        background_margin: ring width in voxels (default: 1/8 of the in-plane size).
    """
    label = label.astype(bool, copy=False)
    body = np.ones_like(label) if body is None else body.astype(bool, copy=False)
    clicks = empty_clicks()
    if background_margin is None:
        background_margin = max(2, label.shape[0] // 8)
    z_with_label = np.flatnonzero(label.any(axis=(0, 1)))
    if not len(z_with_label):
        # No spleen in this volume: one background click anywhere in the body.
        p = _sample_deep_point(body & ~label, rng)
        clicks["background"] = [p] if p is not None else []
        return clicks
    z = int(rng.choice(z_with_label))
    clicks["spleen"] = [(i, j, z) for i, j in _seeds_in_slice(label[:, :, z], rng)]
    u = rng.random()
    near = _near_background_seed(label, body, z, background_margin, rng) if u >= BACKGROUND_FAR_ONLY else None
    far = _far_background_seed(label, body, 2 * background_margin, rng) if u < 1 - BACKGROUND_NEAR_ONLY else None
    clicks["background"] = [p for p in (near, far) if p is not None]
    if not clicks["background"]:  # e.g. no body far from a large spleen
        p = _near_background_seed(label, body, z, background_margin, rng)
        clicks["background"] = [p] if p is not None else []
    return clicks


def _near_background_seed(label, body, z: int, margin: int, rng) -> tuple[int, int, int] | None:
    """In axial slice z: inside the body, outside the spleen, within `margin` voxels of it if possible."""
    ring = ndimage.binary_dilation(label[:, :, z], iterations=margin)
    bg2d = ring & body[:, :, z] & ~label[:, :, z]
    if not bg2d.any():
        bg2d = body[:, :, z] & ~label[:, :, z]
    p = _sample_deep_point(bg2d, rng)
    return None if p is None else (p[0], p[1], z)


def _far_background_seed(label, body, distance: int, rng) -> tuple[int, int, int] | None:
    """Anywhere in the body more than `distance` voxels (chessboard) from the spleen; None if nowhere."""
    far = body & ~ndimage.binary_dilation(label, structure=np.ones((3, 3, 3), bool), iterations=distance)
    if not far.any():
        return None
    return _sample_deep_point(far, rng)


def corrective_clicks(
    pred: np.ndarray, label: np.ndarray, rng: np.random.Generator, second_click_above: int = 0
) -> Clicks:
    """A click in the missed spleen (FN) and one in the over-segmented region (FP), if any.

    Each click is sampled proportionally to exp(d) - 1 with d the 3D chessboard distance to the edge
    of its error region, as in MONAI's `AddRandomGuidanceDeepEditd`. With `second_click_above` > 0,
    an error region larger than that many voxels gets a second, independent click, as MONAI's does
    (its "other label" discrepancy of more than 50 voxels; the `bundle` profile).
    """
    pred = pred.astype(bool, copy=False)
    label = label.astype(bool, copy=False)
    out = empty_clicks()
    for name, region in (("spleen", label & ~pred), ("background", pred & ~label)):
        clicks = 2 if second_click_above > 0 and int(region.sum()) > second_click_above else 1
        for _ in range(clicks):
            p = _sample_deep_point(region, rng)
            if p is not None:
                out[name].append(p)
    return out


def apply_click_budget(clicks: Clicks, rng: np.random.Generator, max_budget: int = 10) -> Clicks:
    """The bundle's click budget: draw N ~ U{1..max_budget}; visit labels in random order and keep
    whole click lists until N clicks are collected; clear the lists of the labels not reached.

    So the model also sees inputs with clicks on one label only. Uses `rng`, not Python's global
    `random` (spec §7.5).
    """
    budget = int(rng.integers(1, max_budget + 1))
    order = [CLICK_CHANNELS[i] for i in rng.permutation(len(CLICK_CHANNELS))]
    kept: Clicks = empty_clicks()
    count = 0
    for name in order:
        kept[name] = list(clicks.get(name, []))
        count += len(kept[name])
        if count >= budget:
            break
    return kept


def merge_clicks(a: Clicks, b: Clicks) -> Clicks:
    return {name: list(a.get(name, [])) + list(b.get(name, [])) for name in CLICK_CHANNELS}


def body_mask(image01: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Body mask of a windowed CT in [0, 1]: voxels above ~-130 HU, holes (gas, lungs) filled."""
    mask = image01 > threshold
    if not mask.any():
        return mask
    comps, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(np.ones_like(comps), comps, index=np.arange(1, n + 1))
        mask = comps == (int(np.argmax(sizes)) + 1)
    # Fill holes slice by slice: gas pockets open to the volume's top or bottom stay holes in 3D.
    for z in range(mask.shape[2]):
        mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    return mask


# ----------------------------------------------------------------------------- evaluation clicks


def next_click(mask: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[str, Point] | None:
    """The corrective click a user would make next, or None when the mask is exact.

    A user clicks on the biggest mistake: the largest connected piece of missed spleen (label and not
    mask; a "spleen" click) or of over-segmentation (mask and not label; a "background" click), not
    a scattered union of thin boundary slivers. The voxel is sampled deep inside that piece, with
    probability proportional to exp(d) - 1 (d: chessboard distance to its edge), as the training
    clicks are (spec §4). Ties go to the missed spleen.
    """
    mask = mask.astype(bool, copy=False)
    label = label.astype(bool, copy=False)
    missed = _largest_piece(label & ~mask)
    extra = _largest_piece(mask & ~label)
    n_missed, n_extra = int(missed.sum()), int(extra.sum())
    if n_missed == 0 and n_extra == 0:
        return None
    name, region = ("spleen", missed) if n_missed >= n_extra else ("background", extra)
    point = _sample_deep_point(region, rng)
    return name, as_point(point)  # the region is not empty: a point


def _largest_piece(region: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (the mask itself if it has one or none)."""
    from scipy import ndimage

    comps, n = ndimage.label(region, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return region
    sizes = np.bincount(comps.ravel())[1:]
    return comps == int(np.argmax(sizes)) + 1


# ----------------------------------------------------------------------------- user clicks


def validate_clicks(clicks: Any, shape: tuple[int, ...]) -> Clicks:
    """Check user clicks `{"spleen": [[i,j,k],...], "background": [...]}` against a volume shape."""
    if clicks is None:
        return {name: [] for name in CLICK_CHANNELS}
    if not isinstance(clicks, Mapping):
        raise ClickError(
            f'clicks must be an object like {{"spleen": [[i,j,k]], "background": []}}, got {type(clicks).__name__}'
        )
    unknown = sorted(set(clicks) - set(CLICK_CHANNELS))
    if unknown:
        raise ClickError(f"unknown click label(s) {unknown}: use {list(CLICK_CHANNELS)}")
    out: Clicks = {}
    for name in CLICK_CHANNELS:
        points = clicks.get(name, [])
        if not isinstance(points, (list, tuple)):
            raise ClickError(f"clicks[{name!r}] must be a list of [i, j, k] points, got {type(points).__name__}")
        checked = []
        for n, p in enumerate(points):
            if not isinstance(p, (list, tuple)) or len(p) != 3:
                raise ClickError(f"clicks[{name!r}][{n}] = {p!r}: each click must be 3 integer voxel indices [i, j, k]")
            if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in p):
                raise ClickError(f"clicks[{name!r}][{n}] = {p!r}: voxel indices must be integers")
            for axis, (v, size) in enumerate(zip(p, shape)):
                if not 0 <= v < size:
                    raise ClickError(
                        f"clicks[{name!r}][{n}] = {list(p)} is outside the volume of shape {list(shape)} (axis {axis})"
                    )
            checked.append(as_point(p))
        out[name] = checked
    return out
