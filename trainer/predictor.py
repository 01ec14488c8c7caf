"""The one predictor: image + clicks -> spleen mask in the original geometry (spec §5).

Used by `infer`, evaluation, the MONAI bundle, batch annotation and the Ray Serve deployment, so they
cannot drift. Stages: `preprocess`, `map_clicks`, `forward` (batched), `windows`, `postprocess`.

Clicks are voxel indices of the original file's array; they are mapped through the reorientation to
RAS (`inv(A_ras) @ A_orig`) and scaled to the network grid (index times grid / scan, truncated), as
the bundle does. The `bundle` profile then does what the model zoo's `inference.json` does, to the
voxel (tests/test_model_zoo_parity.py): both softmax channels resized back in `area` mode (its
`Invertd` of `Resized(mode="area")`), the reorientation undone, argmax. Profiles with
`upsample: logit` (`cpu`, `tiny`) interpolate the spleen logit trilinearly instead, which follows the
boundary more closely (docs/evaluation.md, row S).

How clicks act: with refinement (checkpoints trained with windows) the whole-scan pass stays the
automatic one, cached in the `Prepared` volume, and clicks are answered by windows around them at a
fine spacing (`trainer.refine`); without it, by the whole-scan pass with click locality and the nudge
(`trainer.locality`; off for `bundle`, which matches the model zoo).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from . import refine as rf
from .clicks import ClickError as ClickError  # re-exported: its old home
from .clicks import Clicks, as_point, empty_clicks, guidance_channels, validate_clicks
from .config import Profile, check_click_radius
from .data import DataError, load_volume, write_mask
from .geometry import as_channel_tensor, global_crop, place_global, place_ras, ras_index, zoo_index_to_ras
from .locality import LOGIT_EPS, GridPoints, has_clicks, localize
from .locality import nudge as nudge  # re-exported: its old home
from .network import LoadedModel, autocast, default_device, load_model
from .network import infer_profile as infer_profile  # re-exported: its old home
from .transforms import inference_transforms


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
    # The automatic pass at scan resolution, made once per volume with refinement (every click of a
    # session starts from it): (the predictor that made it, `geometry.global_crop`'s RAS crop and box,
    # or None when it holds no spleen), one tuple so a request racing a model swap never mixes the two.
    auto_placed: tuple[object, tuple[np.ndarray, list[slice]] | None] | None = None
    # Refinement's fine volume (F...) uint8, RAS (`trainer.refine`); None without refinement. Its window
    # answers, by window and guidance, and the predictor that made them (`Predictor.windows`).
    fine: torch.Tensor | None = None
    windows: dict = field(default_factory=dict)
    window_owner: object | None = None

    @property
    def nbytes(self) -> int:
        tensors = [self.image, self.auto_prob, self.fine, *(w.logit for w in self.windows.values())]
        placed = self.auto_placed[1][0].nbytes if self.auto_placed and self.auto_placed[1] else 0
        return placed + sum(t.element_size() * t.nelement() for t in tensors if t is not None)


#: Window answers kept with a volume (a session), as float16 logits: 8 x 0.25 MB for `cpu`, 8 x 4 MB for
#: `bundle`. A session's byte count is taken at upload, before any window: these are on top of it.
WINDOW_CACHE = rf.MAX_WINDOWS


@dataclass(frozen=True, slots=True)
class WindowAnswer:
    """The network's answer on a refinement window: its box of the fine volume and the spleen logit (G...)."""

    window: rf.Window
    logit: torch.Tensor
    sign: int = 0  # refine.click_sign of its guidance
    clicks: tuple = ()  # its guidance clicks, window grid voxels


