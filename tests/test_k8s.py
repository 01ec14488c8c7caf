"""`spleen-deepedit k8s ...` against a FAKE Kubernetes API server on loopback, plus the image and manifests.

No cluster exists here, so `FakeKubeAPI` (a small threaded http.server) implements the few endpoints
the commands call: objects (server-side apply with dryRun, create, get, list by label, JSON Patch /
merge patch, delete), Secrets, pods and pod logs, and the service proxy to the Ray dashboard's job
logs (which wants Ray's token when one is set). It plays scripted RayJob status transitions and a
RayService that applies a new generation, can answer scripted 5xx errors, and records every request
so the tests can check the exact bodies the client sends.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest
import yaml

from k8s import cli as k8s_cli
from k8s.rayservices import promoted_config
from trainer.progress import format_epoch_line, latest_progress

ROOT = Path(__file__).resolve().parents[1]
NS = "ml"
TOKEN = "fake-token"


# ----------------------------------------------------------------------------- the fake API server


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


def _json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 subset: test, replace, add (what kubectl/clients send for these objects)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        target = doc
        for part in parents:
            target = target[part]
        if op["op"] == "test":
            if target.get(last) != op["value"]:
                raise ValueError(f"test failed at {op['path']}")
        elif op["op"] in ("replace", "add"):
            target[last] = op["value"]
        else:
            raise ValueError(f"unsupported op {op['op']}")
    return doc


def _merge_patch(doc, patch):
    if not isinstance(patch, dict) or not isinstance(doc, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(doc)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


class FakeKubeAPI(ThreadingHTTPServer):
    """A FAKE kube-apiserver: in-memory objects, scripted RayJob progress, a recorded request log."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, namespace, name) -> object
        self.requests: list[dict] = []
        self.job_script: list[tuple[dict, str]] = []  # (status, driver log) played one step per GET
        self.job_step = 0
        self.dashboard_up = True
        self.pods: dict[str, str] = {}  # submitter pod name -> log
        self.pod_objects: list[dict] = []  # full pods (status, labels) for `status`'s Pending view
        self.ray_token: str | None = None  # when set, the dashboard proxy wants `x-ray-authorization: Bearer <it>`
        self.failures: list[tuple[str, int]] = []  # (path part, status): answered once each, in order
        self.watch_drops = 0  # watch streams to drop (closed with no event) before answering normally
        self.lock = threading.Lock()
        self._rv = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def requests_of(self, method: str, path_part: str = "") -> list[dict]:
        return [r for r in self.requests if r["method"] == method and path_part in r["path"]]


#: /api/v1/namespaces/{ns}/{plural}[/{name}] and /apis/{group}/{version}/namespaces/{ns}/{plural}[/{name}]
_OBJECT_PATH = re.compile(
    r"^/(?:api/v1|apis/[^/]+/[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?$"
)
_PROXY_PATH = re.compile(
    r"^/api/v1/namespaces/(?P<ns>[^/]+)/services/(?P<svc>[^/]+):dashboard/proxy/api/jobs/(?P<job>[^/]+)/logs$"
)
_POD_LOG_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<pod>[^/]+)/log$")


