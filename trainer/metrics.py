"""Segmentation quality metrics, declared once (MONAI's implementations underneath)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice


def _onehot(mask: torch.Tensor) -> torch.Tensor:
    """(B, X, Y, Z) bool/int mask -> (B, 2, X, Y, Z) float one-hot (background, spleen)."""
    mask = mask.to(torch.bool)
    return torch.stack([~mask, mask], dim=1).float()


def _as_batch(mask) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if t.ndim == 3:
        t = t[None]
    if t.ndim == 5:  # (B, 1, X, Y, Z)
        t = t[:, 0]
    return t


def spleen_dice(pred, label) -> torch.Tensor:
    """Spleen-only Dice per batch item, shape (B,). Both empty counts as 1.0 (a correct 'no spleen')."""
    p, t = _onehot(_as_batch(pred)), _onehot(_as_batch(label))
    return compute_dice(p, t, include_background=False, ignore_empty=False)[:, 0]


def mean_dice_with_background(pred, label) -> torch.Tensor:
    """The bundle's reported number: mean of background and spleen Dice per item (secondary only)."""
    p, t = _onehot(_as_batch(pred)), _onehot(_as_batch(label))
    return compute_dice(p, t, include_background=True, ignore_empty=False).mean(dim=1)


def hd95_mm(mask: np.ndarray, label: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (MONAI); nan if either mask is empty."""
    from monai.metrics import compute_hausdorff_distance

    mask = np.asarray(mask, dtype=bool)
    label = np.asarray(label, dtype=bool)
    if not mask.any() or not label.any():
        return float("nan")
    pred_t = torch.from_numpy(mask)[None, None]
    label_t = torch.from_numpy(label)[None, None]
    with warnings.catch_warnings():
        # MONAI 1.6 calls its own deprecated `get_mask_edges(always_return_as_numpy=...)` internally.
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(
            pred_t, label_t, include_background=True, percentile=95, spacing=[float(s) for s in spacing]
        )
    return float(value.reshape(-1)[0])