@dataclass(kw_only=True, slots=True)
class Prediction:
    mask: np.ndarray  # uint8, original array order
    affine: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


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
            `trainer.locality`). Refinement turns it off.
        version: a label for the loaded weights (checkpoint digest or path).
        refine: answer clicks with a click-centred window at a fine spacing (`trainer.refine`);
            for checkpoints trained with windows (`from_loaded` decides from the checkpoint).
        window_mm: the window's extent at its finest (default: the profile's `window_mm`).
        refine_radius_mm: a window changes the mask only within about this distance of its clicks (and
            on the pieces it flips that hold a click); 0: anywhere in the window (default: the profile's).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        profile: Profile,
        *,
        device: torch.device | None = None,
        amp: bool | None = None,
        sigma: float | None = None,
        click_radius: float | None = None,
        version: str = "unknown",
        refine: bool = False,
        window_mm: float | None = None,
        refine_radius_mm: float | None = None,
    ):
        self.device = device or default_device()
        self.model = model.to(self.device).eval()
        self.profile = profile
        # None: the profile's precision. The model zoo's evaluator (amp: true) runs fp16 autocast on
        # CUDA, and nothing on a CPU (its autocast is CUDA's), so the bundle profile does the same.
        self.amp = (profile.cuda_fp16_inference and self.device.type == "cuda") if amp is None else bool(amp)
        self.sigma = sigma if sigma is not None else profile.guidance_sigma
        self.refine = bool(refine)
        radius = profile.click_radius if click_radius is None else click_radius
        self.click_radius = 0.0 if self.refine else check_click_radius(radius)
        self.window_spacing = rf.window_spacing(profile.spatial_size, window_mm or profile.window_mm)
        self.refine_radius_mm = profile.refine_radius_mm if refine_radius_mm is None else float(refine_radius_mm)
        self.version = version
        self._pre = inference_transforms(profile.spatial_size)
        self._token = object()  # identifies this predictor's cached automatic passes
        self.window_forwards = 0  # refinement windows run so far (cached ones not counted)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        profile: str | None = None,
        device: torch.device | None = None,
        amp: bool | None = None,
        click_radius: float | None = None,
        digest: bool = False,
        refine: bool | None = None,
    ) -> Predictor:
        """A Predictor for a checkpoint at a local path, `file://` or `s3://` URI (`network.load_model`)."""
        loaded = load_model(path, profile=profile, digest=digest)
        return cls.from_loaded(loaded, device=device, amp=amp, click_radius=click_radius, refine=refine)

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedModel,
        *,
        device: torch.device | None = None,
        amp: bool | None = None,
        click_radius: float | None = None,
        refine: bool | None = None,
    ) -> Predictor:
        """refine None: refine when the checkpoint was trained with windows (never a model-zoo `model.pt`)."""
        config = loaded.checkpoint.config or {}
        # Our checkpoints store the training's setting (None: the profile's default).
        sigma = config.get("guidance_sigma") or loaded.profile.guidance_sigma
        if refine is None:
            refine = rf.trained_with_windows(config, loaded.profile)
        return cls(
            loaded.model,
            loaded.profile,
            device=device,
            amp=amp,
            sigma=sigma,
            click_radius=click_radius,
            version=loaded.version,
            refine=refine,
            window_mm=config.get("window_mm"),
        )

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
        meta = MetaTensor(as_channel_tensor(image), affine=torch.as_tensor(affine))
        window_hu, *to_grid = self._pre.transforms
        windowed = window_hu({"image": meta})
        out = windowed
        for transform in to_grid:
            out = transform(out)
        tensor = out["image"].as_tensor() if isinstance(out["image"], MetaTensor) else torch.as_tensor(out["image"])
        return Prepared(
            fine=rf.fine_volume(windowed["image"], self.window_spacing) if self.refine else None,
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
        zoo_to_ras = zoo_index_to_ras(prepared) if self.profile.zoo_click_arithmetic else None
        out: Clicks = {}
        for name, points in clicks.items():
            if self.profile.zoo_click_arithmetic:
                idx = [(zoo_to_ras @ np.array([*p, 1.0]))[:3].astype(int) for p in points]
            else:
                idx = [np.rint(ras_index(p, prepared)).astype(int) for p in points]
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
            out[name] = [tuple(float(v) for v in (ras_index(p, prepared) + 0.5) * size / fine - 0.5) for p in points]
        return out

    @torch.no_grad()
    def network(self, prepared: list[Prepared], net_clicks: list[Clicks]) -> torch.Tensor:
        """The network's batched answer on the network grid: (B, 1, S, S, S) spleen probability, or
        with `upsample: area` (B, 2, S, S, S), the softmax of (background, spleen) as the model zoo keeps it."""
        logits = self._logits(torch.cat([p.image for p in prepared]), net_clicks)
        if self.profile.upsample == "area":
            # The model zoo's postprocessing: softmax of the network's output as it is (fp16 under its
            # CUDA AMP), both channels kept, so the argmax after the resize breaks ties as it does.
            return torch.softmax(logits, dim=1).float()
        # softmax over two channels, spleen part: sigmoid of the logit difference (same value, one pass).
        logits = logits.float()
        return torch.sigmoid(logits[:, 1:2] - logits[:, 0:1])

    def _logits(self, image: torch.Tensor, clicks: list[Clicks]) -> torch.Tensor:
        """(B, 1, G...) images + one click set each -> (B, 2, G...) raw network output."""
        size = tuple(image.shape[-3:])
        guidance = np.stack([guidance_channels(c, size, self.sigma) for c in clicks])
        x = torch.cat([image.to(self.device), torch.from_numpy(guidance).to(self.device)], dim=1)
        with autocast(self.device, self.amp):
            return self.model(x)

    @torch.no_grad()
    def forward(
        self, prepared: list[Prepared], net_clicks: list[Clicks], exact: list[GridPoints] | None = None
    ) -> torch.Tensor:
        """Batched whole-scan prediction -> (B, 1, S, S, S) spleen probability (or (B, 2, ...), see `network`).

        With refinement: the automatic pass, cached per volume (clicks act through `windows`). Else with
        click locality: the clicked pass edited near the clicks (`trainer.locality`); volumes with clicks
        whose automatic pass is not cached yet get it in the same batch. `exact` (from `grid_points`,
        one per volume) turns on the nudge.
        """
        if self.refine:
            return self._automatic(prepared)
        if self.click_radius <= 0:
            return self.network(prepared, net_clicks)
        cached = [self._cached(p) for p in prepared]
        missing = [b for b, c in enumerate(net_clicks) if has_clicks(c) and not cached[b]]
        prob = self.network(
            list(prepared) + [prepared[b] for b in missing], list(net_clicks) + [empty_clicks() for _ in missing]
        )
        for row, b in enumerate(missing, start=len(prepared)):
            self._cache_auto(prepared[b], prob[row])
        out = prob[: len(prepared)].clone()
        channel = 1 if self.profile.upsample == "area" else 0  # click locality blends spleen probabilities
        for b, (p, c) in enumerate(zip(prepared, net_clicks)):
            if not has_clicks(c):
                self._cache_auto(p, out[b])
                continue
            assert p.auto_prob is not None  # cached above
            auto = p.auto_prob.to(out.device)
            spleen = localize(auto[channel], out[b, channel], c, None if exact is None else exact[b], self.click_radius)
            out[b, channel] = spleen
            if len(out[b]) == 2:
                out[b, 0] = 1 - spleen
        return out

    def _automatic(self, prepared: list[Prepared]) -> torch.Tensor:
        todo = [b for b, p in enumerate(prepared) if not self._cached(p)]
        if todo:
            prob = self.network([prepared[b] for b in todo], [empty_clicks() for _ in todo])
            for row, b in enumerate(todo):
                self._cache_auto(prepared[b], prob[row])
        return torch.stack([p.auto_prob for p in prepared if p.auto_prob is not None]).to(self.device)

    def _cached(self, prepared: Prepared) -> bool:
        return prepared.auto_prob is not None and prepared.auto_owner is self._token

    def _cache_auto(self, prepared: Prepared, prob: torch.Tensor) -> None:
        prepared.auto_prob = prob.detach().to("cpu", torch.float32).clone()
        prepared.auto_owner = self._token
        prepared.auto_placed = None

    @torch.no_grad()
    def windows(self, prepared: list[Prepared], clicks: list[Clicks]) -> list[list[WindowAnswer]]:
        """Refinement: per volume, one window per cluster of clicks (`refine.cluster_clicks`), with every
        click inside it as guidance; the windows not cached with the volume run in one batched forward.

        `clicks` are validated original voxel indices (`validate_clicks`). Empty lists where a volume has
        no clicks or the predictor does not refine. A session's earlier windows stay cached, so a new click
        costs one window forward (its cluster's).
        """
        out: list[list[WindowAnswer]] = [[] for _ in prepared]
        wanted: list[tuple[int, tuple, rf.Window, dict]] = []
        for b, c in enumerate(clicks):
            if self.refine and has_clicks(c):
                wanted += [(b, *w) for w in rf.plan_windows(prepared[b], c, self.profile.spatial_size)]
        # Answers are collected here, not read back from the caches: caching one may evict another.
        answers = {(b, key): prepared[b].windows[key] for b, key, *_ in wanted if self._window_cached(prepared[b], key)}
        todo = [w for w in wanted if (w[0], w[1]) not in answers]
        if todo:
            grid = self.profile.spatial_size
            image = torch.stack([rf.crop(prepared[b].fine, window, grid) for b, _, window, _ in todo])  # type: ignore[arg-type]
            logits = self._logits(image, [guidance for *_, guidance in todo]).float().cpu()
            self.window_forwards += len(todo)
            for row, (b, key, window, guidance) in enumerate(todo):
                logit = (logits[row, 1] - logits[row, 0]).to(torch.float16)
                answer = WindowAnswer(
                    window=window,
                    logit=logit,
                    sign=rf.click_sign(guidance),
                    clicks=tuple(q for points in guidance.values() for q in points),
                )
                answers[(b, key)] = answer
                self._cache_window(prepared[b], key, answer, keep={k for v, k, *_ in wanted if v == b})
        for b, key, _, _ in wanted:
            out[b].append(answers[(b, key)])
        return out

    def _window_cached(self, prepared: Prepared, key: tuple) -> bool:
        return prepared.window_owner is self._token and key in prepared.windows

    def _cache_window(self, prepared: Prepared, key: tuple, answer: WindowAnswer, keep: set) -> None:
        """Cache a window answer; beyond WINDOW_CACHE the oldest go first (dicts keep insertion order),
        except those in `keep` (the current prediction's: at most MAX_WINDOWS, so the cache stays bounded)."""
        if prepared.window_owner is not self._token:
            prepared.windows, prepared.window_owner = {}, self._token
        prepared.windows[key] = answer
        stale = [k for k in prepared.windows if k not in keep]
        for old in stale[: max(0, len(prepared.windows) - WINDOW_CACHE)]:
            del prepared.windows[old]

    def postprocess(
        self,
        prob: torch.Tensor,
        prepared: Prepared,
        windows: list[WindowAnswer] | None = None,
        *,
        forwarded: bool = False,
    ) -> np.ndarray:
        """(1, S, S, S) probability (or (2, S, S, S) softmax) -> uint8 mask in the original array order.

        With refinement `windows`, their answers replace the mask inside their boxes (`refine.blend_into`).
        `forwarded`: `prob` is what `forward` gave for `prepared`; with refinement that is the cached
        automatic pass, whose scan-resolution mask is then made once and kept with the volume
        (`Prepared.auto_placed`) for every later click.

        Equal to `F.interpolate(prob, ras_shape, mode) > 0.5`, reoriented back (up to float rounding at
        values within ~1e-7 of 0.5), with mode `area` for `upsample: area` (the model zoo's `Invertd`
        of `Resized(mode="area")`, then argmax) and `trilinear` otherwise, but only the box that can be
        foreground is upsampled (see `trainer.geometry.upsample_window`) and only that box is reoriented: a spleen is a
        few % of the volume. With `upsample: logit` the logit is interpolated and thresholded at 0 (the
        same box: a trilinear value of logits <= 0 cannot exceed 0 either).
        """
        p = prob.detach().float().cpu().reshape(-1, *prob.shape[-3:])
        # Fortran order, as NIfTI stores voxels (x fastest): writing it skips a full-volume transpose.
        mask = np.zeros(prepared.orig_shape, np.uint8, order="F")
        if forwarded and self.refine and self._cached(prepared):
            placed = prepared.auto_placed
            if placed is None or placed[0] is not self._token:
                placed = prepared.auto_placed = (self._token, global_crop(p, prepared, self.profile.upsample))
            if placed[1] is not None:
                auto_crop, auto_box = placed[1]
                place_ras(mask, auto_crop, auto_box, prepared)
        else:
            place_global(mask, p, prepared, self.profile.upsample)
        if windows and prepared.fine is not None:
            spleen = p[1] if len(p) == 2 else p[0]
            # The whole-scan logit (two channels: log p1 - log p0, the same quantity).
            glogit = (
                torch.log(p[1].clamp_min(LOGIT_EPS)) - torch.log(p[0].clamp_min(LOGIT_EPS))
                if len(p) == 2
                else torch.logit(spleen.clamp(LOGIT_EPS, 1 - LOGIT_EPS))
            )
            fine, grid = tuple(prepared.fine.shape), self.profile.spatial_size
            answers = [
                (w.window, w.logit, w.sign, rf.window_to_scan(w.clicks, w.window, grid, prepared.ras_shape, fine))
                for w in windows
            ]
            for box, crop in rf.blend_into(
                glogit,
                answers,
                prepared.ras_shape,
                fine,
                tuple(rf.ras_spacing(prepared.orig_affine)),
                self.refine_radius_mm,
            ):
                place_ras(mask, crop, box, prepared)
        return mask

    def predict_prepared(self, prepared: Prepared, clicks: Any = None) -> Prediction:
        t0 = time.perf_counter()
        checked = validate_clicks(clicks, prepared.orig_shape)
        net_clicks = self.map_clicks(checked, prepared)
        t1 = time.perf_counter()
        prob = self.forward([prepared], [net_clicks], [self.grid_points(checked, prepared)])
        t2 = time.perf_counter()
        windows = self.windows([prepared], [checked])[0]
        t3 = time.perf_counter()
        mask = self.postprocess(prob[0], prepared, windows, forwarded=True)
        t4 = time.perf_counter()
        timings = {"clicks": t1 - t0, "forward": t2 - t1, "window": t3 - t2, "postprocess": t4 - t3}
        if not windows:
            del timings["window"]
        return Prediction(mask=mask, affine=prepared.orig_affine, timings=timings)

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


def __getattr__(name: str) -> Any:
    """`load_clicks` lived here; it is the CLI's now (`trainer.cli`), imported on use so that inference
    never imports the command line."""
    if name == "load_clicks":
        from .cli import load_clicks

        return load_clicks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
