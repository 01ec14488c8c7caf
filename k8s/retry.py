"""Retries of Kubernetes API calls on transient errors (an API server restarting, a load balancer
hiccup, throttling): a long `follow` must not end on one 503. Everything else fails at once."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: HTTP statuses worth another try: throttled, or the API server / its proxy is briefly unavailable.
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Attempts and the first pause (doubled each time, capped): about 15 s in all before giving up.
ATTEMPTS, FIRST_PAUSE_S, MAX_PAUSE_S = 5, 1.0, 8.0


def is_transient(exc: BaseException) -> bool:
    """A 429/5xx answer, or no answer at all (connection refused or reset, timeout)."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(exc, ApiException):
        return exc.status in TRANSIENT_STATUSES or exc.status == 0
    return isinstance(exc, (HTTPError, ConnectionError, TimeoutError))


def retrying(
    call: Callable[[], T],
    *,
    attempts: int = ATTEMPTS,
    first_pause_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`call()`, again after a pause while it fails transiently; the last error is raised as is."""
    pause = FIRST_PAUSE_S if first_pause_s is None else first_pause_s
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            sleep(pause)
            pause = min(pause * 2, MAX_PAUSE_S)
    raise AssertionError("unreachable")
