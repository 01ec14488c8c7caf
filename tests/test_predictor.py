"""The predictor: click mapping through orientation and resize (spec §5), geometry of the output."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from trainer.config import get_profile
from trainer.metrics import mean_dice_with_background, spleen_dice
from trainer.predictor import ClickError, Predictor, validate_clicks
from trainer.synth import generate_case


class FakeClickEchoNet(torch.nn.Module):
    """A fake network (not trained): 'spleen' wherever the spleen-click channel exceeds 0.5.

    Its output is a blob around each spleen click, so where the blob lands in the output mask shows
    where the predictor mapped the click.
    """

    def forward(self, x):
        spleen = (x[:, 1:2] - 0.5) * 20
        return torch.cat([-spleen, spleen], dim=1)


def _predictor():
    # sigma 3 (not the tiny profile's 0.75): a blob several voxels wide makes the mapping visible.
    return Predictor(FakeClickEchoNet(), get_profile("tiny"), device=torch.device("cpu"), sigma=3.0)


def _to_ras(array, affine):
    return np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(array, affine)).dataobj)


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "LAS"])
def test_click_lands_on_the_same_anatomy_in_every_orientation(orientation):
    shape = (80, 72, 40)
    ras_case = generate_case(np.random.default_rng(7), shape=shape, orientation="RAS")
    case = generate_case(np.random.default_rng(7), shape=shape, orientation=orientation)
    ras_label = ras_case.label.astype(bool)
    np.testing.assert_array_equal(_to_ras(case.label, case.affine), ras_label)  # same anatomy
    # A deep spleen voxel, in RAS index space, then in this file's own index space.
    from scipy import ndimage

    depth = ndimage.distance_transform_cdt(ras_label, metric="chessboard")
    ras_click = np.unravel_index(np.argmax(depth), ras_label.shape)
    world = ras_case.affine @ np.array([*ras_click, 1.0])
    click = np.rint(np.linalg.inv(case.affine) @ world)[:3].astype(int).tolist()
    assert case.label[tuple(click)] == 1

    pred = _predictor().predict(case.image.astype(np.float32), case.affine, {"spleen": [click]})
    assert pred.mask.shape == case.image.shape and pred.mask.dtype == np.uint8
    np.testing.assert_allclose(pred.affine, case.affine)
    assert pred.mask[tuple(click)] == 1
    mask_ras = _to_ras(pred.mask, case.affine).astype(bool)
    assert mask_ras[ras_click]
    # The blob is centred on the click (within one network voxel, 80/32 = 2.5 original voxels).
    com = np.argwhere(mask_ras).mean(axis=0)
    scale = np.array(shape) / 32
    assert np.all(np.abs(com - np.array(ras_click)) <= scale + 1)


def test_same_click_same_mask_across_orientations():
    shape = (64, 64, 32)
    masks = []
    for orientation in ("RAS", "LPS", "LAS"):
        case = generate_case(np.random.default_rng(3), shape=shape, orientation=orientation)
        world = np.array([-40.0, -30.0, 0.0, 1.0])
        click = np.rint(np.linalg.inv(case.affine) @ world)[:3].astype(int).tolist()
        pred = _predictor().predict(case.image.astype(np.float32), case.affine, {"spleen": [click], "background": []})
        masks.append(_to_ras(pred.mask, case.affine))
    np.testing.assert_array_equal(masks[0], masks[1])
    np.testing.assert_array_equal(masks[0], masks[2])


def test_no_clicks_is_automatic_mode():
    case = generate_case(np.random.default_rng(1), shape=(64, 64, 32))
    pred = _predictor().predict(case.image.astype(np.float32), case.affine, None)
    assert pred.mask.sum() == 0  # the echo net only segments around spleen clicks
    assert set(pred.timings) >= {"preprocess", "forward", "postprocess"}


@pytest.mark.parametrize(
    "clicks,message",
    [
        ({"spleen": [[100, 1, 1]]}, "outside the volume"),
        ({"spleen": [[-1, 1, 1]]}, "outside the volume"),
        ({"spleen": [[1, 1]]}, "3 integer"),
        ({"spleen": [[1, 1, 1, 1]]}, "3 integer"),
        ({"spleen": [[1.5, 1, 1]]}, "integers"),
        ({"spleen": [["1", 1, 1]]}, "integers"),
        ({"spleen": [[True, 1, 1]]}, "integers"),
        ({"liver": [[1, 1, 1]]}, "unknown click label"),
        ({"spleen": [1, 2, 3]}, "3 integer"),
        ({"spleen": "1,2,3"}, "list"),
        ([[1, 2, 3]], "object"),
    ],
)
def test_bad_clicks_are_rejected_naming_the_value(clicks, message):
    with pytest.raises(ClickError, match=message):
        validate_clicks(clicks, (10, 10, 10))


def test_dice_on_known_masks():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[:5] = True  # 500 voxels
    b[2:7] = True  # 500 voxels, 300 shared
    assert float(spleen_dice(a, b)) == pytest.approx(2 * 300 / 1000)
    assert float(spleen_dice(a, a)) == pytest.approx(1.0)
    assert float(spleen_dice(np.zeros_like(a), np.zeros_like(a))) == pytest.approx(1.0)
    assert float(spleen_dice(a, np.zeros_like(a))) == pytest.approx(0.0)
    # Background-inclusive mean is higher than spleen-only (spec §7.3: why it is only secondary).
    bg = 2 * 300 / 1000  # background: 500 vs 500 voxels, 300 shared
    assert float(mean_dice_with_background(a, b)) == pytest.approx((0.6 + bg) / 2)
