"""The network: the DynUNet factory (the bundle's exact network, spec §1, with smaller named profiles for
CPUs) and the one model loader (checkpoint URI -> checkpoint -> profile -> network -> version)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import DynUNet

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .clicks import Clicks, guidance_channels
from .config import CLICK_CHANNELS, LABELS, PROFILES, ConfigError, Profile, get_profile

IN_CHANNELS = 1 + len(CLICK_CHANNELS)  # CT + spleen clicks + background clicks
OUT_CHANNELS = len(LABELS)  # background, spleen

# The bundle's arguments (spec §1); module names are MONAI's so a bundle state_dict loads as is.
KERNEL_SIZE: list[int] = [3, 3, 3, 3, 3, 3]
STRIDES: list[int | list[int]] = [1, 2, 2, 2, 2, [2, 2, 1]]
UPSAMPLE_KERNEL_SIZE: list[int | list[int]] = [2, 2, 2, 2, [2, 2, 1]]


def build_network(profile: Profile) -> DynUNet:
    """A fresh DynUNet for `profile` (filters=None gives MONAI's default, the bundle's 31 M params)."""
    return DynUNet(
        spatial_dims=3,
        in_channels=IN_CHANNELS,
        out_channels=OUT_CHANNELS,
        kernel_size=KERNEL_SIZE,
        strides=STRIDES,
        upsample_kernel_size=UPSAMPLE_KERNEL_SIZE,
        filters=list(profile.filters) if profile.filters is not None else None,
        norm_name="instance",
        deep_supervision=False,
        res_block=True,
    )


def filters_of_state_dict(state_dict: dict) -> tuple[int, ...]:
    """The per-level filters of a DynUNet state_dict (to match a plain `model.pt` to a profile)."""
    first = state_dict["input_block.conv1.conv.weight"].shape[0]
    downs = []
    i = 0
    while f"downsamples.{i}.conv1.conv.weight" in state_dict:
        downs.append(state_dict[f"downsamples.{i}.conv1.conv.weight"].shape[0])
        i += 1
    bottleneck = state_dict["bottleneck.conv1.conv.weight"].shape[0]
    return (first, *downs, bottleneck)


#: The filters of MONAI's default DynUNet (a profile with `filters: None`, the bundle's).
DEFAULT_FILTERS = (32, 64, 128, 256, 320, 320)


def infer_profile(ckpt: Checkpoint, requested: str | None = None) -> Profile:
    """The profile of a checkpoint: stored in ours; matched by filters for a plain state_dict."""
    if requested is not None:
        return get_profile(requested)
    if ckpt.profile is not None:
        return get_profile(ckpt.profile)
    filters = filters_of_state_dict(ckpt.model)
    for profile in PROFILES.values():
        expected = profile.filters if profile.filters is not None else DEFAULT_FILTERS
        if tuple(expected) == tuple(filters):
            return profile
    raise CheckpointError(f"no profile has DynUNet filters {filters}: pass the profile explicitly")


def check_fits(ckpt: Checkpoint, profile: Profile, source: str | os.PathLike) -> None:
    """Refuse weights of another profile with the `--profile` that fits them."""
    try:
        fit = infer_profile(ckpt)
    except CheckpointError:
        return  # no profile matches: load_state_dict reports the mismatch
    if fit.name != profile.name:
        raise ConfigError(
            f"{str(source)!r} holds weights of profile {fit.name!r} but this run uses profile {profile.name!r}: "
            f"pass --profile {fit.name}"
        )


def load_weights(model: torch.nn.Module, ckpt: Checkpoint, profile: str, source: str) -> None:
    """`ckpt`'s weights into `model`; a CheckpointError naming `source` and `profile` if they do not fit."""
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {source} does not fit profile {profile!r}: {str(exc).splitlines()[0]}"
        ) from None


def read_checkpoint(uri: str | os.PathLike) -> tuple[str, Checkpoint]:
    """The local path of `uri` (plain, file:// or s3://, see `trainer.storage.fetch`) and its checkpoint."""
    from .storage import fetch

    path = fetch(uri)
    return path, load_checkpoint(path)


