"""The one predictor: image + clicks -> spleen mask in the original geometry (spec §5).

Used by `infer`, evaluation, the MONAI bundle and the Ray Serve deployment, so they cannot drift.
Clicks are voxel indices of the original file's array; they are mapped through the reorientation to
RAS (`inv(A_ras) @ A_orig`) and scaled to the network grid (`floor(p * S / N)`), as the bundle does.
The spleen probability is resized back with trilinear interpolation, the reorientation undone, and
thresholded at 0.5 (argmax of two softmax channels).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .clicks import Clicks, guidance_channels
from .config import CLICK_CHANNELS, PROFILES, Profile, get_profile
from .data import DataError
from .engine import autocast
from .network import build_network, filters_of_state_dict
from .runtime import default_device
from .transforms import inference_transforms


class ClickError(ValueError):
    """Clicks are malformed or outside the volume; the message names the value."""


@dataclass(kw_only=True, slots=True)
class Prepared:
    """A preprocessed volume, reusable across clicks (what an interactive session caches)."""

    image: torch.Tensor  # (1, 1, S, S, S) float32 in [0, 1], RAS, network grid
    orig_shape: tuple[int, int, int]
    orig_affine: np.ndarray
    to_ras: np.ndarray  # nibabel orientation transform original -> RAS
    ras_shape: tuple[int, int, int]
    index_to_ras: np.ndarray  # 4x4: original voxel index -> RAS-ordered voxel index

    @property
    def nbytes(self) -> int:
        return self.image.element_size() * self.image.nelement()


@dataclass(kw_only=True, slots=True)
class Prediction:
    mask: np.ndarray  # uint8, original array order
    affine: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


def infer_profile(ckpt: Checkpoint, requested: str | None = None) -> Profile:
    """The profile of a checkpoint: stored in ours; matched by filters for a plain state_dict."""
    if requested is not None:
        return get_profile(requested)
    if ckpt.profile is not None:
        return get_profile(ckpt.profile)
    filters = filters_of_state_dict(ckpt.model)
    for profile in PROFILES.values():
        expected = profile.filters if profile.filters is not None else (32, 64, 128, 256, 320, 320)
        if tuple(expected) == tuple(filters):
            return profile
    raise CheckpointError(f"no profile has DynUNet filters {filters}: pass the profile explicitly")


def validate_clicks(clicks: Any, shape: tuple[int, int, int]) -> Clicks:
    """Check user clicks `{"spleen": [[i,j,k],...], "background": [...]}` against a volume shape."""
    if clicks is None:
        return {name: [] for name in CLICK_CHANNELS}
    if not isinstance(clicks, Mapping):
        raise ClickError(f"clicks must be an object like {{\"spleen\": [[i,j,k]], \"background\": []}}, got {type(clicks).__name__}")
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
            checked.append(tuple(int(v) for v in p))
        out[name] = checked
    return out


def load_clicks(value: str | None) -> Any:
    """`--clicks` value: inline JSON or the path of a JSON file."""
    import json

    if value is None:
        return None
    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise ClickError(f"--clicks {value!r} is neither inline JSON nor an existing JSON file")
        text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClickError(f"--clicks is not valid JSON ({exc.msg} at char {exc.pos})") from None


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI as float32 + affine, rejecting non-3D and non-finite volumes with the file named."""
    from .data import check_volume

    img = check_volume(path)
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