class _Handler(BaseHTTPRequestHandler):
    server: FakeKubeAPI

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, code: int, body) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json" if not isinstance(body, str) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        srv = self.server
        with srv.lock:
            srv.requests.append(
                {
                    "method": method,
                    "path": path,
                    "query": query,
                    "body": body,
                    "content_type": self.headers.get("Content-Type"),
                    "auth": self.headers.get("Authorization"),
                    "ray_auth": self.headers.get("x-ray-authorization"),
                }
            )
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._reply(401, _status(401, "Unauthorized", "no or wrong bearer token"))
            for i, (part, code) in enumerate(srv.failures):
                if part in path:
                    del srv.failures[i]
                    return self._reply(code, _status(code, "InternalError", "scripted failure"))
            if m := _PROXY_PATH.match(path):
                if not srv.dashboard_up:
                    return self._reply(503, _status(503, "ServiceUnavailable", "no endpoints available"))
                if srv.ray_token and self.headers.get("x-ray-authorization") != f"Bearer {srv.ray_token}":
                    return self._reply(401, "Unauthorized: Ray token required")
                return self._reply(200, {"logs": srv.job_script[min(srv.job_step, len(srv.job_script)) - 1][1]})
            if m := _POD_LOG_PATH.match(path):
                return self._reply(200, srv.pods[m["pod"]])
            if path == f"/api/v1/namespaces/{NS}/pods" and srv.pod_objects:
                wanted = dict(s.split("=", 1) for s in query.get("labelSelector", [""])[0].split(",") if s)
                items = [
                    p for p in srv.pod_objects if all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())
                ]
                return self._reply(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
            if path == f"/api/v1/namespaces/{NS}/pods":
                items = [{"metadata": {"name": n, "namespace": NS, "labels": {"job-name": "x"}}} for n in srv.pods]
                return self._reply(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
            m = _OBJECT_PATH.match(path)
            if not m:
                return self._reply(404, _status(404, "NotFound", f"fake API has no route {path}"))
            return self._object(method, m["ns"], m["plural"], m["name"], body, query)

    def _watch(self, plural, ns, query):
        """One watch stream: the RayJob's next update as a MODIFIED event, then the stream ends (as at
        timeoutSeconds). `watch_drops` streams are dropped first, with no event at all."""
        srv = self.server
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()  # no Content-Length: the stream ends when the connection closes
        if srv.watch_drops:
            srv.watch_drops -= 1
            return
        wanted = query.get("fieldSelector", [""])[0].removeprefix("metadata.name=")
        obj = srv.objects.get((plural, ns, wanted))
        if obj is not None:
            self.wfile.write((json.dumps({"type": "MODIFIED", "object": obj}) + "\n").encode())

    def _object(self, method, ns, plural, name, body, query):
        srv = self.server
        key = (plural, ns, name)
        if method == "GET" and name is None and query.get("watch", [""])[0].lower() == "true":
            return self._watch(plural, ns, query)
        if method == "GET" and name is None:  # list, with an equality labelSelector
            wanted = dict(s.split("=", 1) for s in query.get("labelSelector", [""])[0].split(",") if s)
            items = [
                copy.deepcopy(o)
                for (p, n, _), o in srv.objects.items()
                if p == plural
                and n == ns
                and all((o["metadata"].get("labels") or {}).get(k) == v for k, v in wanted.items())
            ]
            return self._reply(200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items})
        if method == "PATCH" and self.headers.get("Content-Type") == "application/apply-patch+yaml":
            if body["metadata"].get("name") != name or body["metadata"].get("namespace") != ns:
                return self._reply(400, _status(400, "BadRequest", "name/namespace mismatch"))
            if query.get("fieldManager") != ["spleen-deepedit"]:
                return self._reply(422, _status(422, "Invalid", "fieldManager is required for apply patch"))
            old = srv.objects.get(key)
            obj = _merge_patch(old, body) if old else copy.deepcopy(body)  # SSA, approximated as a merge
            obj["metadata"].update(
                uid=f"uid-{name}",
                resourceVersion=srv.next_rv(),
                generation=(old or {}).get("metadata", {}).get("generation", 0) + 1,
            )
            if query.get("dryRun") != ["All"]:
                srv.objects[key] = obj
            return self._reply(201 if old is None else 200, obj)
        if method == "POST":
            name = body["metadata"]["name"]
            key = (plural, ns, name)
            if body["metadata"].get("namespace") != ns:
                return self._reply(400, _status(400, "BadRequest", "namespace mismatch"))
            if key in srv.objects:
                return self._reply(409, _status(409, "AlreadyExists", f'{plural} "{name}" already exists'))
            obj = copy.deepcopy(body)
            obj["metadata"].update(
                uid=f"uid-{name}", generation=1, resourceVersion=srv.next_rv(), creationTimestamp="2026-01-01T00:00:00Z"
            )
            if query.get("dryRun") != ["All"]:
                srv.objects[key] = obj
            return self._reply(201, obj)
        if key not in srv.objects:
            return self._reply(404, _status(404, "NotFound", f'{plural} "{name}" not found'))
        obj = srv.objects[key]
        if method == "GET":
            if plural == "rayjobs" and srv.job_script:
                srv.job_step = min(srv.job_step + 1, len(srv.job_script))
                obj["status"] = copy.deepcopy(srv.job_script[srv.job_step - 1][0])
            if plural == "rayservices":
                _advance_rayservice(obj)
            return self._reply(200, obj)
        if method == "PATCH":
            ctype = self.headers.get("Content-Type")
            try:
                new = _json_patch(obj, body) if ctype == "application/json-patch+json" else _merge_patch(obj, body)
            except (ValueError, KeyError) as exc:
                return self._reply(422, _status(422, "Invalid", str(exc)))
            if new.get("spec") != obj.get("spec"):
                new["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
            new["metadata"]["resourceVersion"] = srv.next_rv()
            srv.objects[key] = new
            return self._reply(200, new)
        if method == "DELETE":
            del srv.objects[key]
            return self._reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        return self._reply(405, _status(405, "MethodNotAllowed", method))

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_DELETE(self):
        self._handle("DELETE")


def _advance_rayservice(obj: dict) -> None:
    """Like KubeRay + Serve: a new generation is observed, deploys (reconfigure), then runs."""
    status = obj.setdefault("status", {})
    apps = status.setdefault("activeServiceStatus", {}).setdefault("applicationStatuses", {})
    generation = obj["metadata"]["generation"]
    if status.get("observedGeneration", 0) < generation:
        status["observedGeneration"] = generation
        apps["deepedit"] = {"status": "DEPLOYING"}
    else:
        apps["deepedit"] = {"status": "RUNNING"}
        status.update(serviceStatus="Running", conditions=[{"type": "Ready", "status": "True"}])


@pytest.fixture()
def fake_api():
    pytest.importorskip("kubernetes", reason="pip install kubernetes (the k8s extra)")
    server = FakeKubeAPI()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def kubeconfig(fake_api, tmp_path) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": fake_api.url}}],
                "users": [{"name": "fake", "user": {"token": TOKEN}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NS}}],
            }
        )
    )
    return str(path)


def k8s(kubeconfig: str, *argv: str) -> int:
    """Run `spleen-deepedit k8s ARGV...` (the same parser the main CLI registers)."""
    return k8s_cli.main(["k8s", *argv[:1], "--kubeconfig", kubeconfig, *argv[1:]])


# ----------------------------------------------------------------------------- fixtures: objects


RAYJOB = {
    "apiVersion": "ray.io/v1",
    "kind": "RayJob",
    "metadata": {"name": "spleen-r1", "labels": {"app.kubernetes.io/instance": "spleen-r1"}},
    "spec": {
        "entrypoint": "spleen-deepedit train --ray --data s3://b/d --output /tmp/o --storage s3://b/runs "
        "--run-name spleen-r1 --num-workers 2 --profile tiny",
        "shutdownAfterJobFinishes": True,
        "backoffLimit": 2,
        "rayClusterSpec": {"headGroupSpec": {}},
    },
}
CONFIG_MAP = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": {"name": "spleen-r1-config"},
    "data": {"train.yaml": "amp: false\n"},
}


def _epoch(epoch: int, epochs: int, val: str) -> str:
    """The line the trainer prints (its own formatter), behind the prefix Ray adds to a worker's output."""
    metrics = {
        "epoch": epoch,
        "loss": (60 - epoch) / 100,
        "train_dice": 0.5,
        "epoch_seconds": 12.0,
        "samples_per_s": 2.0,
        "val_dice": None if val == "-" else float(val),
    }
    return f"(RayTrainWorker pid=123, ip=10.0.0.7) {format_epoch_line(metrics, epochs)}\n"


