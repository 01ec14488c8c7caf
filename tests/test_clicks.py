"""Click simulation and guidance encoding (spec §4, §7)."""

import numpy as np
import pytest
import torch

from trainer.clicks import (
    apply_click_budget,
    body_mask,
    click_weight,
    corrective_clicks,
    encode_guidance,
    guidance_channels,
    initial_seeds,
)
from trainer.config import CLICK_CHANNELS
from trainer.engine import network_input


def _monai_signal(points, shape, sigma=3):
    from monai.apps.deepedit.transforms import AddGuidanceSignalDeepEditd

    t = AddGuidanceSignalDeepEditd(keys="image", guidance="guidance", sigma=sigma)
    image = np.zeros((1, *shape), np.float32)
    out = t({"image": image, "guidance": {"spleen": [list(p) for p in points]}})
    return np.asarray(out["image"])[1]


@pytest.mark.parametrize(
    "shape,points",
    [
        ((32, 32, 32), [(5, 6, 7)]),
        ((32, 32, 32), [(0, 0, 0), (31, 31, 31), (16, 16, 16)]),  # corners: kernel clipped at the border
        ((48, 40, 36), [(10, 20, 30), (10, 20, 30), (12, 21, 29), (-1, 4, 5)]),  # duplicate + negative point
        ((64, 64, 64), [(63, 0, 32), (3, 60, 2), (30, 30, 30), (33, 30, 31), (50, 10, 12)]),
        ((24, 24, 24), [(i, j, k) for i in range(0, 24, 6) for j in range(0, 24, 6) for k in range(0, 24, 6)]),
    ],
)
def test_guidance_equals_monai_within_1e_5(shape, points):
    ours = encode_guidance(points, shape, sigma=3.0)
    ref = _monai_signal(points, shape, sigma=3)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-5
    assert ours.max() == pytest.approx(1.0)


def test_no_clicks_gives_zero_channel():
    assert not encode_guidance([], (16, 16, 16)).any()
    np.testing.assert_array_equal(encode_guidance([], (16, 16, 16)), _monai_signal([], (16, 16, 16)))


def test_channel_order_is_ct_spleen_background():
    assert CLICK_CHANNELS == ("spleen", "background")
    shape = (32, 32, 32)
    clicks = {"spleen": [(4, 4, 4)], "background": [(28, 28, 28)]}
    g = guidance_channels(clicks, shape)
    assert g[0][4, 4, 4] == pytest.approx(1.0) and g[0][28, 28, 28] == 0
    assert g[1][28, 28, 28] == pytest.approx(1.0) and g[1][4, 4, 4] == 0
    image = torch.rand(1, 1, *shape)
    x = network_input(image, [clicks], 3.0)
    assert x.shape == (1, 3, *shape)
    torch.testing.assert_close(x[0, 0], image[0, 0])
    assert x[0, 1, 4, 4, 4] == pytest.approx(1.0)  # ch1 = spleen
    assert x[0, 2, 28, 28, 28] == pytest.approx(1.0)  # ch2 = background


def _phantom_masks(seed=0, size=32):
    """Network-resolution spleen and body masks from a real synthetic case."""
    from monai.data import MetaTensor
    from monai.transforms import Compose

    from trainer.synth import generate_case
    from trainer.transforms import preprocess_transforms

    case = generate_case(np.random.default_rng(seed))
    chain = Compose(preprocess_transforms((size,) * 3, ["image", "label"]))
    d = chain(
        {
            "image": MetaTensor(
                torch.from_numpy(case.image.astype(np.float32))[None], affine=torch.as_tensor(case.affine)
            ),
            "label": MetaTensor(
                torch.from_numpy(case.label.astype(np.float32))[None], affine=torch.as_tensor(case.affine)
            ),
        }
    )
    image = np.asarray(d["image"])[0]
    return np.asarray(d["label"])[0] > 0.5, body_mask(image), image


@pytest.mark.parametrize("seed", range(6))
def test_initial_seeds_inside_label_and_background_in_body_outside_spleen(seed):
    label, body, _ = _phantom_masks(seed)
    assert label.any()
    margin = label.shape[0] // 8
    kinds = []
    for draw in range(12):
        clicks = initial_seeds(label, body, np.random.default_rng([seed, draw]))
        assert clicks["spleen"], "a spleen in the volume must give at least one seed"
        for p in clicks["spleen"]:
            assert label[p]
        assert 1 <= len(clicks["background"]) <= 2
        for p in clicks["background"]:
            assert body[p] and not label[p]
            # Near the spleen (within the ring, where it stops) or far from it (liver, stomach, body
            # wall: the background channel must not say where the spleen is), never on the image edge.
            dist = np.abs(np.argwhere(label) - np.array(p)).max(axis=1).min()
            assert dist <= margin + 1 or dist > 2 * margin
            kinds.append("near" if dist <= margin + 1 else "far")
    assert "near" in kinds and "far" in kinds


