"""Learning-rate schedule and the wall-time budget of a training job."""

import json

import pytest

from trainer.config import ConfigError, TrainConfig
from trainer.schedule import Budget, learning_rate


def test_cosine_anneals_from_the_peak_to_the_floor():
    lrs = [learning_rate("cosine", 2e-3, p / 10) for p in range(11)]
    assert lrs[0] == pytest.approx(2e-3)
    assert lrs[-1] == pytest.approx(2e-5)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert learning_rate("constant", 1e-4, 0.7) == 1e-4


def test_cosine_holds_the_peak_until_the_anneal_fraction():
    lrs = [learning_rate("cosine", 1e-3, p / 10, anneal=0.2) for p in range(11)]
    assert lrs[:9] == [pytest.approx(1e-3)] * 9  # constant for the first 80 %
    assert lrs[9] == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))  # half-way down at 90 %
    assert lrs[10] == pytest.approx(1e-5)


def test_progress_is_the_larger_of_steps_and_time():
    budget = Budget(total_steps=100, seconds=60)
    assert budget.progress(10, 30.0) == pytest.approx(0.5)  # time leads
    assert budget.progress(80, 30.0) == pytest.approx(0.8)  # steps lead
    assert budget.progress(10, 600.0) == 1.0
    assert not budget.out_of_time(59.9) and budget.out_of_time(60.0)
    assert not Budget(total_steps=100).out_of_time(1e9)  # no budget: never out of time


def test_profiles_choose_a_schedule_and_a_bad_one_is_refused():
    assert TrainConfig(profile="bundle").schedule == "constant"  # the model zoo's constant 1e-4
    assert TrainConfig(profile="cpu").schedule == "cosine"
    assert TrainConfig(profile="cpu", lr_schedule="constant").schedule == "constant"
    with pytest.raises(ConfigError, match="lr_schedule must be one of constant, cosine, got 'linear'"):
        TrainConfig(lr_schedule="linear")
    with pytest.raises(ConfigError, match="lr_anneal_fraction must be in"):
        TrainConfig(lr_anneal_fraction=0)


def test_a_time_budget_stops_inside_an_epoch_with_a_checkpoint(tmp_path):
    from trainer.checkpoint import load_checkpoint
    from trainer.runtime import LocalRuntime
    from trainer.synth import write_dataset
    from trainer.train import train

    data = tmp_path / "data"
    write_dataset(data, 80, seed=3, shape=(40, 40, 20))  # 64 training cases: more than 3 s per epoch
    out = tmp_path / "run"
    cfg = TrainConfig(profile="tiny", epochs=50, max_train_seconds=3.0, lr_anneal_fraction=1.0, cache_workers=1)
    metrics = train(cfg, str(data), LocalRuntime(out))
    assert metrics["epoch"] == 1  # stopped inside the first epoch, not after 50
    assert 1 < metrics["steps"] < 64
    assert metrics["val_dice"] is not None  # the partial epoch is still validated ...
    assert load_checkpoint(out / "checkpoints" / "last.pt").epoch == 0  # ... and checkpointed
    # The schedule follows the clock: the last step ran late in the budget, at a reduced rate.
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["lr"] < 0.9 * cfg.lr
