"""Why a job's pods are not running yet: Pending pods of its Ray cluster and submitter, with the reason
Kubernetes gives (the last Warning event, e.g. `FailedScheduling 0/4 nodes are available: 4
Insufficient nvidia.com/gpu`, or a container's waiting reason such as ImagePullBackOff)."""

from __future__ import annotations

from functools import partial

from .retry import retrying

#: Labels that select a RayJob's pods: KubeRay's cluster label, and the submitter Job's pods.
SELECTORS = ("ray.io/cluster={cluster}", "job-name={job}")


def _reason(pod, events: list) -> str:
    for status in (pod.status.container_statuses or []) + (pod.status.init_container_statuses or []):
        waiting = status.state.waiting if status.state else None
        if waiting and waiting.reason not in (None, "ContainerCreating", "PodInitializing"):
            return f"{waiting.reason} {waiting.message or ''}".strip()
    mine = [
        e for e in events if e.involved_object and e.involved_object.name == pod.metadata.name and e.type == "Warning"
    ]
    if mine:
        last = max(mine, key=lambda e: str(e.last_timestamp or e.event_time or e.metadata.creation_timestamp or ""))
        return f"{last.reason} {last.message or ''}".strip()
    return "no event yet"


def pending_pods(api, namespace: str, *, cluster: str | None, job: str) -> list[str]:
    """`pod: reason` for each Pending pod of the job (its Ray cluster's and its submitter's)."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    pods, seen = [], set()
    for selector in SELECTORS:
        if "{cluster}" in selector and not cluster:
            continue
        label = selector.format(cluster=cluster, job=job)
        for pod in retrying(
            partial(core.list_namespaced_pod, namespace, label_selector=label, _request_timeout=15)
        ).items:
            if pod.metadata.name not in seen and (pod.status.phase or "Pending") == "Pending":
                seen.add(pod.metadata.name)
                pods.append(pod)
    if not pods:
        return []
    events = retrying(lambda: core.list_namespaced_event(namespace, _request_timeout=15)).items
    return [f"{pod.metadata.name}: {_reason(pod, events)}" for pod in pods]
