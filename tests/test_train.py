"""A short training run on tiny phantoms: it learns, checkpoints are usable, resume works."""

import json
import math

import numpy as np
import pytest
import torch

from trainer.checkpoint import load_checkpoint
from trainer.config import TrainConfig
from trainer.engine import validate_item
from trainer.network import build_network
from trainer.train import build_datasets


def _val_dice(model, cfg, data):
    _, val_ds = build_datasets(cfg, str(data), progress=False)
    scores = []
    for i in range(len(val_ds)):
        item = {k: (v[None] if isinstance(v, torch.Tensor) else v) for k, v in val_ds[i].items()}
        scores.append(
            validate_item(model, item, np.random.default_rng([cfg.seed, 10_000 + i]), cfg, torch.device("cpu"))
        )
    return float(np.mean(scores))


def test_training_beats_an_untrained_model(trained_tiny):
    data, out, metrics = trained_tiny
    cfg = TrainConfig(profile="tiny", cache_workers=1)
    torch.manual_seed(0)
    untrained = _val_dice(build_network(cfg.profile_spec), cfg, data)
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    model = build_network(cfg.profile_spec)
    model.load_state_dict(best.model)
    trained = _val_dice(model, cfg, data)
    assert trained > untrained + 0.25, (trained, untrained)
    assert trained == pytest.approx(best.metrics["val_dice"], abs=1e-6)  # validation is deterministic


def test_metrics_log_and_checkpoints(trained_tiny):
    _, out, metrics = trained_tiny
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 13))
    for r in lines:
        assert r["loss"] > 0 and 0 <= r["train_dice"] <= 1 and r["samples_per_s"] > 0
    assert [r["val_dice"] is not None for r in lines] == [(e % 4 == 0) for e in range(1, 13)]
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last.epoch == 11 and last.optimizer and last.config["profile"] == "tiny"
    assert (out / "config.yaml").is_file()


def test_resume_continues_from_last(trained_tiny, tmp_path):
    import shutil

    from trainer.runtime import LocalRuntime
    from trainer.train import train

    data, out, _ = trained_tiny
    run = tmp_path / "run"
    shutil.copytree(out, run)
    cfg = TrainConfig(profile="tiny", epochs=13, learning_rate=3e-3, val_every=4, cache_workers=1, resume=True)
    metrics = train(cfg, str(data), LocalRuntime(run))
    assert metrics["resumed_from"] == 12 and metrics["epoch"] == 13
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 13


def test_a_diverged_run_stops_with_a_clear_error_and_keeps_its_last_checkpoint(tiny_dataset, tmp_path):
    """lr 1e30: the first update sends the weights to ~1e30, every later step is non-finite and
    skipped. Training stops once half of the last 50 steps were skipped (8 steps per epoch here: the
    25th skip is step 2 of epoch 4), naming the fix, and the checkpoints written before are intact."""
    from trainer.runtime import LocalRuntime
    from trainer.train import TrainingDiverged, train

    cfg = TrainConfig(profile="tiny", epochs=6, learning_rate=1e30, val_every=1, cache_workers=1, amp=False)
    with pytest.raises(
        TrainingDiverged,
        match=r"epoch 4: 25 of the last 26 steps had a non-finite loss or gradient.*Lower --learning-rate",
    ):
        train(cfg, str(tiny_dataset), LocalRuntime(tmp_path))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in lines] == [1, 0, 0]  # epoch 1 made one step, epochs 2-3 none
    assert math.isnan(lines[1]["loss"])  # not a loss of 0
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt").epoch == 2
