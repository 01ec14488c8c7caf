"""False-positive blobs: spleen-like nodules beside the spleen, labelled background.

A ball with the spleen's own CT values 0-5 mm from the spleen (an accessory-spleen-like nodule) is the
false positive a user removes with one background click. `trainer.evaluate.blob_clicks` measures that
click (tests/test_clicks_work.py, scripts/blob_clicks.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from scipy import ndimage

#: Ball radii and gaps to the spleen (mm), and how many draws of the whole set: the candidates per case.
RADII_MM = (30.0, 20.0)
GAPS_MM = (0.0, 2.0, 5.0)
DRAWS = 2


def false_positive_blobs(
    image: np.ndarray,
    affine: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    *,
    radii_mm: Sequence[float] = RADII_MM,
    gaps_mm: Sequence[float] = GAPS_MM,
    draws: int = DRAWS,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[int]]]:
    """(image with the blob, blob mask, blob centre voxel) for balls of the spleen's median HU at
    `gaps_mm` from the spleen, centred inside the body; the spleen itself is never overwritten."""
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    distance = ndimage.distance_transform_edt(~label, sampling=spacing)
    spleen_hu = float(np.median(image[label]))
    grid = np.ogrid[tuple(slice(0, n) for n in image.shape)]
    for _draw in range(draws):
        for radius_mm in radii_mm:
            for gap in gaps_mm:
                centres = np.argwhere((np.abs(distance - (radius_mm + gap)) < 2.0) & (image > -200))
                if not len(centres):
                    continue
                centre = centres[rng.integers(len(centres))]
                ball = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)) <= radius_mm**2
                ball &= ~label
                with_blob = image.astype(np.float32)
                with_blob[ball] = spleen_hu + rng.normal(0.0, 8.0, int(ball.sum()))
                yield with_blob, ball, [int(v) for v in centre]