def _script(final: str = "Complete") -> list[tuple[dict, str]]:
    running = {"jobDeploymentStatus": "Running", "rayClusterName": "spleen-r1-abcde", "jobId": "spleen-r1-x1"}
    log1 = "INFO ray train: run 'spleen-r1'\n" + _epoch(1, 3, "-")
    log2 = log1 + _epoch(2, 3, "0.7012")
    log3 = log2 + _epoch(3, 3, "0.8123")
    last = (
        {**running, "jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "failed": 1, "succeeded": 1}
        if final == "Complete"
        else {
            **running,
            "jobDeploymentStatus": "Failed",
            "jobStatus": "FAILED",
            "failed": 3,
            "reason": "AppFailed",
            "message": "Job failed after 3 attempts",
        }
    )
    return [
        ({"jobDeploymentStatus": "Initializing", "rayClusterName": "spleen-r1-abcde"}, ""),
        ({**running, "jobStatus": "PENDING"}, ""),
        ({**running, "jobStatus": "RUNNING"}, log1),
        ({**running, "jobStatus": "RUNNING"}, log2),
        ({**running, "jobStatus": "RUNNING", "failed": 1}, log2),  # attempt 1 failed: a retry resumed the run
        (last, log3),
    ]


def _serve_config(checkpoint: str) -> str:
    return yaml.safe_dump(
        {
            "proxy_location": "EveryNode",
            "http_options": {"host": "0.0.0.0", "port": 8000},
            "applications": [
                {
                    "name": "deepedit",
                    "route_prefix": "/",
                    "import_path": "trainer.serve.app:build_app",
                    "args": {"checkpoint": checkpoint, "num_gpus": 1, "max_batch_size": 4},
                    "deployments": [{"name": "DeepEdit", "user_config": {"checkpoint": checkpoint, "profile": None}}],
                }
            ],
        },
        sort_keys=False,
    )


def _add_rayservice(fake_api: FakeKubeAPI, checkpoint: str) -> None:
    fake_api.objects[("rayservices", NS, "deepedit")] = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "deepedit", "namespace": NS, "generation": 1},
        "spec": {"serveConfigV2": _serve_config(checkpoint), "rayClusterConfig": {"headGroupSpec": {}}},
        "status": {
            "observedGeneration": 1,
            "serviceStatus": "Running",
            "activeServiceStatus": {"applicationStatuses": {"deepedit": {"status": "RUNNING"}}},
        },
    }


# ----------------------------------------------------------------------------- submit


def _applied(fake_api: FakeKubeAPI) -> list[dict]:
    return [r for r in fake_api.requests_of("PATCH") if r["content_type"] == "application/apply-patch+yaml"]


def test_submit_should_apply_configmap_then_rayjob_from_manifests(fake_api, kubeconfig, tmp_path, capsys):
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all([RAYJOB, CONFIG_MAP]))
    assert k8s(kubeconfig, "submit", "--manifest", str(manifest)) == 0
    applies = _applied(fake_api)
    assert [p["path"] for p in applies] == [
        f"/api/v1/namespaces/{NS}/configmaps/spleen-r1-config",
        f"/apis/ray.io/v1/namespaces/{NS}/rayjobs/spleen-r1",
    ]
    assert all(p["query"]["fieldManager"] == ["spleen-deepedit"] and p["query"]["force"] == ["true"] for p in applies)
    assert all(p["auth"] == f"Bearer {TOKEN}" for p in fake_api.requests)
    stored = fake_api.objects[("rayjobs", NS, "spleen-r1")]
    assert stored["spec"] == {**RAYJOB["spec"], "suspend": False} and stored["metadata"]["namespace"] == NS
    assert "applied: ConfigMap/spleen-r1-config, RayJob/spleen-r1" in capsys.readouterr().out


def test_submit_should_render_the_training_chart_from_a_values_file(fake_api, kubeconfig, tmp_path):
    pytest.importorskip("helm_python", reason="pip install helm-python-sdk")
    values = tmp_path / "values.yaml"
    values.write_text((ROOT / "charts/spleen-deepedit-train/ci/ci-values.yaml").read_text())
    chart = str(ROOT / "charts/spleen-deepedit-train")
    assert k8s(kubeconfig, "submit", "-f", str(values), "--chart", chart, "--release", "spleen-r2") == 0
    kinds = [p["body"]["kind"] for p in _applied(fake_api)]
    assert kinds == ["ServiceAccount", "ConfigMap", "NetworkPolicy", "RayJob", "PodMonitor", "PodMonitor"]
    job = fake_api.objects[("rayjobs", NS, "spleen-r2-spleen-deepedit-train")]
    assert "--run-name spleen-r2 " in job["spec"]["entrypoint"]
    assert [p["path"].rsplit("/", 1)[0] for p in _applied(fake_api) if "podmonitors" in p["path"]] == [
        f"/apis/monitoring.coreos.com/v1/namespaces/{NS}/podmonitors"
    ] * 2


def test_submit_should_run_annotate_from_the_training_chart_in_mode_annotate(fake_api, kubeconfig, tmp_path, capsys):
    """`k8s submit -f` with `mode: annotate`: the same chart and conventions, an annotate RayJob to follow."""
    pytest.importorskip("helm_python", reason="pip install helm-python-sdk")
    ci = yaml.safe_load((ROOT / "charts/spleen-deepedit-train/ci/ci-values.yaml").read_text())
    ci.pop("dataset")
    ci.update(
        mode="annotate", annotate={"input": "s3://deepedit/cohort", "checkpoint": "s3://deepedit/runs/r1/checkpoint.pt"}
    )
    values = tmp_path / "annotate.yaml"
    values.write_text(yaml.safe_dump(ci))
    assert k8s(kubeconfig, "submit", "-f", str(values), "--release", "cohort-a") == 0
    job = fake_api.objects[("rayjobs", NS, "cohort-a-spleen-deepedit-train")]
    assert job["spec"]["entrypoint"].startswith(
        "spleen-deepedit annotate --input s3://deepedit/cohort --output s3://deepedit/runs/annotations/cohort-a "
    )
    # Credentials the same way as training: the Secret by envFrom on every Ray pod, never in the job.
    assert "AWS_SECRET" not in json.dumps(job["spec"].get("runtimeEnvYAML", ""))
    assert "follow it with: spleen-deepedit k8s follow cohort-a-spleen-deepedit-train" in capsys.readouterr().out