def file_digest(path: str | os.PathLike) -> str:
    """The first 10 hex digits of the file's SHA-256 (a retrained `best.pt` has the same name)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


def model_version(path: str | os.PathLike, ckpt: Checkpoint, *, digest: bool = False) -> str:
    """What a loaded model calls itself: `best.pt@epoch12`, or `model.pt(state_dict)` for plain weights,
    with `+<file digest>` when `digest` (the server's, so a replaced file shows)."""
    name = Path(path).name
    version = f"{name}(state_dict)" if ckpt.plain_state_dict else f"{name}@epoch{ckpt.epoch + 1}"
    return f"{version}+{file_digest(path)}" if digest else version


@dataclass(frozen=True)
class LoadedModel:
    """A network with a checkpoint's weights, and where they came from."""

    model: torch.nn.Module
    profile: Profile
    checkpoint: Checkpoint
    version: str


def load_model(
    uri: str | os.PathLike,
    *,
    profile: str | None = None,
    network: torch.nn.Module | None = None,
    digest: bool = False,
    check_fit: bool = False,
) -> LoadedModel:
    """The one model loader: URI -> local file -> checkpoint -> profile -> network with its weights -> version.

    Args:
        uri: a local path, `file://` or `s3://` URI of one of our checkpoints or a plain state_dict.
        profile: the profile name; None: the one stored in the checkpoint, else matched by filters.
        network: the module to load into (the bundle's `network_def`); None builds the profile's.
        digest: append the file's digest to the version.
        check_fit: refuse (ConfigError) weights whose own profile is not `profile`, naming the right one.
    """
    path, ckpt = read_checkpoint(uri)
    prof = infer_profile(ckpt, profile)
    if check_fit:
        check_fits(ckpt, prof, uri)
    model = network if network is not None else build_network(prof)
    load_weights(model, ckpt, prof.name, repr(str(path)))
    return LoadedModel(model=model, profile=prof, checkpoint=ckpt, version=model_version(path, ckpt, digest=digest))


# ----------------------------------------------------------------------------- model I/O


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, enabled: bool):
    """Mixed precision: fp16 autocast on CUDA (paired with a GradScaler), bf16 on CPUs with native
    bf16, fp32 elsewhere or when disabled.

    bf16 on CPU: forward+backward 1.9x faster at 64x64x32 (0.19 vs 0.36 s per step on 2 cores),
    so a 10-minute budget trains 76 epochs instead of 43. Its kernels are not bit-reproducible,
    and ~2 % of steps got an inf/NaN gradient (measured in a 76-epoch run): `train_step` skips those,
    as GradScaler does on CUDA; without that skip the weights went NaN in 1 of 3 tiny runs. Pass
    `amp=False` (`--no-amp`) for fp32, reproducible to the last digit across runs.
    """
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if enabled and device.type == "cpu" and cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def spleen_mask(logits: torch.Tensor) -> torch.Tensor:
    """(B, 2, X, Y, Z) logits -> (B, X, Y, Z) bool: argmax over (background, spleen), ties to background.

    A comparison instead of `argmax(dim=1)`: identical result, ~1000x faster on CPU (argmax over
    the channel dimension of a 2x128^3 tensor took 0.5 s on 2 threads).
    """
    return logits[:, 1] > logits[:, 0]


def network_input(image: torch.Tensor, clicks: list[Clicks], sigma: float) -> torch.Tensor:
    """(B, 1, X, Y, Z) image + per-sample clicks -> (B, 3, X, Y, Z): CT, spleen, background."""
    shape = tuple(image.shape[-3:])
    guidance = np.stack([guidance_channels(c, shape, sigma) for c in clicks])
    return torch.cat([image, torch.from_numpy(guidance).to(image.device, image.dtype)], dim=1)


def default_device() -> torch.device:
    """CUDA when there is a GPU, else the CPU (training and inference alike)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
