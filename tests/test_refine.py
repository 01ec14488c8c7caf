"""Click-centred refinement (trainer.refine): window geometry, the blend at scan resolution, the one
predictor path (one window forward per click, the automatic pass cached) and the training windows."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer import refine as rf
from trainer import window_sampling as ws
from trainer.checkpoint import Checkpoint, save_checkpoint
from trainer.config import TrainConfig, get_profile
from trainer.metrics import spleen_dice
from trainer.network import build_network
from trainer.predictor import Predictor
from trainer.synth import generate_case
from trainer.transforms import area_resize

#: Halfway between the ball (250 HU -> 1.0 in the CT window) and soft tissue (0 HU -> 175 / 425).
MIDPOINT = (1.0 + 175 / 425) / 2


class FakeThresholdNet(torch.nn.Module):
    """A fake network (not trained): "spleen" where the CT channel is above the midpoint between the
    ball and its surroundings, whatever the clicks. On a finer view its answer is a finer mask, which
    shows what a window buys."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []  # batch size of each forward

    def forward(self, x):
        self.calls.append(int(x.shape[0]))
        spleen = (x[:, 0:1] - MIDPOINT) * 40
        return torch.cat([-spleen, spleen], dim=1)


def _ball_scan(spacing=(0.8, 0.8, 2.5), shape=(240, 220, 90), radius_mm=14.0):
    """A bright ball (the 'spleen', 250 HU) in soft tissue (0 HU); RAS affine."""
    axes = [(np.arange(n) - n / 2 + 0.5) * s for n, s in zip(shape, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    ball = (x - 20) ** 2 + (y + 10) ** 2 + z**2 <= radius_mm**2
    image = np.where(ball, 250, 0).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    return image, affine, ball


def test_window_holds_every_click_with_a_margin_and_one_click_sits_in_the_middle():
    grid = (64, 64, 32)
    one = rf.window_around(np.array([[100.0, 50.0, 20.0]]), grid)
    assert one.size == grid
    assert [lo + s / 2 for lo, s in zip(one.lo, one.size)] == pytest.approx([100.5, 50.5, 20.5], abs=0.5)
    spread = np.array([[10.0, 10.0, 5.0], [120.0, 40.0, 9.0]])
    w = rf.window_around(spread, grid)
    assert all(s >= g for s, g in zip(w.size, grid))
    scale = w.size[0] / grid[0]
    assert w.size[2] == pytest.approx(grid[2] * scale, abs=1)  # one scale on every axis
    for p in spread:
        for axis in range(3):
            margin = rf.CLICK_MARGIN * grid[axis] - 1
            assert w.lo[axis] + margin <= p[axis] <= w.lo[axis] + w.size[axis] - margin


def test_crop_of_the_whole_volume_is_the_area_resize_and_outside_is_zero():
    fine = (torch.rand(64, 48, 40) * 255).to(torch.uint8)  # fine volumes are bytes (multiples of 1/255)
    values = fine.float() / 255
    grid = (32, 32, 16)
    whole = rf.crop(fine, rf.Window(lo=(0, 0, 0), size=(64, 48, 40)), grid)
    torch.testing.assert_close(whole, area_resize(values[None], grid))
    shifted = rf.crop(fine, rf.Window(lo=(-32, 0, 0), size=(64, 48, 40)), grid)
    assert float(shifted[0, :16].abs().max()) == 0.0  # the half outside the volume is zero-padded
    torch.testing.assert_close(shifted[0, 16:], area_resize(values[None, :32], (16, 32, 16))[0])


def test_the_whole_scan_sample_is_pytorchs_trilinear_resize():
    values = torch.randn(16, 12, 8)
    ras_shape = (50, 37, 21)
    box = (slice(3, 40), slice(0, 37), slice(5, 6))
    ours = rf.sample(values, box, ras_shape, ras_shape, None)
    ref = F.interpolate(values[None, None], size=ras_shape, mode="trilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(ours, ref[box], atol=1e-5, rtol=1e-5)


def test_a_click_maps_to_the_window_voxel_over_it():
    ras_shape, fine = (200, 180, 60), (100, 90, 60)
    click = np.array([[123, 77, 31]])
    f = rf.scan_to_fine(click, ras_shape, fine)
    window = rf.window_around(f, (32, 32, 16))
    (g,) = rf.to_window(f, window, (32, 32, 16))
    # The window voxel's footprint on the scan holds the click.
    for axis in range(3):
        lo = (window.lo[axis] + g[axis] * window.size[axis] / (32, 32, 16)[axis]) * ras_shape[axis] / fine[axis]
        hi = (window.lo[axis] + (g[axis] + 1) * window.size[axis] / (32, 32, 16)[axis]) * ras_shape[axis] / fine[axis]
        assert lo <= click[0, axis] + 0.5 <= hi


def test_taper_is_zero_at_the_faces_and_one_inside():
    ras_shape, fine = (64, 64, 32), (64, 64, 32)
    window = rf.Window(lo=(16, 16, 8), size=(32, 32, 16))
    box = rf.scan_box(window, ras_shape, fine)
    assert box == (slice(16, 48), slice(16, 48), slice(8, 24))
    w = rf.taper(box, ras_shape, fine, window, (32, 32, 16))
    assert float(w[0].max()) <= 0.5 / rf.BLEND_RAMP + 1e-6 and float(w[16, 16, 8]) == 1.0


def test_a_window_refines_at_scan_resolution_and_leaves_the_rest_alone():
    """The same (fake) network on a fine window gets the ball's surface right where the whole-scan
    grid cannot; outside the window the mask is the automatic one."""
    image, affine, ball = _ball_scan()
    net = FakeThresholdNet()
    plain = Predictor(net, get_profile("cpu"), device=torch.device("cpu"), click_radius=0)
    refining = Predictor(net, get_profile("cpu"), device=torch.device("cpu"), refine=True)
    auto = plain.predict(image, affine).mask.astype(bool)
    prepared = refining.preprocess(image, affine)
    centre = tuple(int(v) for v in np.argwhere(ball).mean(axis=0).round())
    outside = (centre[0] + 25, centre[1], centre[2])  # 20 mm from the centre of a 14 mm ball: one window
    refined = refining.predict_prepared(prepared, {"spleen": [centre], "background": [outside]})
    dice_auto = float(spleen_dice(auto, ball)[0])
    dice_refined = float(spleen_dice(refined.mask.astype(bool), ball)[0])
    assert dice_refined > dice_auto + 0.02, (dice_auto, dice_refined)
    assert dice_refined > 0.96  # measured: 0.937 automatic (64x64x32 over 192 mm), 0.976 refined
    assert "window" in refined.timings
    # Outside the window's box the automatic mask stands.
    fine = tuple(prepared.fine.shape)
    f = rf.scan_to_fine(np.array([centre]), prepared.ras_shape, fine)
    box = rf.scan_box(rf.window_around(f, refining.profile.spatial_size), prepared.ras_shape, fine)
    outside = np.ones(image.shape, bool)
    outside[box] = False
    np.testing.assert_array_equal(refined.mask.astype(bool)[outside], auto[outside])


def test_a_session_click_costs_one_window_forward():
    image, affine, ball = _ball_scan(shape=(120, 110, 50), spacing=(1.6, 1.6, 4.0))
    net = FakeThresholdNet()
    p = Predictor(net, get_profile("tiny"), device=torch.device("cpu"), refine=True)
    prepared = p.preprocess(image, affine)
    p.predict_prepared(prepared, None)
    assert net.calls == [1]  # the automatic pass
    centre = [int(v) for v in np.argwhere(ball).mean(axis=0).round()]
    steps = [("spleen", centre), ("background", [5, 5, 5]), ("spleen", [centre[0] + 3, centre[1], centre[2]])]
    clicks = {"spleen": [], "background": []}
    for n, (name, point) in enumerate(steps, start=1):
        clicks[name].append(point)
        pred = p.predict_prepared(prepared, clicks)
        # The automatic pass is cached; each click runs its own cluster's window (the far background
        # click gets a window of its own, and the spleen cluster's window is not rerun for it).
        assert net.calls == [1] * (n + 1), (n, net.calls)
        assert "window" in pred.timings
        # What the session's caches (the automatic pass at scan resolution, earlier windows) give is
        # what the same clicks give on a fresh upload.
        fresh = Predictor(FakeThresholdNet(), get_profile("tiny"), device=torch.device("cpu"), refine=True)
        np.testing.assert_array_equal(pred.mask, fresh.predict(image, affine, clicks).mask)
    p.predict_prepared(prepared, clicks)  # the same clicks again: every window is cached
    assert len(net.calls) == 4 and p.window_forwards == 3
    assert prepared.auto_placed and prepared.nbytes > prepared.auto_placed[1][0].nbytes


class FakeInvertedNet(FakeThresholdNet):
    """A fake network (not trained) answering the opposite of `FakeThresholdNet`: another model's mask."""

    def forward(self, x):
        return -super().forward(x)


def test_a_session_volume_shared_by_two_models_never_mixes_their_masks():
    """A volume a session keeps outlives a model swap: the new model's clicks start from its own
    automatic mask, even when a request of the old model finishes after the swap and leaves its
    scan-resolution mask with the volume."""
    image, affine, ball = _ball_scan(shape=(120, 110, 50), spacing=(1.6, 1.6, 4.0))
    old, new = (
        Predictor(n, get_profile("tiny"), device=torch.device("cpu"), refine=True)
        for n in (FakeThresholdNet(), FakeInvertedNet())
    )
    prepared = old.preprocess(image, affine)
    centre = [int(v) for v in np.argwhere(ball).mean(axis=0).round()]
    clicks = {"spleen": [centre], "background": []}
    old.predict_prepared(prepared, clicks)
    late = prepared.auto_placed
    expected = new.predict(image, affine, clicks).mask
    np.testing.assert_array_equal(new.predict_prepared(prepared, clicks).mask, expected)
    prepared.auto_placed = late  # the old model's request, finishing last
    np.testing.assert_array_equal(new.predict_prepared(prepared, clicks).mask, expected)
    assert prepared.auto_placed is not None and prepared.auto_placed[0] is new._token


def test_scattered_clicks_run_at_most_max_windows_and_a_long_session_keeps_working():
    """Clicks far apart each make a cluster: beyond MAX_WINDOWS clusters the windows widen instead of
    multiplying (a request's cost is bounded), and a session whose clusters outnumber the cache keeps
    answering (before: a KeyError, caching one window evicted another the same click needed)."""
    image, affine, _ = _ball_scan(shape=(100, 100, 60), spacing=(4.0, 4.0, 5.0))
    net = FakeThresholdNet()
    p = Predictor(net, get_profile("tiny"), device=torch.device("cpu"), refine=True)
    prepared = p.preprocess(image, affine)
    lattice = [[x, y, z] for z in (8, 50) for y in (10, 50, 90) for x in (10, 50, 90)]  # 160-210 mm apart
    clicks: dict[str, list] = {"spleen": [], "background": []}
    grid = p.profile.spatial_size
    for n, point in enumerate(lattice):
        clicks["background" if n % 2 else "spleen"].append(point)
        before = p.window_forwards
        pred = p.predict_prepared(prepared, clicks)
        assert p.window_forwards - before <= rf.MAX_WINDOWS
        assert len(prepared.windows) <= rf.MAX_WINDOWS
        assert pred.mask.shape == image.shape
        plans = rf.plan_windows(prepared, clicks, grid)
        # Only the closest clusters merge: as many windows as allowed, the finest ones still the grid.
        assert len(plans) == min(n + 1, rf.MAX_WINDOWS), (n, len(plans))
        assert min(max(w.size) for _, w, _ in plans) == max(grid)
    before = p.window_forwards
    p.predict_prepared(prepared, clicks)  # the same clicks again: their windows are cached
    assert p.window_forwards == before


def test_a_prediction_needing_more_windows_than_the_cache_holds_gets_them_all(monkeypatch):
    """Caching one window may evict another; the prediction still gets every window it asked for."""
    from trainer import predictor as pm

    monkeypatch.setattr(pm, "WINDOW_CACHE", 1)
    image, affine, _ = _ball_scan(shape=(100, 100, 60), spacing=(4.0, 4.0, 5.0))
    p = Predictor(FakeThresholdNet(), get_profile("tiny"), device=torch.device("cpu"), refine=True)
    prepared = p.preprocess(image, affine)
    clicks = {"spleen": [[10, 10, 8], [90, 90, 50]], "background": [[10, 90, 30]]}
    assert len(p.windows([prepared], [clicks])[0]) == 3
    assert p.window_forwards == 3
    assert len(prepared.windows) <= 3  # the current prediction's windows stay; older ones go first


def test_window_locality_takes_the_clicked_piece_and_ignores_clicks_outside_its_box():
    box = (slice(10, 30), slice(0, 20), slice(5, 15))
    changed = np.zeros((20, 20, 10), bool)
    changed[0:3, 5:15, 2:8] = True  # a piece on the box's low-x face
    inside = rf.near_clicks(box, np.array([[11.0, 10.0, 10.0]]), (1.0, 1.0, 1.0), 1.0, changed)
    assert bool((inside[torch.from_numpy(changed)] == 1).all())
    outside = rf.near_clicks(box, np.array([[2.0, 10.0, 10.0]]), (1.0, 1.0, 1.0), 1.0, changed)
    assert float(outside.max()) < 1e-6  # 8 mm outside the box: neither its Gaussian nor the face's piece


def test_only_checkpoints_trained_with_windows_refine_by_default(tmp_path):
    profile = get_profile("tiny")
    weights = build_network(profile).state_dict()
    cases = {
        "zoo.pt": (None, False),  # a plain state_dict: the model zoo's behaviour
        "old.pt": ({"profile": "tiny"}, False),  # trained before windows existed
        "win.pt": (TrainConfig(profile="tiny", window_prob=0.5).to_dict(), True),
        "nowin.pt": (TrainConfig(profile="tiny", window_prob=0.0).to_dict(), False),
    }
    for name, (config, expected) in cases.items():
        if config is None:
            torch.save(weights, tmp_path / name)
        else:
            save_checkpoint(Checkpoint(model=weights, profile="tiny", config=config), tmp_path / name)
        assert Predictor.from_checkpoint(tmp_path / name, profile="tiny").refine is expected, name
    assert Predictor.from_checkpoint(tmp_path / "win.pt", refine=False).refine is False
    assert Predictor.from_checkpoint(tmp_path / "zoo.pt", profile="tiny", refine=True).refine is True


def test_bundle_profile_never_refines_a_model_zoo_state_dict(tmp_path):
    torch.save(build_network(get_profile("bundle")).state_dict(), tmp_path / "model.pt")
    p = Predictor.from_checkpoint(tmp_path / "model.pt", profile="bundle")
    assert p.refine is False and p.click_radius == 0


def test_training_windows_are_grid_items_around_the_spleen():
    case = generate_case(np.random.default_rng(3), shape=(96, 96, 48), orientation="LPS")
    from monai.data import MetaTensor

    from trainer.transforms import WindowHUd

    image = MetaTensor(torch.from_numpy(case.image.astype(np.float32))[None], affine=torch.as_tensor(case.affine))
    label = MetaTensor(torch.from_numpy(case.label.astype(np.float32))[None], affine=torch.as_tensor(case.affine))
    windowed = WindowHUd()({"image": image})["image"]
    spacing = rf.window_spacing((32, 32, 32), 128.0)
    item = ws.FineVolumed(spacing)({"image": windowed, "label": label})
    # The fine label is the RAS-ordered label area-resized to the fine shape (MONAI's reorientation, then PyTorch's area).
    import nibabel as nib

    ras = np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(case.label, case.affine)).dataobj).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(ras)[None, None], size=tuple(item[ws.FINE_LABEL].shape), mode="area")[
        0, 0
    ]
    torch.testing.assert_close(item[ws.FINE_LABEL].float() / 255, expected, atol=0.5 / 255 + 1e-5, rtol=0)
    t = ws.RandWindowd(prob=1.0, grid=(32, 32, 32), soft_label=True)
    t.set_random_state(0)
    hits = 0
    for _ in range(8):
        out = t(dict(item))
        assert ws.FINE_IMAGE not in out and int(out[ws.WINDOW]) == 1
        assert tuple(out["image"].shape) == (1, 32, 32, 32) and out["label"].dtype == torch.float16
        hits += int(float(out["label"].float().max()) >= 0.5)
    assert hits >= 6  # windows are centred on or near the spleen
    off = ws.RandWindowd(prob=0.0, grid=(32, 32, 32), soft_label=True)
    out = off(dict(item))
    assert ws.FINE_IMAGE not in out and int(out[ws.WINDOW]) == 0


