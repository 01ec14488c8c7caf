"""Failures injected by tests into a Ray training run, to check in-run recovery (tests/test_ray_train.py).

Never set from the command line: only `RayJobConfig.fault` (a test hook) arms them. They live here, not
in the launcher, so that production code reads as production code.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import Protocol

from .config import ConfigError

log = logging.getLogger(__name__)


class _Position(Protocol):
    """Where a worker is: `trainer.ray_job.RayRuntime`."""

    rank: int
    epoch: int
    start_epoch: int


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultSpec:
    """A failure injected by tests (see `RayJobConfig.fault`)."""

    rank: int
    epoch: int
    step: int = 0
    mode: str = "raise"

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        try:
            fields = dict(part.split("=", 1) for part in text.split(","))
            spec = cls(
                rank=int(fields.pop("rank")),
                epoch=int(fields.pop("epoch")),
                step=int(fields.pop("step", 0)),
                mode=fields.pop("mode", "raise"),
            )
        except (KeyError, ValueError):
            raise ConfigError(f"fault must look like 'rank=1,epoch=1,step=0,mode=raise', got {text!r}") from None
        if fields or spec.mode not in ("raise", "kill"):
            raise ConfigError(f"fault {text!r}: unknown keys {sorted(fields)} or mode not raise/kill")
        return spec


def _wait_until_committed(epoch: int, timeout_s: float = 60.0) -> None:
    """Wait until Ray's controller has registered the checkpoint of `epoch` (1-based) in storage.

    Ray restores only checkpoints its controller has registered (it polls the workers every ~2 s);
    one uploaded just before a crash is redone. Waiting makes the injected fault deterministic.
    """
    import time

    import ray.train

    ctx = ray.train.get_context().get_storage()
    snapshot = f"{ctx.experiment_fs_path}/checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with ctx.storage_filesystem.open_input_stream(snapshot) as f:
                if f"checkpoint_epoch_{epoch:04d}" in f.read().decode():
                    return
        except (FileNotFoundError, OSError):
            pass
        time.sleep(0.5)


class FaultyLoader:
    """Wraps a DataLoader; fails at one step of one epoch (tests of in-run recovery only)."""

    def __init__(self, loader, runtime: _Position, fault: FaultSpec):
        self._loader, self._runtime, self._fault = loader, runtime, fault

    def __getattr__(self, name: str):  # sampler, dataset, batch_size ... of the real loader
        return getattr(self._loader, name)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        f, rt = self._fault, self._runtime
        armed = rt.rank == f.rank and rt.epoch == f.epoch and rt.start_epoch < f.epoch
        for step, batch in enumerate(self._loader):
            if armed and step == f.step:
                if f.epoch > 0:
                    _wait_until_committed(f.epoch)
                log.warning("injected fault: rank %d, epoch %d, step %d (%s)", rt.rank, f.epoch, f.step, f.mode)
                if f.mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected fault at rank {rt.rank}, epoch {f.epoch}, step {f.step}")
            yield batch
