"""Wait for a RayJob to change with a Kubernetes watch instead of a blind sleep.

`follow` wakes as soon as the operator updates the RayJob (a new phase, attempt or job status) and at
the latest after its interval (to read the epoch and Dice from the log, which change without the
object changing). Each wait is one watch request bounded by `timeoutSeconds`: a dropped stream, a
transient error or an expired resourceVersion (410) just ends the wait early, and the next wait
starts a fresh watch from the version `follow` last read.
"""

from __future__ import annotations

import time

from .rayjobs import RAY_GROUP, RAY_VERSION, custom_objects
from .retry import is_transient


def wait_for_change(api, name: str, namespace: str, resource_version: str | None, timeout_s: float) -> bool:
    """Block until RayJob `name` changes after `resource_version`, or `timeout_s` passes.

    True when a change was seen; False on timeout or when the stream ended early (the caller re-reads).
    """
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    started = time.monotonic()
    w = watch.Watch()
    kwargs = {
        "field_selector": f"metadata.name={name}",
        "timeout_seconds": max(1, int(timeout_s)),
        "_request_timeout": timeout_s + 10,
    }
    if resource_version:
        kwargs["resource_version"] = resource_version
    try:
        for event in w.stream(
            custom_objects(api).list_namespaced_custom_object, RAY_GROUP, RAY_VERSION, namespace, "rayjobs", **kwargs
        ):
            if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                w.stop()
                return True
    except ApiException as exc:
        if exc.status != 410 and not is_transient(exc):  # 410: the version expired; re-read and watch anew
            raise
    except Exception as exc:  # a dropped connection mid-stream
        if not is_transient(exc):
            raise
    finally:
        w.stop()
    # The stream ended before its timeout (dropped): do not spin; pause a little before the re-read.
    elapsed = time.monotonic() - started
    if elapsed < min(1.0, timeout_s):
        time.sleep(min(1.0, timeout_s) - elapsed)
    return False
