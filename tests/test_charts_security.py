"""What the KubeRay operator builds from our charts, checked as a locked-down namespace would check it.

Every pod template the operator turns into a pod (RayJob: head, workers, submitter; RayService: head,
workers; the KubeRay-built autoscaler sidecar and `wait-gcs-ready` init container, whose security
context the operator copies from ours; the `helm test` pod) is extracted from the rendered objects for
the defaults, the `ci/` values and each toggle, and checked against the Kubernetes Pod Security
Standards **restricted** profile (https://kubernetes.io/docs/concepts/security/pod-security-standards/,
the baseline controls plus the restricted ones), and with Checkov's Kubernetes checks when Checkov is
installed. The NetworkPolicies are evaluated flow by flow: they admit exactly the listed flows.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_charts import (  # noqa: E402  (same folder; pytest puts it on sys.path)
    ANNOTATE_REQUIRED,
    IMAGE,
    NAMESPACE,
    RELEASE,
    SERVE,
    SERVE_REQUIRED,
    TRAIN,
    TRAIN_REQUIRED,
    ci_values,
    crd_errors,
    helm_python,
    merge,
    one,
    render,
    validate_all,
)

pytestmark = pytest.mark.helm

# ----------------------------------------------------------------------------- the restricted profile

#: Volume types the restricted profile allows ("Volume Types" control).
RESTRICTED_VOLUME_TYPES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
#: Baseline "Sysctls": the safe set.
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
#: Baseline "SELinux": allowed types (user and role must be unset).
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})


def restricted_violations(pod: dict, where: str) -> list[str]:
    """Every Pod Security Standards `restricted` control (baseline included) that `pod` (a PodSpec) fails."""
    out: list[str] = []
    bad = out.append
    psc = pod.get("securityContext") or {}
    # Baseline: host namespaces, HostProcess, hostPath, sysctls, SELinux, AppArmor, seccomp not Unconfined.
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            bad(f"{where}: {key} true")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        bad(f"{where}: pod windowsOptions.hostProcess")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            bad(f"{where}: unsafe sysctl {sysctl.get('name')}")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            bad(f"{where}: volume {volume.get('name')} of type {sorted(kinds - RESTRICTED_VOLUME_TYPES)}")
    # Restricted: runAsNonRoot true (pod, or every container), runAsUser never 0, seccomp RuntimeDefault/Localhost.
    pod_nonroot = psc.get("runAsNonRoot") is True
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if psc.get("runAsUser") == 0:
        bad(f"{where}: pod runAsUser 0")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        bad(f"{where}: pod seccompProfile {pod_seccomp}")
    bad_selinux(psc.get("seLinuxOptions"), f"{where}: pod", bad)
    if (psc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
        bad(f"{where}: pod appArmorProfile")
    containers = [
        *(pod.get("initContainers") or []),
        *(pod.get("containers") or []),
        *(pod.get("ephemeralContainers") or []),
    ]
    if not containers:
        bad(f"{where}: no containers")
    for c in containers:
        name = f"{where}/{c.get('name')}"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            bad(f"{name}: privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            bad(f"{name}: windowsOptions.hostProcess")
        if sc.get("procMount") not in (None, "Default"):
            bad(f"{name}: procMount {sc.get('procMount')}")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad(f"{name}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad(f"{name}: capabilities.drop lacks ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad(f"{name}: adds capabilities {caps.get('add')}")
        if sc.get("runAsNonRoot") is False or not (pod_nonroot or sc.get("runAsNonRoot") is True):
            bad(f"{name}: runAsNonRoot not true")
        if sc.get("runAsUser") == 0:
            bad(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp not in (None, "RuntimeDefault", "Localhost") or (seccomp is None and pod_seccomp is None):
            bad(f"{name}: seccompProfile {seccomp or 'unset'}")
        bad_selinux(sc.get("seLinuxOptions"), name, bad)
        if (sc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
            bad(f"{name}: appArmorProfile")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                bad(f"{name}: hostPort {port['hostPort']}")
    return out


def bad_selinux(options: dict | None, where: str, bad) -> None:
    if not options:
        return
    if options.get("type", "") not in SELINUX_TYPES or options.get("user") or options.get("role"):
        bad(f"{where}: seLinuxOptions {options}")


def test_the_restricted_checker_should_catch_each_control():
    """The checker itself fails pods that break each control (else a green test proves nothing)."""
    good = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {"name": "c", "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}
        ],
        "volumes": [{"name": "v", "emptyDir": {}}],
    }
    assert restricted_violations(good, "good") == []
    breakers = [
        lambda p: p.update(hostNetwork=True),
        lambda p: p.update(hostPID=True),
        lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        lambda p: p["securityContext"].pop("runAsNonRoot"),
        lambda p: p["securityContext"].pop("seccompProfile"),
        lambda p: p["securityContext"].update(runAsUser=0),
        lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
        lambda p: p["containers"][0]["securityContext"].update(privileged=True),
        lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        lambda p: p["containers"][0]["securityContext"].update(capabilities={"drop": ["NET_RAW"]}),
        lambda p: p["containers"][0]["securityContext"].update(capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
        lambda p: p["containers"][0]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        lambda p: p["containers"][0].update(ports=[{"containerPort": 80, "hostPort": 80}]),
        lambda p: p.update(initContainers=[{"name": "init"}]),
    ]
    for i, breaker in enumerate(breakers):
        pod = copy.deepcopy(good)
        breaker(pod)
        assert restricted_violations(pod, "bad"), f"breaker {i} not caught"


# ----------------------------------------------------------------------------- what the operator builds


def operator_pods(obj: dict) -> dict[str, dict]:
    """Every PodSpec the operator creates from a RayJob / RayService, as it builds it (security-wise).

    Added as KubeRay v1.7 does (ray-operator/controllers/ray/common/pod.go): the autoscaler sidecar with
    `autoscalerOptions.securityContext` (mergeAutoscalerOverrides), the workers' `wait-gcs-ready` init
    container with the Ray container's security context (DefaultWorkerPodTemplate), `/tmp/ray` and
    `/dev/shm` emptyDirs. The submitter template is used as given (common/job.go GetSubmitterTemplate).
    """
    spec = obj["spec"]
    cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
    pods = {}
    head = copy.deepcopy(cluster["headGroupSpec"]["template"]["spec"])
    head.setdefault("volumes", []).append({"name": "shared-mem", "emptyDir": {"medium": "Memory"}})
    if cluster.get("enableInTreeAutoscaling"):
        options = cluster.get("autoscalerOptions") or {}
        head["containers"].append(
            {"name": "autoscaler", "image": "same", "securityContext": options.get("securityContext")}
        )
    pods["head"] = head
    for group in cluster["workerGroupSpecs"]:
        worker = copy.deepcopy(group["template"]["spec"])
        ray = worker["containers"][0]
        worker["initContainers"] = [
            {
                "name": "wait-gcs-ready",
                "image": ray["image"],
                "securityContext": copy.deepcopy(ray.get("securityContext")),
                "volumeMounts": copy.deepcopy(ray.get("volumeMounts")),
                "resources": {
                    "limits": {"cpu": "200m", "memory": "256Mi"},
                    "requests": {"cpu": "200m", "memory": "256Mi"},
                },
            }
        ]
        pods[f"worker-{group['groupName']}"] = worker
    if obj["kind"] == "RayJob" and spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
        assert "submitterPodTemplate" in spec, "K8sJobMode without submitterPodTemplate: KubeRay builds a bare pod"
        pods["submitter"] = copy.deepcopy(spec["submitterPodTemplate"]["spec"])
    return pods


def ray_object(objects: list[dict]) -> dict:
    return next(o for o in objects if o["apiVersion"] == "ray.io/v1")


PVC = {
    "extraVolumes": [{"name": "runs", "persistentVolumeClaim": {"claimName": "runs"}}],
    "extraVolumeMounts": [{"name": "runs", "mountPath": "/mnt/runs"}],
}
COMMON_TOGGLES = {
    "sa-create": {"serviceAccount": {"create": True}},
    "sa-named": {"serviceAccount": {"name": "ml-runner"}},
    "ray-auth-off": {"rayAuth": {"enabled": False}},
    "ray-auth-secret": {"rayAuth": {"secretName": "ray-token"}},
    "netpol-off": {"networkPolicy": {"enabled": False}},
    "podmonitor": {"podMonitor": {"enabled": True}},
    "pull-secrets": {"image": {"pullSecrets": ["regcred"]}},
    "pvc": PVC,
    "extensions": {
        "runtimeClassName": "nvidia",
        "priorityClassName": "ml-high",
        "env": [{"name": "A", "value": "1"}],
        "envFrom": [{"configMapRef": {"name": "extra"}}],
        "head": {
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": {"matchLabels": {"a": "b"}},
                }
            ],
            "rayStartParams": {"object-store-memory": "1000000000"},
        },
    },
}
TRAIN_CASES = {
    "defaults": TRAIN_REQUIRED,
    "ci": ci_values(TRAIN),
    **{k: merge(TRAIN_REQUIRED, v) for k, v in COMMON_TOGGLES.items()},
    "http-mode": merge(TRAIN_REQUIRED, {"job": {"submissionMode": "HTTPMode"}}),
    "config": merge(TRAIN_REQUIRED, {"training": {"config": {"amp": False}}}),
    "cpu": merge(TRAIN_REQUIRED, {"workers": {"gpusPerWorker": 0}}),
    "annotate": ANNOTATE_REQUIRED,
    "annotate-ci": merge(ci_values(TRAIN), {"mode": "annotate", "annotate": ANNOTATE_REQUIRED["annotate"]}),
}
SERVE_CASES = {
    "defaults": SERVE_REQUIRED,
    "ci": ci_values(SERVE),
    **{k: merge(SERVE_REQUIRED, v) for k, v in COMMON_TOGGLES.items()},
    "autoscaling": merge(SERVE_REQUIRED, {"autoscaling": {"enabled": True}}),
    "autoscaling-sa-create": merge(
        SERVE_REQUIRED, {"autoscaling": {"enabled": True}, "serviceAccount": {"create": True}}
    ),
    "auth-off": merge(SERVE_REQUIRED, {"auth": {"enabled": False}}),
    "ingress": merge(SERVE_REQUIRED, {"ingress": {"enabled": True}, "service": {"enabled": True}}),
}
CASES = [(TRAIN, name, values) for name, values in TRAIN_CASES.items()] + [
    (SERVE, name, values) for name, values in SERVE_CASES.items()
]
CASE_IDS = [f"{chart.name.rsplit('-', 1)[1]}-{name}" for chart, name, _ in CASES]


@pytest.mark.parametrize("chart,name,values", CASES, ids=CASE_IDS)
def test_every_pod_the_operator_builds_should_meet_the_restricted_profile(chart, name, values):
    rendered = render(chart, values)
    validate_all(rendered["objects"])
    ray = ray_object(rendered["objects"])
    pods = operator_pods(ray)
    pods.update({f"helm-test-{t['metadata']['name']}": t["spec"] for t in rendered["tests"]})
    violations = [v for role, pod in pods.items() for v in restricted_violations(pod, role)]
    assert violations == []
    for role, pod in pods.items():
        # Private registries, placement, least privilege: on every pod, the submitter included.
        if values.get("image", {}).get("pullSecrets"):
            assert pod.get("imagePullSecrets") == [{"name": s} for s in values["image"]["pullSecrets"]], role
        assert pod.get("serviceAccountName") != "default", role
        for c in pod["containers"]:
            if c["name"] != "autoscaler":
                assert c["image"].startswith(IMAGE["image"]["repository"] + ":"), (role, c["image"])
                assert c["securityContext"].get("readOnlyRootFilesystem") is True, (role, c["name"])
                limits = (c.get("resources") or {}).get("limits") or {}
                assert "ephemeral-storage" in limits and "memory" in limits, (role, c["name"])
        for volume in pod.get("volumes") or []:  # every scratch volume is bounded
            if "emptyDir" in volume and volume["emptyDir"].get("medium") != "Memory":
                assert volume["emptyDir"].get("sizeLimit"), (role, volume["name"])


def test_train_chart_should_specify_a_small_submitter_pod_that_never_restarts_and_has_deadlines():
    values = merge(
        TRAIN_REQUIRED,
        {
            "image": {"pullSecrets": ["regcred"]},
            "serviceAccount": {"create": True},
            "submitter": {"nodeSelector": {"pool": "cpu"}, "tolerations": [{"key": "x", "operator": "Exists"}]},
        },
    )
    job = one(render(TRAIN, values)["objects"], "RayJob")
    spec = job["spec"]
    pod = spec["submitterPodTemplate"]["spec"]
    # KubeRay does not default restartPolicy for a user template (common/job.go); a Job needs Never/OnFailure.
    assert pod["restartPolicy"] == "Never"
    assert (
        pod["imagePullSecrets"] == [{"name": "regcred"}]
        and pod["serviceAccountName"] == f"{RELEASE}-spleen-deepedit-train"
    )
    assert pod["nodeSelector"] == {"pool": "cpu"} and pod["tolerations"] == [{"key": "x", "operator": "Exists"}]
    assert pod["automountServiceAccountToken"] is False
    container = pod["containers"][0]
    assert container["name"] == "ray-job-submitter" and "command" not in container  # KubeRay fills in `ray job submit`
    assert container["resources"]["requests"]["cpu"] == "100m" and container["resources"]["limits"]["memory"] == "1Gi"
    assert spec["submitterConfig"] == {"backoffLimit": 2}
    # Deadlines by default: a job stuck before Running, or running forever, fails and frees its GPUs.
    assert spec["activeDeadlineSeconds"] == 259200 and spec["preRunningDeadlineSeconds"] == 1800
    assert pod["activeDeadlineSeconds"] == spec["activeDeadlineSeconds"]
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert crd_errors(job) == []
    http = one(render(TRAIN, merge(TRAIN_REQUIRED, {"job": {"submissionMode": "HTTPMode"}}))["objects"], "RayJob")
    assert "submitterPodTemplate" not in http["spec"] and "submitterConfig" not in http["spec"]


def test_ray_pods_should_keep_the_root_filesystem_read_only_with_sized_scratch_volumes():
    job = one(render(TRAIN, TRAIN_REQUIRED)["objects"], "RayJob")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    # `ray-logs` is KubeRay's name for /tmp/ray: an autoscaler sidecar shares the same volume (pod.go addEmptyDir).
    assert mounts == {
        "/tmp": "tmp",
        "/tmp/ray": "ray-logs",
        "/var/cache/spleen-deepedit": "dataset-cache",
        "/outputs": "outputs",
    }
    env = {e["name"]: e.get("value") for e in head["containers"][0]["env"]}
    assert env["SPLEEN_DEEPEDIT_CACHE"] == "/var/cache/spleen-deepedit"  # trainer/storage.py cache_root
    assert "--output /outputs/" in job["spec"]["entrypoint"]
    sizes = {v["name"]: v["emptyDir"]["sizeLimit"] for v in head["volumes"]}
    assert sizes == {"tmp": "2Gi", "ray-logs": "16Gi", "dataset-cache": "8Gi", "outputs": "4Gi"}


# ----------------------------------------------------------------------------- service accounts and autoscaling


@pytest.mark.parametrize("autoscaling", [False, True], ids=["fixed", "autoscaling"])
@pytest.mark.parametrize(
    "account",
    [{}, {"create": True}, {"name": "ml-runner"}, {"create": True, "name": "made-here"}],
    ids=["none", "create", "named", "create-named"],
)
def test_serve_autoscaler_should_get_an_account_and_a_token_with_every_service_account_setting(autoscaling, account):
    """Ray's KubeRay autoscaler reads the mounted token unconditionally; KubeRay binds its Role to the
    head's account, or creates one per cluster when the head names none (reconcileAutoscalerServiceAccount)."""
    values = merge(SERVE_REQUIRED, {"autoscaling": {"enabled": autoscaling}, "serviceAccount": account})
    objects = render(SERVE, values)["objects"]
    validate_all(objects)
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert head["automountServiceAccountToken"] is autoscaling  # only the autoscaler calls the API server
    assert worker["automountServiceAccountToken"] is False
    name = head.get("serviceAccountName")
    assert name != "default" and name == worker.get("serviceAccountName")
    created = [a["metadata"]["name"] for a in objects if a["kind"] == "ServiceAccount"]
    if account.get("create"):
        assert created == [name] and name == account.get("name", f"{RELEASE}-spleen-deepedit-serve")
    elif account.get("name"):
        assert created == [] and name == "ml-runner"  # the user's account; KubeRay binds its Role to it
    else:
        assert created == [] and name is None  # KubeRay creates `<cluster>` for the autoscaler


