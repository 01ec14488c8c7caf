"""The predictor: click mapping through orientation and resize (spec §5), geometry of the output."""

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.config import ConfigError, get_profile
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
    # Click locality off: these tests look at the network's raw answer to see where clicks land.
    return Predictor(FakeClickEchoNet(), get_profile("tiny"), device=torch.device("cpu"), sigma=3.0, click_radius=0)


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


# ----------------------------------------------------------------------------- click locality


class FakeOverreachingNet(torch.nn.Module):
    """A fake network (not trained) whose clicks change far-away things, as a badly trained one might.

    Image: bright cubes. Automatic: spleen where bright. Any spleen click: also a blob around the
    click and a slab at the far end of x (grid x >= 28). Any background click: everything
    background. Counts the volumes it is run on.
    """

    def __init__(self):
        super().__init__()
        self.volumes = 0

    def forward(self, x):
        self.volumes += x.shape[0]
        logit = (x[:, 0:1] - 0.5) * 20
        fg = x[:, 1:2].flatten(1).amax(1).view(-1, 1, 1, 1, 1) > 0
        bg = x[:, 2:3].flatten(1).amax(1).view(-1, 1, 1, 1, 1) > 0
        extra = torch.zeros_like(logit, dtype=torch.bool)
        extra[..., 28:, :, :] = True
        extra |= x[:, 1:2] > 0.05
        logit = torch.where(fg & extra, torch.full_like(logit, 10.0), logit)
        logit = torch.where(bg, torch.full_like(logit, -10.0), logit)
        return torch.cat([-logit, logit], dim=1)


def _cube_volume():
    image = np.full((64, 64, 32), -500, np.int16)
    image[20:44, 20:44, 8:24] = 200  # bright cube: the automatic "spleen"
    image[4:10, 50:58, 4:10] = 200  # a small bright blob far from it
    return image, np.diag([2.0, 2.0, 4.0, 1.0])


def _locality_predictor(radius):
    return Predictor(FakeOverreachingNet(), get_profile("tiny"), device=torch.device("cpu"), click_radius=radius)


def test_click_locality_confines_a_spleen_click_to_its_neighbourhood():
    image, affine = _cube_volume()
    auto = _locality_predictor(2.0).predict(image, affine).mask.astype(bool)
    click = [8, 32, 16]  # left of the cube, 2 grid voxels (4 voxels) from the far slab's opposite end
    raw = _locality_predictor(0).predict(image, affine, {"spleen": [click]}).mask.astype(bool)
    local = _locality_predictor(2.0).predict(image, affine, {"spleen": [click]}).mask.astype(bool)
    assert raw[60:].all()  # without locality the click also paints the far slab
    assert local[tuple(click)] and (local >= auto).all()  # the clicked voxel is spleen; nothing removed
    assert not local[60:].any()
    added = np.argwhere(local & ~auto)
    # 32^3 grid on 64x64x32 voxels: 2 voxels per grid voxel in x, y; 4 grid voxels of radius 2 each side.
    assert np.all(np.abs(added - click).max(axis=0) <= [4 * 2 * 2, 4 * 2 * 2, 4 * 2])
    assert 0 < len(added) < 0.02 * image.size


def test_background_click_removes_the_piece_it_is_in_and_a_spleen_click_never_removes():
    image, affine = _cube_volume()
    pred = _locality_predictor(2.0)
    auto = pred.predict(image, affine).mask.astype(bool)
    assert auto[6, 54, 6] and auto[32, 32, 16]
    # The net answers a background click with "everything background"; only the blob clicked goes.
    mask = pred.predict(image, affine, {"background": [[6, 54, 6]]}).mask.astype(bool)
    assert not mask[4:10, 50:58, 4:10].any()
    np.testing.assert_array_equal(mask[16:48, 16:48], auto[16:48, 16:48])  # the cube stays whole
    # A spleen click inside the cube: the net's additions far away are dropped; nothing is removed.
    inside = pred.predict(image, affine, {"spleen": [[32, 32, 16]]}).mask.astype(bool)
    assert (inside >= auto).all() and not inside[60:].any()


