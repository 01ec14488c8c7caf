"""DynUNet factory: the bundle's exact network (spec §1), with smaller named profiles for CPUs."""

from __future__ import annotations

from monai.networks.nets import DynUNet

from .config import CLICK_CHANNELS, LABELS, Profile

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
