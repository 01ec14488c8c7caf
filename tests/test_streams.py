"""Random streams of training: each rank draws its own augmentation, and a resumed run draws what an
uninterrupted one draws (same shuffle, same augmentation, same clicks: identical fp32 weights)."""

from __future__ import annotations

import pytest
import torch

from trainer.checkpoint import load_checkpoint
from trainer.config import TrainConfig
from trainer.runtime import LocalRuntime
from trainer.train import build_datasets, make_loader, seed_epoch, train


def _draws(loader, cfg, rank, epoch, n=6):
    seed_epoch(loader, cfg, rank, epoch)
    return [loader.dataset[i]["image"].clone() for i in range(n)]


def test_each_rank_draws_its_own_augmentation(tiny_dataset):
    cfg = TrainConfig(profile="tiny", cache_workers=1, flip_prob=0.5, rot90_prob=0.5)
    train_ds, _ = build_datasets(cfg, str(tiny_dataset), progress=False)
    loaders = [make_loader(train_ds, cfg, rank, 2) for rank in (0, 1)]
    rank0, rank1 = _draws(loaders[0], cfg, 0, 0), _draws(loaders[1], cfg, 1, 0)
    # The same cases (same dataset indices) augmented differently on the two ranks.
    assert sum(not torch.equal(a, b) for a, b in zip(rank0, rank1)) >= 4
    # A rank's stream is a function of (seed, rank, epoch): drawn again, the same; next epoch, another.
    assert all(torch.equal(a, b) for a, b in zip(rank0, _draws(loaders[0], cfg, 0, 0)))
    assert not all(torch.equal(a, b) for a, b in zip(rank0, _draws(loaders[0], cfg, 0, 1)))
    # The two ranks' shares of an epoch do not overlap.
    for loader in loaders:
        loader.sampler.set_epoch(2)
    shares = [set(iter(loader.sampler)) for loader in loaders]
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == len(train_ds)


class _Interrupted(Exception):
    pass


class _StopAfter(LocalRuntime):
    """Writes checkpoints like LocalRuntime, then dies after the given epoch (a preempted job)."""

    def __init__(self, output_dir, epochs: int):
        super().__init__(output_dir)
        self.epochs = epochs

    def on_epoch_end(self, *, metrics, checkpoint, is_best):
        super().on_epoch_end(metrics=metrics, checkpoint=checkpoint, is_best=is_best)
        if metrics["epoch"] >= self.epochs:
            raise _Interrupted


def _cfg(**changes) -> TrainConfig:
    # constant lr: with a time budget the schedule follows the clock, which no rerun repeats.
    base = dict(
        profile="tiny",
        epochs=2,
        cache_workers=1,
        amp=False,
        seed=9,
        val_every=2,
        lr_schedule="constant",
        click_prob_train=0.5,
        flip_prob=0.3,
    )
    return TrainConfig(**(base | changes))


def _weights(run) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt").model


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_dataset, tmp_path):
    straight = tmp_path / "straight"
    train(_cfg(), str(tiny_dataset), LocalRuntime(straight))

    # Interrupted after epoch 1, resumed at epoch 2.
    at_boundary = tmp_path / "boundary"
    with pytest.raises(_Interrupted):
        train(_cfg(), str(tiny_dataset), _StopAfter(at_boundary, 1))
    metrics = train(_cfg(resume=True), str(tiny_dataset), LocalRuntime(at_boundary))
    assert metrics["resumed_from"] == 1 and metrics["epoch"] == 2

    # Cut inside epoch 1 by a time budget, resumed at the step where it stopped.
    mid_epoch = tmp_path / "mid"
    train(_cfg(max_train_seconds=1.0), str(tiny_dataset), LocalRuntime(mid_epoch))
    cut = load_checkpoint(mid_epoch / "checkpoints" / "last.pt").metrics
    train(_cfg(resume=True), str(tiny_dataset), LocalRuntime(mid_epoch))

    expected = _weights(straight)
    for run in (at_boundary, mid_epoch):
        got = _weights(run)
        assert all(torch.equal(got[k], expected[k]) for k in expected), (run.name, cut)
