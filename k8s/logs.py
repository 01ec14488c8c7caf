"""A RayJob's driver log: read through the API server's service proxy to the Ray dashboard (with Ray's
token when the cluster has token auth), else from the K8sJobMode submitter pod; `logs -f` follows it."""

from __future__ import annotations

import json
from collections.abc import Callable

from .rayjobs import JobStatus, api_error, get_rayjob, job_status


def ray_token(api, obj: dict) -> str | None:
    """Ray's auth token of the job's cluster (`authOptions.mode: token`): from `authOptions.secretName`,
    else the Secret KubeRay creates per cluster (named after the RayCluster, key `auth_token`).
    None when auth is off or the Secret cannot be read (then the dashboard answers 401 and the
    submitter pod's log is used)."""
    import base64

    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    spec = obj.get("spec") or {}
    auth = (spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or {}).get("authOptions") or {}
    if auth.get("mode") != "token":
        return None
    name = auth.get("secretName") or (obj.get("status") or {}).get("rayClusterName")
    if not name:
        return None
    try:
        secret = client.CoreV1Api(api).read_namespaced_secret(name, obj["metadata"]["namespace"], _request_timeout=15)
    except ApiException:
        return None
    value = (secret.data or {}).get("auth_token")
    return base64.b64decode(value).decode() if value else None


def read_logs(api, obj: dict) -> str:
    """The job's driver log: from the Ray dashboard (through the API server's service proxy) while the
    cluster lives, else from KubeRay's submitter pod (K8sJobMode). Empty if neither is there yet.

    With Ray token auth the dashboard wants the token; `Authorization` belongs to the API server on
    this path, so it goes in Ray's fallback header `x-ray-authorization` (ray/_private/authentication).
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    status = obj.get("status") or {}
    cluster, job_id = status.get("rayClusterName"), status.get("jobId")
    if cluster and job_id:
        path = f"/api/v1/namespaces/{namespace}/services/{cluster}-head-svc:dashboard/proxy/api/jobs/{job_id}/logs"
        token = ray_token(api, obj)
        headers = {"x-ray-authorization": f"Bearer {token}"} if token else {}
        try:
            response = api.call_api(
                path,
                "GET",
                header_params=headers,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=15,
            )
            return json.loads(response.data).get("logs", "")
        except (ApiException, ValueError, OSError):
            pass  # cluster gone or dashboard not up yet: try the submitter pod
    core = client.CoreV1Api(api)
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
    except ApiException as exc:
        raise api_error(exc, f"listing the submitter pods of RayJob {namespace}/{name}") from None
    pods.sort(key=lambda p: p.metadata.creation_timestamp or 0)
    for pod in reversed(pods):
        try:
            # Raw bytes: the client's str deserialisation of a log returns the bytes' repr.
            response = core.read_namespaced_pod_log(
                pod.metadata.name, namespace, _preload_content=False, _request_timeout=15
            )
            return response.data.decode("utf-8", errors="replace")
        except ApiException:
            continue
    return ""


def follow_logs(
    api,
    name: str,
    namespace: str,
    *,
    interval_s: float = 10.0,
    tail: int | None = None,
    out: Callable[[str], None] = print,
) -> JobStatus:
    """`logs -f`: print the driver log, then what is new at each read, until the job is terminal.

    A log that got shorter is a new attempt (a RayJob retry on a new cluster): it is printed from its
    start under a marker line.
    """
    from .watch import wait_for_change

    printed = None
    while True:
        obj = get_rayjob(api, name, namespace)
        status = job_status(obj)
        text = read_logs(api, obj)
        if printed is None:
            lines = text.splitlines(keepends=True)
            out("".join(lines[-tail:] if tail is not None else lines))
        elif len(text) < printed:
            out(f"--- {name}: new attempt {status.attempt}/{status.max_attempts} ---\n" + text)
        else:
            out(text[printed:])
        printed = len(text)
        if status.terminal:
            return status
        wait_for_change(api, name, namespace, status.resource_version, interval_s)