def test_submit_should_find_the_packaged_chart_from_any_directory(fake_api, kubeconfig, tmp_path, monkeypatch):
    pytest.importorskip("helm_python", reason="pip install helm-python-sdk")
    values = tmp_path / "values.yaml"
    values.write_text((ROOT / "charts/spleen-deepedit-train/ci/ci-values.yaml").read_text())
    monkeypatch.chdir(tmp_path)  # not the repository root
    assert k8s(kubeconfig, "submit", "-f", str(values), "--release", "spleen-r3") == 0
    assert ("rayjobs", NS, "spleen-r3-spleen-deepedit-train") in fake_api.objects
    assert Path(k8s_cli.DEFAULT_TRAIN_CHART).resolve() == (ROOT / "charts/spleen-deepedit-train").resolve()


def test_submit_dry_run_should_ask_the_server_to_validate_and_store_nothing(fake_api, kubeconfig, tmp_path, capsys):
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump(RAYJOB))
    assert k8s(kubeconfig, "submit", "--manifest", str(manifest), "--dry-run") == 0
    assert _applied(fake_api)[0]["query"]["dryRun"] == ["All"]
    assert fake_api.objects == {}
    assert "validated (dry run): RayJob/spleen-r1" in capsys.readouterr().out


def test_submit_twice_should_update_leftovers_and_resume_a_suspended_job(fake_api, kubeconfig, tmp_path, capsys):
    """A resubmission with the same release name is how a run resumes: it must not fail on 409."""
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all([RAYJOB, CONFIG_MAP]))
    assert k8s(kubeconfig, "submit", "--manifest", str(manifest)) == 0
    fake_api.objects[("rayjobs", NS, "spleen-r1")]["spec"]["suspend"] = True  # what `cancel` does
    fake_api.objects[("rayjobs", NS, "spleen-r1")]["status"] = {"jobDeploymentStatus": "Suspended"}
    changed = {**CONFIG_MAP, "data": {"train.yaml": "amp: true\n"}}
    manifest.write_text(yaml.safe_dump_all([RAYJOB, changed]))
    assert k8s(kubeconfig, "submit", "--manifest", str(manifest)) == 0
    assert fake_api.objects[("configmaps", NS, "spleen-r1-config")]["data"] == changed["data"]
    assert fake_api.objects[("rayjobs", NS, "spleen-r1")]["spec"]["suspend"] is False  # resumed
    assert fake_api.requests_of("POST") == [] and fake_api.requests_of("DELETE") == []


def test_submit_should_replace_a_finished_job_and_refuse_a_running_one(fake_api, kubeconfig, tmp_path, capsys):
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump(RAYJOB))
    assert k8s(kubeconfig, "submit", "--manifest", str(manifest)) == 0
    fake_api.objects[("rayjobs", NS, "spleen-r1")]["status"] = {"jobDeploymentStatus": "Running"}
    assert k8s(kubeconfig, "submit", "--manifest", str(manifest)) == 2
    assert "is Running: cancel it first" in capsys.readouterr().err
    fake_api.objects[("rayjobs", NS, "spleen-r1")]["status"] = {"jobDeploymentStatus": "Failed"}
    assert k8s(kubeconfig, "submit", "--manifest", str(manifest)) == 0
    assert "deleted the Failed RayJob spleen-r1" in capsys.readouterr().out
    assert [r["path"] for r in fake_api.requests_of("DELETE")] == [f"/apis/ray.io/v1/namespaces/{NS}/rayjobs/spleen-r1"]
    assert "status" not in fake_api.objects[("rayjobs", NS, "spleen-r1")]  # a fresh RayJob


def test_submit_should_refuse_kinds_it_does_not_manage(fake_api, kubeconfig, tmp_path, capsys):
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(
        yaml.safe_dump_all([RAYJOB, {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}])
    )
    assert k8s(kubeconfig, "submit", "--manifest", str(manifest)) == 2
    assert "cannot create kind(s) ['Deployment']" in capsys.readouterr().err
    assert fake_api.requests_of("PATCH") == [] and fake_api.requests_of("POST") == []


def test_submit_should_retry_a_transient_api_error(fake_api, kubeconfig, tmp_path, monkeypatch):
    from k8s import retry

    monkeypatch.setattr(retry, "FIRST_PAUSE_S", 0.01)
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump(RAYJOB))
    fake_api.failures = [("rayjobs/spleen-r1", 503), ("rayjobs/spleen-r1", 500)]
    assert k8s(kubeconfig, "submit", "--manifest", str(manifest)) == 0
    assert ("rayjobs", NS, "spleen-r1") in fake_api.objects


# ----------------------------------------------------------------------------- status, follow, logs


def _submitted(fake_api: FakeKubeAPI, final: str = "Complete") -> None:
    fake_api.objects[("rayjobs", NS, "spleen-r1")] = {
        **copy.deepcopy(RAYJOB),
        "metadata": {"name": "spleen-r1", "namespace": NS},
    }
    fake_api.job_script = _script(final)


def test_follow_should_print_each_status_transition_until_the_job_completes(fake_api, kubeconfig, capsys):
    _submitted(fake_api)
    assert k8s(kubeconfig, "follow", "spleen-r1", "--interval", "0.01", "--timeout", "30") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "spleen-r1: Initializing  attempt 1/3",
        "spleen-r1: Running  job PENDING  attempt 1/3",
        "spleen-r1: Running  job RUNNING  attempt 1/3  epoch 1/3  loss 0.5900",
        "spleen-r1: Running  job RUNNING  attempt 1/3  epoch 2/3  loss 0.5800  val dice 0.7012",
        "spleen-r1: Running  job RUNNING  attempt 2/3  epoch 2/3  loss 0.5800  val dice 0.7012",
        "spleen-r1: Complete  job SUCCEEDED  attempt 2/3  epoch 3/3  loss 0.5700  val dice 0.8123",
    ]
    # Progress comes from the Ray dashboard's job log, through the API server's service proxy.
    assert fake_api.requests_of("GET", "/services/spleen-r1-abcde-head-svc:dashboard/proxy/api/jobs/spleen-r1-x1/logs")


