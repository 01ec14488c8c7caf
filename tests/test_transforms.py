"""The shared preprocessing chain equals MONAI's own transforms (spec §2), on every orientation.

Reference: `Orientationd(RAS)` -> `ScaleIntensityRanged` -> `Resized(area / nearest)`, the bundle's
order. Ours windows and resizes in the stored axis order and reorients on the network grid; the
image must agree within 1e-5, nearest-resized labels exactly, and the affine must be the same.
The predictor's postprocessing (box-limited trilinear upsampling) is checked against the full
`F.interpolate` it replaces.
"""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai import transforms as mt
from monai.data import MetaTensor

from trainer.config import HU_MAX, HU_MIN, TrainConfig, get_profile
from trainer.predictor import Predictor, load_volume
from trainer.transforms import (
    RAS_LABELS,
    ResizeBeforeOrientd,
    WindowHUd,
    area_resize,
    cache_transforms,
    nearest_indices,
    preprocess_transforms,
)

# (stored shape, network grid): divisible; z upsampled 100 -> 128; nothing divisible.
SHAPES = [((96, 64, 40), (32, 32, 16)), ((64, 64, 100), (32, 32, 128)), ((70, 45, 33), (32, 32, 16))]
# Axis codes of the stored array; "SLP" permutes all axes, "oblique" is RAS rotated by 12 degrees.
ORIENTATIONS = ["RAS", "LPS", "LAS", "SLP", "oblique"]


def _affine(code: str, spacing=(0.8, 0.7, 2.5), origin=(-120.0, 35.0, -60.0)) -> np.ndarray:
    affine = np.eye(4)
    if code == "oblique":
        c, s = np.cos(np.radians(12)), np.sin(np.radians(12))
        affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(spacing)
    else:
        affine[:3, :3] = 0
        for axis, (world, sign) in enumerate(nib.orientations.axcodes2ornt(code)):
            affine[int(world), axis] = sign * spacing[axis]
    affine[:3, 3] = origin
    return affine


def _reference(size, keys, label_mode="nearest"):
    modes = ["area" if k == "image" else label_mode for k in keys]
    return mt.Compose(
        [
            mt.Orientationd(keys=keys, axcodes="RAS", labels=RAS_LABELS),
            mt.ScaleIntensityRanged(keys=["image"], a_min=HU_MIN, a_max=HU_MAX, b_min=0.0, b_max=1.0, clip=True),
            mt.Resized(keys=keys, spatial_size=size, mode=modes),
        ]
    )


def _item(image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> dict:
    meta = lambda a: MetaTensor(torch.from_numpy(a.copy())[None], affine=torch.as_tensor(affine))  # noqa: E731
    return {"image": meta(image), "label": meta(label)}


def _volumes(shape, seed):
    """Random HU noise (int16) with a smooth gradient, and a random label with blobs and speckles."""
    rng = np.random.default_rng(seed)
    grad = np.linspace(-400, 600, shape[0])[:, None, None]
    image = (rng.integers(-300, 300, size=shape) + grad).astype(np.int16)
    label = (rng.random(shape) < 0.3).astype(np.float32)
    label[shape[0] // 4 : shape[0] // 2, 5:20, 3:9] = 1
    return image, label


def _assert_same(ours: dict, ref: dict, keys=("image", "label")) -> None:
    for key in keys:
        a, b = ours[key], ref[key]
        assert tuple(a.shape) == tuple(b.shape), key
        assert a.dtype == b.dtype == torch.float32, key
        np.testing.assert_allclose(np.asarray(a.affine), np.asarray(b.affine), rtol=0, atol=1e-9, err_msg=key)
    assert float((ours["image"].as_tensor() - ref["image"].as_tensor()).abs().max()) <= 1e-5
    if "label" in keys:
        assert torch.equal(ours["label"].as_tensor(), ref["label"].as_tensor())


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("shape,size", SHAPES)
def test_chain_equals_monai_orientation_window_resize(orientation, shape, size):
    image, label = _volumes(shape, seed=len(orientation) + shape[2])
    affine = _affine(orientation)
    ours = mt.Compose(preprocess_transforms(size, ["image", "label"]))(_item(image, label, affine))
    ref = _reference(size, ["image", "label"])(_item(image.astype(np.float32), label, affine))
    _assert_same(ours, ref)


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64, np.uint8])
def test_window_equals_scale_intensity_ranged_and_leaves_its_input_alone(dtype):
    rng = np.random.default_rng(0)
    lo, hi = (0, 255) if dtype == np.uint8 else (-1000, 1500)
    x = torch.from_numpy(np.asfortranarray(rng.uniform(lo, hi, size=(1, 20, 18, 7)).astype(dtype)))
    before = x.clone()
    ours = WindowHUd(keys="image")({"image": MetaTensor(x)})["image"]
    ref = mt.ScaleIntensityRanged(keys="image", a_min=HU_MIN, a_max=HU_MAX, b_min=0.0, b_max=1.0, clip=True)(
        {"image": MetaTensor(x.clone())}
    )["image"]
    assert isinstance(ours, MetaTensor) and ours.dtype == torch.float32
    assert float((ours.as_tensor() - ref.as_tensor().float()).abs().max()) <= 1e-6
    assert torch.equal(x, before)