def test_background_seeds_do_not_say_where_the_spleen_is():
    """Over many draws, a background seed is as often far from the spleen as near it."""
    label, body, _ = _phantom_masks(0)
    margin = label.shape[0] // 8
    far = near = 0
    for draw in range(60):
        for p in initial_seeds(label, body, np.random.default_rng([7, draw]))["background"]:
            dist = np.abs(np.argwhere(label) - np.array(p)).max(axis=1).min()
            far, near = far + (dist > 2 * margin), near + (dist <= margin + 1)
    assert 0.35 < far / (far + near) < 0.65, (far, near)


def test_a_large_error_gets_a_second_click_when_the_profile_says_so():
    label = np.zeros((32, 32, 32), bool)
    label[5:20, 5:20, 5:20] = True
    pred = np.zeros_like(label)
    pred[10:20, 5:20, 5:20] = True  # 1125 voxels missed
    pred[28:30, 28:30, 28:30] = True  # an 8-voxel false positive
    c = corrective_clicks(pred, label, np.random.default_rng(0), second_click_above=50)
    assert len(c["spleen"]) == 2 and len(c["background"]) == 1  # MONAI: 2 above 50 voxels
    assert all(label[p] and not pred[p] for p in c["spleen"])
    one = corrective_clicks(pred, label, np.random.default_rng(0))
    assert len(one["spleen"]) == len(one["background"]) == 1  # our small grids: one per error region


def test_seeds_favour_the_interior():
    label = np.zeros((32, 32, 32), bool)
    label[8:24, 8:24, 10:20] = True
    rng = np.random.default_rng(0)
    depths = []
    for _ in range(50):
        (p,) = initial_seeds(label, None, rng)["spleen"]
        depths.append(min(p[0] - 8, 23 - p[0], p[1] - 8, 23 - p[1]))
    assert np.mean(depths) > 4  # uniform sampling would give ~3.75; exp(d)-1 weights go deep


def test_one_seed_per_component_up_to_five():
    label = np.zeros((40, 40, 8), bool)
    for n in range(7):
        label[2 + 5 * n : 5 + 5 * n, 5:10, 4] = True
    clicks = initial_seeds(label, None, np.random.default_rng(1))
    assert len(clicks["spleen"]) == 5


def test_no_spleen_gives_background_click_in_body():
    label = np.zeros((16, 16, 16), bool)
    body = np.zeros_like(label)
    body[4:12, 4:12, :] = True
    clicks = initial_seeds(label, body, np.random.default_rng(0))
    assert clicks["spleen"] == [] and len(clicks["background"]) == 1
    assert body[clicks["background"][0]]


def test_corrective_clicks_land_in_errors():
    label = np.zeros((32, 32, 32), bool)
    label[5:20, 5:20, 5:20] = True
    pred = np.zeros_like(label)
    pred[10:20, 5:20, 5:20] = True  # misses 5:10 on axis 0 (FN)
    pred[25:30, 25:30, 25:30] = True  # false positive blob
    for seed in range(10):
        c = corrective_clicks(pred, label, np.random.default_rng(seed))
        (fn,) = c["spleen"]
        (fp,) = c["background"]
        assert label[fn] and not pred[fn]
        assert pred[fp] and not label[fp]
    perfect = corrective_clicks(label, label, np.random.default_rng(0))
    assert perfect == {"spleen": [], "background": []}


def test_click_budget_keeps_or_clears_whole_labels_and_is_seedable():
    clicks = {"spleen": [(1, 1, 1), (2, 2, 2), (3, 3, 3)], "background": [(4, 4, 4)]}
    seen = set()
    for seed in range(40):
        a = apply_click_budget(clicks, np.random.default_rng(seed))
        b = apply_click_budget(clicks, np.random.default_rng(seed))
        assert a == b
        for name in a:
            assert a[name] in ([], clicks[name])
        assert any(a.values())
        seen.add(tuple(len(v) for v in a.values()))
    assert (3, 0) in seen and (3, 1) in seen and (0, 1) in seen


def test_click_weight_in_mm_is_the_gaussian_of_the_physical_distance():
    """With `spacing`, the weight is exp(-d^2 / 2 r^2) of the distance in mm, computed here the plain
    way (every voxel, no truncation window), and the voxel form is spacing 1."""
    shape, spacing, radius = (30, 24, 12), (0.8, 1.5, 4.0), 6.0
    points = [(10.3, 11.0, 5.0), (22.0, 3.0, 9.6)]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    d2 = [(((grid - np.array(p)) * np.array(spacing)) ** 2).sum(-1) for p in points]
    expected = np.max([np.exp(-d / (2 * radius**2)) for d in d2], axis=0)
    got = click_weight(points, shape, radius, spacing=spacing)
    np.testing.assert_allclose(got, expected, atol=np.exp(-8) + 1e-6)
    np.testing.assert_array_equal(click_weight(points, shape, 2.0, spacing=(1, 1, 1)), click_weight(points, shape, 2.0))