@pytest.mark.parametrize("chart,required", [(TRAIN, TRAIN_REQUIRED), (SERVE, SERVE_REQUIRED)], ids=["train", "serve"])
def test_chart_should_refuse_the_default_service_account_by_name(chart, required):
    with pytest.raises(helm_python.HelmValuesError, match="serviceAccount"):
        render(chart, merge(required, {"serviceAccount": {"name": "default"}}))


# ----------------------------------------------------------------------------- auth


@pytest.mark.parametrize("chart,required", [(TRAIN, TRAIN_REQUIRED), (SERVE, SERVE_REQUIRED)], ids=["train", "serve"])
def test_ray_token_auth_should_be_on_by_default_with_the_token_from_a_secret(chart, required):
    def cluster(values):
        spec = ray_object(render(chart, values)["objects"])["spec"]
        return spec.get("rayClusterSpec") or spec["rayClusterConfig"]

    assert cluster(required)["authOptions"] == {"mode": "token"}  # KubeRay makes a Secret per cluster
    assert cluster(merge(required, {"rayAuth": {"secretName": "ray-token"}}))["authOptions"] == {
        "mode": "token",
        "secretName": "ray-token",
    }
    off = render(chart, merge(required, {"rayAuth": {"enabled": False}}))
    assert cluster(merge(required, {"rayAuth": {"enabled": False}}))["authOptions"] == {"mode": "disabled"}
    assert "WARNING: rayAuth.enabled is false" in off["notes"]