class FakeTwoBlobNet(torch.nn.Module):
    """A fake network (not trained): automatic = nothing; any spleen click = two bright cubes (one
    clicked, one far away), as a network that found the missed spleen and also a false positive."""

    def forward(self, x):
        bright = (x[:, 0:1] - 0.5) * 20
        fg = x[:, 1:2].flatten(1).amax(1).view(-1, 1, 1, 1, 1) > 0
        logit = torch.where(fg, bright, torch.full_like(bright, -10.0))
        return torch.cat([-logit, logit], dim=1)


def test_a_click_in_a_missed_piece_takes_all_of_it_and_nothing_else():
    image = np.full((64, 64, 32), -500, np.int16)
    image[4:28, 4:28, 4:28] = 200  # the missed spleen: 24 voxels = 12 grid voxels wide, far beyond radius 1
    image[44:56, 44:56, 8:20] = 200  # another bright piece the click is not in
    pred = Predictor(FakeTwoBlobNet(), get_profile("tiny"), device=torch.device("cpu"), click_radius=1.0)
    mask = pred.predict(image, np.diag([2.0, 2.0, 4.0, 1.0]), {"spleen": [[16, 16, 16]]}).mask.astype(bool)
    clicked_piece = np.zeros_like(mask)
    clicked_piece[4:28, 4:28, 4:28] = True
    assert (mask & clicked_piece).sum() / clicked_piece.sum() > 0.9
    assert not mask[44:56, 44:56, 8:20].any()


class FakeShellNet(torch.nn.Module):
    """A fake network (not trained): spleen where the image is brighter than a threshold, and a
    lower threshold once there is a spleen click, so a click grows the mask by one voxel all round,
    as a model that moves its whole boundary when any click arrives."""

    def forward(self, x):
        fg = x[:, 1:2].flatten(1).amax(1).view(-1, 1, 1, 1, 1) > 0
        threshold = torch.where(fg, torch.full_like(fg, 0.553, dtype=x.dtype), torch.full_like(fg, 0.6, dtype=x.dtype))
        logit = (x[:, 0:1] - threshold) * 50
        return torch.cat([-logit, logit], dim=1)


def test_a_click_on_the_boundary_does_not_take_a_shell_all_round():
    # A ball whose brightness falls 20 HU per voxel: automatic = radius 8.5, clicked = radius 9.5
    # (the thresholds above, on the 32^3 grid of `tiny`, one image voxel per grid voxel).
    d = np.linalg.norm(np.indices((32, 32, 32)) - 16.0, axis=0)
    image = np.rint(250 - 20 * d).astype(np.int16)
    pred = Predictor(FakeShellNet(), get_profile("tiny"), device=torch.device("cpu"), click_radius=1.0)
    assert pred.predict(image, np.eye(4)).mask[16, 16, 16] and not pred.predict(image, np.eye(4)).mask[25, 16, 16]
    mask = pred.predict(image, np.eye(4), {"spleen": [[25, 16, 16]]}).mask.astype(bool)
    assert mask[25, 16, 16]  # the clicked voxel is added
    assert not mask[7, 16, 16] and not mask[16, 7, 16] and not mask[16, 16, 25]  # the far side is not
    assert mask.sum() < ((d <= 8.5).sum() + (d <= 9.5).sum()) / 2


def test_click_radius_zero_returns_the_network_answer_unchanged():
    image, affine = _cube_volume()
    pred = _locality_predictor(0)
    prepared = pred.preprocess(image, affine)
    clicks = {"spleen": [[50, 32, 16]]}
    net_clicks = pred.map_clicks(validate_clicks(clicks, image.shape), prepared)
    torch.testing.assert_close(pred.forward([prepared], [net_clicks]), pred.network([prepared], [net_clicks]))
    assert pred.predict_prepared(prepared, clicks).mask[60:].all() and prepared.auto_prob is None
    # The bundle profile keeps the model zoo's behaviour; the cpu profile has locality on.
    assert Predictor(FakeOverreachingNet(), get_profile("bundle"), device=torch.device("cpu")).click_radius == 0
    assert get_profile("cpu").click_radius > 0


