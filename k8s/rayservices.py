"""Serving RayServices through the Kubernetes API: status, and checkpoint promotion without downtime.

`promote` rewrites only the DeepEdit deployment's `user_config.checkpoint` inside `spec.serveConfigV2`.
KubeRay sends the new Serve config to the running cluster (a serveConfigV2-only change never creates a
new cluster), and Serve applies a user_config-only change as a lightweight update: it calls
`reconfigure` on the live replicas, which load the new checkpoint while the old one keeps answering.
The patch is a JSON Patch with a `test` of the current config, so a concurrent edit fails instead of
being overwritten.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from .rayjobs import RAY_GROUP, RAY_VERSION, K8sError, api_error, custom_objects

DEPLOYMENT = "DeepEdit"
#: What the Serve app accepts (trainer/serve/settings.py ServeArgs): an s3:// key, file:// or an absolute path.
CHECKPOINT_URI = re.compile(r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+|file:///\S+|/\S+)$")


def get_rayservice(api, name: str, namespace: str) -> dict:
    from kubernetes.client.exceptions import ApiException

    try:
        return custom_objects(api).get_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, "rayservices", name)
    except ApiException as exc:
        raise api_error(exc, f"RayService {namespace}/{name}") from None


def _application(config: dict, app: str | None) -> dict:
    apps = config.get("applications") or []
    if app is None:
        ours = [a for a in apps if any(d.get("name") == DEPLOYMENT for d in a.get("deployments") or [])]
        if len(ours) != 1:
            raise K8sError(
                f"serveConfigV2 has {len(ours)} applications with a {DEPLOYMENT} deployment: pass --app NAME"
            )
        return ours[0]
    for candidate in apps:
        if candidate.get("name") == app:
            return candidate
    raise K8sError(f"serveConfigV2 has no application {app!r} (has: {', '.join(a.get('name', '?') for a in apps)})")


def promoted_config(
    serve_config: str, checkpoint: str, *, app: str | None = None, profile: str | None = None
) -> tuple[str, str | None]:
    """The serveConfigV2 text with the new checkpoint in the deployment's user_config; and the old one.

    Only `user_config` changes: `args` (the application's code-level settings) stay as they are, so
    Serve reconfigures the replicas in place instead of replacing them.
    """
    if not CHECKPOINT_URI.match(checkpoint):
        raise K8sError(f"checkpoint {checkpoint!r}: use s3://bucket/key, file:///path or an absolute path")
    config = yaml.safe_load(serve_config) or {}
    application = _application(config, app)
    deployments = application.setdefault("deployments", [])
    deployment = next((d for d in deployments if d.get("name") == DEPLOYMENT), None)
    if deployment is None:
        deployment = {"name": DEPLOYMENT}
        deployments.append(deployment)
    user_config = dict(deployment.get("user_config") or {})
    old = user_config.get("checkpoint") or (application.get("args") or {}).get("checkpoint")
    user_config["checkpoint"] = checkpoint
    if profile is not None:
        user_config["profile"] = profile
    user_config.setdefault("profile", (application.get("args") or {}).get("profile"))
    deployment["user_config"] = user_config
    return yaml.safe_dump(config, sort_keys=False), old


def promote_patch(service: dict, checkpoint: str, *, app: str | None = None, profile: str | None = None) -> list[dict]:
    """The JSON Patch that promotes `checkpoint` (test the current config, then replace it)."""
    current = service["spec"]["serveConfigV2"]
    new, _ = promoted_config(current, checkpoint, app=app, profile=profile)
    return [
        {"op": "test", "path": "/spec/serveConfigV2", "value": current},
        {"op": "replace", "path": "/spec/serveConfigV2", "value": new},
    ]


@dataclass(kw_only=True, slots=True)
class ServiceStatus:
    """What `status --kind rayservice` shows."""

    name: str
    service_status: str | None
    ready: bool
    up_to_date: bool
    applications: dict[str, str] = field(default_factory=dict)
    checkpoint: str | None = None

    def line(self) -> str:
        apps = ", ".join(f"{k} {v}" for k, v in self.applications.items()) or "no applications yet"
        state = "Ready" if self.ready else (self.service_status or "not ready")
        sync = "" if self.up_to_date else "  (config change in progress)"
        return f"{self.name}: {state}  {apps}  checkpoint {self.checkpoint}{sync}"

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}


def service_status(obj: dict, app: str | None = None) -> ServiceStatus:
    status = obj.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    active = (status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
    try:
        application = _application(yaml.safe_load(obj["spec"]["serveConfigV2"]) or {}, app)
        deployment: dict[str, Any] = next(
            (d for d in application.get("deployments") or [] if d.get("name") == DEPLOYMENT), {}
        )
        checkpoint = (deployment.get("user_config") or {}).get("checkpoint") or (application.get("args") or {}).get(
            "checkpoint"
        )
    except K8sError:
        checkpoint = None
    generation = obj["metadata"].get("generation")
    observed = status.get("observedGeneration")
    return ServiceStatus(
        name=obj["metadata"]["name"],
        service_status=status.get("serviceStatus"),
        ready=conditions.get("Ready") == "True" or status.get("serviceStatus") == "Running",
        up_to_date=generation is None or (observed is not None and observed >= generation),
        applications={k: (v or {}).get("status", "?") for k, v in active.items()},
        checkpoint=checkpoint,
    )


def get_service_status(api, name: str, namespace: str, app: str | None = None) -> ServiceStatus:
    return service_status(get_rayservice(api, name, namespace), app)


def promote(
    api,
    name: str,
    namespace: str,
    checkpoint: str,
    *,
    app: str | None = None,
    profile: str | None = None,
    wait: bool = False,
    timeout_s: float = 600.0,
    interval_s: float = 5.0,
) -> dict[str, Any]:
    """Serve `checkpoint` on RayService `name` without downtime; optionally wait until it is applied.

    Returns {"previous": old checkpoint, "checkpoint": new, "status": ServiceStatus or None}.
    """
    from kubernetes.client.exceptions import ApiException

    service = get_rayservice(api, name, namespace)
    patch = promote_patch(service, checkpoint, app=app, profile=profile)
    _, old = promoted_config(service["spec"]["serveConfigV2"], checkpoint, app=app, profile=profile)
    try:
        custom_objects(api).patch_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, namespace, "rayservices", name, patch, _content_type="application/json-patch+json"
        )
    except ApiException as exc:
        if exc.status == 422:
            raise K8sError(
                f"RayService {namespace}/{name} changed while promoting (the patch's test failed): run promote again"
            ) from None
        raise api_error(exc, f"patching RayService {namespace}/{name}") from None
    result: dict[str, Any] = {"previous": old, "checkpoint": checkpoint, "status": None}
    if wait:
        result["status"] = wait_applied(api, name, namespace, app=app, timeout_s=timeout_s, interval_s=interval_s)
    return result


def wait_applied(
    api, name: str, namespace: str, *, app: str | None = None, timeout_s: float = 600.0, interval_s: float = 5.0
) -> ServiceStatus:
    """Poll until the operator has observed the latest spec and every application is RUNNING."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = get_service_status(api, name, namespace, app)
        if status.up_to_date and status.applications and all(s == "RUNNING" for s in status.applications.values()):
            return status
        if any(s in ("DEPLOY_FAILED", "UNHEALTHY") for s in status.applications.values()):
            raise K8sError(f"RayService {namespace}/{name}: {status.line()}; see `kubectl describe rayservice {name}`")
        if time.monotonic() > deadline:
            raise K8sError(f"RayService {namespace}/{name} not applied after {timeout_s:.0f}s: {status.line()}")
        time.sleep(interval_s)
