"""Refinement windows for training: the fine volumes a training item keeps, and the windows drawn from
them (`RandWindowd`), cut as inference cuts its windows (`trainer.refine.crop`), so the network learns
the click-centred view it is asked about at inference (`trainer.refine`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai import transforms as mt

from .refine import FINE_LEVELS, Window, crop, fine_volume

FINE_IMAGE, FINE_LABEL, WINDOW = "fine_image", "fine_label", "window"
#: Training windows are drawn at 1 to this many times the finest window (inference: as the clicks need).
MAX_TRAIN_SCALE = 1.6


class FineVolumed:
    """Cache step: the windowed image and its label as fine volumes (`fine_volume`) under FINE_IMAGE /
    FINE_LABEL (soft fractions), before the grid resize. Runs on channel-first MetaTensors."""

    def __init__(self, window_spacing_mm: Sequence[float], image_key: str = "image", label_key: str = "label"):
        self.spacing = tuple(float(s) for s in window_spacing_mm)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data):
        d = dict(data)
        d[FINE_IMAGE] = fine_volume(d[self.image_key], self.spacing)
        label = d[self.label_key]
        d[FINE_LABEL] = fine_volume(label.float() if hasattr(label, "float") else label, self.spacing)
        return d


def _window_centre(label: np.ndarray, size: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Where a training window is centred (fine continuous coordinates), as a user's clicks would put it:
    half on the spleen's surface (most errors), a quarter inside it, a quarter anywhere within half a
    window of it (false positives next to it); any voxel without spleen."""
    from scipy import ndimage

    spleen = label >= FINE_LEVELS // 2 + 1 if label.dtype == np.uint8 else label >= 0.5
    if not spleen.any():
        return rng.uniform(0, 1, 3) * np.asarray(label.shape)
    u = rng.random()
    region = spleen & ~ndimage.binary_erosion(spleen) if u < 0.5 else spleen
    points = np.argwhere(region if region.any() else spleen)
    centre = points[rng.integers(len(points))] + rng.uniform(0, 1, 3)
    if u >= 0.75:
        centre = centre + rng.uniform(-0.5, 0.5, 3) * size
    return centre


def draw_window(label: np.ndarray, grid: Sequence[int], rng: np.random.Generator) -> Window:
    """A training window of a fine label volume: scale log-uniform in [1, MAX_TRAIN_SCALE], centred by
    `_window_centre`, jittered by up to an eighth of the window."""
    grid_arr = np.asarray(grid, dtype=np.float64)
    scale = math.exp(rng.uniform(0.0, math.log(MAX_TRAIN_SCALE)))
    size = np.ceil(grid_arr * scale).astype(int)
    centre = _window_centre(label, size, rng) + rng.uniform(-0.125, 0.125, 3) * size
    return Window.centred(centre, size)


def window_item(
    fine_image: torch.Tensor, fine_label: torch.Tensor, window: Window, grid: Sequence[int], soft_label: bool
) -> dict[str, torch.Tensor]:
    """A training item (image, label, body at the grid) cut from the fine volumes by `window`."""
    from .clicks import body_mask

    image = crop(fine_image, window, grid)
    label = crop(fine_label, window, grid)
    label = label.to(torch.float16) if soft_label else (label >= 0.5).to(torch.uint8)
    body = torch.from_numpy(body_mask(image[0].numpy())[None].astype(np.uint8))
    return {"image": image, "label": label, "body": body}


class RandWindowd(mt.RandomizableTransform):
    """With probability `prob`, replace a cached whole-scan item by a refinement window of its fine
    volumes (`draw_window`); always drops the fine volumes (their shapes differ per case) and sets
    WINDOW (1 for a window), so training can give every window clicks."""

    def __init__(self, prob: float, grid: Sequence[int], soft_label: bool):
        super().__init__(prob)
        self.grid, self.soft_label = tuple(int(g) for g in grid), soft_label

    def __call__(self, data):
        d = dict(data)
        fine_image, fine_label = d.pop(FINE_IMAGE, None), d.pop(FINE_LABEL, None)
        self.randomize(None)
        d[WINDOW] = torch.tensor(0, dtype=torch.uint8)
        if not self._do_transform or fine_image is None or fine_label is None:
            return d
        # MONAI's stream is a legacy RandomState; a Generator seeded from it keeps the draw reproducible.
        rng = np.random.default_rng(int(self.R.randint(2**31)))
        window = draw_window(fine_label.numpy(), self.grid, rng)
        d.update(window_item(fine_image, fine_label, window, self.grid, self.soft_label))
        d[WINDOW] = torch.tensor(1, dtype=torch.uint8)
        return d