def test_follow_should_watch_the_rayjob_and_reconnect_after_a_dropped_stream(fake_api, kubeconfig, capsys):
    _submitted(fake_api)
    fake_api.objects[("rayjobs", NS, "spleen-r1")]["metadata"]["resourceVersion"] = "41"
    fake_api.watch_drops = 2  # the first two watch connections close with no event
    assert k8s(kubeconfig, "follow", "spleen-r1", "--interval", "0.01", "--timeout", "60") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("spleen-r1: Complete  job SUCCEEDED")
    watches = [r for r in fake_api.requests_of("GET", "/rayjobs") if r["query"].get("watch", [""])[0].lower() == "true"]
    assert len(watches) >= 4 and fake_api.watch_drops == 0  # dropped twice, watched again each time
    assert all(w["query"]["fieldSelector"] == ["metadata.name=spleen-r1"] for w in watches)
    assert all(w["query"]["resourceVersion"] == ["41"] for w in watches)  # from the version last read


def test_follow_should_exit_1_and_show_the_reason_when_the_job_fails(fake_api, kubeconfig, capsys):
    _submitted(fake_api, final="Failed")
    assert k8s(kubeconfig, "follow", "spleen-r1", "--interval", "0.01", "--timeout", "30") == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("spleen-r1: Failed  job FAILED  attempt 3/3") and "reason AppFailed" in last
    assert "Job failed after 3 attempts" in last


def test_status_json_should_report_phase_attempt_epoch_and_dice(fake_api, kubeconfig, capsys):
    _submitted(fake_api)
    fake_api.job_step = 3  # the next GET shows the 4th step
    assert k8s(kubeconfig, "status", "spleen-r1", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["phase"] == "Running" and status["attempt"] == 1 and status["max_attempts"] == 3
    assert status["epoch"] == 2 and status["epochs"] == 3 and status["val_dice"] == pytest.approx(0.7012)
    assert status["terminal"] is False


def test_logs_should_fall_back_to_the_submitter_pod_when_the_dashboard_is_gone(fake_api, kubeconfig, capsys):
    _submitted(fake_api)
    fake_api.job_step = 5
    fake_api.dashboard_up = False
    fake_api.pods = {"spleen-r1-sub1": "submitter log\n" + _epoch(3, 3, "0.8123")}
    assert k8s(kubeconfig, "logs", "spleen-r1", "--tail", "1") == 0
    assert capsys.readouterr().out.strip() == _epoch(3, 3, "0.8123").strip()
    pod_list = fake_api.requests_of("GET", f"/api/v1/namespaces/{NS}/pods")[0]
    assert pod_list["query"]["labelSelector"] == ["job-name=spleen-r1"]


def test_follow_should_ride_out_a_500_from_the_api_server_mid_follow(fake_api, kubeconfig, capsys, monkeypatch):
    from k8s import retry

    monkeypatch.setattr(retry, "FIRST_PAUSE_S", 0.01)
    _submitted(fake_api)
    # Three steps in, the API server answers 500 more times than one call's retries: follow says so
    # and goes on; the job still ends Complete with exit 0.
    fake_api.job_step = 2
    fake_api.failures = [("rayjobs/spleen-r1", 500)] * (retry.ATTEMPTS + 1)
    assert k8s(kubeconfig, "follow", "spleen-r1", "--interval", "0.01", "--timeout", "30") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("API server unavailable" in line and "HTTP 500" in line for line in lines)
    assert lines[-1].startswith("spleen-r1: Complete  job SUCCEEDED")


def test_follow_should_stop_on_an_error_that_is_not_transient(fake_api, kubeconfig, capsys):
    _submitted(fake_api)
    fake_api.failures = [("rayjobs/spleen-r1", 403)]
    assert k8s(kubeconfig, "follow", "spleen-r1", "--interval", "0.01", "--timeout", "30") == 2
    assert "HTTP 403" in capsys.readouterr().err


def test_logs_should_send_the_ray_token_from_the_cluster_secret(fake_api, kubeconfig, capsys):
    import base64

    _submitted(fake_api)
    fake_api.objects[("rayjobs", NS, "spleen-r1")]["spec"]["rayClusterSpec"]["authOptions"] = {"mode": "token"}
    fake_api.ray_token = "ray-secret-token"
    # KubeRay's per-cluster Secret, named after the RayCluster (raycluster_controller.go reconcileAuthSecret).
    fake_api.objects[("secrets", NS, "spleen-r1-abcde")] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "spleen-r1-abcde", "namespace": NS},
        "data": {"auth_token": base64.b64encode(b"ray-secret-token").decode()},
    }
    fake_api.job_step = 4
    assert k8s(kubeconfig, "logs", "spleen-r1", "--tail", "1") == 0
    assert "epoch" in capsys.readouterr().out
    proxied = fake_api.requests_of("GET", ":dashboard/proxy/")
    assert proxied and proxied[-1]["ray_auth"] == "Bearer ray-secret-token"
    assert proxied[-1]["auth"] == f"Bearer {TOKEN}"  # Authorization stays the API server's


def test_list_should_show_jobs_and_services_with_phase_and_release(fake_api, kubeconfig, capsys):
    _submitted(fake_api)
    fake_api.objects[("rayjobs", NS, "spleen-r1")]["status"] = {
        "jobDeploymentStatus": "Running",
        "jobStatus": "RUNNING",
    }
    fake_api.objects[("rayjobs", NS, "spleen-r1")]["metadata"]["labels"] = {"app.kubernetes.io/instance": "spleen-r1"}
    fake_api.job_script = []
    _add_rayservice(fake_api, "s3://b/run/checkpoint_epoch_0001/checkpoint.pt")
    assert k8s(kubeconfig, "list", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert {
        "kind": "RayJob",
        "name": "spleen-r1",
        "phase": "Running",
        "detail": "RUNNING",
        "release": "spleen-r1",
    } in rows
    assert [r["kind"] for r in rows] == ["RayJob", "RayService"]
    assert k8s(kubeconfig, "list") == 0
    assert "RayJob      spleen-r1" in capsys.readouterr().out


def test_status_should_show_pending_pods_with_the_scheduler_s_reason(fake_api, kubeconfig, capsys):
    _submitted(fake_api)
    fake_api.job_step = 1  # Initializing, cluster spleen-r1-abcde

    def pod(name, labels, phase, waiting=None):
        statuses = (
            [
                {
                    "name": "ray-worker",
                    "ready": False,
                    "restartCount": 0,
                    "image": "i",
                    "imageID": "",
                    "state": {"waiting": waiting},
                }
            ]
            if waiting
            else []
        )
        return {
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "status": {"phase": phase, "containerStatuses": statuses},
        }

    cluster = {"ray.io/cluster": "spleen-r1-abcde"}
    fake_api.pod_objects = [
        pod("spleen-r1-abcde-head", cluster, "Running"),
        pod("spleen-r1-abcde-gpu-worker-1", cluster, "Pending"),
        pod(
            "spleen-r1-abcde-gpu-worker-2",
            cluster,
            "Pending",
            {"reason": "ImagePullBackOff", "message": "pull access denied"},
        ),
    ]
    fake_api.objects[("events", NS, "e1")] = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "e1", "namespace": NS},
        "type": "Warning",
        "reason": "FailedScheduling",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        "involvedObject": {"kind": "Pod", "name": "spleen-r1-abcde-gpu-worker-1", "namespace": NS},
    }
    assert k8s(kubeconfig, "status", "spleen-r1") == 0
    out = capsys.readouterr().out
    assert (
        "spleen-r1-abcde-gpu-worker-1: FailedScheduling 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in out
    )
    assert "spleen-r1-abcde-gpu-worker-2: ImagePullBackOff pull access denied" in out
    assert "abcde-head" not in out