def test_clicks_share_a_window_when_near_and_the_order_of_clicks_does_not_matter():
    grid = (64, 64, 32)
    points = np.array([[10.0, 10.0, 10.0], [40.0, 20.0, 12.0], [200.0, 10.0, 10.0], [60.0, 30.0, 14.0]])
    clusters = rf.cluster_clicks(points, grid)
    assert [sorted(c.tolist()) for c in clusters] == [[0, 1, 3], [2]]  # chained within half a grid; one far
    shuffled = rf.cluster_clicks(points[[2, 3, 0, 1]], grid)
    assert [sorted(points[[2, 3, 0, 1]][c].tolist()) for c in shuffled] == [
        sorted(points[c].tolist()) for c in clusters
    ]
    assert rf.cluster_clicks(np.zeros((0, 3)), grid) == []


def test_a_background_click_never_adds_spleen_and_a_spleen_click_never_removes_it():
    """Whatever the window's network answers (here a fake that ignores clicks), a window guided only by
    background clicks can only remove spleen, and one guided only by spleen clicks can only add it."""
    image, affine, ball = _ball_scan()
    net = FakeThresholdNet()
    p = Predictor(net, get_profile("cpu"), device=torch.device("cpu"), refine=True)
    prepared = p.preprocess(image, affine)
    auto = p.predict_prepared(prepared, None).mask.astype(bool)
    centre = [int(v) for v in np.argwhere(ball).mean(axis=0).round()]
    removed = p.predict_prepared(prepared, {"spleen": [], "background": [centre]}).mask.astype(bool)
    added = p.predict_prepared(prepared, {"spleen": [centre], "background": []}).mask.astype(bool)
    assert not (removed & ~auto).any() and not (auto & ~added).any()
    assert (auto & ~removed).any() and (added & ~auto).any()  # each did change the mask (the fine answer differs)