@pytest.mark.parametrize("layout", ["C", "F", "permuted"])
@pytest.mark.parametrize("shape,size", SHAPES + [((40, 50, 60), (40, 25, 90)), ((8, 8, 8), (8, 8, 8))])
def test_area_resize_equals_interpolate_in_any_memory_layout(layout, shape, size):
    x = torch.rand(1, *shape, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    if layout == "F":
        x = torch.from_numpy(np.asfortranarray(x.numpy()))
    elif layout == "permuted":
        x = x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    ref = F.interpolate(x[None], size=size, mode="area")[0]
    ours = area_resize(x, size)
    assert ours.shape == ref.shape and ours.is_contiguous()
    assert float((ours - ref).abs().max()) <= 1e-6


@pytest.mark.parametrize("n,size", [(100, 128), (512, 128), (70, 32), (33, 16), (5, 5), (3, 11)])
def test_nearest_indices_are_pytorchs(n, size):
    ramp = torch.arange(n, dtype=torch.float32).view(1, 1, 1, 1, n)
    ref = F.interpolate(ramp, size=(1, 1, size), mode="nearest").view(size).long()
    assert torch.equal(nearest_indices(n, size), ref)


def test_resize_before_orient_rejects_other_modes():
    with pytest.raises(ValueError, match="area' or 'nearest"):
        ResizeBeforeOrientd(keys="image", spatial_size=(8, 8, 8), mode="trilinear")


@pytest.mark.parametrize("label_resize", ["nearest", "area"])
def test_training_cache_chain_equals_monai_on_files(tmp_path, label_resize):
    """The training path: LoadImaged from int16 / uint8 NIfTI files, as the cache builds items."""
    image, label = _volumes((70, 45, 33), seed=5)
    affine = _affine("LPS")
    paths = {"image": tmp_path / "img.nii.gz", "label": tmp_path / "lab.nii.gz"}
    nib.save(nib.Nifti1Image(image, affine), str(paths["image"]))
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(paths["label"]))
    cfg = TrainConfig(profile="tiny", label_resize=label_resize)
    ours = cache_transforms(cfg)({k: str(v) for k, v in paths.items()})
    load = mt.Compose(
        [
            mt.LoadImaged(keys=["image", "label"], image_only=True),
            mt.EnsureChannelFirstd(keys=["image", "label"], channel_dim="no_channel"),
        ]
    )
    ref = _reference(cfg.spatial_size, ["image", "label"], label_resize)(load({k: str(v) for k, v in paths.items()}))
    assert float((ours["image"] - ref["image"].as_tensor()).abs().max()) <= 1e-5
    if label_resize == "nearest":  # the bundle's 0/1 labels, exactly
        assert torch.equal(ours["label"], ref["label"].as_tensor().to(torch.uint8))
    else:  # fractions of each voxel that are label, stored as float16
        assert ours["label"].dtype == torch.float16
        assert float((ours["label"].float() - ref["label"].as_tensor()).abs().max()) <= 1e-3