def test_dashboard_should_forward_the_head_service_and_show_the_ray_token(
    fake_api, kubeconfig, tmp_path, capsys, monkeypatch
):
    import base64

    _submitted(fake_api)
    fake_api.job_step = 2
    fake_api.objects[("rayjobs", NS, "spleen-r1")]["spec"]["rayClusterSpec"]["authOptions"] = {
        "mode": "token",
        "secretName": "ray-token",
    }
    fake_api.objects[("secrets", NS, "ray-token")] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "ray-token"},
        "data": {"auth_token": base64.b64encode(b"t0k3n").decode()},
    }
    # A fake `kubectl` on PATH records its arguments (no cluster here).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "kubectl-args"}\n')
    (bin_dir / "kubectl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert k8s(kubeconfig, "dashboard", "spleen-r1", "--port", "18265", "--show-token") == 0
    out = capsys.readouterr().out
    assert "http://127.0.0.1:18265/" in out and "Ray token (the dashboard asks for it): t0k3n" in out
    args = (tmp_path / "kubectl-args").read_text().split()
    assert (
        args[:5] == ["port-forward", "-n", NS, "svc/spleen-r1-abcde-head-svc", "18265:8265"] and "--kubeconfig" in args
    )
    assert k8s(kubeconfig, "dashboard", "spleen-r1", "--print-only") == 0
    out = capsys.readouterr().out
    assert (
        "<hidden: pass --show-token>" in out
        and "run: kubectl port-forward -n ml svc/spleen-r1-abcde-head-svc 8265:8265" in out
    )


def test_logs_follow_should_print_each_new_line_once_until_the_job_ends(fake_api, kubeconfig, capsys):
    _submitted(fake_api)
    assert k8s(kubeconfig, "logs", "spleen-r1", "-f", "--interval", "0.01") == 0
    out = capsys.readouterr().out
    for epoch, val in ((1, "-"), (2, "0.7012"), (3, "0.8123")):
        assert out.count(_epoch(epoch, 3, val)) == 1, out  # the log grows; every line is printed once


def test_status_should_say_how_to_fix_a_missing_job(fake_api, kubeconfig, capsys):
    assert k8s(kubeconfig, "status", "nope") == 2
    assert "RayJob ml/nope: HTTP 404" in capsys.readouterr().err


def test_latest_progress_should_read_the_last_epoch_and_last_validation_dice():
    logs = _epoch(1, 5, "0.5000") + "noise epoch x\n" + _epoch(2, 5, "-")
    assert latest_progress(logs) == {"epoch": 2, "epochs": 5, "loss": pytest.approx(0.58), "val_dice": 0.5}
    assert latest_progress("") == {}


# ----------------------------------------------------------------------------- cancel


def test_cancel_should_suspend_the_job_with_a_merge_patch(fake_api, kubeconfig, capsys):
    _submitted(fake_api)
    fake_api.job_step = 2
    assert k8s(kubeconfig, "cancel", "spleen-r1") == 0
    patch = fake_api.requests_of("PATCH")[0]
    assert patch["content_type"] == "application/merge-patch+json"
    assert patch["body"] == {"spec": {"suspend": True}}
    assert fake_api.objects[("rayjobs", NS, "spleen-r1")]["spec"]["suspend"] is True
    assert "suspended RayJob ml/spleen-r1" in capsys.readouterr().out


def test_cancel_delete_should_delete_every_object_of_the_release(fake_api, kubeconfig, tmp_path, capsys):
    labels = {"app.kubernetes.io/instance": "spleen-r1"}
    manifest = tmp_path / "rendered.yaml"
    others = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "spleen-r1", "labels": labels}},
        {**CONFIG_MAP, "metadata": {**CONFIG_MAP["metadata"], "labels": labels}},
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "spleen-r1", "labels": labels},
            "spec": {},
        },
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": {"name": "spleen-r1-head", "labels": labels},
            "spec": {},
        },
    ]
    unrelated = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "other", "labels": {"app.kubernetes.io/instance": "other"}},
    }
    manifest.write_text(yaml.safe_dump_all([RAYJOB, *others, unrelated]))
    assert k8s(kubeconfig, "submit", "--manifest", str(manifest)) == 0
    assert k8s(kubeconfig, "cancel", "spleen-r1", "--delete") == 0
    assert set(fake_api.objects) == {("configmaps", NS, "other")}  # everything of the release, nothing else
    deletes = [r["path"] for r in fake_api.requests_of("DELETE")]
    assert deletes[0] == f"/apis/monitoring.coreos.com/v1/namespaces/{NS}/podmonitors/spleen-r1-head"
    assert f"/apis/ray.io/v1/namespaces/{NS}/rayjobs/spleen-r1" in deletes
    assert "(release spleen-r1)" in capsys.readouterr().out