def test_with_a_radius_a_window_changes_the_mask_only_near_its_clicks():
    image, affine, ball = _ball_scan()
    net = FakeThresholdNet()
    centre = [int(v) for v in np.argwhere(ball).mean(axis=0).round()]
    # Either side of the ball's surface on its +x side (0.8 mm voxels: 11.2 and 16.8 mm from the centre).
    clicks = {
        "spleen": [[centre[0] + 14, centre[1], centre[2]]],
        "background": [[centre[0] + 21, centre[1], centre[2]]],
    }
    free = Predictor(net, get_profile("cpu"), device=torch.device("cpu"), refine=True)
    local = Predictor(net, get_profile("cpu"), device=torch.device("cpu"), refine=True, refine_radius_mm=4.0)
    auto = free.predict(image, affine).mask.astype(bool)
    changed_free = free.predict(image, affine, clicks).mask.astype(bool) != auto
    changed_local = local.predict(image, affine, clicks).mask.astype(bool) != auto
    assert changed_free.sum() > 2 * changed_local.sum() > 0
    spacing = np.array([0.8, 0.8, 2.5])
    d = np.min(
        [
            np.linalg.norm((np.argwhere(changed_local) - c) * spacing, axis=1)
            for c in clicks["spleen"] + clicks["background"]
        ],
        axis=0,
    )
    assert d.max() <= 12.0  # within 3 radii of a click: the rest of the ball's surface is left as it was
    d_free = np.min(
        [
            np.linalg.norm((np.argwhere(changed_free) - c) * spacing, axis=1)
            for c in clicks["spleen"] + clicks["background"]
        ],
        axis=0,
    )
    assert d_free.max() > 20.0  # without the radius the window also redrew the far side


