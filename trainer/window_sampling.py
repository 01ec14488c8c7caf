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