def test_automatic_pass_is_cached_per_volume_and_per_model():
    image, affine = _cube_volume()
    pred = _locality_predictor(2.0)
    prepared = pred.preprocess(image, affine)
    pred.predict_prepared(prepared, {"spleen": [[50, 32, 16]]})
    assert pred.model.volumes == 2  # clicked + automatic, one batch
    pred.predict_prepared(prepared, {"spleen": [[50, 32, 16], [10, 10, 10]]})
    assert pred.model.volumes == 3  # the automatic pass is reused
    assert prepared.nbytes == 2 * prepared.image.nelement() * 4
    other = _locality_predictor(2.0)  # e.g. a reloaded checkpoint: must not reuse the old pass
    other.predict_prepared(prepared, {"spleen": [[50, 32, 16]]})
    assert other.model.volumes == 2


def test_batched_forward_mixes_clicked_and_automatic_volumes():
    image, affine = _cube_volume()
    pred = _locality_predictor(2.0)
    p1, p2 = pred.preprocess(image, affine), pred.preprocess(image, affine)
    c1 = pred.map_clicks({"spleen": [(50, 32, 16)], "background": []}, p1)
    c2 = {"spleen": [], "background": []}
    batched = pred.forward([p1, p2], [c1, c2])
    alone = _locality_predictor(2.0)
    q1 = alone.preprocess(image, affine)
    np.testing.assert_allclose(batched[0], alone.forward([q1], [c1])[0], atol=1e-6)
    np.testing.assert_allclose(batched[1], alone.forward([q1], [c2])[0], atol=1e-6)


@pytest.mark.parametrize("radius", [-1, float("nan"), float("inf"), "3", True])
def test_bad_click_radius_is_rejected_naming_the_value(radius):
    with pytest.raises(ConfigError, match="click_radius must be a number >= 0"):
        _locality_predictor(radius)


# ----------------------------------------------------------------------------- the nudge


class FakeDeafNet(torch.nn.Module):
    """A fake network (not trained) that ignores clicks: spleen where the image is brighter than a
    threshold, as a model whose answer to a click on a thin boundary error is "no change"."""

    def forward(self, x):
        logit = (x[:, 0:1] - 0.6) * 20
        return torch.cat([-logit, logit], dim=1)


def _ball(n=64):
    # Brightness falls 10 HU per voxel from the centre: the mask edge lies between grid voxels.
    d = np.linalg.norm(np.indices((n, n, n)) + 0.5 - n / 2, axis=0)
    return np.rint(250 - 10 * d).astype(np.int16), d


def test_a_click_just_past_the_boundary_moves_it_there_and_nowhere_else():
    image, d = _ball()  # 64^3 voxels on the 32^3 grid of `tiny`: two voxels per grid voxel
    pred = Predictor(FakeDeafNet(), get_profile("tiny"), device=torch.device("cpu"), click_radius=1.0)
    auto = pred.predict(image, np.eye(4)).mask.astype(bool)
    edge = int(np.argmax(~auto[32:, 32, 32])) + 32  # first voxel outside the mask along +x
    outside, inside = [edge, 32, 32], [edge - 1, 32, 32]
    grown = pred.predict(image, np.eye(4), {"spleen": [outside]}).mask.astype(bool)
    shrunk = pred.predict(image, np.eye(4), {"background": [inside]}).mask.astype(bool)
    assert grown[tuple(outside)] and (grown >= auto).all()  # the clicked voxel becomes spleen
    assert not shrunk[tuple(inside)] and (shrunk <= auto).all()  # the clicked voxel becomes background
    for mask, click in ((grown, outside), (shrunk, inside)):
        changed = np.argwhere(mask != auto)
        # sigma 1.5 R = 1.5 grid voxels: changes stay within 3 sigma = 4.5 grid voxels = 9 voxels
        assert 0 < len(changed) and np.abs(changed - click).max() <= 10
    # The network alone (no exact click positions, hence no nudge) leaves the clicked voxel as it was.
    prepared = pred.preprocess(image, np.eye(4))
    net_only = pred.forward([prepared], [pred.map_clicks({"spleen": [tuple(outside)], "background": []}, prepared)])
    assert not pred.postprocess(net_only[0], prepared)[tuple(outside)]


