"""Training RayJobs through the Kubernetes API: submit, status, follow, logs, cancel.

Everything goes through the official `kubernetes` client (imported lazily): custom objects for
`ray.io/v1` RayJobs, the API server's service proxy for the Ray dashboard's job logs (no port-forward
needed), and the submitter pod's log as a fallback. Progress (epoch, validation Dice) is read from the
lines the trainer's rank 0 prints each epoch (`trainer.progress`, which also parses them), which Ray
forwards to the job log.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from trainer import env
from trainer.errors import K8sError as K8sError
from trainer.progress import latest_progress

RAY_GROUP, RAY_VERSION = "ray.io", "v1"
#: `jobDeploymentStatus` values after which nothing more happens to a RayJob.
TERMINAL_PHASES = frozenset({"Complete", "Failed", "ValidationFailed", "Suspended"})


# ----------------------------------------------------------------------------- connection


def connect(kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None):
    """An `ApiClient` and the namespace to use (flag, else the context's, else `default`).

    Reads the kubeconfig (`--kubeconfig`, `$KUBECONFIG`, `~/.kube/config`), or the in-cluster service
    account when running inside a pod.
    """
    from kubernetes import config

    path = env.kubeconfig(kubeconfig)
    if os.path.isfile(path):
        try:
            api = config.new_client_from_config(config_file=path, context=context)
            _, current = config.list_kube_config_contexts(config_file=path)
        except config.ConfigException as exc:
            raise K8sError(f"kubeconfig {path}: {exc}") from None
        if context:
            contexts, _ = config.list_kube_config_contexts(config_file=path)
            current = next((c for c in contexts if c["name"] == context), current)
        default_ns = (current or {}).get("context", {}).get("namespace") or "default"
        return api, namespace or default_ns
    if env.in_kubernetes_pod():
        from kubernetes import client

        config.load_incluster_config()
        ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return client.ApiClient(), namespace or (ns_file.read_text().strip() if ns_file.is_file() else "default")
    raise K8sError(f"no kubeconfig at {path} and not running in a cluster: pass --kubeconfig or set KUBECONFIG")


def api_error(exc: Exception, what: str) -> K8sError:
    """A readable K8sError from a kubernetes `ApiException` (status + the API server's message)."""
    status: int | None = getattr(exc, "status", None)
    try:
        message = json.loads(getattr(exc, "body", "") or "{}").get("message", "")
    except (ValueError, AttributeError):
        message = ""
    hint = {
        404: " (not found: check the name and --namespace)",
        409: " (already exists: pick another release name or delete the old one)",
        403: " (forbidden: your account lacks RBAC permission)",
    }.get(status or 0, "")
    return K8sError(f"{what}: HTTP {status} {message or getattr(exc, 'reason', '')}{hint}".rstrip(), status)


def custom_objects(api):
    from kubernetes import client

    return client.CustomObjectsApi(api)


def get_rayjob(api, name: str, namespace: str) -> dict:
    from kubernetes.client.exceptions import ApiException

    from .retry import retrying

    try:
        return retrying(
            lambda: custom_objects(api).get_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, "rayjobs", name)
        )
    except ApiException as exc:
        raise api_error(exc, f"RayJob {namespace}/{name}") from None


# ----------------------------------------------------------------------------- submit


def load_manifests(path: str) -> list[dict]:
    """Objects from a YAML file of one or more documents (`-`: stdin), e.g. `helm template` output."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_chart(chart: str, values_files: Iterable[str], *, release: str, namespace: str) -> list[dict]:
    """Render a chart with the Helm engine (helm-python-sdk); values files merge left to right."""
    try:
        import helm_python
    except ImportError:
        raise K8sError(
            "rendering a chart needs helm-python-sdk: pip install 'spleen-deepedit[k8s]', or pass --manifest"
        ) from None
    values: dict = {}
    for path in values_files:
        values = _deep_merge(values, yaml.safe_load(Path(path).read_text()) or {})
    try:
        rendered = helm_python.Chart.load(chart).render(values, name=release, namespace=namespace, is_install=True)
    except helm_python.HelmError as exc:
        raise K8sError(f"chart {chart}: {exc}") from None
    return [
        doc
        for path, text in rendered.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ----------------------------------------------------------------------------- status and progress


@dataclass(kw_only=True, slots=True)
class JobStatus:
    """What `status` and `follow` show about one training RayJob."""

    name: str
    phase: str
    job_status: str | None = None
    reason: str | None = None
    message: str | None = None
    cluster: str | None = None
    job_id: str | None = None
    attempt: int = 0
    max_attempts: int = 1
    epoch: int | None = None
    epochs: int | None = None
    loss: float | None = None
    val_dice: float | None = None
    pending: list[str] | None = None  # `pod: reason` of Pending pods (status only, not follow)
    resource_version: str | None = None  # of the RayJob object read (follow watches from it)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES

    @property
    def succeeded(self) -> bool:
        return self.phase == "Complete" and self.job_status in (None, "SUCCEEDED")

    def line(self) -> str:
        parts = [f"{self.name}: {self.phase}"]
        if self.job_status:
            parts.append(f"job {self.job_status}")
        parts.append(f"attempt {self.attempt}/{self.max_attempts}")
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch}/{self.epochs}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.val_dice is not None:
            parts.append(f"val dice {self.val_dice:.4f}")
        if self.reason:
            parts.append(f"reason {self.reason}")
        if self.message and self.phase in ("Failed", "ValidationFailed"):
            parts.append(self.message)
        return "  ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__} | {"terminal": self.terminal}


def job_status(obj: dict) -> JobStatus:
    """Phase and attempts from a RayJob object (no log access)."""
    status = obj.get("status") or {}
    spec = obj.get("spec") or {}
    phase = status.get("jobDeploymentStatus") or "New"
    done = int(status.get("failed") or 0) + int(status.get("succeeded") or 0)
    attempt = done if phase in TERMINAL_PHASES else done + (phase != "New")
    return JobStatus(
        name=obj["metadata"]["name"],
        phase=phase,
        job_status=status.get("jobStatus"),
        reason=status.get("reason"),
        message=status.get("message"),
        cluster=status.get("rayClusterName"),
        job_id=status.get("jobId"),
        attempt=max(attempt, 0),
        max_attempts=int(spec.get("backoffLimit") or 0) + 1,
        resource_version=obj["metadata"].get("resourceVersion"),
    )


def get_status(api, name: str, namespace: str, *, progress: bool = True, pods: bool = False) -> JobStatus:
    """RayJob phase and attempts, plus the latest epoch and validation Dice from its log, and (`pods`)
    its Pending pods with the reason (no GPU free, an image that cannot be pulled, ...)."""
    obj = get_rayjob(api, name, namespace)
    status = job_status(obj)
    if pods and not status.terminal:
        from kubernetes.client.exceptions import ApiException

        from .pods import pending_pods

        try:
            status.pending = pending_pods(api, namespace, cluster=status.cluster, job=name)
        except ApiException as exc:
            status.pending = [f"(cannot list pods: {api_error(exc, 'pods').args[0]})"]
    if progress and status.phase != "New":
        from .logs import read_logs

        for key, value in latest_progress(read_logs(api, obj)).items():
            setattr(status, key, value)
    return status


def follow(
    api,
    name: str,
    namespace: str,
    *,
    interval_s: float = 10.0,
    timeout_s: float | None = None,
    out: Callable[[str], None] = print,
) -> JobStatus:
    """Print a line each time the job's phase, attempt, epoch or Dice changes; return at a terminal phase.

    Between reads it watches the RayJob (k8s/watch.py): an operator update wakes it at once, the log
    (epoch, Dice) is read again at least every `interval_s`.
    """
    from .retry import TRANSIENT_STATUSES
    from .watch import wait_for_change

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    while True:
        try:
            status = get_status(api, name, namespace)
        except K8sError as exc:  # still failing after get_rayjob's retries: say so, keep following
            if exc.status not in TRANSIENT_STATUSES:
                raise
            out(f"{name}: API server unavailable ({exc}); still following")
            if deadline is not None and time.monotonic() > deadline:
                raise
            time.sleep(interval_s)
            continue
        if status.line() != last:
            last = status.line()
            out(last)
        if status.terminal:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise K8sError(f"RayJob {namespace}/{name} still {status.phase} after {timeout_s:.0f}s (it keeps running)")
        wait_for_change(api, name, namespace, status.resource_version, interval_s)


# ----------------------------------------------------------------------------- cancel


def cancel(api, name: str, namespace: str, *, delete: bool = False) -> str:
    """Stop a RayJob: suspend it (the operator deletes its Ray cluster; the object and its run stay, and
    un-suspending resumes from the last checkpoint), or delete it with every object of its release
    (ConfigMap, ServiceAccount, NetworkPolicy, PodMonitors...: found by the release label)."""
    from kubernetes.client.exceptions import ApiException

    custom = custom_objects(api)
    if delete:
        from .objects import delete_release

        release = (get_rayjob(api, name, namespace)["metadata"].get("labels") or {}).get("app.kubernetes.io/instance")
        deleted = delete_release(api, release, namespace) if release else []
        if f"rayjobs/{name}" not in deleted:  # not labelled as a release (plain manifests): the job alone
            try:
                custom.delete_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, "rayjobs", name)
            except ApiException as exc:
                raise api_error(exc, f"deleting RayJob {namespace}/{name}") from None
            deleted.insert(0, f"rayjobs/{name}")
        return f"deleted from {namespace}" + (f" (release {release})" if release else "") + ": " + ", ".join(deleted)
    obj = get_rayjob(api, name, namespace)
    if job_status(obj).terminal:
        return f"RayJob {namespace}/{name} already {job_status(obj).phase}: nothing to cancel"
    if not obj["spec"].get("shutdownAfterJobFinishes"):
        raise K8sError(
            f"RayJob {namespace}/{name} has shutdownAfterJobFinishes false, which KubeRay cannot suspend: use --delete"
        )
    try:
        custom.patch_namespaced_custom_object(
            RAY_GROUP,
            RAY_VERSION,
            namespace,
            "rayjobs",
            name,
            {"spec": {"suspend": True}},
            _content_type="application/merge-patch+json",
        )
    except ApiException as exc:
        raise api_error(exc, f"suspending RayJob {namespace}/{name}") from None
    return f"suspended RayJob {namespace}/{name}: its Ray cluster is being deleted; checkpoints stay in storage"


# ----------------------------------------------------------------------------- list


def list_jobs_and_services(api, namespace: str) -> list[dict[str, str]]:
    """Every RayJob and RayService in the namespace: kind, name, phase, release (for `k8s list`)."""
    from kubernetes.client.exceptions import ApiException

    from .retry import retrying

    rows = []
    for plural, kind in (("rayjobs", "RayJob"), ("rayservices", "RayService")):
        try:
            listing = retrying(
                partial(custom_objects(api).list_namespaced_custom_object, RAY_GROUP, RAY_VERSION, namespace, plural)
            )
        except ApiException as exc:
            raise api_error(exc, f"listing {plural} in {namespace}") from None
        for obj in listing.get("items", []):
            status = obj.get("status") or {}
            phase = status.get("jobDeploymentStatus") if kind == "RayJob" else status.get("serviceStatus")
            detail = status.get("jobStatus") or ""
            rows.append(
                {
                    "kind": kind,
                    "name": obj["metadata"]["name"],
                    "phase": phase or "New",
                    "detail": detail,
                    "release": (obj["metadata"].get("labels") or {}).get("app.kubernetes.io/instance", ""),
                }
            )
    return rows
