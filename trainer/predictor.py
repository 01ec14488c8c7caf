"""The one predictor: image + clicks -> spleen mask in the original geometry (spec §5).

Used by `infer`, evaluation, the MONAI bundle and the Ray Serve deployment, so they cannot drift.
Clicks are voxel indices of the original file's array; they are mapped through the reorientation to
RAS (`inv(A_ras) @ A_orig`) and scaled to the network grid (index times grid / scan, truncated), as
the bundle does. The `bundle` profile then does what the model zoo's `inference.json` does, to the
voxel (tests/test_model_zoo_parity.py): both softmax channels resized back in `area` mode (its
`Invertd` of `Resized(mode="area")`), the reorientation undone, argmax. Profiles with
`upsample: logit` (`cpu`, `tiny`) interpolate the spleen logit trilinearly instead, which varies
smoothly where the probability saturates: with the same model the mask follows the boundary more
closely (validation split: missed spleen 7.5 -> 7.2 % and extra 9.6 -> 8.6 % of the spleen, Dice
0.9165 -> 0.9227; docs/evaluation.md, row S).

Click locality (profiles `cpu` and `tiny`; off for `bundle`, which matches the model zoo): a click
edits the mask near itself and nowhere else. The network answers a click with its whole output, and
a small model trained for minutes also moves the boundary tens of millimetres away (measured: the
median changed voxel lay 20-35 mm from the click, a third to two thirds of the changes wrong), so
corrective clicks on a good mask cost about as much as they fixed. With `click_radius` R > 0 the
returned probability is the automatic one plus, near spleen clicks, what the clicked pass adds, and
minus, near background clicks, what it removes, weighted by exp(-d^2 / 2R^2) (d in grid voxels):
`p = a + w_spleen * max(c - a, 0) - w_background * max(a - c, 0)`. The weight is also 1 on the whole
connected piece of the change that contains the click (for spleen clicks after an opening, so a
shell one or two voxels thick, the boundary moving out all round, is not a piece): a click in a
wholly missed spleen takes all of it, a click in a false-positive blob removes all of it. A spleen
click can only add spleen, a background click only remove it, as users expect. The automatic pass
is cached in the `Prepared` volume, so an interactive session pays for it once.

Then the nudge: most remaining errors of a good mask are sheets thinner than one grid voxel along the
boundary, which the network's answer to a click seldom flips (measured: a spleen click fixed 0-10
voxels of a 1400-voxel missed sheet). So, where the clicked voxel (its exact, fractional grid
position) still has the wrong label, the logit is shifted near it, by a Gaussian of width
1.5 R, just far enough that the clicked voxel crosses the threshold by `NUDGE_MARGIN`: the boundary
moves locally through the click, as a user dragging it would move it. Each click then gets its own
label (with `upsample: logit`; up to interpolation otherwise), and the mean Dice stops falling from one
click to the next (docs/evaluation.md, row S).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from .clicks import ClickError as ClickError  # re-exported: its old home
from .clicks import Clicks, as_point, click_weight, empty_clicks, guidance_channels, validate_clicks
from .config import CLICK_CHANNELS, Profile, check_click_radius
from .data import DataError, load_volume, write_mask
from .engine import autocast
from .network import LoadedModel, load_model
from .network import infer_profile as infer_profile  # re-exported: its old home
from .runtime import default_device
from .transforms import inference_transforms

#: Clicks as exact (fractional) network-grid coordinates, for the nudge (see the module docstring).
GridPoints = dict[str, list[tuple[float, ...]]]
#: Width of the nudge per unit of click radius (R 2 -> sigma 3 grid voxels: chosen on the held-out
#: set of the demo; sigma 2 left a fall of 0.002 in the mean).
NUDGE_SIGMA_PER_RADIUS = 1.5
#: How far past the threshold a nudged click lands, in logit units (0.2: probability 0.55).
NUDGE_MARGIN = 0.2
#: Probabilities are clipped to [eps, 1 - eps] before taking logits (float32 rounds 1 - 1e-8 to 1).
LOGIT_EPS = 1e-6


@dataclass(kw_only=True, slots=True)
class Prepared:
    """A preprocessed volume, reusable across clicks (what an interactive session caches)."""

    image: torch.Tensor  # (1, 1, S, S, S) float32 in [0, 1], RAS, network grid
    orig_shape: tuple[int, ...]  # 3D
    orig_affine: np.ndarray
    to_ras: np.ndarray  # nibabel orientation transform original -> RAS
    ras_shape: tuple[int, ...]  # 3D
    index_to_ras: np.ndarray  # 4x4: original voxel index -> RAS-ordered voxel index
    # The automatic (no-click) probability (1, S, S, S) on the CPU, and the predictor that made it:
    # click locality blends clicked passes with it, and a reloaded model must not reuse it.
    auto_prob: torch.Tensor | None = None
    auto_owner: object | None = None

    @property
    def nbytes(self) -> int:
        extra = 0 if self.auto_prob is None else self.auto_prob.element_size() * self.auto_prob.nelement()
        return self.image.element_size() * self.image.nelement() + extra


@dataclass(kw_only=True, slots=True)
class Prediction:
    mask: np.ndarray  # uint8, original array order
    affine: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


# dtypes torch.from_numpy shares without a copy and the chain's windowing handles directly.
_SHARED_DTYPES = {np.dtype(t) for t in (np.float32, np.float64, np.int16, np.int32, np.int64, np.int8, np.uint8)}


def _as_channel_tensor(image: np.ndarray) -> torch.Tensor:
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


def _upsample_window(fg_along: torch.Tensor, fine: int, mode: str = "trilinear") -> tuple[slice, slice, slice] | None:
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


class Predictor:
    """DeepEdit inference for one network.

    Args:
        model: a DynUNet of `profile`.
        profile: its profile (spatial size).
        device: where the forward runs.
        amp: autocast the forward (fp16 on CUDA, bf16 on CPU); None: the profile's choice (fp16 on
            CUDA for `bundle`, as the model zoo; fp32 otherwise).
        sigma: Gaussian sigma of the click maps (default: the profile's).
        click_radius: click locality radius in grid voxels, 0 = off (default: the profile's; see
            the module docstring).
        version: a label for the loaded weights (checkpoint digest or path).
    """

    def __init__(self, model: torch.nn.Module, profile: Profile, *, device: torch.device | None = None,
                 amp: bool | None = None, sigma: float | None = None, click_radius: float | None = None,
                 version: str = "unknown"):
        self.device = device or default_device()
        self.model = model.to(self.device).eval()
        self.profile = profile
        # None: the profile's precision. The model zoo's evaluator (amp: true) runs fp16 autocast on
        # CUDA, and nothing on a CPU (its autocast is CUDA's), so the bundle profile does the same.
        self.amp = (profile.cuda_fp16_inference and self.device.type == "cuda") if amp is None else bool(amp)
        self.sigma = sigma if sigma is not None else profile.guidance_sigma
        self.click_radius = check_click_radius(profile.click_radius if click_radius is None else click_radius)
        self.version = version
        self._pre = inference_transforms(profile.spatial_size)
        self._token = object()  # identifies this predictor's cached automatic passes

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, profile: str | None = None, device: torch.device | None = None,
                        amp: bool | None = None, click_radius: float | None = None, digest: bool = False) -> Predictor:
        """A Predictor for a checkpoint at a local path, `file://` or `s3://` URI (`network.load_model`)."""
        loaded = load_model(path, profile=profile, digest=digest)
        return cls.from_loaded(loaded, device=device, amp=amp, click_radius=click_radius)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, *, device: torch.device | None = None, amp: bool | None = None,
                    click_radius: float | None = None) -> Predictor:
        # Our checkpoints store the training's setting (None: the profile's default).
        sigma = (loaded.checkpoint.config or {}).get("guidance_sigma") or loaded.profile.guidance_sigma
        return cls(loaded.model, loaded.profile, device=device, amp=amp, sigma=sigma, click_radius=click_radius,
                   version=loaded.version)

    # ----------------------------------------------------------------- stages

    def preprocess(self, image: np.ndarray, affine: np.ndarray) -> Prepared:
        """Original array + affine -> network-grid tensor and the geometry needed to go back.

        `image` may be in any numeric dtype (e.g. the file's int16): the chain's windowing makes the
        one float32 copy, so no full-resolution float conversion is needed before it.
        """
        image = np.asarray(image)
        if image.ndim != 3:
            raise DataError(f"expected a 3D volume, got shape {tuple(image.shape)}")
        affine = np.asarray(affine, dtype=np.float64)
        ornt = nib.orientations.io_orientation(affine)
        ras_shape = tuple(int(image.shape[int(a)]) for a in np.argsort(ornt[:, 0]))
        # index_to_ras maps an original voxel index to its index in the RAS-ordered array.
        index_to_ras = np.linalg.inv(nib.orientations.inv_ornt_aff(ornt, image.shape))
        meta = MetaTensor(_as_channel_tensor(image), affine=torch.as_tensor(affine))
        out = self._pre({"image": meta})["image"]
        tensor = out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)
        return Prepared(
            image=tensor[None].float().contiguous(),
            orig_shape=tuple(int(s) for s in image.shape),
            orig_affine=affine,
            to_ras=ornt,
            ras_shape=ras_shape,
            index_to_ras=index_to_ras,
        )

    def map_clicks(self, clicks: Clicks, prepared: Prepared) -> Clicks:
        """Original voxel indices -> network-grid indices (spec §5)."""
        # The model zoo's arithmetic (ResizeGuidanceMultipleLabelDeepEditd): the index times the float
        # factor grid / scan, truncated, so a click on an exact multiple lands where the bundle puts it.
        factor = np.divide(self.profile.spatial_size, prepared.ras_shape)
        zoo_to_ras = _zoo_index_to_ras(prepared) if self.profile.zoo_click_arithmetic else None
        out: Clicks = {}
        for name, points in clicks.items():
            if self.profile.zoo_click_arithmetic:
                idx = [(zoo_to_ras @ np.array([*p, 1.0]))[:3].astype(int) for p in points]
            else:
                idx = [np.rint(_ras_index(p, prepared)).astype(int) for p in points]
            out[name] = [as_point(np.multiply(i, factor).astype(int)) for i in idx]
        return out

    def grid_points(self, clicks: Clicks, prepared: Prepared) -> GridPoints:
        """Original voxel indices -> where their centres fall on the network grid, as fractions.

        The convention of the trilinear resize back (`align_corners=False`): a fine voxel j of N lies at
        (j + 0.5) * S / N - 0.5 on a grid of S, so interpolating the grid there gives the voxel's value.
        """
        size = np.asarray(self.profile.spatial_size, dtype=np.float64)
        fine = np.asarray(prepared.ras_shape, dtype=np.float64)
        out: GridPoints = {}
        for name, points in clicks.items():
            out[name] = [tuple(float(v) for v in (_ras_index(p, prepared) + 0.5) * size / fine - 0.5) for p in points]
        return out

    @torch.no_grad()
    def network(self, prepared: list[Prepared], net_clicks: list[Clicks]) -> torch.Tensor:
        """The network's batched answer on the network grid: (B, 1, S, S, S) spleen probability, or
        with `upsample: area` (B, 2, S, S, S), the softmax of (background, spleen) as the model zoo keeps it."""
        size = tuple(self.profile.spatial_size)
        guidance = np.stack([guidance_channels(c, size, self.sigma) for c in net_clicks])
        image = torch.cat([p.image for p in prepared]).to(self.device)
        x = torch.cat([image, torch.from_numpy(guidance).to(self.device)], dim=1)
        with autocast(self.device, self.amp):
            logits = self.model(x)
        if self.profile.upsample == "area":
            # The model zoo's postprocessing: softmax of the network's output as it is (fp16 under its
            # CUDA AMP), both channels kept, so the argmax after the resize breaks ties as it does.
            return torch.softmax(logits, dim=1).float()
        # softmax over two channels, spleen part: sigmoid of the logit difference (same value, one pass).
        logits = logits.float()
        return torch.sigmoid(logits[:, 1:2] - logits[:, 0:1])

    @torch.no_grad()
    def forward(self, prepared: list[Prepared], net_clicks: list[Clicks],
                exact: list[GridPoints] | None = None) -> torch.Tensor:
        """Batched prediction -> (B, 1, S, S, S) spleen probability, with click locality applied.

        Volumes with clicks whose automatic pass is not cached yet get it in the same batch. `exact`
        (from `grid_points`, one per volume) turns on the nudge; without it clicks act only through
        the network.
        """
        if self.click_radius <= 0:
            return self.network(prepared, net_clicks)
        if self.profile.upsample == "area":  # click locality blends spleen probabilities
            return self._local(prepared, net_clicks, exact, lambda *a: self.network(*a)[:, 1:2])
        return self._local(prepared, net_clicks, exact, self.network)

    def _local(self, prepared, net_clicks, exact, network) -> torch.Tensor:
        """`forward` with click locality and the nudge; `network` gives (B, 1, S, S, S) probabilities."""
        cached = [p.auto_prob is not None and p.auto_owner is self._token for p in prepared]
        missing = [b for b, c in enumerate(net_clicks) if _has_clicks(c) and not cached[b]]
        prob = network(list(prepared) + [prepared[b] for b in missing],
                       list(net_clicks) + [empty_clicks() for _ in missing])
        for row, b in enumerate(missing, start=len(prepared)):
            self._cache_auto(prepared[b], prob[row])
        out = prob[: len(prepared)].clone()
        for b, (p, c) in enumerate(zip(prepared, net_clicks)):
            if not _has_clicks(c):
                self._cache_auto(p, out[b])
                continue
            auto = p.auto_prob.to(out.device)[0]
            clicked = out[b, 0]
            gain, loss = (clicked - auto).clamp(min=0), (auto - clicked).clamp(min=0)
            result = auto.clone()
            if c.get("spleen"):
                result += self._click_weight(c["spleen"], (clicked > 0.5) & (auto <= 0.5), opening=True) * gain
            if c.get("background"):
                result -= self._click_weight(c["background"], (auto > 0.5) & (clicked <= 0.5), opening=False) * loss
            if exact is not None:
                result = nudge(result, exact[b], NUDGE_SIGMA_PER_RADIUS * self.click_radius)
            out[b, 0] = result
        return out

    def _click_weight(self, points: list, changed: torch.Tensor, *, opening: bool) -> torch.Tensor:
        """Where clicks of one label may change the mask: a Gaussian of `click_radius` around each
        click, and all of each connected piece of `changed` (what the clicked pass adds, or removes)
        that contains a click, so a click in a missed spleen or in a false-positive blob takes the
        whole of it. With `opening`, thin parts of `changed` are opened away first."""
        device, region = changed.device, changed.cpu().numpy()
        weight = click_weight(points, region.shape, self.click_radius)
        if region.any():
            self._take_clicked_pieces(weight, points, region, opening)
        return torch.from_numpy(weight).to(device)

    @staticmethod
    def _take_clicked_pieces(weight: np.ndarray, points: list, changed: np.ndarray, opening: bool) -> None:
        from scipy import ndimage

        cube = np.ones((3, 3, 3), bool)
        # For spleen clicks, an opening first: a shell one or two voxels thick (the clicked pass moving
        # the boundary out all round) is not a piece; a missed spleen is thick and stays. Background
        # clicks take their piece as it is: opened, it left 21 % of false-positive blobs instead of
        # 8 % (tests/test_clicks_work.py's check), for falls of at most 0.0006 (docs/evaluation.md).
        pieces, _ = ndimage.label(ndimage.binary_opening(changed, cube) if opening else changed, structure=cube)
        voxels = [tuple(min(max(int(v), 0), n - 1) for v, n in zip(q, changed.shape)) for q in points]
        hit = {int(pieces[v]) for v in voxels} - {0}
        if hit:
            weight[np.isin(pieces, sorted(hit))] = 1.0

    def _cache_auto(self, prepared: Prepared, prob: torch.Tensor) -> None:
        prepared.auto_prob = prob.detach().to("cpu", torch.float32).clone()
        prepared.auto_owner = self._token

    def postprocess(self, prob: torch.Tensor, prepared: Prepared) -> np.ndarray:
        """(1, S, S, S) probability (or (2, S, S, S) softmax) -> uint8 mask in the original array order.

        Equal to `F.interpolate(prob, ras_shape, mode) > 0.5`, reoriented back (up to float rounding at
        values within ~1e-7 of 0.5), with mode `area` for `upsample: area` (the model zoo's `Invertd`
        of `Resized(mode="area")`, then argmax) and `trilinear` otherwise, but only the box that can be
        foreground is upsampled (see `_upsample_window`) and only that box is reoriented: a spleen is a
        few % of the volume. With `upsample: logit` the logit is interpolated and thresholded at 0 (the
        same box: a trilinear value of logits <= 0 cannot exceed 0 either).
        """
        p = prob.detach().float().reshape(-1, *prob.shape[-3:])
        # Fortran order, as NIfTI stores voxels (x fastest): writing it skips a full-volume transpose.
        mask = np.zeros(prepared.orig_shape, np.uint8, order="F")
        # Two channels (background, spleen): the argmax, ties to background, as the model zoo's AsDiscrete.
        fg = p[1] > p[0] if len(p) == 2 else p[0] > 0.5
        if not bool(fg.any()):
            return mask
        mode = "area" if self.profile.upsample == "area" else "trilinear"
        found = [
            _upsample_window(fg.any(dim=tuple(d for d in range(3) if d != axis)), fine, mode)
            for axis, fine in enumerate(prepared.ras_shape)
        ]
        if any(w is None for w in found):
            return mask
        windows = [w for w in found if w is not None]
        coarse, level = p[(slice(None), *(w[0] for w in windows))], 0.5
        if self.profile.upsample == "logit" and len(p) == 1:
            coarse, level = torch.logit(coarse.clamp(LOGIT_EPS, 1 - LOGIT_EPS)), 0.0
        size = tuple(w[1].stop - w[1].start for w in windows)
        up = F.interpolate(coarse[None], size=size, mode=mode, **({} if mode == "area" else {"align_corners": False}))[0]
        up = up[(slice(None), *(w[2] for w in windows))]
        crop = (up[1] > up[0] if len(up) == 2 else up[0] > level).cpu().numpy().view(np.uint8)
        # Back to the original array order: reorient the crop and place it at the box's original indices.
        back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), prepared.to_ras)
        crop = nib.orientations.apply_orientation(crop, back)
        box = []
        for ras_axis, flip in prepared.to_ras:
            fine, keep = windows[int(ras_axis)][1], windows[int(ras_axis)][2]
            j0, j1 = fine.start + keep.start, fine.start + keep.stop
            n = prepared.ras_shape[int(ras_axis)]
            box.append(slice(n - j1, n - j0) if flip < 0 else slice(j0, j1))
        mask[tuple(box)] = crop
        return mask

    # ----------------------------------------------------------------- one call

    def predict_prepared(self, prepared: Prepared, clicks: Any = None) -> Prediction:
        t0 = time.perf_counter()
        checked = validate_clicks(clicks, prepared.orig_shape)
        net_clicks = self.map_clicks(checked, prepared)
        t1 = time.perf_counter()
        prob = self.forward([prepared], [net_clicks], [self.grid_points(checked, prepared)])
        t2 = time.perf_counter()
        mask = self.postprocess(prob[0], prepared)
        t3 = time.perf_counter()
        return Prediction(mask=mask, affine=prepared.orig_affine,
                          timings={"clicks": t1 - t0, "forward": t2 - t1, "postprocess": t3 - t2})

    def predict(self, image: np.ndarray, affine: np.ndarray, clicks: Any = None) -> Prediction:
        # Validate clicks before spending time on preprocessing.
        validate_clicks(clicks, tuple(image.shape)) if image.ndim == 3 else None
        t0 = time.perf_counter()
        prepared = self.preprocess(image, affine)
        t1 = time.perf_counter()
        pred = self.predict_prepared(prepared, clicks)
        pred.timings = {"preprocess": t1 - t0, **pred.timings}
        return pred

    def predict_file(self, image_path: str | Path, output_path: str | Path, clicks: Any = None) -> Prediction:
        t0 = time.perf_counter()
        image, affine = load_volume(image_path)
        t1 = time.perf_counter()
        pred = self.predict(image, affine, clicks)
        t2 = time.perf_counter()
        write_mask(output_path, pred.mask, pred.affine)
        pred.timings = {"load": t1 - t0, **pred.timings, "write": time.perf_counter() - t2}
        return pred


def _ras_index(point, prepared: Prepared) -> np.ndarray:
    """An original voxel index -> its index in the RAS-ordered array (float; exact integers)."""
    return (prepared.index_to_ras @ np.array([*point, 1.0]))[:3]


def _zoo_index_to_ras(prepared: Prepared) -> np.ndarray:
    """The model zoo's original index -> RAS index map, as floats: `inv(A_ras) @ A_orig`, with A_ras
    the affine MONAI's Orientationd gives (A_orig @ the reorientation), in float64 as it computes it."""
    xform = nib.orientations.inv_ornt_aff(prepared.to_ras, prepared.orig_shape)
    return np.linalg.inv(prepared.orig_affine @ xform) @ prepared.orig_affine


def _has_clicks(clicks: Mapping[str, list]) -> bool:
    return any(len(points) for points in clicks.values())


def nudge(prob: torch.Tensor, points: GridPoints, sigma: float, margin: float = NUDGE_MARGIN) -> torch.Tensor:
    """Shift the logit near each click whose voxel still has the wrong label, so that it has the
    right one by `margin` (see the module docstring).

    Args:
        prob: (S, S, S) spleen probability on the network grid.
        points: clicks as fractional grid coordinates (`Predictor.grid_points`).
        sigma: Gaussian width of the shift, in grid voxels.
        margin: how far past the threshold (logit 0) the clicked voxel lands.

    Where clicks of one label overlap, the larger shift counts; spleen and background shifts add.
    """
    from scipy import ndimage

    if sigma <= 0 or not _has_clicks(points):
        return prob
    logit = torch.logit(prob.detach().float().clamp(LOGIT_EPS, 1 - LOGIT_EPS)).cpu().numpy()
    sign = {"spleen": 1.0, "background": -1.0}
    shift = {}
    for name in CLICK_CHANNELS:
        wrong, amounts = [], []
        for point in points.get(name, []):
            here = float(ndimage.map_coordinates(logit, np.reshape(point, (3, 1)), order=1, mode="nearest")[0])
            if margin - sign[name] * here > 0:
                wrong.append(point)
                amounts.append(margin - sign[name] * here)
        shift[name] = click_weight(wrong, logit.shape, sigma, scales=amounts, truncate=3.0)
    if not any(s.any() for s in shift.values()):
        return prob
    logit += shift["spleen"] - shift["background"]
    return torch.sigmoid(torch.from_numpy(logit)).to(prob.device, prob.dtype)


def __getattr__(name: str) -> Any:
    """`load_clicks` lived here; it is the CLI's now (`trainer.cli`), imported on use so that inference
    never imports the command line."""
    if name == "load_clicks":
        from .cli import load_clicks

        return load_clicks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