def test_area_labels_are_aligned_with_the_image_and_nearest_ones_are_not(tmp_path):
    """A network that reproduced its training targets exactly, mapped back by the predictor.

    Nearest takes each bin's first source voxel, so its targets lie up to half a network voxel off
    the image and cost Dice on the original grid; soft area targets do not (cpu profile, phantoms).
    """
    from trainer.metrics import spleen_dice
    from trainer.synth import write_dataset

    write_dataset(tmp_path, 3, seed=4)
    pairs = sorted(
        zip(sorted((tmp_path / "imagesTr").glob("*.nii.gz")), sorted((tmp_path / "labelsTr").glob("*.nii.gz")))
    )
    pred = Predictor(torch.nn.Identity(), get_profile("cpu"), device=torch.device("cpu"))
    scores = {}
    for mode in ("nearest", "area"):
        chain = cache_transforms(TrainConfig(profile="cpu", label_resize=mode))
        dices = []
        for image_path, label_path in pairs:
            target = chain({"image": str(image_path), "label": str(label_path)})["label"].float()
            image, affine = load_volume(image_path)
            label = load_volume(label_path)[0] > 0.5
            mask = pred.postprocess(target, pred.preprocess(image, affine)).astype(bool)
            dices.append(float(spleen_dice(mask, label)))
        scores[mode] = float(np.mean(dices))
    assert scores["area"] >= 0.96, scores
    assert scores["area"] > scores["nearest"] + 0.02, scores


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "SLP"])
def test_predictor_preprocess_equals_monai_from_int16_and_float32(orientation):
    shape = (64, 64, 100)
    image, _ = _volumes(shape, seed=2)
    affine = _affine(orientation)
    pred = Predictor(torch.nn.Identity(), get_profile("tiny"), device=torch.device("cpu"))
    ref = _reference(pred.profile.spatial_size, ["image"])(
        {"image": MetaTensor(torch.from_numpy(image.astype(np.float32))[None], affine=torch.as_tensor(affine))}
    )["image"]
    for array in (image, image.astype(np.float32), np.asfortranarray(image)):
        prepared = pred.preprocess(array, affine)
        assert prepared.image.shape == (1, 1, *pred.profile.spatial_size)
        assert float((prepared.image[0] - ref.as_tensor()).abs().max()) <= 1e-5
    full = MetaTensor(torch.zeros(1, *shape), affine=torch.as_tensor(affine))
    ras = mt.Orientation(axcodes="RAS", labels=RAS_LABELS)(full)
    assert prepared.ras_shape == tuple(ras.shape[1:])


def _full_postprocess(prob: torch.Tensor, prepared, upsample: str) -> tuple[np.ndarray, np.ndarray]:
    """What the predictor did before: upsample everything, threshold, reorient back. Returns the mask
    and the upsampled values minus the threshold."""
    values, level = (prob, 0.5) if upsample == "probability" else (torch.logit(prob.clamp(1e-6, 1 - 1e-6)), 0.0)
    up = F.interpolate(values[None].float(), size=prepared.ras_shape, mode="trilinear", align_corners=False)[0, 0]
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), prepared.to_ras)
    to_orig = lambda a: np.ascontiguousarray(nib.orientations.apply_orientation(a, back))  # noqa: E731
    return to_orig((up > level).numpy().astype(np.uint8)), to_orig((up - level).numpy())


