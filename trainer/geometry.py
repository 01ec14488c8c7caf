"""Scan <-> network grid geometry of the predictor: the input tensor, the part of the scan the grid's
foreground can reach when resized back, and boxes of the RAS-ordered scan placed in the file's array order."""

from __future__ import annotations

import math
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

#: Probabilities are clipped to [eps, 1 - eps] before taking logits (float32 rounds 1 - 1e-8 to 1).
LOGIT_EPS = 1e-6

# dtypes torch.from_numpy shares without a copy and the chain's windowing handles directly.
_SHARED_DTYPES = {np.dtype(t) for t in (np.float32, np.float64, np.int16, np.int32, np.int64, np.int8, np.uint8)}


def as_channel_tensor(image: np.ndarray) -> torch.Tensor:
    """(1, X, Y, Z) tensor sharing `image`'s memory where torch can; the windowing copies it to float32."""
    if image.dtype in _SHARED_DTYPES and image.dtype.isnative and image.flags.writeable:
        return torch.from_numpy(image)[None]
    return torch.from_numpy(np.asarray(image, dtype=np.float32))[None]  # e.g. uint16, big-endian, read-only


def _taps(coarse: int, fine: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per fine index: the first and last coarse index its value is made of.

    `trilinear` (`F.interpolate(align_corners=False)`, ATen's formula: src = max(scale * (j + 0.5) -
    0.5, 0), scale = coarse / fine): the two coarse voxels it blends. `area` (adaptive average
    pooling, what `F.interpolate(mode="area")` and MONAI's `Resize(mode="area")` do): the coarse range
    [floor(j * c / f), ceil((j + 1) * c / f)) it averages.
    """
    if mode == "area":
        j = torch.arange(fine, dtype=torch.int64)
        return (j * coarse) // fine, -((-(j + 1) * coarse) // fine) - 1
    scale = torch.tensor(coarse, dtype=torch.float32) / torch.tensor(fine, dtype=torch.float32)
    src = (scale * (torch.arange(fine, dtype=torch.float32) + 0.5) - 0.5).clamp_(min=0)
    i0 = src.floor().to(torch.int64).clamp_(max=coarse - 1)
    return i0, torch.where(i0 < coarse - 1, i0 + 1, i0)


def upsample_window(fg_along: torch.Tensor, fine: int, mode: str = "trilinear") -> tuple[slice, slice, slice] | None:
    """Along one axis: which coarse slab to upsample, to which fine slab, and which fine indices to keep.

    Keep: the fine indices whose coarse taps touch a coarse voxel over 0.5 (elsewhere the value, a
    convex combination of voxels <= 0.5 in both modes, cannot exceed 0.5). Coarse and fine sizes repeat
    with periods c/g and f/g (g = gcd): a slab cut at whole periods, with one spare period on each
    side, is resized by `F.interpolate` with exactly the full volume's scale and taps (area: the same
    pooling ranges, shifted by whole periods), and the spare periods absorb the edge clamping the full
    volume does not have there. None: no fine index touches the foreground.
    """
    coarse = fg_along.numel()
    hits = torch.nonzero(fg_along).flatten()
    lo, hi = int(hits[0]), int(hits[-1])
    i0, i1 = _taps(coarse, fine, mode)
    touching = torch.nonzero((i1 >= lo) & (i0 <= hi)).flatten()  # contiguous: the taps are monotone
    if not len(touching):
        return None  # a scan with fewer voxels than the grid: trilinear taps can step over the blob
    j_lo, j_hi = int(touching[0]), int(touching[-1]) + 1
    g = math.gcd(coarse, fine)
    pc, pf = coarse // g, fine // g
    k0, k1 = max(j_lo // pf - 1, 0), min(-(-j_hi // pf) + 1, g)
    return slice(k0 * pc, k1 * pc), slice(k0 * pf, k1 * pf), slice(j_lo - k0 * pf, j_hi - k0 * pf)


def place_ras(mask: np.ndarray, crop: np.ndarray, ras_box, prepared: Any) -> None:
    """Write `crop`, a box of the RAS-ordered scan, into `mask` (original array order)."""
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), prepared.to_ras)
    crop = nib.orientations.apply_orientation(crop, back)
    box = []
    for ras_axis, flip in prepared.to_ras:
        sl, n = ras_box[int(ras_axis)], prepared.ras_shape[int(ras_axis)]
        box.append(slice(n - sl.stop, n - sl.start) if flip < 0 else sl)
    mask[tuple(box)] = crop


def ras_index(point, prepared: Any) -> np.ndarray:
    """An original voxel index -> its index in the RAS-ordered array (float; exact integers)."""
    return (prepared.index_to_ras @ np.array([*point, 1.0]))[:3]


def zoo_index_to_ras(prepared: Any) -> np.ndarray:
    """The model zoo's original index -> RAS index map, as floats: `inv(A_ras) @ A_orig`, with A_ras
    the affine MONAI's Orientationd gives (A_orig @ the reorientation), in float64 as it computes it."""
    xform = nib.orientations.inv_ornt_aff(prepared.to_ras, prepared.orig_shape)
    return np.linalg.inv(prepared.orig_affine @ xform) @ prepared.orig_affine


def place_global(mask: np.ndarray, p: torch.Tensor, prepared: Any, upsample: str) -> None:
    """The whole-scan answer `p` (C, S, S, S) resized back into `mask` (see `Predictor.postprocess`)."""
    placed = global_crop(p, prepared, upsample)
    if placed is not None:
        place_ras(mask, *placed, prepared)


def global_crop(p: torch.Tensor, prepared: Any, upsample: str) -> tuple[np.ndarray, list[slice]] | None:
    """The whole-scan answer `p` (C, S, S, S) at scan resolution, as (uint8 RAS crop, its RAS box): only
    the box that can be foreground; None: no foreground."""
    # Two channels (background, spleen): the argmax, ties to background, as the model zoo's AsDiscrete.
    fg = p[1] > p[0] if len(p) == 2 else p[0] > 0.5
    if not bool(fg.any()):
        return None
    mode = "area" if upsample == "area" else "trilinear"
    found = [
        upsample_window(fg.any(dim=tuple(d for d in range(3) if d != axis)), fine, mode)
        for axis, fine in enumerate(prepared.ras_shape)
    ]
    if any(w is None for w in found):
        return None
    windows = [w for w in found if w is not None]
    coarse, level = p[(slice(None), *(w[0] for w in windows))], 0.5
    if upsample == "logit" and len(p) == 1:
        coarse, level = torch.logit(coarse.clamp(LOGIT_EPS, 1 - LOGIT_EPS)), 0.0
    size = tuple(w[1].stop - w[1].start for w in windows)
    up = F.interpolate(coarse[None], size=size, mode=mode, **({} if mode == "area" else {"align_corners": False}))[0]
    up = up[(slice(None), *(w[2] for w in windows))]
    crop = (up[1] > up[0] if len(up) == 2 else up[0] > level).cpu().numpy().view(np.uint8)
    ras_box = [slice(w[1].start + w[2].start, w[1].start + w[2].stop) for w in windows]
    return crop, ras_box