# ----------------------------------------------------------------------------- the current mask as context

#: A window's context (`TrainConfig.window_context`) is the spleen mask with the kinds of error the
#: whole-scan pass makes: all of it missed (this share), a coarser grid's blocky boundary, a boundary
#: shifted by a voxel or two, chunks missed and blobs of a neighbour taken.
CONTEXT_EMPTY_SHARE = 0.1
#: The whole-scan grid is 1 to this many times coarser than a window (cpu: 2 mm windows, ~3-6 mm grid).
CONTEXT_MAX_COARSENING = 4
#: Rounds of corrective clicks a context window trains with (inference: every click of its cluster).
CONTEXT_MAX_ROUNDS = 3


def _ball(shape: Sequence[int], centre: np.ndarray, radius: float) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius * radius


def corrupt_mask(label: np.ndarray, body: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible whole-scan answer for a window whose true spleen is `label` (bool, window grid):
    the errors a user would click on (`CONTEXT_*`). `body`: where false positives may lie."""
    import torch.nn.functional as F
    from scipy import ndimage

    label = label.astype(bool, copy=False)
    if rng.random() < CONTEXT_EMPTY_SHARE or not label.any():
        return np.zeros_like(label)
    shape = np.asarray(label.shape)
    k = int(rng.integers(1, CONTEXT_MAX_COARSENING + 1))
    mask = label
    if k > 1:
        small = tuple(int(v) for v in np.maximum(shape // k, 1))
        t = torch.from_numpy(label.astype(np.float32))[None, None]
        coarse = F.interpolate(F.interpolate(t, size=small, mode="area"), size=tuple(shape), mode="trilinear")
        mask = coarse[0, 0].numpy() > rng.uniform(0.35, 0.65)
    shift = int(rng.choice([-2, -1, -1, 0, 0, 0, 1, 1, 2]))
    if shift > 0:
        mask = ndimage.binary_dilation(mask, iterations=shift)
    elif shift < 0:
        mask = ndimage.binary_erosion(mask, iterations=-shift)
    # Chunks and blobs are sized by the spleen's part in the window (its equivalent ball's radius).
    size = max(2.0, float((3 * label.sum() / (4 * np.pi)) ** (1 / 3)))
    spleen = np.argwhere(label)
    for _ in range(int(rng.integers(0, 3))):  # missed chunks: a ball around a spleen voxel
        mask = mask & ~_ball(shape, spleen[rng.integers(len(spleen))], rng.uniform(0.25, 0.7) * size)
    near = ndimage.binary_dilation(label, iterations=max(2, int(0.5 * size))) & ~label & body.astype(bool)
    candidates = np.argwhere(near)
    for _ in range(int(rng.integers(0, 3)) if len(candidates) else 0):  # a neighbour's blob taken
        blob = _ball(shape, candidates[rng.integers(len(candidates))], rng.uniform(0.2, 0.5) * size)
        mask = mask | (blob & ~label)
    return mask


def context_clicks(context: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> dict[str, list]:
    """1..CONTEXT_MAX_ROUNDS clicks on `context`'s errors, as the evaluation's user makes them
    (`trainer.clicks.next_click`: deep in the largest error piece), each piece then taken as fixed so
    the next click goes to the next one. No error: seeds from the label (`initial_seeds`)."""
    from .clicks import _largest_piece, empty_clicks, initial_seeds, next_click

    label = label.astype(bool, copy=False)
    current = context.astype(bool, copy=True)
    clicks = empty_clicks()
    for _ in range(int(rng.integers(1, CONTEXT_MAX_ROUNDS + 1))):
        click = next_click(current, label, rng)
        if click is None:
            break
        name, point = click
        clicks[name].append(point)
        piece = _largest_piece(label & ~current) if name == "spleen" else _largest_piece(current & ~label)
        current[piece] = name == "spleen"
    if not any(clicks.values()):
        clicks = initial_seeds(label, None, rng)
    return clicks