def test_cancel_delete_should_delete_an_unlabelled_rayjob_alone(fake_api, kubeconfig):
    _submitted(fake_api)
    fake_api.objects[("rayjobs", NS, "spleen-r1")]["metadata"].pop("labels", None)
    assert k8s(kubeconfig, "cancel", "spleen-r1", "--delete") == 0
    assert fake_api.requests_of("DELETE")[-1]["path"] == f"/apis/ray.io/v1/namespaces/{NS}/rayjobs/spleen-r1"
    assert ("rayjobs", NS, "spleen-r1") not in fake_api.objects


def test_cancel_should_leave_a_finished_job_alone(fake_api, kubeconfig, capsys):
    _submitted(fake_api)
    fake_api.job_step = len(fake_api.job_script) - 1
    assert k8s(kubeconfig, "cancel", "spleen-r1") == 0
    assert fake_api.requests_of("PATCH") == [] and "already Complete" in capsys.readouterr().out


# ----------------------------------------------------------------------------- promote


OLD = "s3://deepedit/runs/spleen-r1/checkpoint_epoch_0002/checkpoint.pt"
NEW = "s3://deepedit/runs/spleen-r1/checkpoint_epoch_0003/checkpoint.pt"


def test_promote_should_patch_only_the_user_config_checkpoint_and_wait_until_running(fake_api, kubeconfig, capsys):
    from ray.serve.schema import ServeDeploySchema

    _add_rayservice(fake_api, OLD)
    before = yaml.safe_load(fake_api.objects[("rayservices", NS, "deepedit")]["spec"]["serveConfigV2"])
    assert k8s(kubeconfig, "promote", "deepedit", "--checkpoint", NEW, "--wait", "--interval", "0.01") == 0
    patch = fake_api.requests_of("PATCH")[0]
    assert patch["content_type"] == "application/json-patch+json"
    assert [op["op"] for op in patch["body"]] == ["test", "replace"]
    assert patch["body"][0] == {"op": "test", "path": "/spec/serveConfigV2", "value": _serve_config(OLD)}
    assert patch["body"][1]["path"] == "/spec/serveConfigV2"
    after = yaml.safe_load(patch["body"][1]["value"])
    ServeDeploySchema.model_validate(after)
    # Only the deployment's user_config changed: Serve reconfigures the live replicas (no restart).
    expected = copy.deepcopy(before)
    expected["applications"][0]["deployments"][0]["user_config"]["checkpoint"] = NEW
    assert after == expected
    out = capsys.readouterr().out
    assert f"checkpoint {OLD} -> {NEW}" in out
    assert "deepedit: Ready  deepedit RUNNING" in out and f"checkpoint {NEW}" in out


def test_promote_should_fail_cleanly_when_the_service_changed_meanwhile(fake_api, kubeconfig, capsys, monkeypatch):
    from k8s import rayservices

    _add_rayservice(fake_api, OLD)
    real_get = rayservices.get_rayservice

    def stale_get(api, name, namespace):  # someone edits the RayService between our read and our patch
        obj = real_get(api, name, namespace)
        fake_api.objects[("rayservices", NS, "deepedit")]["spec"]["serveConfigV2"] = _serve_config("/models/other.pt")
        return obj

    monkeypatch.setattr(rayservices, "get_rayservice", stale_get)
    assert k8s(kubeconfig, "promote", "deepedit", "--checkpoint", NEW) == 2
    assert "changed while promoting" in capsys.readouterr().err
    assert "/models/other.pt" in fake_api.objects[("rayservices", NS, "deepedit")]["spec"]["serveConfigV2"]


def test_promote_should_reject_a_checkpoint_uri_the_app_cannot_load(fake_api, kubeconfig, capsys):
    _add_rayservice(fake_api, OLD)
    assert k8s(kubeconfig, "promote", "deepedit", "--checkpoint", "gs://bucket/x.pt") == 2
    assert "use s3://bucket/key" in capsys.readouterr().err
    assert fake_api.requests_of("PATCH") == []


def test_promoted_config_should_pick_the_application_with_the_deepedit_deployment():
    config = yaml.safe_load(_serve_config(OLD))
    config["applications"].append({"name": "other", "import_path": "x:y", "route_prefix": "/other"})
    new, old = promoted_config(yaml.safe_dump(config), NEW)
    assert old == OLD
    apps = {a["name"]: a for a in yaml.safe_load(new)["applications"]}
    assert apps["deepedit"]["deployments"][0]["user_config"]["checkpoint"] == NEW
    assert apps["other"] == {"name": "other", "import_path": "x:y", "route_prefix": "/other"}


def test_service_status_should_show_the_served_checkpoint(fake_api, kubeconfig, capsys):
    _add_rayservice(fake_api, OLD)
    fake_api.objects[("rayservices", NS, "deepedit")]["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    assert k8s(kubeconfig, "status", "deepedit", "--kind", "rayservice", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["ready"] is True and status["checkpoint"] == OLD and status["applications"] == {"deepedit": "RUNNING"}


# ----------------------------------------------------------------------------- CLI wiring


def test_k8s_cli_should_register_on_a_parent_parser_without_importing_kubernetes():
    code = (
        "import argparse, sys\n"
        "from k8s.cli import add_parser\n"
        "p = argparse.ArgumentParser(); add_parser(p.add_subparsers(dest='command'))\n"
        "a = p.parse_args(['k8s', 'promote', 'svc', '-n', 'ml', '--checkpoint', 's3://b/k.pt'])\n"
        "assert a.namespace == 'ml' and a.checkpoint == 's3://b/k.pt' and callable(a.func)\n"
        "assert 'kubernetes' not in sys.modules and 'helm_python' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_k8s_cli_should_explain_a_missing_kubeconfig(tmp_path, capsys, monkeypatch):
    pytest.importorskip("kubernetes")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert k8s_cli.main(["k8s", "status", "x", "--kubeconfig", str(tmp_path / "nope")]) == 2
    assert "no kubeconfig at" in capsys.readouterr().err


def test_k8s_cli_should_explain_an_unreachable_api_server(tmp_path, capsys, monkeypatch):
    pytest.importorskip("kubernetes")
    import socket

    from k8s import retry

    monkeypatch.setattr(retry, "FIRST_PAUSE_S", 0.01)  # connection refused is retried (an API server restart)

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": TOKEN}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            }
        )
    )
    assert k8s_cli.main(["k8s", "status", "x", "--kubeconfig", str(path)]) == 2
    assert f"cannot reach the Kubernetes API server at http://127.0.0.1:{port}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- container image


