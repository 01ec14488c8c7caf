"""The one preprocessing chain, shared by training, validation, inference and serving (spec §2).

load -> channel first -> RAS -> CT window [-175, 250] HU -> [0, 1] -> resize to the profile's grid
(image: area, label: nearest). The chain is deterministic, so training caches its output **at
network resolution**; augmentation (flips, axial rot90, intensity shift) runs after the resize,
which commutes with it up to interpolation (spec §2) and costs a fraction of the bundle's
full-resolution work and memory.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai import transforms as mt

from .clicks import body_mask
from .config import HU_MAX, HU_MIN, TrainConfig

IMAGE, LABEL, BODY = "image", "label", "body"


class BodyMaskd(mt.MapTransform):
    """Add a boolean body mask (from the windowed image) under `BODY`; used for background seeds."""

    def __init__(self, image_key: str = IMAGE, body_key: str = BODY):
        super().__init__([image_key])
        self.image_key, self.body_key = image_key, body_key

    def __call__(self, data):
        d = dict(data)
        image = np.asarray(d[self.image_key])[0]
        d[self.body_key] = torch.from_numpy(body_mask(image)[None].astype(np.uint8))
        return d


def load_transforms(keys: Sequence[str]) -> list:
    """File -> channel-first MetaTensor carrying the file's affine."""
    return [
        mt.LoadImaged(keys=list(keys), image_only=True),
        mt.EnsureChannelFirstd(keys=list(keys), channel_dim="no_channel"),
    ]


def preprocess_transforms(spatial_size: Sequence[int], keys: Sequence[str] = (IMAGE,)) -> list:
    """Channel-first volume(s) -> RAS, windowed, resized to `spatial_size`.

    `keys` holds IMAGE and optionally LABEL; the label is resized with nearest neighbour.
    """
    keys = list(keys)
    modes = ["area" if k == IMAGE else "nearest" for k in keys]
    out = [
        mt.Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        mt.ScaleIntensityRanged(keys=[IMAGE], a_min=HU_MIN, a_max=HU_MAX, b_min=0.0, b_max=1.0, clip=True),
        mt.Resized(keys=keys, spatial_size=tuple(spatial_size), mode=modes),
    ]
    return out


def cache_transforms(cfg: TrainConfig) -> mt.Compose:
    """Deterministic part of the training/validation chain: its output is what the cache holds.

    Image float32 at network resolution, label and body masks uint8; metadata dropped so cached
    items are plain tensors (small, fast to collate).
    """
    keys = [IMAGE, LABEL]
    return mt.Compose(
        [mt.LoadImaged(keys=keys, image_only=True), CheckPaird()]
        + load_transforms(keys)[1:]
        + preprocess_transforms(cfg.spatial_size, keys)
        + [
            mt.CastToTyped(keys=[LABEL], dtype=torch.uint8),
            BodyMaskd(),
            mt.EnsureTyped(keys=[IMAGE, LABEL, BODY], track_meta=False),
        ]
    )


def augment_transforms(cfg: TrainConfig) -> mt.Compose:
    """Random augmentation applied to cached network-resolution items (training only)."""
    keys = [IMAGE, LABEL, BODY]
    return mt.Compose(
        [
            mt.RandFlipd(keys=keys, prob=cfg.flip_prob, spatial_axis=0),
            mt.RandFlipd(keys=keys, prob=cfg.flip_prob, spatial_axis=1),
            mt.RandFlipd(keys=keys, prob=cfg.flip_prob, spatial_axis=2),
            mt.RandRotate90d(keys=keys, prob=cfg.rot90_prob, max_k=3, spatial_axes=(0, 1)),
            mt.RandShiftIntensityd(keys=[IMAGE], offsets=cfg.shift_offset, prob=cfg.shift_prob),
            mt.EnsureTyped(keys=keys, track_meta=False),
        ]
    )


def inference_transforms(spatial_size: Sequence[int]) -> mt.Compose:
    """Preprocessing of an image already loaded as a channel-first MetaTensor (infer and serve)."""
    return mt.Compose(preprocess_transforms(spatial_size, [IMAGE]))


class CheckPaird(mt.MapTransform):
    """Reject an unusable image/label pair right after loading, naming the file (see data.check_arrays)."""

    def __init__(self, image_key: str = IMAGE, label_key: str = LABEL):
        super().__init__([image_key, label_key])
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data):
        from .data import check_arrays

        image, label = data[self.image_key], data[self.label_key]
        check_arrays(
            np.asarray(image),
            np.asarray(label),
            image.affine,
            label.affine,
            image.meta.get("filename_or_obj", "image"),
            label.meta.get("filename_or_obj", "label"),
        )
        return data