def test_the_fine_volume_is_at_the_window_spacing_whatever_the_scan():
    """A window means the same millimetres on a coarse scan and a fine one: the fine volume is at the
    window spacing exactly (coarse scans linearly upsampled, fine ones area-downsampled), so training
    on 3.5 mm phantoms teaches the 128 mm windows that inference cuts from 0.7 mm clinical scans."""
    from monai.data import MetaTensor

    window_spacing = rf.window_spacing((64, 64, 32), 128.0)  # cpu: 2x2x4 mm
    fines = []
    for spacing, shape in (((3.5, 3.5, 5.0), (112, 112, 48)), ((0.875, 0.875, 2.5), (448, 448, 96))):
        image, affine, ball = _ball_scan(spacing=spacing, shape=shape, radius_mm=40.0)
        assert rf.fine_shape(shape, spacing, window_spacing) == (196, 196, 60)  # 392x392x240 mm
        windowed = MetaTensor(torch.from_numpy(ball[None].astype(np.float32)), affine=torch.from_numpy(affine))
        fine = rf.fine_volume(windowed, window_spacing)
        assert tuple(fine.shape) == (196, 196, 60) and fine.dtype == torch.uint8
        fines.append(fine.float() / rf.FINE_LEVELS)
    # The same ball at the same fine voxels: soft fractions agree up to the coarse scan's blur.
    coarse, fine = (f >= 0.5 for f in fines)
    assert spleen_dice(coarse.numpy(), fine.numpy()) >= 0.95
    assert float((fines[0] - fines[1]).abs().mean()) < 0.02


