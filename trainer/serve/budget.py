"""A replica's memory budget: the bytes of decode + preprocess in flight, reserved before the work.

A request prices its volume from the upload's header (`codecs.NiftiPlan.work_bytes`), then reserves
that many bytes here (waiting up to `admission_wait_s`, else 503 + Retry-After); the capacity defaults
to half the replica's memory limit (`memory_limit_bytes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from .errors import ApiError


def memory_limit_bytes() -> int:
    """The replica's memory limit: its cgroup's (a Kubernetes container limit), else the machine's RAM."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class MemoryBudget:
    """Bytes of decode + preprocess in flight in one replica; a request reserves its estimate first.

    Args:
        capacity: bytes that may be in flight at once.
        wait_s: how long a request waits for room before it gets 503 + Retry-After.
        retry_after_s: the Retry-After value.
    """

    POLL_S = 0.02

    def __init__(self, capacity: int, wait_s: float, retry_after_s: int):
        self.capacity = capacity
        self.wait_s = wait_s
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int):
        if nbytes > self.capacity:
            raise ApiError(
                413,
                "volume_too_large",
                f"decoding and preprocessing this volume needs about {nbytes} bytes, more "
                f"than the replica's budget of {self.capacity} (memory_budget_bytes): send a smaller volume",
            )
        deadline = time.monotonic() + self.wait_s
        while self.in_flight + nbytes > self.capacity:
            if time.monotonic() >= deadline:
                raise ApiError(
                    503,
                    "memory_busy",
                    f"the replica is decoding {self.in_flight} bytes of other volumes; retry later",
                    {"Retry-After": str(self.retry_after_s)},
                )
            await asyncio.sleep(self.POLL_S)
        self.in_flight += nbytes  # the event loop is one thread: check and add are atomic
        try:
            yield
        finally:
            self.in_flight -= nbytes
