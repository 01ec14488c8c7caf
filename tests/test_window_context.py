"""The current mask as a refinement window's context (`TrainConfig.window_context`): what training
feeds the 4th channel, what inference feeds it, and that both reach every path through the one predictor."""

import numpy as np
import pytest
import torch

from trainer import refine as rf
from trainer import window_sampling as ws
from trainer.checkpoint import Checkpoint, save_checkpoint
from trainer.clicks import _largest_piece
from trainer.config import ConfigError, TrainConfig, get_profile
from trainer.network import build_network, load_model, takes_context
from trainer.predictor import Predictor


def _ellipsoid(shape=(32, 32, 32), radii=(9, 7, 8)):
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - n / 2) / r) ** 2 for g, n, r in zip(grids, shape, radii)) <= 1.0


def test_a_corrupted_context_has_errors_to_click_and_depends_only_on_its_seed():
    label = _ellipsoid()
    body = np.ones_like(label)
    masks = [ws.corrupt_mask(label, body, np.random.default_rng(s)) for s in range(40)]
    again = ws.corrupt_mask(label, body, np.random.default_rng(7))
    assert np.array_equal(masks[7], again)
    wrong = [int((m != label).sum()) for m in masks]
    assert sum(w > 0 for w in wrong) >= 36  # nearly always something to correct
    assert sum(not m.any() for m in masks) <= 10  # "all missed" is a minority
    dice = [2 * (m & label).sum() / (m.sum() + label.sum()) for m in masks if m.any()]
    assert np.median(dice) > 0.6  # mostly a plausible answer, not noise
    assert not ws.corrupt_mask(np.zeros_like(label), body, np.random.default_rng(0)).any()


def test_context_clicks_go_deep_into_successive_error_pieces():
    label = _ellipsoid()
    context = label.copy()
    context[:, :, 22:] = False  # a missed cap of the spleen (the largest piece)
    context[2:6, 2:6, 2:6] = True  # a small false positive far away
    for seed in range(10):
        clicks = ws.context_clicks(context, label, np.random.default_rng(seed))
        spleen, background = clicks["spleen"], clicks["background"]
        assert spleen and all(label[p] and not context[p] for p in spleen)
        assert spleen[0][2] >= 22  # the first click: in the largest piece
        assert all(context[p] and not label[p] for p in background)
        assert len(spleen) <= 1 and len(background) <= 1  # each piece clicked once, then taken as fixed


def test_context_clicks_fall_back_to_seeds_when_the_context_is_right():
    label = _ellipsoid()
    clicks = ws.context_clicks(label, label, np.random.default_rng(0))
    assert clicks["spleen"] and all(label[p] for p in clicks["spleen"])


def test_the_context_crop_is_the_whole_scan_mask_seen_through_the_window():
    """A ball on the whole-scan grid, cut by a window over part of it at 4x the resolution: the window's
    context is the same ball at the window's voxels, and zero where the window reaches outside."""
    grid = (16, 16, 16)
    whole = torch.from_numpy(_ellipsoid(grid, (5, 5, 5)).astype(np.float32))
    fine = (64, 64, 64)  # the fine volume: 4 fine voxels per whole-scan voxel
    window = rf.Window(lo=(16, 16, 16), size=(32, 32, 32))  # fine [16, 48): the middle half
    ctx = rf.context_crop(whole, window, fine, grid)
    assert ctx.shape == (1, *grid)
    expected = torch.nn.functional.interpolate(whole[None, None], size=fine, mode="trilinear")[0, 0] > 0.5
    expected = expected[16:48:2, 16:48:2, 16:48:2]
    agree = float((ctx[0].bool() == expected).float().mean())
    assert agree > 0.97
    outside = rf.context_crop(torch.ones(grid), rf.Window(lo=(-32, 0, 0), size=(32, 32, 32)), fine, grid)
    assert float(outside.max()) == 0.0


