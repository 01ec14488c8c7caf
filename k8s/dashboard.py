"""`spleen-deepedit k8s dashboard NAME`: the Ray dashboard of a RayJob's or RayService's cluster on
127.0.0.1, with the Ray token it asks for (KubeRay's per-cluster Secret, or `authOptions.secretName`).

The port-forward itself is `kubectl port-forward` (the Python client's port-forwarding serves one
socket, not a browser's many), run in the foreground until Ctrl-C.
"""

from __future__ import annotations

import shutil
import subprocess

from .logs import ray_token
from .rayjobs import RAY_GROUP, RAY_VERSION, K8sError, api_error, custom_objects
from .retry import retrying

DASHBOARD_PORT = 8265


def cluster_of(obj: dict) -> str | None:
    """The RayCluster serving a RayJob (status.rayClusterName) or a RayService (the active cluster)."""
    status = obj.get("status") or {}
    return status.get("rayClusterName") or (status.get("activeServiceStatus") or {}).get("rayClusterName")


def get_object(api, kind: str, name: str, namespace: str) -> dict:
    from kubernetes.client.exceptions import ApiException

    plural = {"rayjob": "rayjobs", "rayservice": "rayservices"}[kind]
    try:
        return retrying(
            lambda: custom_objects(api).get_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, plural, name)
        )
    except ApiException as exc:
        raise api_error(exc, f"{kind} {namespace}/{name}") from None


def port_forward_command(
    namespace: str, cluster: str, local_port: int, kubeconfig: str | None, context: str | None
) -> list[str]:
    cmd = ["kubectl", "port-forward", "-n", namespace, f"svc/{cluster}-head-svc", f"{local_port}:{DASHBOARD_PORT}"]
    if kubeconfig:
        cmd += ["--kubeconfig", kubeconfig]
    if context:
        cmd += ["--context", context]
    return cmd


def open_dashboard(
    api,
    kind: str,
    name: str,
    namespace: str,
    *,
    local_port: int,
    kubeconfig: str | None = None,
    context: str | None = None,
    show_token: bool = False,
    run: bool = True,
) -> int:
    """Print how to reach the dashboard (URL, token) and run the port-forward (`run`)."""
    obj = get_object(api, kind, name, namespace)
    cluster = cluster_of(obj)
    if not cluster:
        raise K8sError(
            f"{kind} {namespace}/{name} has no Ray cluster yet (or any more): check `spleen-deepedit k8s status {name}`"
        )
    obj.setdefault("status", {}).setdefault("rayClusterName", cluster)
    token = ray_token(api, obj)
    cmd = port_forward_command(namespace, cluster, local_port, kubeconfig, context)
    print(f"Ray dashboard of {cluster}: http://127.0.0.1:{local_port}/")
    if token:
        print(f"Ray token (the dashboard asks for it): {token if show_token else '<hidden: pass --show-token>'}")
    if not run or shutil.which("kubectl") is None:
        print("run: " + " ".join(cmd))
        return 0 if not run else 1
    print("forwarding until Ctrl-C ...", flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0
