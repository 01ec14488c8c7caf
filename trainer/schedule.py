"""Learning-rate schedule and training budget: how far along a job is, in steps or in wall time.

A job ends at whichever comes first: its last epoch or its wall-time budget (`max_train_seconds`).
The schedule follows the same progress, so a time-budgeted job anneals its learning rate to the
floor exactly when its time is up, whatever the machine's speed (the point of a budget: the cpu
profile's recipe is "10 minutes on 2 cores", not "N epochs").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Names accepted by `TrainConfig.lr_schedule`.
SCHEDULES: tuple[str, ...] = ("constant", "cosine")


@dataclass(frozen=True, kw_only=True, slots=True)
class Budget:
    """The extent of a training job.

    Attributes:
        total_steps: optimisation steps of all epochs (per rank).
        seconds: wall-time budget; 0 means none.
    """

    total_steps: int
    seconds: float = 0.0

    def progress(self, step: int, elapsed: float) -> float:
        """Fraction of the job done, in [0, 1]: the larger of step progress and time progress."""
        done = step / max(self.total_steps, 1)
        if self.seconds > 0:
            done = max(done, elapsed / self.seconds)
        return min(max(done, 0.0), 1.0)

    def out_of_time(self, elapsed: float) -> bool:
        return self.seconds > 0 and elapsed >= self.seconds


def learning_rate(schedule: str, base: float, progress: float, anneal: float = 1.0, floor: float = 0.01) -> float:
    """The learning rate at `progress` in [0, 1].

    Args:
        schedule: `constant` (the bundle: its StepLR never fires) or `cosine`: `base` until the last
            `anneal` fraction of the job, then half a cosine down to `floor * base` at its end.
        base: the configured (peak) learning rate.
        progress: fraction of the job done (`Budget.progress`).
        anneal: fraction of the job, at its end, over which `cosine` anneals (1: all of it).
        floor: the final learning rate as a fraction of `base`.
    """
    if schedule == "constant":
        return base
    if schedule == "cosine":
        t = min(max((progress - (1.0 - anneal)) / anneal, 0.0), 1.0) if anneal > 0 else 0.0
        return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t)))
    raise ValueError(f"unknown lr_schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