def test_serve_chart_should_enable_api_auth_by_default_with_a_generated_secret():
    rendered = render(SERVE, SERVE_REQUIRED)
    secret = one(rendered["objects"], "Secret")
    name = f"{RELEASE}-spleen-deepedit-serve-api-token"
    assert secret["metadata"]["name"] == name
    import base64

    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) == 48 and token.isalnum()
    service = one(rendered["objects"], "RayService")
    for group in (
        service["spec"]["rayClusterConfig"]["headGroupSpec"],
        *service["spec"]["rayClusterConfig"]["workerGroupSpecs"],
    ):
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["DEEPEDIT_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "token"}
    assert token not in json.dumps(service)  # only the Secret holds it
    assert "Authorization: Bearer" in rendered["notes"] and "WARNING: auth.enabled is false" not in rendered["notes"]
    # An existing Secret: the chart makes none.
    own = render(SERVE, merge(SERVE_REQUIRED, {"auth": {"existingSecret": "mine"}}))["objects"]
    assert [o for o in own if o["kind"] == "Secret"] == []


def test_serve_chart_should_warn_when_auth_is_off_and_refuse_an_ingress_without_auth():
    notes = render(SERVE, merge(SERVE_REQUIRED, {"auth": {"enabled": False}}))["notes"]
    assert "WARNING: auth.enabled is false: the API answers ANYONE" in notes
    with pytest.raises(helm_python.HelmError, match="ingress.enabled with auth.enabled false"):
        render(SERVE, merge(SERVE_REQUIRED, {"auth": {"enabled": False}, "ingress": {"enabled": True}}))


def test_serve_helm_test_pod_should_check_health_and_one_segmentation_with_the_token():
    tests = render(SERVE, SERVE_REQUIRED)["tests"]
    pod = one(tests, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    script = container["args"][0]
    compile(script, "helm-test", "exec")  # valid Python
    assert "/healthz" in script and "client.segment(" in script
    env = {e["name"]: e for e in container["env"]}
    assert env["DEEPEDIT_URL"]["value"] == f"http://{RELEASE}-spleen-deepedit-serve-serve-svc:8000"
    assert (
        env["DEEPEDIT_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-spleen-deepedit-serve-api-token"
    )
    assert pod["spec"]["restartPolicy"] == "Never"
    import kubernetes_validate

    kubernetes_validate.validate(pod, "1.33.0", strict=True)


# ----------------------------------------------------------------------------- render-time checks


@pytest.mark.parametrize("chart,required", [(TRAIN, TRAIN_REQUIRED), (SERVE, SERVE_REQUIRED)], ids=["train", "serve"])
def test_chart_should_require_an_image_repository(chart, required):
    values = {k: v for k, v in required.items() if k != "image"}
    with pytest.raises(helm_python.HelmError, match="image.repository is required"):
        render(chart, values)


def test_train_chart_should_refuse_more_ranks_than_the_worker_group_holds():
    with pytest.raises(helm_python.HelmError, match=r"training.numWorkers 5 .* 2 x 2 GPU\(s\) = 4 ranks"):
        render(
            TRAIN,
            merge(TRAIN_REQUIRED, {"training": {"numWorkers": 5}, "workers": {"replicas": 2, "gpusPerWorker": 2}}),
        )
    job = one(
        render(
            TRAIN,
            merge(TRAIN_REQUIRED, {"training": {"numWorkers": 3}, "workers": {"replicas": 2, "gpusPerWorker": 2}}),
        )["objects"],
        "RayJob",
    )
    assert "--num-workers 3" in job["spec"]["entrypoint"]


def test_chart_should_pass_extensions_per_group():
    values = merge(
        TRAIN_REQUIRED,
        COMMON_TOGGLES["extensions"],
        PVC,
        {
            "workers": {
                "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
                "priorityClassName": "gpu-batch",
                "rayStartParams": {"num-cpus": "6"},
            }
        },
    )
    job = one(render(TRAIN, values)["objects"], "RayJob")
    assert crd_errors(job) == []
    cluster = job["spec"]["rayClusterSpec"]
    head, worker = cluster["headGroupSpec"], cluster["workerGroupSpecs"][0]
    assert head["rayStartParams"] == {"num-cpus": "0", "dashboard-host": "0.0.0.0", "object-store-memory": "1000000000"}
    assert worker["rayStartParams"] == {"num-cpus": "6"}
    hp, wp = head["template"]["spec"], worker["template"]["spec"]
    assert hp["runtimeClassName"] == wp["runtimeClassName"] == "nvidia"
    assert hp["priorityClassName"] == "ml-high" and wp["priorityClassName"] == "gpu-batch"
    assert "topologySpreadConstraints" in hp and "topologySpreadConstraints" not in wp
    henv = {e["name"] for e in hp["containers"][0]["env"]}
    wenv = {e["name"] for e in wp["containers"][0]["env"]}
    assert "A" in henv and {"A", "NCCL_DEBUG"} <= wenv and "NCCL_DEBUG" not in henv
    assert {"configMapRef": {"name": "extra"}} in wp["containers"][0]["envFrom"]
    assert {"name": "runs", "mountPath": "/mnt/runs"} in wp["containers"][0]["volumeMounts"]
    with pytest.raises(helm_python.HelmValuesError):
        render(TRAIN, merge(TRAIN_REQUIRED, {"extraVolumes": [{"name": "h", "hostPath": {"path": "/data"}}]}))


# ----------------------------------------------------------------------------- serve schema vs ServeArgs


def schema_corners(schema: dict) -> list[tuple[str, object]]:
    """(key, value) for the bounds of every numeric `serve.*` / `autoscaling.*` value the schema allows."""
    corners = []
    for section in ("serve", "autoscaling"):
        for key, prop in schema["properties"][section]["properties"].items():
            types = prop.get("type")
            types = types if isinstance(types, list) else [types]
            if not {"integer", "number"} & set(types):
                continue
            integer = "integer" in types and "number" not in types
            if "minimum" in prop:
                corners.append((f"{section}.{key}", prop["minimum"]))
            if "exclusiveMinimum" in prop:
                corners.append((f"{section}.{key}", prop["exclusiveMinimum"] + (1 if integer else 1e-6)))
            if "maximum" in prop:
                corners.append((f"{section}.{key}", prop["maximum"]))
    return corners


def test_serve_schema_corners_should_all_be_valid_serve_args_or_refused_with_a_message():
    """Every bound the chart's schema accepts is a ServeArgs Ray accepts, or the chart refuses it naming the fix."""
    from ray.serve.config import AutoscalingConfig

    from trainer.serve.settings import ServeArgs

    schema = json.loads((SERVE / "values.schema.json").read_text())
    corners = schema_corners(schema)
    assert ("autoscaling.minReplicas", 0) in corners and ("serve.maxBatchSize", 64) in corners
    refused = []
    for key, value in corners:
        section, name = key.split(".")
        values = merge(SERVE_REQUIRED, {"autoscaling": {"enabled": True}}, {section: {name: value}})
        try:
            service = one(render(SERVE, values)["objects"], "RayService")
        except helm_python.HelmError as exc:
            assert "raise" in str(exc) or "lower" in str(exc), (key, value, str(exc))
            refused.append(key)
            continue
        app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
        ServeArgs(**app["args"])
        deployment = app["deployments"][0]
        if (
            "autoscaling_config" in deployment
            and deployment["autoscaling_config"]["min_replicas"] <= deployment["autoscaling_config"]["max_replicas"]
        ):
            AutoscalingConfig(**deployment["autoscaling_config"])
    # maxBatchSize 64 > maxOngoingRequests 8, maxOngoingRequests 1 < maxBatchSize 4: the chart says to raise it.
    assert refused == ["serve.maxBatchSize", "serve.maxOngoingRequests"]


# ----------------------------------------------------------------------------- NetworkPolicy, flow by flow


def _selects(selector: dict | None, labels: dict) -> bool:
    """LabelSelector semantics (matchLabels + the In/NotIn/Exists/DoesNotExist expressions)."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        matches = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not matches:
            return False
    return True


def admitted(policy: dict, src_pod: dict, src_ns: dict, policy_ns: dict, port: int) -> bool:
    """Does `policy` admit TCP to `port` from a pod (labels `src_pod`) in a namespace (labels `src_ns`)?"""
    for rule in policy["spec"].get("ingress") or []:
        ports = rule.get("ports")
        if ports and not any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports):
            continue
        peers = rule.get("from")
        if not peers:
            return True
        for peer in peers:
            assert "ipBlock" not in peer, "the default policy has no ipBlock peers"
            ns_ok = _selects(peer["namespaceSelector"], src_ns) if "namespaceSelector" in peer else src_ns is policy_ns
            pod_ok = _selects(peer["podSelector"], src_pod) if "podSelector" in peer else True
            if ns_ok and pod_ok:
                return True
    return False


OWN_NS = {"kubernetes.io/metadata.name": NAMESPACE}
SOURCES = {
    "same-release": ({"app.kubernetes.io/instance": RELEASE}, OWN_NS),  # + the chart's name label, below
    "other-release": ({"app.kubernetes.io/instance": "other"}, OWN_NS),
    "kuberay-operator": (
        {"app.kubernetes.io/name": "kuberay-operator"},
        {"kubernetes.io/metadata.name": "kuberay-system"},
    ),
    "prometheus": ({"app.kubernetes.io/name": "prometheus"}, {"kubernetes.io/metadata.name": "monitoring"}),
    "ingress-nginx": ({"app.kubernetes.io/name": "ingress-nginx"}, {"kubernetes.io/metadata.name": "ingress-nginx"}),
    "other-in-monitoring": ({"app.kubernetes.io/name": "grafana"}, {"kubernetes.io/metadata.name": "monitoring"}),
    "other-namespace": ({"app": "x"}, {"kubernetes.io/metadata.name": "team-b"}),
}
PORTS = [6379, 8265, 10001, 8000, 8080, 44227, 44217, 12345]


@pytest.mark.parametrize(
    "chart,required,expected",
    [
        (TRAIN, TRAIN_REQUIRED, {("kuberay-operator", 8265), ("prometheus", 8080), ("prometheus", 44227)}),
        (
            SERVE,
            SERVE_REQUIRED,
            {
                ("kuberay-operator", 8265),
                ("prometheus", 8080),
                ("prometheus", 44227),
                ("prometheus", 44217),
                ("ingress-nginx", 8000),
            },
        ),
    ],
    ids=["train", "serve"],
)
def test_network_policy_should_admit_exactly_ray_operator_ingress_and_prometheus_flows(chart, required, expected):
    objects = render(chart, required)["objects"]
    validate_all(objects)
    policy = one(objects, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    selector = policy["spec"]["podSelector"]
    ray = ray_object(objects)
    spec = ray["spec"]
    cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"], *[g["template"] for g in cluster["workerGroupSpecs"]]]
    if "submitterPodTemplate" in spec:
        templates.append(spec["submitterPodTemplate"])
    assert all(_selects(selector, t["metadata"]["labels"]) for t in templates)  # every pod of the release is covered
    got = set()
    for source, (pod_labels, ns_labels) in SOURCES.items():
        pod_labels = {**pod_labels, "app.kubernetes.io/name": chart.name} if source.endswith("-release") else pod_labels
        for port in PORTS:
            if admitted(policy, pod_labels, ns_labels, OWN_NS, port):
                got.add((source, port))
    same = {("same-release", p) for p in PORTS}  # Ray's own dynamic ports: all, but only inside the release
    assert got == same | expected
    assert not [
        o
        for o in render(chart, merge(required, {"networkPolicy": {"enabled": False}}))["objects"]
        if o["kind"] == "NetworkPolicy"
    ]


# ----------------------------------------------------------------------------- Checkov


#: Checkov checks we fail on purpose, with the reason. Everything else must pass.
CHECKOV_SKIPS = {
    "CKV_K8S_43": "image digest: a user value (image.tag: 0.1.0@sha256:...); the charts default to the appVersion tag",
    "CKV_K8S_8": "liveness probe: KubeRay injects the Ray probes itself (pod.go initLivenessAndReadinessProbe); a submitter or test pod has none to offer",
    "CKV_K8S_9": "readiness probe: as CKV_K8S_8",
    "CKV_K8S_38": "service-account token: the autoscaler head must mount it (Ray's KubeRay autoscaler reads it); every other pod has it off",
    "CKV_K8S_40": "high UID (>10000): the Ray base image's user is uid 1000; remapping it breaks the image's file ownership",
    "CKV_K8S_35": "secrets as files rather than env: Ray and KubeRay read RAY_AUTH_TOKEN / AWS_* from the environment",
    "CKV_K8S_21": "default namespace: the charts leave the namespace to `helm -n` (non-pod objects carry none)",
    "CKV_K8S_15": "image pull policy Always: IfNotPresent with a pinned tag/digest is the production setting for multi-GB images",
}


def _checkov() -> str | None:
    """Checkov's CLI: $CHECKOV, else on PATH. Not a project dependency: checkov 3.3.30 pins boto3==1.35.49,
    packaging<24 and networkx<2.7, which would downgrade ours. CI installs it on its own
    (`pipx install checkov==3.3.30`: 55 s here; the check itself takes about 15 s)."""
    return os.environ.get("CHECKOV") or shutil.which("checkov")


@pytest.mark.slow
@pytest.mark.skipif(_checkov() is None, reason="checkov not installed (pipx install checkov, or set CHECKOV)")
def test_checkov_kubernetes_checks_should_pass_on_every_pod_outside_the_skip_list(tmp_path):
    docs = []
    for chart, name, values in [c for c in CASES if c[1] in ("defaults", "ci", "autoscaling")]:
        rendered = render(chart, values)
        for role, pod in operator_pods(ray_object(rendered["objects"])).items():
            pod = copy.deepcopy(pod)
            for c in pod["containers"]:  # the autoscaler sidecar as KubeRay builds it (pod.go BuildAutoscalerContainer)
                if c["name"] == "autoscaler":
                    c["image"] = pod["containers"][0]["image"]
                    c["resources"] = {
                        "limits": {"cpu": "500m", "memory": "512Mi"},
                        "requests": {"cpu": "500m", "memory": "512Mi"},
                    }
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": f"{chart.name}-{name}-{role}", "namespace": NAMESPACE},
                    "spec": pod,
                }
            )
        docs += [t for t in rendered["tests"]]
        docs += [o for o in rendered["objects"] if o["apiVersion"] != "ray.io/v1" and o["kind"] != "PodMonitor"]
    (tmp_path / "pods.yaml").write_text(yaml.safe_dump_all(docs))
    done = subprocess.run(
        [
            _checkov(),
            "-f",
            str(tmp_path / "pods.yaml"),
            "--framework",
            "kubernetes",
            "-o",
            "json",
            "--skip-check",
            ",".join(CHECKOV_SKIPS),
            "--quiet",
            "--compact",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(done.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [
        f"{c['check_id']} {c['resource']}: {c['check_name']}" for r in reports for c in r["results"]["failed_checks"]
    ]
    assert failed == [], "\n".join(failed)
    passed = sum(r["summary"]["passed"] for r in reports)
    assert passed > 100, passed  # it really checked the pods


# ----------------------------------------------------------------------------- walkthrough and metadata


DOCS = Path(__file__).resolve().parents[1] / "docs" / "kubernetes.md"


def walkthrough_values(name: str) -> dict:
    """The `# my-train.yaml` / `# my-serve.yaml` block of docs/kubernetes.md."""
    text = DOCS.read_text()
    for block in text.split("```yaml\n")[1:]:
        body = block.split("```", 1)[0]
        if body.startswith(f"# {name}\n"):
            return yaml.safe_load(body)
    raise AssertionError(f"no {name} block in {DOCS}")


@pytest.mark.parametrize("chart,name", [(TRAIN, "my-train.yaml"), (SERVE, "my-serve.yaml")], ids=["train", "serve"])
def test_walkthrough_values_files_should_render_valid_restricted_objects(chart, name):
    rendered = render(chart, walkthrough_values(name))
    validate_all(rendered["objects"])
    pods = operator_pods(ray_object(rendered["objects"]))
    assert [v for role, pod in pods.items() for v in restricted_violations(pod, role)] == []


def test_walkthrough_should_install_the_operator_without_a_servicemonitor_before_its_crd_exists():
    """Step 2 runs on an empty cluster: a ServiceMonitor there fails with "no matches for kind"."""
    values = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "k8s/manifests/kuberay-operator-values.yaml").read_text()
    )
    assert values["metrics"]["serviceMonitor"]["enabled"] is False
    text = DOCS.read_text()
    step2, step3 = text.index("## 2. Install the KubeRay operator"), text.index("## 3. Monitoring")
    assert text.index("kube-prometheus-stack", step3) < text.index("metrics.serviceMonitor.enabled=true", step3)
    assert "serviceMonitor.enabled=true" not in text[step2:step3]


@pytest.mark.parametrize("chart", [TRAIN, SERVE], ids=["train", "serve"])
def test_chart_metadata_should_name_sources_maintainers_and_kube_version(chart):
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    assert meta["sources"] and meta["maintainers"] and meta["kubeVersion"].startswith(">=1.25")