def _dockerfile():
    dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile")
    return dockerfile.parse_file(str(ROOT / "Dockerfile"))


def test_dockerfile_should_use_a_pinned_ray_2_60_python_3_11_cuda_base():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_pin = next(r for r in project["optional-dependencies"]["ray"] if r.startswith("ray["))
    ray_version = ray_pin.split("==")[1]
    assert project["requires-python"] == ">=3.11,<3.12"
    bases = [c.value[0] for c in _dockerfile() if c.cmd == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        assert re.fullmatch(rf"rayproject/ray:{re.escape(ray_version)}-py311-cu\d+(@sha256:[0-9a-f]{{64}})?", base), (
            base
        )
    charts_ray = yaml.safe_load((ROOT / "charts/spleen-deepedit-train/values.yaml").read_text())["rayVersion"]
    assert charts_ray == ray_version


def test_dockerfile_should_run_as_a_non_root_user_and_install_the_project_pins():
    commands = _dockerfile()
    final_stage = commands[max(i for i, c in enumerate(commands) if c.cmd == "FROM") :]
    users = [c.value[0] for c in final_stage if c.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert commands[-1].cmd == "USER" or final_stage[-1].cmd in ("WORKDIR", "USER")
    installs = " ".join(c.value[0] for c in final_stage if c.cmd == "RUN")
    assert "ray[train,serve,default]==2.60.0" in installs
    assert "torch.__version__.startswith('2.13.0')" in installs  # the build fails on a different torch
    assert "assert torch.version.cuda" in installs  # ... or on a CPU build of it


def test_dockerfile_should_install_dependencies_before_the_code_without_tooling_or_sudo():
    import tomllib

    commands = _dockerfile()
    final_stage = commands[max(i for i, c in enumerate(commands) if c.cmd == "FROM") :]
    runs = [(i, c) for i, c in enumerate(final_stage) if c.cmd == "RUN"]
    deps = next(i for i, c in runs if "-c /tmp/deps/constraints.txt" in c.value[0])
    code = next(i for i, c in runs if "--no-deps" in c.value[0] and "spleen_deepedit-" in c.value[0])
    assert deps < code  # a code change does not rebuild the dependency layer
    # The dependency layer sees only pyproject.toml, never the code.
    copies = [c for c in final_stage[:deps] if c.cmd == "COPY"]
    assert [c.value[:-1] for c in copies] == [("pyproject.toml",)]
    # The requirements come from the `runtime` extra, constrained by Ray's compiled versions.
    script = next(h.content for _, c in runs for h in c.heredocs)
    assert 'expand(["runtime"])' in script and "/home/ray/requirements_compiled.txt" in script
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    runtime = " ".join(extras["runtime"])
    for tooling in ("k8s", "plots"):  # helm-python-sdk, kubernetes, matplotlib stay out of the image
        assert tooling not in runtime
    assert "[all]" not in " ".join(c.value[0] for _, c in runs)
    # sudo removed (as root), then back to the non-root user for everything after.
    sudo = next(i for i, c in runs if "purge -y --auto-remove sudo" in c.value[0])
    assert final_stage[sudo - 1].cmd == "USER" and final_stage[sudo - 1].value[0] == "0"
    assert all(c.value[0].split(":")[0] not in ("0", "root") for c in final_stage[sudo + 1 :] if c.cmd == "USER")
    # The build stage copies the charts too: the wheel carries them (k8s/charts -> ../charts).
    build_copies = [c.value[0] for c in commands[: commands.index(final_stage[0])] if c.cmd == "COPY"]
    assert "charts" in build_copies


def test_dockerfile_should_hold_no_secrets_and_copy_no_data():
    commands = _dockerfile()
    secret = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|AWS_|PRIVATE)", re.I)
    for c in commands:
        if c.cmd in ("ENV", "ARG", "LABEL"):
            assert not any(secret.search(v) for v in c.value), c.original
        if c.cmd in ("COPY", "ADD"):
            sources = c.value[:-1]
            assert not any(s in (".", "./") or s.endswith((".env", ".pem", ".key", ".pt")) for s in sources), c.original
    assert not any(c.cmd == "ADD" for c in commands), "use COPY (ADD fetches URLs and unpacks archives)"
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "**" in ignore and "**/.env" in ignore and "**/*.pt" in ignore


# ----------------------------------------------------------------------------- plain manifests


MANIFESTS = ROOT / "k8s" / "manifests"


def test_plain_manifests_should_be_valid_kubernetes_objects():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        if path.name == "kuberay-operator-values.yaml":
            continue  # Helm values, not a manifest
        for obj in yaml.safe_load_all(path.read_text()):
            if obj["apiVersion"] == "monitoring.coreos.com/v1":
                assert obj["kind"] == "PodMonitor" and obj["spec"]["podMetricsEndpoints"], path
                continue
            kubernetes_validate.validate(obj, "1.33.0", strict=True)


def test_grafana_dashboards_should_be_ray_s_own_and_fit_in_a_configmap(tmp_path):
    from k8s import dashboards

    committed = sorted(MANIFESTS.glob("grafana-dashboards/*.yaml"))
    assert {p.stem for p in committed} == {f"ray-{n.replace('_', '-')}-dashboard" for n in dashboards.DASHBOARDS}
    for path in committed:
        assert path.stat().st_size < 1_000_000, path
        obj = yaml.safe_load(path.read_text())
        assert obj["metadata"]["labels"]["grafana_dashboard"] == "1"
        (content,) = obj["data"].values()
        assert json.loads(content)["panels"]
    # Up to date with the installed Ray: regenerating gives the committed files.
    regenerated = dashboards.write_all(tmp_path)
    for path in regenerated:
        assert path.read_text() == (MANIFESTS / "grafana-dashboards" / path.name).read_text(), (
            f"run python -m k8s.dashboards ({path.name})"
        )