class RecordingNet(torch.nn.Module):
    """A fake network (not trained) that records its inputs and answers "no spleen"."""

    def __init__(self, channels: int):
        super().__init__()
        self.input_block = torch.nn.Module()
        self.input_block.conv1 = torch.nn.Module()
        self.input_block.conv1.conv = torch.nn.Conv3d(channels, 1, 1)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.clone())
        spleen = (x[:, :1] > 0.9).float() * 20 - 10  # "spleen" only where the CT is bright
        return torch.cat([-spleen, spleen], dim=1)


def test_a_window_gets_the_automatic_mask_as_context_and_the_whole_scan_gets_none():
    profile = get_profile("tiny")
    shape, spacing = (96, 96, 48), (3.0, 3.0, 4.0)
    image = np.zeros(shape, np.int16)
    image[30:60, 30:60, 14:34] = 300  # a bright box: the automatic answer's "spleen"
    affine = np.diag([*spacing, 1.0])
    net = RecordingNet(4)
    p = Predictor(net, profile, device=torch.device("cpu"), refine=True)
    assert p.context
    prepared = p.preprocess(image, affine)
    p.predict_prepared(prepared, {"spleen": [[45, 45, 24]], "background": []})
    whole, window = net.inputs
    assert whole.shape[1] == 4 and float(whole[:, 3].abs().max()) == 0.0
    ctx = window[0, 3]
    assert 0.0 < float(ctx.mean()) < 1.0  # the box's answer, cut by the window around the click
    assert bool((ctx[window[0, 0] < 0.5] == 0).all())  # ... only where the box is
    three = RecordingNet(3)
    Predictor(three, profile, device=torch.device("cpu"), refine=True).predict(
        image, affine, {"spleen": [[45, 45, 24]]}
    )
    assert all(x.shape[1] == 3 for x in three.inputs)


def test_window_context_is_refused_where_it_cannot_work():
    with pytest.raises(ConfigError, match="model zoo's network takes 3"):
        TrainConfig(profile="bundle", window_context=True)
    with pytest.raises(ConfigError, match="window_prob is 0.0"):
        TrainConfig(profile="cpu", window_prob=0.0, window_context=True)


def test_a_context_checkpoint_loads_with_its_fourth_channel(tmp_path):
    profile = get_profile("tiny")
    model = build_network(profile, context=True)
    assert takes_context(model) and not takes_context(build_network(profile))
    cfg = TrainConfig(profile="tiny", window_prob=0.5, window_context=True)
    save_checkpoint(Checkpoint(model=model.state_dict(), profile="tiny", config=cfg.to_dict()), tmp_path / "c.pt")
    loaded = load_model(tmp_path / "c.pt")
    assert takes_context(loaded.model)
    # A bundle config's `network_def` is the profile's 3-channel network: the weights get their own.
    assert takes_context(load_model(tmp_path / "c.pt", network=build_network(profile)).model)
    p = Predictor.from_checkpoint(tmp_path / "c.pt")
    assert p.refine and p.context


def test_training_with_context_trains_and_evaluates_through_the_one_predictor(tiny_dataset, tmp_path):
    from trainer.config import EvaluateConfig
    from trainer.evaluate import evaluate_checkpoint
    from trainer.runtime import LocalRuntime
    from trainer.train import train

    cfg = TrainConfig(profile="tiny", epochs=1, window_prob=0.5, window_context=True, cache_workers=1)
    train(cfg, str(tiny_dataset), LocalRuntime(tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    summary = evaluate_checkpoint(
        EvaluateConfig(checkpoint=ckpt, data_dir=tiny_dataset, output_dir=tmp_path / "eval", split="test", max_clicks=2)
    )
    assert len(summary["dice_by_clicks"]) == 3
    assert all(0.0 <= d <= 1.0 for d in summary["dice_by_clicks"])


def test_the_largest_piece_helper_is_what_next_click_uses():
    region = np.zeros((10, 10, 10), bool)
    region[0:2, 0:2, 0:2] = True
    region[5:9, 5:9, 5:9] = True
    assert int(_largest_piece(region).sum()) == 64
