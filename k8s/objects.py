"""The objects of a release, as a set: server-side apply, list and delete by the release's labels.

`submit` applies (server-side apply, field manager `spleen-deepedit`) instead of creating, so a
resubmission with the same release name updates what is left from the last one instead of failing on
409. `cancel --delete` removes every object the chart made for the release (found by its
`app.kubernetes.io/instance` label), not only the RayJob. Pods, Services and RayClusters are owned by
the RayJob/RayService (ownerReferences) and go with it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .rayjobs import K8sError, api_error
from .retry import retrying

FIELD_MANAGER = "spleen-deepedit"
#: Kinds the charts render: (apiVersion, kind) -> plural. Order = apply order (what the RayJob's pods
#: reference first); deletion goes the other way.
KINDS: dict[tuple[str, str], str] = {
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Secret"): "secrets",
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("ray.io/v1", "RayJob"): "rayjobs",
    ("ray.io/v1", "RayService"): "rayservices",
    ("networking.k8s.io/v1", "Ingress"): "ingresses",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitors",
}
RELEASE_LABEL = "app.kubernetes.io/instance"


def object_path(api_version: str, plural: str, namespace: str, name: str | None = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{base}/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")


def _call(
    api, path: str, method: str, *, body: Any = None, query: list | None = None, content_type: str | None = None
) -> Any:
    headers = {"Accept": "application/json"}
    if content_type:
        headers["Content-Type"] = content_type
    response = retrying(
        lambda: api.call_api(
            path,
            method,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _return_http_data_only=True,
            _request_timeout=30,
        )
    )
    return json.loads(response.data or b"{}")


def check_kinds(objects: list[dict]) -> None:
    unknown = sorted({str(o.get("kind")) for o in objects if (o.get("apiVersion"), o.get("kind")) not in KINDS})
    if unknown:
        raise K8sError(f"cannot create kind(s) {unknown}: apply them with kubectl")
    if not any(o["kind"] in ("RayJob", "RayService") for o in objects):
        raise K8sError("the manifests hold no RayJob or RayService")


def apply_objects(api, objects: list[dict], namespace: str, *, dry_run: bool = False) -> list[str]:
    """Server-side apply, in dependency order; returns `Kind/name` of each. `dry_run`: validated only.

    A RayJob is applied with `suspend: false`, so a resubmission after `cancel` (a suspend) resumes.
    """
    from kubernetes.client.exceptions import ApiException

    check_kinds(objects)
    order = list(KINDS)
    applied: list[str] = []
    query = [("fieldManager", FIELD_MANAGER), ("force", "true")] + ([("dryRun", "All")] if dry_run else [])
    for obj in sorted(objects, key=lambda o: order.index((o["apiVersion"], o["kind"]))):
        obj = {**obj, "metadata": {**obj["metadata"], "namespace": namespace}}
        if obj["kind"] == "RayJob":
            obj = {**obj, "spec": {**obj["spec"], "suspend": False}}
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        path = object_path(
            obj["apiVersion"], KINDS[(obj["apiVersion"], obj["kind"])], namespace, obj["metadata"]["name"]
        )
        try:
            _call(api, path, "PATCH", body=obj, query=query, content_type="application/apply-patch+yaml")
        except ApiException as exc:
            raise api_error(
                exc, f"applying {what}" + (f" (applied so far: {', '.join(applied)})" if applied else "")
            ) from None
        applied.append(what)
    return applied


def release_objects(api, release: str, namespace: str) -> list[tuple[str, str, str]]:
    """(apiVersion, plural, name) of every object labelled with the release, in deletion order.
    Kinds whose API the cluster lacks (no Prometheus Operator: no PodMonitors) are skipped."""
    from kubernetes.client.exceptions import ApiException

    found = []
    for (api_version, _kind), plural in reversed(KINDS.items()):
        try:
            listing = _call(
                api,
                object_path(api_version, plural, namespace),
                "GET",
                query=[("labelSelector", f"{RELEASE_LABEL}={release}")],
            )
        except ApiException as exc:
            if exc.status == 404:
                continue
            raise api_error(exc, f"listing {plural} of release {release}") from None
        found += [(api_version, plural, item["metadata"]["name"]) for item in listing.get("items", [])]
    return found


def delete_release(api, release: str, namespace: str) -> list[str]:
    """Delete every object of the release (RayJob/RayService first: their pods and clusters follow by
    ownerReference); returns `plural/name` of each."""
    from kubernetes.client.exceptions import ApiException

    deleted = []
    for api_version, plural, name in release_objects(api, release, namespace):
        try:
            _call(
                api,
                object_path(api_version, plural, namespace, name),
                "DELETE",
                body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
            )
        except ApiException as exc:
            if exc.status != 404:  # gone meanwhile: fine
                raise api_error(exc, f"deleting {plural}/{name}") from None
        deleted.append(f"{plural}/{name}")
    return deleted


def replace_finished_rayjob(
    api, obj: dict, namespace: str, *, timeout_s: float = 120.0, interval_s: float = 1.0
) -> str | None:
    """A RayJob of the same name that has finished (Complete/Failed) ignores a new spec: delete it (its
    run stays in storage) and wait until it is gone, so the apply creates a fresh one that resumes.
    A running one is left alone with an error; a suspended one is resumed by the apply itself."""
    from kubernetes.client.exceptions import ApiException

    from .rayjobs import TERMINAL_PHASES

    name = obj["metadata"]["name"]
    path = object_path(obj["apiVersion"], "rayjobs", namespace, name)
    try:
        current = _call(api, path, "GET")
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise api_error(exc, f"RayJob {namespace}/{name}") from None
    phase = (current.get("status") or {}).get("jobDeploymentStatus") or "New"
    if phase == "Suspended" or current.get("spec", {}).get("suspend"):
        return None
    if phase not in TERMINAL_PHASES:
        raise K8sError(
            f"RayJob {namespace}/{name} is {phase}: cancel it first (spleen-deepedit k8s cancel {name} "
            f"-n {namespace}), then submit again to resume"
        )
    _call(api, path, "DELETE", body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Foreground"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _call(api, path, "GET")
        except ApiException as exc:
            if exc.status == 404:
                return phase
            raise api_error(exc, f"RayJob {namespace}/{name}") from None
        time.sleep(interval_s)
    raise K8sError(
        f"the finished RayJob {namespace}/{name} is still being deleted after {timeout_s:.0f}s: submit again later"
    )
