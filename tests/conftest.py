"""Shared fixtures: synthetic Decathlon datasets written by the project's own phantom generator."""

from __future__ import annotations

import os

import pytest

# Keep every test process light on the 2-core CI machine and off the network.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray otherwise binds to the host's address; every test server must stay on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """10 labelled + 2 test phantoms of moderate size (varied orientation, spacing, size)."""
    from trainer.synth import write_dataset

    root = tmp_path_factory.mktemp("tiny_ds")
    write_dataset(root, 10, seed=3)
    return root


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """A tiny-profile model trained briefly on 16 phantoms: (dataset dir, run dir, final metrics)."""
    from trainer.config import TrainConfig
    from trainer.runtime import LocalRuntime
    from trainer.synth import write_dataset
    from trainer.train import train

    data = tmp_path_factory.mktemp("train_ds")
    write_dataset(data, 16, seed=11, shape=(64, 64, 32))
    out = tmp_path_factory.mktemp("train_run")
    cfg = TrainConfig(profile="tiny", epochs=12, learning_rate=3e-3, val_every=4, cache_workers=1)
    metrics = train(cfg, str(data), LocalRuntime(out))
    return data, out, metrics