class Predictor:
    """DeepEdit inference for one network.

    Args:
        model: a DynUNet of `profile`.
        profile: its profile (spatial size).
        device: where the forward runs.
        amp: autocast the forward (fp16 on CUDA, bf16 on CPU).
        sigma: Gaussian sigma of the click maps.
        version: a label for the loaded weights (checkpoint digest or path).
    """

    def __init__(self, model: torch.nn.Module, profile: Profile, *, device: torch.device | None = None,
                 amp: bool = False, sigma: float = 3.0, version: str = "unknown"):
        self.device = device or default_device()
        self.model = model.to(self.device).eval()
        self.profile = profile
        self.amp = amp
        self.sigma = sigma
        self.version = version
        self._pre = inference_transforms(profile.spatial_size)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, profile: str | None = None, device: torch.device | None = None,
                        amp: bool = False) -> "Predictor":
        if str(path).startswith("s3://"):  # object storage: a local copy through trainer.storage
            from .storage import fetch

            path = fetch(str(path))
        ckpt = load_checkpoint(path)
        prof = infer_profile(ckpt, profile)
        model = build_network(prof)
        try:
            model.load_state_dict(ckpt.model)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit profile {prof.name!r}: {str(exc).splitlines()[0]}") from None
        sigma = float(ckpt.config.get("guidance_sigma", 3.0)) if ckpt.config else 3.0
        version = f"{Path(path).name}@epoch{ckpt.epoch + 1}" if not ckpt.plain_state_dict else f"{Path(path).name}(state_dict)"
        return cls(model, prof, device=device, amp=amp, sigma=sigma, version=version)

    # ----------------------------------------------------------------- stages

    def preprocess(self, image: np.ndarray, affine: np.ndarray) -> Prepared:
        """Original array + affine -> network-grid tensor and the geometry needed to go back."""
        if image.ndim != 3:
            raise DataError(f"expected a 3D volume, got shape {tuple(image.shape)}")
        affine = np.asarray(affine, dtype=np.float64)
        ornt = nib.orientations.io_orientation(affine)
        ras_shape = tuple(int(image.shape[int(a)]) for a in np.argsort(ornt[:, 0]))
        # index_to_ras maps an original voxel index to its index in the RAS-ordered array.
        index_to_ras = np.linalg.inv(nib.orientations.inv_ornt_aff(ornt, image.shape))
        meta = MetaTensor(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None], affine=torch.as_tensor(affine))
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
        size = self.profile.spatial_size
        out: Clicks = {}
        for name, points in clicks.items():
            mapped = []
            for p in points:
                ras = prepared.index_to_ras @ np.array([*p, 1.0])
                idx = np.rint(ras[:3]).astype(int)
                mapped.append(tuple(int(np.floor(v * s / n)) for v, s, n in zip(idx, size, prepared.ras_shape)))
            out[name] = mapped
        return out

    @torch.no_grad()
    def forward(self, prepared: list[Prepared], net_clicks: list[Clicks]) -> torch.Tensor:
        """Batched forward: -> (B, 1, S, S, S) spleen probability on the network grid."""
        size = tuple(self.profile.spatial_size)
        guidance = np.stack([guidance_channels(c, size, self.sigma) for c in net_clicks])
        image = torch.cat([p.image for p in prepared]).to(self.device)
        x = torch.cat([image, torch.from_numpy(guidance).to(self.device)], dim=1)
        with autocast(self.device, self.amp):
            logits = self.model(x)
        # softmax over two channels, spleen part: sigmoid of the logit difference (same value, one pass).
        logits = logits.float()
        return torch.sigmoid(logits[:, 1:2] - logits[:, 0:1])

    def postprocess(self, prob: torch.Tensor, prepared: Prepared) -> np.ndarray:
        """(1, S, S, S) probability -> uint8 mask in the original array order."""
        up = F.interpolate(prob[None].float(), size=prepared.ras_shape, mode="trilinear", align_corners=False)
        mask_ras = (up[0, 0] > 0.5).cpu().numpy().astype(np.uint8)
        back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), prepared.to_ras)
        return np.ascontiguousarray(nib.orientations.apply_orientation(mask_ras, back))

    # ----------------------------------------------------------------- one call

    def predict_prepared(self, prepared: Prepared, clicks: Any = None) -> Prediction:
        t0 = time.perf_counter()
        checked = validate_clicks(clicks, prepared.orig_shape)
        net_clicks = self.map_clicks(checked, prepared)
        t1 = time.perf_counter()
        prob = self.forward([prepared], [net_clicks])
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


def write_mask(path: str | Path, mask: np.ndarray, affine: np.ndarray, dtype=np.uint8) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(mask.astype(dtype, copy=False), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