@pytest.mark.parametrize("upsample", ["probability", "logit"])
@pytest.mark.parametrize("orientation", ["RAS", "LPS", "SLP"])
@pytest.mark.parametrize("shape", [(160, 160, 50), (100, 70, 33), (20, 30, 10)])
@pytest.mark.parametrize("kind", ["blob", "corners", "noisy", "empty"])
def test_postprocess_equals_full_trilinear_upsampling(orientation, shape, kind, upsample):
    profile = dataclasses.replace(get_profile("tiny"), upsample=upsample)
    pred = Predictor(torch.nn.Identity(), profile, device=torch.device("cpu"))
    prepared = pred.preprocess(np.zeros(shape, np.int16), _affine(orientation))
    gen = torch.Generator().manual_seed(sum(shape))
    prob = torch.zeros(1, 32, 32, 32)
    if kind == "blob":
        prob[0, 5:12, 20:30, 3:9] = torch.rand(7, 10, 6, generator=gen)
    elif kind == "corners":
        prob[0, 0, 31, 0], prob[0, 31, 0, 31], prob[0, 31, 31, 31] = 0.9, 0.7, 0.51
    elif kind == "noisy":  # values near the threshold everywhere: the box is the whole volume
        prob = 0.5 + (torch.rand(1, 32, 32, 32, generator=gen) - 0.5) * 0.02
    mask = pred.postprocess(prob, prepared)
    ref, values = _full_postprocess(prob, prepared, upsample)
    assert mask.shape == ref.shape == shape and mask.dtype == np.uint8
    differ = mask != ref
    # Equal except, at most, at float-rounding ties with the threshold.
    assert not (differ & (np.abs(values) > 1e-5)).any()
    assert differ.sum() <= 2


def test_load_volume_reads_the_file_once_as_float32(tmp_path, monkeypatch):
    image, _ = _volumes((12, 10, 6), seed=0)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(image, _affine("LPS")), str(path))
    loads = []
    real_load = nib.load
    monkeypatch.setattr(nib, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    array, affine = load_volume(path)
    assert len(loads) == 1
    assert array.dtype == np.float32 and np.array_equal(array, image.astype(np.float32))
    np.testing.assert_allclose(affine, _affine("LPS"), atol=1e-5)


def test_edge_cut_makes_a_scan_that_ends_inside_the_spleen_and_keeps_the_cache_dtypes():
    from trainer.transforms import RandEdgeCutd, augment_transforms

    label = torch.zeros(1, 32, 32, 32, dtype=torch.float16)
    label[:, 10:20, 10:20, 10:22] = 1
    item = {
        "image": torch.linspace(0, 1, 32).expand(1, 32, 32, 32).clone(),
        "label": label,
        "body": torch.ones(1, 32, 32, 32, dtype=torch.uint8),
    }
    cut = RandEdgeCutd(keys=["image", "label", "body"], prob=1.0, soft_label=True)
    cut.set_random_state(seed=0)
    edges = set()
    for _ in range(10):
        out = cut(item)
        assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, v.dtype) for k, v in item.items()}
        spleen_z = torch.nonzero(out["label"][0].float().amax((0, 1)) >= 0.5).flatten()
        # The spleen now touches the first or the last slice: the scan ends inside it ...
        assert spleen_z[0] == 0 or spleen_z[-1] == 31
        edges.add("bottom" if spleen_z[0] == 0 else "top")
        # ... and part of it is gone, x and y untouched.
        assert out["label"][:, :10].float().sum() == 0 and out["label"][:, 10:20, 10:20].float().amax() == 1
    assert edges == {"bottom", "top"}
    # No spleen, nothing to cut; the bundle profile keeps the model zoo's augmentation.
    empty = dict(item, label=torch.zeros_like(label))
    assert cut(empty)["image"] is empty["image"]
    assert TrainConfig(profile="bundle").edge_cut_probability == 0.0 < TrainConfig(profile="cpu").edge_cut_probability
    plain = augment_transforms(TrainConfig(profile="bundle", flip_prob=0.0, rot90_prob=0.0, shift_prob=0.0))(dict(item))
    torch.testing.assert_close(plain["label"], label)


def test_a_bad_edge_cut_probability_is_refused():
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="edge_cut_prob must be a probability in \\[0, 1\\], got 1.5"):
        TrainConfig(profile="cpu", edge_cut_prob=1.5)