def test_a_small_scan_declaring_huge_voxels_gets_a_bounded_fine_volume():
    """Upsampling is where a fine volume could outgrow its scan: 64 voxels a side of 50 mm would be
    1600 at 2 mm (4 G voxels from a 262 K-voxel upload). It stays within FINE_MAX_VOXELS, never below
    the scan's own size, and ordinary scans are untouched by the bound."""
    window_spacing = rf.window_spacing((64, 64, 32), 128.0)
    shape = rf.fine_shape((64, 64, 64), (50.0, 50.0, 50.0), window_spacing)
    assert np.prod(shape) <= rf.FINE_MAX_VOXELS and all(f >= 64 for f in shape)
    assert shape == (322, 322, 161)  # one factor on every axis: 2x2x4 mm grown to 9.9x9.9x19.9 mm
    assert rf.fine_shape((4, 4, 4), (1000.0, 1000.0, 1000.0), window_spacing) == (322, 322, 161)
    needle = rf.fine_shape((16, 16, 16), (5e5, 1.0, 1.0), window_spacing)
    assert needle[1:] == (8, 4) and np.prod(needle) <= rf.FINE_MAX_VOXELS  # downsampled axes as usual
    assert rf.fine_shape((512, 512, 1500), (0.7, 0.7, 1.0), window_spacing) == (179, 179, 375)
