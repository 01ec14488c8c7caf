"""The one preprocessing chain, shared by training, validation, inference and serving (spec §2).

load -> channel first -> CT window [-175, 250] HU -> [0, 1] -> resize to the profile's grid (image:
area, label: nearest) -> RAS. The result equals MONAI's `Orientationd` -> `ScaleIntensityRanged` ->
`Resized` (tests/test_transforms.py checks it against them), but the full-resolution work is one
windowing pass and one pooling pass: the reorientation runs on the network grid (~12x fewer voxels
than 512x512x100; see `ResizeBeforeOrientd`). The chain is deterministic, so training caches its
output **at network resolution**; augmentation (scans ending inside the spleen, flips, axial rot90,
intensity shift) runs after the resize, which commutes with it up to interpolation (spec §2) and
costs a fraction of the bundle's full-resolution work and memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai import transforms as mt
from monai.data import MetaTensor
from monai.transforms.utils import scale_affine
from monai.utils import ensure_tuple_rep

from .clicks import body_mask
from .config import HU_MAX, HU_MIN, LABEL_RESIZE_MODES, TrainConfig

IMAGE, LABEL, BODY = "image", "label", "body"
#: MONAI's `Orientationd` labels for RAS (explicit, so an LPS "space" meta entry cannot change them).
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


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


class WindowHUd(mt.MapTransform):
    """Clip to [a_min, a_max] and scale to [0, 1] in float32: `ScaleIntensityRanged(clip=True)` in one copy.

    MONAI's transform converts to float32 and then makes several full-volume passes (subtract,
    divide, multiply, add, clip), each allocating; here the input (any numeric dtype, e.g. the
    file's int16) is copied once into float32 and windowed in place. Never modifies its input.

    Args:
        keys: keys of the channel-first images to window.
        a_min: intensity mapped to 0 (HU).
        a_max: intensity mapped to 1 (HU).
    """

    def __init__(self, keys: Sequence[str] | str = IMAGE, a_min: float = HU_MIN, a_max: float = HU_MAX):
        super().__init__(keys)
        self.a_min, self.a_max = float(a_min), float(a_max)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.window(d[key])
        return d

    def window(self, img):
        x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        if x.device.type == "cpu" and not x.requires_grad and x.dtype != torch.bfloat16:  # numpy-representable
            # numpy's astype keeps the memory order (nibabel arrays are Fortran-ordered) and is ~3x
            # faster than torch's strided `.to` on 2 threads.
            y = torch.from_numpy(x.numpy().astype(np.float32))
        else:
            y = x.to(torch.float32, copy=True)
        # Same float32 arithmetic as MONAI ((x - a_min) / (a_max - a_min)) on the clipped values.
        y.clamp_(self.a_min, self.a_max).sub_(self.a_min).div_(self.a_max - self.a_min)
        if isinstance(img, MetaTensor):
            out = MetaTensor(y)
            out.copy_meta_from(img)
            return out
        return y


def _target_ornt(affine, axcodes: str, labels) -> np.ndarray:
    """nibabel orientation transform from an affine's axes to `axcodes` (as MONAI's `Orientation`)."""
    src = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    return nib.orientations.ornt_transform(src, nib.orientations.axcodes2ornt(axcodes, labels=labels))


def _area_axis(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """1D adaptive average pooling of `x` along `dim` to `size` (PyTorch's `area` bins, any ratio).

    Bin i covers [floor(i*N/S), ceil((i+1)*N/S)), as in ATen's adaptive pooling; bins hold at most
    `width` inputs, so the result is `width` gathers of the output's size, summed, then divided.
    """
    n = x.shape[dim]
    i = torch.arange(size, dtype=torch.int64, device=x.device)
    start, end = (i * n) // size, -((-(i + 1) * n) // size)
    count = end - start
    width = int(count.max())
    shape = [1] * x.ndim
    shape[dim] = size
    out: torch.Tensor | None = None
    for t in range(width):
        idx = torch.clamp(start + t, max=n - 1)
        part = x.index_select(dim, idx)
        if t and bool((count <= t).any()):
            part = part * (count > t).to(part.dtype).view(shape)
        out = part if out is None else out.add_(part)
    assert out is not None  # width >= 1: every bin holds at least one input
    return out.div_(count.to(out.dtype).view(shape))


def area_resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """`F.interpolate(x[None], size, mode="area")[0]` for a channel-first float tensor, separably.

    Area resizing is adaptive average pooling, and the average over a box is the average of the
    per-axis averages, so the axes can be pooled one after the other. Axes that divide evenly pool
    together in one `avg_pool3d` pass over the full volume (identical bins), run in the tensor's
    memory order so no strided copy is made; the others (non-divisible or upsampled) follow on the
    already reduced tensor. Equal to PyTorch's up to float rounding (~1e-7).
    """
    size = tuple(int(s) for s in size)
    spatial = tuple(x.shape[1:])
    if len(size) != 3 or len(spatial) != 3:
        raise ValueError(f"area_resize needs a (C, X, Y, Z) tensor and 3 sizes, got {tuple(x.shape)} and {size}")
    if spatial == size:
        return x.clone(memory_format=torch.contiguous_format)
    # Spatial dims ordered from slowest to fastest in memory: pooling a contiguous view is fastest.
    order = sorted(range(3), key=lambda a: -x.stride(a + 1))
    xm = x.permute(0, *(a + 1 for a in order))
    kernel = [spatial[a] // size[a] if spatial[a] % size[a] == 0 else 1 for a in order]
    if any(k > 1 for k in kernel):
        xm = F.avg_pool3d(xm.contiguous()[None], kernel_size=kernel, stride=kernel)[0]
    for m, a in enumerate(order):
        if xm.shape[m + 1] != size[a]:
            xm = _area_axis(xm, m + 1, size[a])
    return xm.permute(0, *(order.index(a) + 1 for a in range(3))).contiguous()


def nearest_indices(n: int, size: int) -> torch.Tensor:
    """Source indices of PyTorch's `nearest` resize of an axis of length n to `size`.

    Taken from `F.interpolate` itself on an index ramp (exact in float64), so they match MONAI's
    `Resized(mode="nearest")` bit for bit, including ATen's float32 scale rounding.
    """
    ramp = torch.arange(n, dtype=torch.float64).view(1, 1, n)
    return F.interpolate(ramp, size=size, mode="nearest").view(size).to(torch.int64)


class ResizeBeforeOrientd(mt.MapTransform):
    """Resize in the stored axis order, for a following `Orientationd(axcodes)` on the small grid.

    `ResizeBeforeOrientd(spatial_size)` then `Orientationd` gives what `Orientationd` then
    `Resized(spatial_size)` give — values and affine — while the full-resolution volume is never
    flipped or transposed. `spatial_size` is in the `axcodes` order. Area resizing commutes with
    flips (adaptive pooling bins are mirror-symmetric) and axis permutations, so it is a plain
    separable area resize (`area_resize`). Nearest does not commute with a flip, so on flipped axes
    the source indices are mirrored: the labels come out exactly as MONAI's.

    Not invertible through `Invertd`: the predictor maps its output back itself (predictor.py).

    Args:
        keys: channel-first MetaTensors (their affine decides the orientation).
        spatial_size: output grid in `axcodes` order.
        mode: "area" or "nearest", one per key or one for all. On a 0/1 label, "area" gives the
            fraction of each output voxel's footprint that is foreground (a soft label), aligned
            with the area-resized image; "nearest" samples each bin's first source voxel.
        axcodes: the orientation the following `Orientationd` produces.
        labels: its axis labels.
    """

    def __init__(
        self,
        keys: Sequence[str] | str,
        spatial_size: Sequence[int],
        mode: Sequence[str] | str = "area",
        axcodes: str = "RAS",
        labels=RAS_LABELS,
    ):
        super().__init__(keys)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        for m in self.mode:
            if m not in ("area", "nearest"):
                raise ValueError(f"ResizeBeforeOrientd supports mode 'area' or 'nearest', got {m!r}")
        self.axcodes, self.labels = axcodes, labels

    def __call__(self, data):
        d = dict(data)
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.resize(d[key], mode)
        return d

    def resize(self, img, mode: str):
        affine = img.affine if isinstance(img, MetaTensor) else torch.eye(4, dtype=torch.float64)
        ornt = _target_ornt(affine, self.axcodes, self.labels)
        x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        spatial = tuple(int(s) for s in x.shape[1:])
        size = tuple(self.spatial_size[int(ornt[a, 0])] for a in range(3))
        if mode == "area":
            out = area_resize(x.to(torch.float32), size)  # MONAI's Resize computes in float32 too
        else:
            out = x
            for a in sorted(range(3), key=lambda a: size[a] / spatial[a]):  # most reducing axis first
                idx = nearest_indices(spatial[a], size[a])
                if ornt[a, 1] < 0:  # flipped by the orientation: mirror the nearest choice
                    idx = spatial[a] - 1 - idx.flip(0)
                out = out.index_select(a + 1, idx.to(out.device))
        out = out.to(torch.float32).contiguous()  # MONAI's Resize returns float32
        if not isinstance(img, MetaTensor):
            return out
        result = MetaTensor(out)
        result.copy_meta_from(img)
        # As MONAI's Resize (align_corners=False): index scaling about the voxel centres.
        new_affine = np.asarray(img.affine, dtype=np.float64) @ scale_affine(spatial, size)
        result.affine = torch.as_tensor(new_affine, dtype=torch.float64)
        return result


def load_transforms(keys: Sequence[str]) -> list:
    """File -> channel-first MetaTensor carrying the file's affine."""
    return [
        mt.LoadImaged(keys=list(keys), image_only=True),
        mt.EnsureChannelFirstd(keys=list(keys), channel_dim="no_channel"),
    ]


def preprocess_transforms(
    spatial_size: Sequence[int], keys: Sequence[str] = (IMAGE,), label_resize: str = "nearest"
) -> list:
    """Channel-first volume(s) -> windowed, resized to `spatial_size`, RAS.

    `keys` holds IMAGE and optionally LABEL. Equal to MONAI's `Orientationd(RAS)` ->
    `ScaleIntensityRanged` -> `Resized` (image: area, within float rounding; label: `nearest`
    exactly, or `area`; same affine), with the reorientation done on the small grid.

    Args:
        spatial_size: the network grid.
        keys: IMAGE and optionally LABEL.
        label_resize: `nearest` (the bundle: 0/1) or `area` (the fraction of each network voxel
            that is spleen: a soft label). PyTorch's nearest takes the first source voxel of each
            bin, not its centre, so a downsampled label lies up to half a network voxel off the
            image; on the cpu profile's held-out phantoms, a network that reproduced such targets
            exactly would score 0.90 Dice on the original grid (mean of 6), against 0.976 for
            area targets (see tests/test_transforms.py).
    """
    keys = list(keys)
    if label_resize not in LABEL_RESIZE_MODES:
        raise ValueError(f"label_resize must be one of {', '.join(LABEL_RESIZE_MODES)}, got {label_resize!r}")
    modes = ["area" if k == IMAGE else label_resize for k in keys]
    out = [
        WindowHUd(keys=[IMAGE], a_min=HU_MIN, a_max=HU_MAX),
        ResizeBeforeOrientd(keys=keys, spatial_size=spatial_size, mode=modes, axcodes="RAS", labels=RAS_LABELS),
        mt.Orientationd(keys=keys, axcodes="RAS", labels=RAS_LABELS),
    ]
    return out


def cache_transforms(cfg: TrainConfig, fine: bool = False) -> mt.Compose:
    """Deterministic part of the training/validation chain: its output is what the cache holds.

    With `fine` (training with refinement windows) the items also hold the scan's fine volumes
    (`trainer.refine.FineVolumed`), from which `augment_transforms` cuts windows.

    Image float32 at network resolution, label uint8 (`nearest`) or float16 fractions (`area`), body
    mask uint8; metadata dropped so cached items are plain tensors (small, fast to collate). Use
    `label_mask` for the label as a mask.
    """
    keys = [IMAGE, LABEL]
    soft = cfg.label_resize_mode == "area"
    to_grid = preprocess_transforms(cfg.spatial_size, keys, cfg.label_resize_mode)
    if fine:  # after the windowing, before the grid resize
        from .refine import window_spacing
        from .window_sampling import FineVolumed

        to_grid.insert(1, FineVolumed(window_spacing(cfg.spatial_size, cfg.window_extent_mm)))
    return mt.Compose(
        [mt.LoadImaged(keys=keys, image_only=True), CheckPaird()]
        + load_transforms(keys)[1:]
        + to_grid
        + [
            mt.CastToTyped(keys=[LABEL], dtype=torch.float16 if soft else torch.uint8),
            BodyMaskd(),
            mt.EnsureTyped(keys=[IMAGE, LABEL, BODY], track_meta=False),
        ]
    )


def label_mask(label: torch.Tensor) -> torch.Tensor:
    """A cached label (0/1 or soft fractions) as a bool mask: voxels at least half spleen."""
    return label >= 0.5


def augment_transforms(cfg: TrainConfig) -> mt.Compose:
    """Random augmentation applied to cached network-resolution items (training only)."""
    from .window_sampling import RandWindowd

    keys = [IMAGE, LABEL, BODY]
    soft = cfg.label_resize_mode == "area"
    return mt.Compose(
        [
            RandWindowd(prob=cfg.window_probability, grid=cfg.spatial_size, soft_label=soft),
            RandEdgeCutd(keys=keys, prob=cfg.edge_cut_probability, soft_label=cfg.label_resize_mode == "area"),
            mt.RandFlipd(keys=keys, prob=cfg.flip_prob, spatial_axis=0),
            mt.RandFlipd(keys=keys, prob=cfg.flip_prob, spatial_axis=1),
            mt.RandFlipd(keys=keys, prob=cfg.flip_prob, spatial_axis=2),
            mt.RandRotate90d(keys=keys, prob=cfg.rot90_prob, max_k=3, spatial_axes=(0, 1)),
            mt.RandShiftIntensityd(keys=[IMAGE], offsets=cfg.shift_offset, prob=cfg.shift_prob),
            mt.EnsureTyped(keys=keys, track_meta=False),
        ]
    )


class RandEdgeCutd(mt.RandomizableTransform, mt.MapTransform):
    """With probability `prob`, turn a cached sample into a scan whose top or bottom ends inside the spleen.

    Inference resizes the whole scan to the grid, so a scan that stops inside the spleen shows a
    spleen cut flat at the first or last grid slice. Phantoms have that 15 % of the time, and such
    spleens were most of the whole-organ misses. The transform picks a cut slice inside the spleen's z
    range (keeping 20-80 % of it), keeps a run of `min_scale`..1 of the grid's slices that ends there,
    and resizes that run back to the grid in z (image and soft labels linearly, 0/1 labels and the
    body mask by nearest neighbour), as a scan of that shorter range would be. Samples without
    spleen are left alone. Runs on network-resolution items (after the cache).
    """

    def __init__(
        self, keys: Sequence[str], prob: float, soft_label: bool, label_key: str = LABEL, min_scale: float = 0.5
    ):
        mt.RandomizableTransform.__init__(self, prob)
        mt.MapTransform.__init__(self, keys)
        self.label_key, self.soft_label, self.min_scale = label_key, soft_label, min_scale

    def _window(self, label: torch.Tensor) -> tuple[int, int] | None:
        depth = label.shape[-1]
        zs = torch.nonzero(label.reshape(-1, depth).amax(0) >= 0.5).flatten()
        if len(zs) < 3:
            return None
        z0, z1 = int(zs[0]), int(zs[-1]) + 1
        cut = int(round(z0 + self.R.uniform(0.2, 0.8) * (z1 - z0)))
        length = max(2, int(round(self.R.uniform(self.min_scale, 1.0) * depth)))
        if self.R.random() < 0.5:  # the scan ends at the cut: the spleen's top is missing
            return max(0, cut - length), cut
        return cut, min(depth, cut + length)  # the scan starts at the cut: its bottom is missing

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform or int(d.get("window", 0)):  # a refinement window: its own edges
            return d
        window = self._window(torch.as_tensor(d[self.label_key]))
        if window is None:
            return d
        for key in self.key_iterator(d):
            value = torch.as_tensor(d[key])
            part = value[..., window[0] : window[1]].float()
            linear = key == IMAGE or (key == self.label_key and self.soft_label)
            out = F.interpolate(
                part[None],
                size=tuple(value.shape[-3:]),
                mode="trilinear" if linear else "nearest-exact",
                align_corners=False if linear else None,
            )[0]
            d[key] = out.to(value.dtype)
        return d


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