def test_click_radius_zero_turns_the_nudge_off():
    image, _ = _ball()
    deaf = Predictor(FakeDeafNet(), get_profile("tiny"), device=torch.device("cpu"), click_radius=0)
    auto = deaf.predict(image, np.eye(4)).mask
    edge = int(np.argmax(~auto[32:, 32, 32].astype(bool))) + 32
    np.testing.assert_array_equal(deaf.predict(image, np.eye(4), {"spleen": [[edge, 32, 32]]}).mask, auto)


def test_upsampling_follows_the_profile():
    # logit: the logit is interpolated and thresholded at 0; probability: trilinear at 0.5; area (the
    # bundle): adaptive average pooling, as the model zoo's Invertd of Resized(mode="area") (spec §5).
    assert get_profile("bundle").upsample == "area" and get_profile("cpu").upsample == "logit"
    rng = np.random.default_rng(0)
    prob = torch.from_numpy(rng.uniform(0, 1, (1, 32, 32, 32)).astype(np.float32))
    cases = (
        ("logit", 0.0, torch.logit(prob.clamp(1e-6, 1 - 1e-6)), "trilinear"),
        ("probability", 0.5, prob, "trilinear"),
        ("area", 0.5, prob, "area"),
    )
    for upsample, level, values, mode in cases:
        profile = dataclasses.replace(get_profile("tiny"), upsample=upsample)
        pred = Predictor(FakeDeafNet(), profile, device=torch.device("cpu"))
        prepared = pred.preprocess(np.zeros((80, 72, 40), np.int16), np.eye(4))
        kwargs = {} if mode == "area" else {"align_corners": False}
        expected = F.interpolate(values[None], size=(80, 72, 40), mode=mode, **kwargs)[0, 0] > level
        np.testing.assert_array_equal(pred.postprocess(prob, prepared), expected.numpy())


@pytest.mark.parametrize("shape", [(80, 72, 40), (97, 61, 23), (33, 130, 17), (32, 32, 32), (250, 250, 7)])
@pytest.mark.parametrize("upsample", ["area", "logit"])
def test_windowed_upsampling_equals_the_whole_volume_resize(shape, upsample):
    """Only the box that can be foreground is resized; the answer is the full-volume resize's, for
    scans larger and smaller than the grid, sizes that share no factor with it, and blobs at the edge."""
    rng = np.random.default_rng(sum(shape))
    profile = dataclasses.replace(get_profile("tiny"), upsample=upsample)
    pred = Predictor(FakeDeafNet(), profile, device=torch.device("cpu"))
    prepared = pred.preprocess(np.zeros(shape, np.int16), np.eye(4))
    for trial in range(4):
        prob = torch.zeros(1, 32, 32, 32)
        lo = rng.integers(0, 28, 3) if trial else np.array([0, 25, 28])
        hi = np.minimum(lo + rng.integers(2, 6, 3), 32)
        prob[0, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = torch.from_numpy(
            rng.uniform(0.3, 1.0, tuple(hi - lo)).astype(np.float32)
        )
        if upsample == "area":
            full = F.interpolate(prob[None], size=shape, mode="area")[0, 0] > 0.5
        else:
            full = (
                F.interpolate(
                    torch.logit(prob.clamp(1e-6, 1 - 1e-6))[None], size=shape, mode="trilinear", align_corners=False
                )[0, 0]
                > 0
            )
        np.testing.assert_array_equal(pred.postprocess(prob, prepared), full.numpy())


def test_a_profile_with_an_unknown_upsampling_is_refused():
    with pytest.raises(ConfigError, match="upsample must be one of area, probability, logit"):
        dataclasses.replace(get_profile("tiny"), upsample="cubic")
