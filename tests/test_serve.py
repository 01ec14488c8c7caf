"""Ray Serve inference service: unit tests of its parts, then HTTP tests on one local Serve instance.

The HTTP tests share one module-scoped Ray + Serve (tiny checkpoint, bearer token on, CORS on, small
upload limits, a fixed metrics export port); the overload test adds a second, tightly bounded
application next to it and removes it afterwards. Order matters only once: the model-swap test runs
near the end (later tests read the version from /v1/info instead of assuming it).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import hostile_inputs as hi
import numpy as np
import pytest
from seaweed import free_port as _free_port
from seaweed import start_seaweedfs, stop_process, weed_binary

TOKEN_ENV = "DEEPEDIT_TEST_TOKEN"
TOKEN = "test-token-7c1f0e-0123456789abcdef0123"
ORIGIN = "http://viewer.example"
SHAPE = (64, 64, 32)
LIMITS = {
    "max_upload_bytes": 2 * 1024 * 1024,
    "max_voxels": 300_000,
    "max_dim": 128,
    "max_volume_bytes": 1024 * 1024,
    "max_extension_bytes": 64 * 1024,
    "max_gzip_members": 64,
    "memory_budget_bytes": 256 * 1024 * 1024,
}


# ----------------------------------------------------------------------------- helpers


def _nifti(data: np.ndarray, affine=None, gz: bool = True) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    raw = img.to_bytes()
    return gzip.compress(raw) if gz else raw


def _singular_affine_nifti(image: np.ndarray) -> bytes:
    """A NIfTI whose sform maps every voxel to one point (nibabel will not write one, so patch the bytes)."""
    raw = bytearray(_nifti(image, np.eye(4), gz=False))
    raw[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1
    raw[280:328] = bytes(48)  # srow_x, srow_y, srow_z = 0
    return gzip.compress(bytes(raw))


def _read_nifti(body: bytes):
    import nibabel as nib

    raw = gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body
    img = nib.Nifti1Image.from_bytes(raw)
    return np.asarray(img.dataobj), img.affine, img.get_data_dtype()


def _read_nrrd(body: bytes):
    import nrrd

    with tempfile.NamedTemporaryFile(suffix=".nrrd") as f:
        f.write(body)
        f.flush()
        return nrrd.read(f.name)


def _make_checkpoint(path, seed: int, window_prob: float = 0.0) -> None:
    """A tiny checkpoint (random weights); `window_prob` > 0: stored as trained with refinement windows."""
    import torch

    from trainer.checkpoint import Checkpoint, save_checkpoint
    from trainer.config import TrainConfig, get_profile
    from trainer.network import build_network

    torch.manual_seed(seed)
    config = TrainConfig(profile="tiny", window_prob=window_prob).to_dict()
    save_checkpoint(
        Checkpoint(model=build_network(get_profile("tiny")).state_dict(), profile="tiny", epoch=seed, config=config),
        path,
    )


# ----------------------------------------------------------------------------- unit tests (no Ray)


def test_session_store_ttl_lru_and_ids():
    from trainer.serve.errors import ApiError
    from trainer.serve.sessions import SessionStore

    now = [0.0]
    store = SessionStore(ttl_s=10, max_bytes=300, clock=lambda: now[0])
    a = store.create("A", 100, {"shape": [1]})
    b = store.create("B", 100, {"shape": [2]})
    assert len(a) == 32 and a != b and all(c in "0123456789abcdef" for c in a)
    now[0] = 5
    assert store.get(a).value == "A"  # a is now the most recently used
    store.create("C", 100, {})
    store.create("D", 100, {})  # over 300 bytes: evicts the least recently used (b)
    with pytest.raises(ApiError) as e:
        store.get(b)
    assert e.value.status == 404
    assert store.get(a).value == "A"
    now[0] = 16  # 11 s after a's last use
    with pytest.raises(ApiError, match="unknown or expired"):
        store.get(a)
    for bad in ("../../etc/passwd", "A" * 32, "", "0" * 31, "0" * 33):
        with pytest.raises(ApiError) as e:
            store.get(bad)
        assert e.value.status == 404
    with pytest.raises(ApiError) as e:
        store.put_image("../x", "X", 1, {})
    assert e.value.status == 400
    with pytest.raises(ApiError) as e:
        store.create("big", 301, {})
    assert e.value.status == 413
    assert store.stats()["bytes"] <= 300


def test_codecs_roundtrip_and_limits():
    from trainer.serve.codecs import VolumeLimits, decode_nifti, encode_mask
    from trainer.serve.errors import ApiError
    from trainer.synth import generate_case

    case = generate_case(np.random.default_rng(0), shape=SHAPE)
    limits = VolumeLimits(max_voxels=300_000, max_dim=128)
    image, affine = decode_nifti(_nifti(case.image, case.affine), limits)
    assert image.shape == SHAPE and image.dtype == np.float32
    np.testing.assert_allclose(affine, case.affine, atol=1e-5)
    np.testing.assert_array_equal(image, case.image.astype(np.float32))
    # Uncompressed works too, and a trailing singleton axis is still 3D.
    assert decode_nifti(_nifti(case.image[..., None], case.affine, gz=False), limits)[0].shape == SHAPE

    mask = (case.label > 0).astype(np.uint8)
    back, aff, dtype = _read_nifti(encode_mask(mask, case.affine, ".nii.gz"))
    assert dtype == np.uint8 and back.shape == SHAPE
    np.testing.assert_array_equal(back, mask)
    data, header = _read_nrrd(encode_mask(mask, case.affine, ".nrrd"))
    np.testing.assert_array_equal(data, mask)
    lps = np.diag([-1, -1, 1]) @ case.affine[:3, :3]
    np.testing.assert_allclose(np.asarray(header["space directions"]).T, lps, atol=1e-4)

    bomb = gzip.compress(b"\0" * (300_000 * 8 + 2 * 1024 * 1024))
    with pytest.raises(ApiError) as e:
        decode_nifti(bomb, limits)
    assert e.value.status == 415  # only the header (540 bytes) is inflated before the body is refused


def test_serve_args_validation():
    from pydantic import ValidationError

    from trainer.serve.settings import ServeArgs

    args = ServeArgs(checkpoint="x.pt")
    assert args.user_config() == {"checkpoint": "x.pt", "profile": None}
    for bad in (
        {"checkpoint": "http://x/y.pt"},
        {"checkpoint": "x.pt", "auth_token_env": "A-B"},
        {"checkpoint": "x.pt", "max_batch_size": 8, "max_ongoing_requests": 4},
        {"checkpoint": "x.pt", "max_bath_size": 2},
        {"checkpoint": "x.pt", "click_radius": -1},
        {"checkpoint": "x.pt", "click_radius": float("nan")},
    ):
        with pytest.raises(ValidationError):
            ServeArgs(**bad)


def test_build_app_is_typed_builder():
    from ray.serve import Application

    from trainer.serve.app import build_app
    from trainer.serve.settings import ServeArgs

    app = build_app(ServeArgs(checkpoint="x.pt"))
    assert isinstance(app, Application)
    import inspect

    assert inspect.signature(build_app).parameters["args"].annotation in (ServeArgs, "ServeArgs")


def test_request_deadline_gives_503_with_retry_after():
    import asyncio
    from types import SimpleNamespace

    from trainer.serve.core import ServiceCore
    from trainer.serve.errors import ApiError

    fake = SimpleNamespace(settings=SimpleNamespace(request_timeout_s=0.05, retry_after_s=3))

    async def slow_request():
        async with ServiceCore.deadline(fake):
            await asyncio.sleep(5)

    with pytest.raises(ApiError) as e:
        asyncio.run(slow_request())
    assert e.value.status == 503 and e.value.error == "timeout" and e.value.headers == {"Retry-After": "3"}


def test_cli_serve_rejects_missing_checkpoint_before_starting_ray(capsys):
    from trainer.cli import main

    assert main(["serve", "--checkpoint", "/nonexistent/model.pt", "--port", "8999"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_loadtest_refuses_non_loopback_targets():
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import loadtest

    for url in ("http://10.1.2.3:8000", "http://192.0.2.7/", "http://[2001:db8::1]:80"):
        with pytest.raises(ValueError, match="loopback"):
            loadtest.check_loopback(url)
    loadtest.check_loopback("http://127.0.0.1:8000")
    assert loadtest.percentile([1, 2, 3, 4], 50) == 2 and loadtest.percentile([1, 2, 3, 4], 99) == 4
    with pytest.raises(ValueError):
        loadtest.run("http://127.0.0.1:1", b"", requests=10**6, concurrency=1)


# ----------------------------------------------------------------------------- the Serve instance


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_ckpt")
    _make_checkpoint(d / "model_a.pt", 0, window_prob=0.5)  # refines clicks (trainer.refine)
    _make_checkpoint(d / "model_b.pt", 1)  # does not: the swap test goes from one to the other
    return str(d / "model_a.pt"), str(d / "model_b.pt")


@pytest.fixture(scope="module")
def case():
    from trainer.synth import generate_case

    return generate_case(np.random.default_rng(0), shape=SHAPE)


@pytest.fixture(scope="module")
def service(ckpts, tmp_path_factory):
    """(base URL, metrics export port, ServeArgs kwargs, s3 URI of checkpoint b or None).

    One Ray + Serve for the module. When SeaweedFS is installed, an S3 endpoint on loopback holds
    checkpoint b and the AWS_* variables point at it (set before Ray starts: replicas inherit them).
    """
    pytest.importorskip("ray.serve")
    import ray

    from trainer.serve.cli import start_local, stop_local

    if ray.is_initialized():
        ray.shutdown()
    saved = dict(os.environ)
    os.environ[TOKEN_ENV] = TOKEN
    s3_uri = None
    try:
        with contextlib.ExitStack() as stack:
            if weed_binary() is not None:
                os.environ.update(
                    stack.enter_context(
                        start_seaweedfs(tmp_path_factory.mktemp("serve_s3"), "ckpt", "serve-test", "serve-secret")
                    )
                )
                from trainer import storage

                storage.s3_client().upload_file(ckpts[1], "ckpt", "serve/model_b.pt")
                s3_uri = "s3://ckpt/serve/model_b.pt"
            metrics_port = _free_port()
            opts = dict(
                auth_token_env=TOKEN_ENV,
                cors_origins=[ORIGIN],
                max_batch_size=4,
                batch_wait_timeout_s=0.02,
                max_ongoing_requests=8,
                max_queued_requests=64,
                **LIMITS,
            )
            url = start_local(ckpts[0], port=_free_port(), metrics_export_port=metrics_port, num_cpus=4, **opts)
            try:
                yield url, metrics_port, opts, s3_uri
            finally:
                stop_local()
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def client(service):
    import httpx

    with httpx.Client(base_url=service[0], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def volume(case):
    return _nifti(case.image, case.affine)


def _clicks(case):
    idx = np.argwhere(case.label > 0)
    centre = idx[len(idx) // 2].tolist()
    return {"spleen": [centre], "background": [[2, 2, 2]]}


def _info(client) -> dict:
    r = client.get("/v1/info")
    assert r.status_code == 200, r.text
    return r.json()


# ----------------------------------------------------------------------------- native API


@pytest.mark.serve
@pytest.mark.slow
def test_health_ready_info_and_auth_exemptions(service, client):
    import httpx

    anon = httpx.Client(base_url=service[0], timeout=30)
    assert anon.get("/healthz").json() == {"status": "ok"}
    assert anon.get("/readyz").status_code == 200
    assert anon.get("/v1/info").status_code == 401
    info = _info(client)
    assert info["model"]["profile"] == "tiny" and info["model"]["version"].startswith("model_")
    # Model a refines clicks (locality off); model b (after the swap test) has the tiny profile's locality.
    assert (info["model"]["refine"], info["model"]["click_radius"]) in ((True, 0.0), (False, 1.0))
    assert info["auth"] is True and "/" not in info["model"]["checkpoint"]  # no paths leak
    # CORS: the configured origin is allowed (preflight needs no token), others get no CORS header.
    pre = anon.options(
        "/v1/segment",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    r = client.get("/v1/info", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.serve
def test_segment_raw_and_multipart_match_in_process_predictor(service, client, case, volume, ckpts):
    from trainer.predictor import Predictor
    from trainer.serve.ingress import parse_server_timing

    clicks = _clicks(case)
    r = client.post("/v1/segment", content=volume, params={"clicks": json.dumps(clicks)})
    assert r.status_code == 200, r.text
    mask, affine, dtype = _read_nifti(r.content)
    assert mask.shape == SHAPE and dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    np.testing.assert_allclose(affine, case.affine, atol=1e-4)
    stages = parse_server_timing(r.headers["server-timing"])
    # Model a refines: the clicks' window is a stage of its own.
    assert set(stages) == {"decode", "preprocess", "forward", "window", "postprocess", "encode"}

    expected = Predictor.from_checkpoint(ckpts[0]).predict(case.image.astype(np.float32), case.affine, clicks).mask
    np.testing.assert_array_equal(mask, expected)  # the service runs the one predictor

    m = client.post("/v1/segment", files={"file": ("ct.nii.gz", volume)}, data={"clicks": json.dumps(clicks)})
    assert m.status_code == 200, m.text
    np.testing.assert_array_equal(_read_nifti(m.content)[0], expected)
    auto = client.post("/v1/segment", content=_nifti(case.image, case.affine, gz=False), params={"format": "nrrd"})
    assert auto.status_code == 200
    data, header = _read_nrrd(auto.content)
    assert data.shape == SHAPE and header["space"] == "left-posterior-superior"


@pytest.mark.serve
def test_session_click_round_trip_skips_upload_and_preprocess(client, case, volume):
    from trainer.serve.ingress import parse_server_timing

    before = _info(client)["counters"]
    r = client.post("/v1/sessions", content=volume)
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    assert r.json()["shape"] == list(SHAPE)
    assert "preprocess" in parse_server_timing(r.headers["server-timing"])

    clicks = _clicks(case)
    durations = []
    for n in range(3):
        body = json.dumps({"spleen": clicks["spleen"][: n + 1], "background": clicks["background"]}).encode()
        assert len(body) < 200  # a click is ~100 bytes, the volume is not re-sent
        t0 = time.perf_counter()
        s = client.post(f"/v1/sessions/{sid}/segment", content=body, headers={"content-type": "application/json"})
        durations.append(time.perf_counter() - t0)
        assert s.status_code == 200, s.text
        stages = parse_server_timing(s.headers["server-timing"])
        assert "preprocess" not in stages and "decode" not in stages and "forward" in stages
        assert "window" in stages  # model a refines: the click-centred window's share
        mask, affine, _ = _read_nifti(s.content)
        assert mask.shape == SHAPE
        np.testing.assert_allclose(affine, case.affine, atol=1e-4)
    after = _info(client)["counters"]
    assert after["preprocess"] - before["preprocess"] == 1  # one upload, three clicks, one preprocess
    assert after["forward"] - before["forward"] == 3
    # At most one window forward per click (the automatic pass and unchanged windows are cached; a click
    # that leaves its cluster's window and guidance as they were costs none).
    assert 1 <= after["window"] - before["window"] <= 3
    view = client.get(f"/v1/sessions/{sid}").json()
    assert view["segmentations"] == 3 and view["preprocessed"] == 1
    # Same clicks through the session and through a full upload give the same mask.
    full = client.post("/v1/segment", content=volume, params={"clicks": json.dumps(clicks)})
    last = client.post(f"/v1/sessions/{sid}/segment", json=clicks)
    np.testing.assert_array_equal(_read_nifti(full.content)[0], _read_nifti(last.content)[0])
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert client.post(f"/v1/sessions/{sid}/segment", json=clicks).status_code == 404


# ----------------------------------------------------------------------------- MONAI Label API


@pytest.mark.serve
def test_monailabel_info_auth_session_datastore_infer(service, client, case, volume):
    from trainer.serve.monailabel import parse_multipart_reply

    info = client.get("/info/").json()
    models = info["models"]
    assert models["deepedit_spleen"]["type"] == "deepedit" and models["deepedit_spleen_seg"]["type"] == "segmentation"
    assert models["deepedit_spleen"]["labels"] == {"background": 0, "spleen": 1} and info["labels"] == ["spleen"]
    import httpx

    anon = httpx.Client(base_url=service[0], timeout=30)
    assert anon.get("/auth/").json()["enabled"] is True
    tok = anon.post("/auth/token", data={"username": "slicer", "password": TOKEN})
    assert tok.status_code == 200 and tok.json()["access_token"] == TOKEN
    assert anon.post("/auth/token", data={"username": "slicer", "password": "nope"}).status_code == 401

    s = client.put("/session/", files={"files": ("volume.nii.gz", volume)})
    assert s.status_code == 200, s.text
    sid = s.json()["session_id"]
    assert client.get(f"/session/{sid}").status_code == 200

    clicks = _clicks(case)
    params = {
        **clicks,
        "label": "spleen",
        "result_extension": ".nrrd",
        "result_dtype": "uint8",
        "client_id": "user-xyz",
    }
    r = client.post(
        "/infer/deepedit_spleen",
        params={"image": "volume", "session_id": sid},
        files={"params": (None, json.dumps(params))},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("multipart/form-data")
    parts = parse_multipart_reply(r.headers["content-type"], r.content)
    meta = json.loads(parts["params"][1])
    assert meta["label_names"] == {"background": 0, "spleen": 1}
    assert set(meta["latencies"]) >= {"pre", "infer", "invert", "post", "write", "total"}
    filename, body = parts["image"]
    assert filename.endswith(".nrrd")
    data, header = _read_nrrd(body)
    assert data.shape == SHAPE and data.dtype == np.uint8
    lps = np.diag([-1, -1, 1]) @ case.affine[:3, :3]
    np.testing.assert_allclose(np.asarray(header["space directions"]).T, lps, atol=1e-4)
    native = client.post("/v1/segment", content=volume, params={"clicks": json.dumps(clicks)})
    np.testing.assert_array_equal(data, _read_nifti(native.content)[0])

    # DeepGrow-style "foreground" is a synonym of the spleen label.
    fg = {"foreground": clicks["spleen"], "background": clicks["background"], "result_extension": ".nrrd"}
    r2 = client.post(
        "/infer/deepedit_spleen",
        params={"session_id": sid, "output": "image"},
        files={"params": (None, json.dumps(fg))},
    )
    assert r2.status_code == 200 and r2.headers["content-type"] == "application/octet-stream"
    np.testing.assert_array_equal(_read_nrrd(r2.content)[0], data)

    # Datastore upload, then automatic segmentation by image id, NIfTI out, json-only output.
    d = client.put(
        "/datastore/", params={"image": "case_001"}, files={"file": ("case_001.nii.gz", volume)}, data={"params": "{}"}
    )
    assert d.status_code == 200 and d.json() == {"image": "case_001"}
    auto = client.post(
        "/infer/deepedit_spleen_seg",
        params={"image": "case_001", "output": "image"},
        files={"params": (None, json.dumps({"result_extension": ".nii.gz"}))},
    )
    assert auto.status_code == 200
    mask, affine, _ = _read_nifti(auto.content)
    assert mask.shape == SHAPE
    np.testing.assert_allclose(affine, case.affine, atol=1e-4)
    j = client.post(
        "/infer/deepedit_spleen_seg", params={"image": "case_001", "output": "json"}, files={"params": (None, "{}")}
    )
    assert j.status_code == 200 and j.json()["label_names"]["spleen"] == 1
    # A file sent along with the request (no session, no datastore).
    f = client.post(
        "/infer/deepedit_spleen", files={"file": ("x.nii.gz", volume), "params": (None, json.dumps(params))}
    )
    assert f.status_code == 200 and parse_multipart_reply(f.headers["content-type"], f.content)["image"][0].endswith(
        ".nrrd"
    )
    assert client.delete(f"/session/{sid}").status_code == 200
    assert client.get(f"/session/{sid}").status_code == 404


# ----------------------------------------------------------------------------- DICOM series in, DICOM SEG out


def _zip(files: dict[str, bytes]) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def dicom_case(case, tmp_path_factory):
    """(slice files {name: bytes}, zip bytes, NIfTI of the volume read back from the series, series read back)."""
    pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from trainer.dicom import read_series, write_ct_series

    folder = tmp_path_factory.mktemp("serve_dicom")
    files = {p.name: p.read_bytes() for p in write_ct_series(folder, case.image, case.affine)}
    vol = read_series(folder)
    return files, _zip(files), _nifti(vol.image, vol.affine), vol


def _dciodvfy_errors(body: bytes, tmp_path) -> list[str]:
    path = tmp_path / "seg.dcm"
    path.write_bytes(body)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.serve
def test_dicom_series_segments_like_its_nifti_and_answers_dicom_seg(service, client, case, dicom_case, tmp_path):
    import highdicom as hd
    import pydicom

    from trainer.serve.monailabel import parse_multipart_reply

    files, zipped, nifti, vol = dicom_case
    clicks = _clicks(case)
    # The phantom's click voxels, in the series' grid (k sorted along the slice normal: reversed here).
    flip = vol.affine[2, 2] * case.affine[2, 2] < 0
    sclicks = {k: [[i, j, (SHAPE[2] - 1 - z) if flip else z] for i, j, z in v] for k, v in clicks.items()}
    ref = client.post("/v1/segment", content=nifti, params={"clicks": json.dumps(sclicks)})
    assert ref.status_code == 200, ref.text
    expected = _read_nifti(ref.content)[0]
    assert expected.sum() > 0
    # A zip as the raw body, and the files as multipart parts: the NIfTI path's mask.
    r = client.post("/v1/segment", content=zipped, params={"clicks": json.dumps(sclicks)})
    assert r.status_code == 200, r.text
    mask, affine, _ = _read_nifti(r.content)
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_allclose(affine, vol.affine, atol=1e-4)
    parts = [("file", (name, data, "application/dicom")) for name, data in files.items()]
    m = client.post("/v1/segment", files=parts, data={"clicks": json.dumps(sclicks)})
    assert m.status_code == 200, m.text
    np.testing.assert_array_equal(_read_nifti(m.content)[0], expected)

    # format=dcm: a DICOM SEG of the same mask, referencing the uploaded slices, version = the model's.
    s = client.post("/v1/segment", content=zipped, params={"clicks": json.dumps(sclicks), "format": "dcm"})
    assert s.status_code == 200, s.text
    assert s.headers["content-type"] == "application/dicom"
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(s.content)))
    src = vol.meta.datasets
    uids = [ds.SOPInstanceUID for ds in src]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])[..., 0]
    np.testing.assert_array_equal(frames.transpose(2, 1, 0), expected)
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmVersion == s.headers["x-model-version"][:64]
    assert seg.StudyInstanceUID == src[0].StudyInstanceUID and seg.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    if shutil.which("dciodvfy") is not None:
        assert not _dciodvfy_errors(s.content, tmp_path)
    # A NIfTI upload has no series to reference: 400 before any decoding.
    bad = client.post("/v1/segment", content=nifti, params={"format": "dcm"})
    assert bad.status_code == 400 and bad.json()["error"] == "bad_format"

    # Sessions keep the series' headers: a click round trip can answer a SEG.
    sid = client.post("/v1/sessions", content=zipped)
    assert sid.status_code == 201, sid.text
    assert sid.json()["shape"] == list(SHAPE) and sid.json()["input"] == "dicom"
    again = client.post(f"/v1/sessions/{sid.json()['session_id']}/segment", params={"format": "dcm"}, json=sclicks)
    assert again.status_code == 200, again.text
    assert pydicom.dcmread(io.BytesIO(again.content)).Modality == "SEG"

    # MONAI Label: a session of .dcm files (Slicer sends `files`), then output=dicom_seg.
    ml = client.put("/session/", files=[("files", (name, data)) for name, data in files.items()])
    assert ml.status_code == 200, ml.text
    params = {**sclicks, "label": "spleen"}
    r = client.post(
        "/infer/deepedit_spleen",
        params={"session_id": ml.json()["session_id"], "output": "dicom_seg"},
        files={"params": (None, json.dumps(params))},
    )
    assert r.status_code == 200, r.text
    seg2 = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(r.content)))
    frames2 = seg2.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])[..., 0]
    np.testing.assert_array_equal(frames2.transpose(2, 1, 0), expected)
    # A zip in the datastore, then the default multipart reply with a NIfTI mask.
    d = client.put("/datastore/", files={"file": ("dicom_case.zip", zipped)})
    assert d.status_code == 200 and d.json() == {"image": "dicom_case"}
    f = client.post(
        "/infer/deepedit_spleen", params={"image": "dicom_case"}, files={"params": (None, json.dumps(params))}
    )
    assert f.status_code == 200, f.text
    body = parse_multipart_reply(f.headers["content-type"], f.content)["image"][1]
    np.testing.assert_array_equal(_read_nifti(body)[0], expected)


def _hostile_dicom_cases(files: dict[str, bytes]) -> dict[str, tuple[object, int, str]]:
    """name -> (upload: bytes or list of (name, bytes) parts, expected status, expected error code)."""
    import pydicom

    from trainer.dicom import write_ct_series

    names = sorted(files)
    with tempfile.TemporaryDirectory() as tmp:
        other = {p.name: p.read_bytes() for p in write_ct_series(tmp, np.zeros((16, 16, 4), np.int16), np.eye(4))}
    two = _zip({**{f"a/{n}": b for n, b in files.items()}, **{f"b/{n}": b for n, b in other.items()}})
    # Slices sorted by position are not sorted by name (write_ct_series shuffles names): drop by position.
    by_z = sorted(
        names,
        key=lambda n: float(pydicom.dcmread(io.BytesIO(files[n]), stop_before_pixels=True).ImagePositionPatient[2]),
    )
    missing = _zip({n: files[n] for n in by_z if n not in by_z[10:12]})
    bomb = _zip({"IM00001.dcm": bytes(64 * 1024 * 1024)})  # 64 MiB of zeros, about 64 KiB zipped
    truncated = _zip(files)[: len(_zip(files)) // 2]
    # Slices whose headers declare 4096 x 4096 pixels: refused from the headers, before decoding.
    huge = {}
    for n in names:
        ds = pydicom.dcmread(io.BytesIO(files[n]))
        ds.Rows = ds.Columns = 4096
        buf = io.BytesIO()
        ds.save_as(buf)
        huge[n] = buf.getvalue()
    return {
        "two_series": (two, 422, "several_series"),
        "non_dicom_in_zip": (_zip({**files, "Doe^John notes.txt": b"not an image"}), 422, "not_dicom"),
        "zip_bomb": (bomb, 413, "too_large"),
        "missing_slices": (missing, 422, "missing_slices"),
        "truncated_zip": (truncated, 422, "bad_zip"),
        "one_slice": (files[names[0]], 422, "too_few_slices"),
        "huge_declared_slices": (_zip(huge), 413, "volume_too_large"),
        "parts_with_junk": ([(n, files[n]) for n in names[:4]] + [("x.bin", b"\0" * 300)], 422, "not_dicom"),
        "corrupt_pixels": (_zip({**files, names[3]: files[names[3]][:-4000]}), 422, "undecodable"),
    }


@pytest.mark.serve
def test_hostile_dicom_uploads_get_4xx_json_and_names_stay_out_of_logs(service, client, dicom_case):
    files, zipped, _, _ = dicom_case
    cases = _hostile_dicom_cases(files)
    failures = []
    for name, (upload, status, code) in cases.items():
        t0 = time.perf_counter()
        if isinstance(upload, list):
            r = client.post("/v1/segment", files=[("file", part) for part in upload])
        else:
            r = client.post("/v1/segment", content=upload)
        took = time.perf_counter() - t0
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != status or body.get("error") != code or not body.get("detail") or took > 5:
            failures.append(f"{name}: {r.status_code} {r.text[:300]} in {took:.1f}s (expected {status} {code})")
    assert not failures, "\n".join(failures)
    # The same checks guard sessions and the MONAI Label routes.
    two = cases["two_series"][0]
    assert client.post("/v1/sessions", content=two).json()["error"] == "several_series"
    r = client.put("/session/", files={"files": ("study.zip", two)})
    assert r.status_code == 422 and r.json()["error"] == "several_series"
    # The file name (it could hold a patient's name) goes to the client...
    r = client.post("/v1/segment", content=cases["non_dicom_in_zip"][0])
    assert "Doe^John" in r.json()["detail"]
    # ...and the service is fine after all of it.
    assert client.post("/v1/segment", content=zipped).status_code == 200
    # ...never to the logs (the Serve replica's and proxy's logs of this Ray session).
    import ray

    logs_dir = ray._private.worker._global_node.get_logs_dir_path()
    leaked = []
    for root, _, names in os.walk(logs_dir):
        for n in names:
            with contextlib.suppress(OSError), open(os.path.join(root, n), "rb") as f:
                if b"Doe^John" in f.read():
                    leaked.append(n)
    assert not leaked, leaked


# ----------------------------------------------------------------------------- malformed requests


def _malformed_cases(case):
    vol = _nifti(case.image, case.affine)
    raw = _nifti(case.image, case.affine, gz=False)
    nan = case.image.astype(np.float32)
    nan[3, 3, 3] = np.nan
    inf = case.image.astype(np.float32)
    inf[1, 2, 3] = np.inf
    good_clicks = json.dumps(_clicks(case))
    unknown_sid = "0123456789abcdef0123456789abcdef"
    ml = "/infer/deepedit_spleen"

    def seg(body=vol, clicks=None, **kw):
        params = {"clicks": clicks} if clicks is not None else {}
        return {"method": "POST", "url": "/v1/segment", "content": body, "params": {**params, **kw}}

    def infer(params, url=ml, query=None, file=True):
        files = {"params": (None, params)}
        if file:
            files["file"] = ("x.nii.gz", vol)
        return {"method": "POST", "url": url, "files": files, "params": query or {}}

    def chunks():
        for _ in range(5):
            yield b"\0" * (1024 * 1024)

    return {
        "not_nifti": (seg(b"this is not a volume" * 20), 415),
        "truncated_gzip": (seg(vol[: len(vol) // 2]), 400),
        "corrupt_gzip": (seg(b"\x1f\x8b\x08\x00garbage-garbage-garbage"), 400),
        "gzip_of_text": (seg(gzip.compress(b"hello world" * 100)), 415),
        "truncated_nifti": (seg(raw[:5000]), 400),
        "header_only": (seg(raw[:200]), 400),
        "empty_body": (seg(b""), 400),
        "2d_image": (seg(_nifti(np.zeros((64, 64), np.int16))), 422),
        "4d_image": (seg(_nifti(np.zeros((16, 16, 8, 2), np.int16))), 422),
        "axis_over_limit": (seg(_nifti(np.zeros((200, 8, 8), np.int16))), 413),
        "voxels_over_limit": (seg(_nifti(np.zeros((100, 100, 40), np.uint8))), 413),
        "nan_voxels": (seg(_nifti(nan, case.affine)), 422),
        "inf_voxels": (seg(_nifti(inf, case.affine)), 422),
        "complex_voxels": (seg(_nifti(np.zeros((8, 8, 8), np.complex64))), 422),
        "singular_affine": (seg(_singular_affine_nifti(case.image)), 422),
        "click_out_of_bounds": (seg(clicks='{"spleen": [[64, 0, 0]]}'), 400),
        "click_negative": (seg(clicks='{"spleen": [[-1, 0, 0]]}'), 400),
        "click_wrong_arity": (seg(clicks='{"spleen": [[1, 2]]}'), 400),
        "click_not_integer": (seg(clicks='{"spleen": [[1.5, 2, 3]]}'), 400),
        "click_string": (seg(clicks='{"spleen": [["1", "2", "3"]]}'), 400),
        "clicks_not_object": (seg(clicks="[[1, 2, 3]]"), 400),
        "clicks_not_list": (seg(clicks='{"spleen": 5}'), 400),
        "clicks_malformed_json": (seg(clicks='{"spleen": [[1, 2, 3]'), 400),
        "clicks_unknown_label": (seg(clicks='{"liver": [[1, 2, 3]]}'), 400),
        "bad_format": (seg(clicks=good_clicks, format="png"), 400),
        "multipart_without_file": (
            {
                "method": "POST",
                "url": "/v1/segment",
                "data": {"clicks": good_clicks},
                "files": {"other": ("a.txt", b"x")},
            },
            400,
        ),
        "multipart_broken": (
            {
                "method": "POST",
                "url": "/v1/segment",
                "content": b"--zzz\r\nnonsense",
                "headers": {"content-type": "multipart/form-data; boundary=abc"},
            },
            400,
        ),
        "oversized_body": (seg(b"\0" * (3 * 1024 * 1024)), 413),
        "oversized_chunked_body": ({"method": "POST", "url": "/v1/segment", "content": chunks()}, 413),
        "unknown_session": ({"method": "POST", "url": f"/v1/sessions/{unknown_sid}/segment", "json": {}}, 404),
        "malformed_session_id": ({"method": "POST", "url": "/v1/sessions/..%2F..%2Fetc/segment", "json": {}}, 404),
        "get_unknown_session": ({"method": "GET", "url": "/v1/sessions/not-a-session"}, 404),
        "delete_unknown_session": ({"method": "DELETE", "url": f"/v1/sessions/{unknown_sid}"}, 404),
        "session_bad_json": (
            {"method": "POST", "url": f"/v1/sessions/{unknown_sid}/segment", "content": b"{oops"},
            400,
        ),
        "session_upload_not_nifti": ({"method": "POST", "url": "/v1/sessions", "content": b"not a volume" * 40}, 415),
        # Zip magic makes it a DICOM series upload (zips are accepted), which does not open: 422 bad_zip.
        "session_upload_corrupt_zip": ({"method": "POST", "url": "/v1/sessions", "content": b"PK\x03\x04zip"}, 422),
        "seg_format_of_nifti": (seg(format="dcm"), 400),
        "ml_dicom_seg_of_nifti": (infer("{}", query={"output": "dicom_seg"}), 400),
        "missing_token": ({"method": "GET", "url": "/v1/info", "headers": {"authorization": ""}}, 401),
        "wrong_token": ({"method": "GET", "url": "/v1/info", "headers": {"authorization": "Bearer wrong"}}, 401),
        "wrong_scheme": ({"method": "GET", "url": "/v1/info", "headers": {"authorization": f"Basic {TOKEN}"}}, 401),
        "token_on_wrong_route_still_checked": (
            {"method": "POST", "url": ml, "headers": {"authorization": "Bearer x"}},
            401,
        ),
        "unknown_route": ({"method": "GET", "url": "/v2/nothing"}, 404),
        "wrong_method": ({"method": "GET", "url": "/v1/segment"}, 405),
        "ml_unknown_model": (infer("{}", url="/infer/liver"), 404),
        "ml_params_not_json": (infer("{not json"), 400),
        "ml_params_array": (infer("[1, 2]"), 400),
        "ml_params_clicks_not_list": (infer('{"spleen": "here"}'), 400),
        "ml_click_out_of_bounds": (infer('{"spleen": [[0, 0, 99]]}'), 400),
        "ml_bad_extension": (infer('{"result_extension": ".png"}'), 400),
        "ml_bad_dtype": (infer('{"result_dtype": "complex64"}'), 400),
        "ml_bad_output": (infer("{}", query={"output": "xml"}), 400),
        "ml_no_image": (infer("{}", file=False), 400),
        "ml_unknown_datastore_image": (infer("{}", file=False, query={"image": "never_uploaded"}), 404),
        "ml_unknown_session": (infer("{}", file=False, query={"session_id": unknown_sid}), 404),
        "ml_get_unknown_session": ({"method": "GET", "url": "/session/zzz"}, 404),
        "ml_session_no_files": ({"method": "PUT", "url": "/session/", "files": {"other": ("a", b"x")}}, 400),
        "ml_datastore_bad_id": (
            {
                "method": "PUT",
                "url": "/datastore/",
                "params": {"image": "../../etc/passwd"},
                "files": {"file": ("x.nii.gz", vol)},
            },
            400,
        ),
    }


@pytest.mark.serve
def test_malformed_requests_get_4xx_json_and_service_survives(service, client, case, volume):
    cases = _malformed_cases(case)
    assert len(cases) >= 30
    failures = []
    for name, (req, expected) in cases.items():
        req = dict(req)
        r = client.request(req.pop("method"), req.pop("url"), **req)
        body_ok = False
        try:
            payload = r.json()
            body_ok = isinstance(payload.get("error"), str) and isinstance(payload.get("detail"), str)
        except ValueError:
            pass
        if r.status_code != expected or not body_ok or "Traceback" in r.text:
            failures.append(f"{name}: {r.status_code} (want {expected}) {r.text[:200]}")
    assert not failures, "\n".join(failures)
    # Still answering normally.
    ok = client.post("/v1/segment", content=volume)
    assert ok.status_code == 200 and _read_nifti(ok.content)[0].shape == SHAPE
    assert client.get("/healthz").status_code == 200


def _replica_rss_bytes() -> int:
    """Resident memory of this test's DeepEdit replica: a descendant of this process (not another
    engineer's Ray) whose title is Ray's `ray::ServeReplica:deepedit:DeepEdit`."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, rss = [os.getpid()], 0
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().decode(errors="replace")
            if title.startswith("ray::ServeReplica:deepedit:DeepEdit"):
                with open(f"/proc/{pid}/status") as f:
                    rss = max(rss, next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")))
        except (OSError, StopIteration):
            continue
    return rss


def _hostile_cases(case):
    """Issue 15's rows at sizes CI affords, and more: (request, allowed statuses)."""
    vol = _nifti(case.image, case.affine)
    sid_path = "/v1/sessions/{sid}/segment"  # filled in with a live session
    ml = "/infer/deepedit_spleen"

    def seg(body, **params):
        return {"method": "POST", "url": "/v1/segment", "content": body, "params": params}

    def click(body):
        return {"method": "POST", "url": sid_path, "content": body, "headers": {"content-type": "application/json"}}

    def infer(params: str):
        return {"method": "POST", "url": ml, "files": {"params": (None, params), "file": ("x.nii.gz", vol)}}

    small = hi.nifti_bytes(np.zeros((8, 8, 8), np.int16))
    deep = "[" * 5000
    return {
        "ext_records_400k": (seg(hi.extension_records_bomb(400_000)), {413}),
        "ext_records_uncompressed_cap": (seg(hi.extension_records_bomb(5000, gz=False)), {413}),
        "gzip_100k_empty_members": (seg(hi.empty_members_bomb(100_000, small)), {413}),
        "gzip_members_then_volume": (seg(hi.empty_members_bomb(65, vol)), {413}),
        "declared_512x512x1024_float64_header_only": (seg(hi.declared_zeros_bomb(full=False)), {413}),
        "declared_float64_over_volume_bytes": (seg(hi.declared_zeros_bomb((64, 64, 72))), {413}),
        "declared_int16_truncated": (
            seg(hi.declared_zeros_bomb((64, 64, 64), datatype=4, itemsize=2, full=False)),
            {400},
        ),
        "sheared_sform_drops_axis": (seg(hi.sheared_sform_nifti()), {422}),
        "nan_vox_offset": (seg(hi.header_with(vox_offset=float("nan"))), {400}),
        "vox_offset_inside_header": (seg(hi.header_with(vox_offset=100)), {422}),
        "huge_vox_offset": (seg(hi.header_with(vox_offset=3e38)), {413}),
        "unknown_datatype": (seg(hi.header_with(datatype=9999)), {400}),
        "rgb_datatype": (seg(hi.header_with(datatype=128, bitpix=24)), {422}),
        "negative_dim": (seg(hi.header_with(dim=[3, 8, -8, 8, 1, 1, 1, 1])), {422}),
        "inf_scl_inter": (seg(hi.header_with(scl_slope=1.0, scl_inter=float("inf"))), {422}),
        "nan_sform": (seg(hi.header_with(srow_x=[float("nan"), 0, 0, 0])), {422}),
        "truncated_voxels": (seg(hi.header_with(data_bytes=100)), {400}),
        "gzip_header_only": (seg(vol[:10]), {400}),
        "clicks_query_deep_json": (seg(vol, clicks="[" * 1000), {400}),
        "clicks_query_5000_digits": (seg(vol, clicks='{"spleen": [[' + "9" * 5000 + ", 1, 1]]}"), {400}),
        "clicks_query_600_clicks": (seg(vol, clicks=hi.many_clicks_body(600).decode()), {400}),
        "session_200k_clicks": (click(hi.many_clicks_body(200_000)), {413}),
        "session_600_clicks": (click(hi.many_clicks_body(600)), {400}),
        "session_brackets_100k": (click(b"[" * 100_000), {413}),
        "session_brackets_5000": (click(deep.encode()), {400}),
        "session_5000_digit_coordinate": (click(b'{"spleen": [[' + b"9" * 5000 + b", 1, 1]]}"), {400}),
        "session_nan_coordinate": (click(b'{"spleen": [[NaN, 1, 1]]}'), {400}),
        "session_1e999_coordinate": (click(b'{"spleen": [[1e999, 1, 1]]}'), {400}),
        "session_huge_int_in_range_check": (click(b'{"spleen": [[' + b"9" * 30 + b", 1, 1]]}"), {400}),
        "session_bool_coordinate": (click(b'{"spleen": [[true, 1, 1]]}'), {400}),
        "session_not_utf8": (click(b"\xff\xfe{}"), {400}),
        "session_ray_timeout_header_ignored": (
            {
                **click(b"{oops"),
                "headers": {
                    "content-type": "application/json",
                    "x-request-timeout-seconds": "0",
                    "x-request-disconnect-disabled": "?1",
                },
            },
            {400},
        ),
        "ml_params_deep": (infer('{"spleen": ' + "[" * 50 + "]" * 50 + "}"), {400}),
        "ml_params_600_clicks": (infer(hi.many_clicks_body(600).decode()), {400}),
        "ml_params_too_large": (infer(json.dumps({"x": "a" * 70_000})), {413}),
        "ml_foreground_plus_spleen_over_cap": (
            infer(json.dumps({"spleen": [[1, 1, 1]] * 300, "foreground": [[2, 2, 2]] * 300})),
            {400},
        ),
        # Several file parts are a DICOM series (one part per slice), so NIfTI parts are not DICOM files...
        "multipart_several_nifti_files": (
            {"method": "POST", "url": "/v1/segment", "files": [("file", (f"f{i}.nii.gz", small)) for i in range(6)]},
            {422},
        ),
        # ...and more parts than a series may have slices (ingress.MAX_FORM_FILES) stop the form parser.
        "multipart_too_many_files": (
            {"method": "POST", "url": "/v1/segment", "files": [("file", (f"s{i}.dcm", b"x")) for i in range(2049)]},
            {400},
        ),
        "auth_token_large_body": (
            {
                "method": "POST",
                "url": "/auth/token",
                "content": b"password=" + b"x" * 100_000,
                "headers": {"content-type": "application/x-www-form-urlencoded", "authorization": ""},
            },
            {413},
        ),
        "datastore_overwrite_other_volume": (
            {
                "method": "PUT",
                "url": "/datastore/",
                "params": {"image": "hostile_case"},
                "files": {"file": ("x.nii.gz", small)},
            },
            {409},
        ),
    }


@pytest.mark.serve
def test_hostile_corpus_each_4xx_within_2s_and_service_fine_after(service, client, case, volume):
    """Issue 15: at least 60 hostile requests (these and the malformed corpus), each 4xx in 2 s, no 5xx."""
    sid = client.post("/v1/sessions", content=volume).json()["session_id"]
    first = client.put("/datastore/", params={"image": "hostile_case"}, files={"file": ("c.nii.gz", volume)})
    assert first.status_code == 200, first.text
    cases = {**{f"malformed:{k}": (v[0], {v[1]}) for k, v in _malformed_cases(case).items()}, **_hostile_cases(case)}
    assert len(cases) >= 60
    rss_before = _replica_rss_bytes()
    failures = []
    for name, (req, allowed) in cases.items():
        req = dict(req)
        url = req.pop("url").replace("{sid}", sid)
        t0 = time.perf_counter()
        r = client.request(req.pop("method"), url, **req)
        seconds = time.perf_counter() - t0
        try:
            payload = r.json()
            body_ok = isinstance(payload.get("error"), str) and isinstance(payload.get("detail"), str)
        except ValueError:
            body_ok = False
        if r.status_code not in allowed or not body_ok or seconds > 2.0 or "Traceback" in r.text or "/tmp" in r.text:
            failures.append(f"{name}: {r.status_code} (want {sorted(allowed)}) in {seconds:.2f}s {r.text[:160]}")
    assert not failures, "\n".join(failures)
    rss_after = _replica_rss_bytes()
    if rss_before:  # the replica's memory grew by less than its decode budget
        assert rss_after - rss_before < LIMITS["memory_budget_bytes"], (rss_before, rss_after)
    assert client.get("/healthz").status_code == 200
    ok = client.post("/v1/segment", content=volume, params={"clicks": json.dumps(_clicks(case))})
    assert ok.status_code == 200 and _read_nifti(ok.content)[0].shape == SHAPE
    # The same volume under the same id is not an overwrite: 200, and the id still segments.
    assert (
        client.put("/datastore/", params={"image": "hostile_case"}, files={"file": ("c.nii.gz", volume)}).status_code
        == 200
    )
    # Duplicated clicks are one click: 512 copies of one voxel cost what one click costs.
    dup = client.post(f"/v1/sessions/{sid}/segment", content=hi.many_clicks_body(512, duplicate=True))
    assert dup.status_code == 200, dup.text
    info = _info(client)
    assert info["counters"]["max_forward_batch"] <= info["batching"]["max_batch_size"]
    assert info["limits"]["memory_budget_bytes"] == LIMITS["memory_budget_bytes"]


#: 8 threads posting the bomb files of a folder, each at most 5 a second (200 each at most), until a
#: stop file appears; prints the statuses as JSON. Paced: the bombers run on the server's own 2 CPUs,
#: where each request costs the client, Ray's proxy and the replica ~10 ms of Python CPU whatever it
#: holds, so back-to-back clients measure the machine: the normal client's p95 was 4.1x unloaded
#: unpaced and 3.5x at 160 bombs/s, the whole box busy with per-request overhead, not with bombs.
_BOMBER = """
import json, os, sys, threading, time, httpx
url, token, sid, folder, stop = sys.argv[1:6]
bombs = [open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder)) if n.endswith(".bin")]
statuses = []
def run(i):
    with httpx.Client(base_url=url, headers={"Authorization": "Bearer " + token}, timeout=60) as b:
        for n in range(200):
            if os.path.exists(stop):
                return
            payload = bombs[(i + n) % len(bombs)]
            path = "/v1/sessions/" + sid + "/segment" if payload[:1] == b"[" else "/v1/segment"
            statuses.append(b.post(path, content=payload).status_code)
            time.sleep(0.2)
threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(statuses))
"""


@pytest.mark.serve
@pytest.mark.slow
def test_mixed_load_bombs_do_not_slow_a_normal_client(service, case, volume):
    """Issue 15: 8 clients sending bombs while a ninth segments through a session: all succeed, p95 <= 3x unloaded."""
    import httpx

    headers = {"Authorization": f"Bearer {TOKEN}"}
    # One of each row, at the size that trips its limit (bandwidth is not what is tested: a 2 MB body
    # costs the shared proxy the same whatever it holds).
    bombs = [
        hi.extension_records_bomb(400_000),
        hi.empty_members_bomb(LIMITS["max_gzip_members"] + 1),
        hi.declared_zeros_bomb(full=False),
        hi.sheared_sform_nifti(),
        b"[" * 100_000,
    ]
    with httpx.Client(base_url=service[0], headers=headers, timeout=60) as c:
        sid = c.post("/v1/sessions", content=volume).json()["session_id"]
        body = json.dumps(_clicks(case)).encode()

        def clicks(n: int) -> list[float]:
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                r = c.post(f"/v1/sessions/{sid}/segment", content=body)
                assert r.status_code == 200, r.text
                out.append(time.perf_counter() - t0)
            return out

        clicks(2)  # warm
        unloaded = clicks(12)
        # The 8 bomb clients run in another process (8 threads, as from one other machine): in this
        # process their threads would hold the GIL the measured client needs, which is no property
        # of the server. They still share the 2 CPUs with the server.
        work = Path(tempfile.mkdtemp(prefix="bombs-"))
        for i, payload in enumerate(bombs):
            (work / f"{i}.bin").write_bytes(payload)
        stop_file = work / "stop"
        bombers = subprocess.Popen(
            [sys.executable, "-c", _BOMBER, service[0], TOKEN, sid, str(work), str(stop_file)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(1.0)
            loaded = clicks(20)
        finally:
            stop_file.touch()
            out, _ = bombers.communicate(timeout=120)
            shutil.rmtree(work, ignore_errors=True)
        statuses = json.loads(out)
    p95 = lambda xs: sorted(xs)[max(0, int(np.ceil(0.95 * len(xs))) - 1)]  # noqa: E731
    assert statuses and all(400 <= s < 500 for s in statuses), sorted(set(statuses))
    assert p95(loaded) <= 3 * p95(unloaded) + 0.05, (p95(loaded), p95(unloaded))


@pytest.mark.serve
def test_python_client(service, case, volume):
    from trainer.serve.client import DeepEditClient

    c = DeepEditClient(service[0], token=TOKEN)
    auto = c.segment(volume)
    assert auto.mask.shape == SHAPE and auto.seconds > 0 and "preprocess" in auto.server_timing
    with c.session(volume) as s:
        r = s.click(_clicks(case))
        assert r.mask.shape == SHAPE and "preprocess" not in r.server_timing
        np.testing.assert_allclose(r.affine, case.affine, atol=1e-4)
    with pytest.raises(RuntimeError, match="404"):
        s.click({})  # deleted on exit
    c.close()


@pytest.mark.serve
def test_loadtest_script_against_the_service(service, volume):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import loadtest

    os.environ.setdefault(TOKEN_ENV, TOKEN)
    s = loadtest.run(
        service[0], volume, requests=8, concurrency=4, mode="session", clicks={"spleen": [[30, 30, 15]]}, token=TOKEN
    )
    assert s["ok"] == 8 and s["errors"] == 0 and s["p50_s"] <= s["p95_s"] <= s["p99_s"] and s["throughput_rps"] > 0


# ----------------------------------------------------------------------------- overload


@pytest.mark.serve
@pytest.mark.slow
def test_overload_gets_503_with_retry_after_and_no_other_5xx(service, ckpts, case):
    import httpx

    from trainer.serve.cli import remove_app, start_local

    # A second application next to the main one, bounded tightly: one request running, one queued.
    base = start_local(
        ckpts[0],
        app_name="tight",
        route_prefix="/tight",
        max_batch_size=1,
        max_ongoing_requests=1,
        max_queued_requests=1,
        retry_after_s=2,
        num_cpus=0.5,
    )
    try:
        body = _nifti(case.image, case.affine)

        def one(_):
            with httpx.Client(timeout=120) as c:
                r = c.post(f"{base}/v1/segment", content=body)
                return r.status_code, r.headers.get("retry-after")

        with cf.ThreadPoolExecutor(max_workers=12) as pool:
            results = list(pool.map(one, range(24)))
        statuses = [s for s, _ in results]
        assert statuses.count(200) >= 1, statuses
        rejected = [(s, ra) for s, ra in results if s == 503]
        assert rejected, f"no request was rejected: {statuses}"
        assert all(ra == "2" for _, ra in rejected)
        assert set(statuses) <= {200, 503}, statuses
        with httpx.Client(timeout=120) as c:  # and it recovers
            assert c.post(f"{base}/v1/segment", content=body).status_code == 200
    finally:
        remove_app("tight")


@pytest.mark.serve
@pytest.mark.slow
def test_timed_out_requests_hold_their_slot_until_their_work_stops(service, ckpts):
    """Issue 15: a request past request_timeout_s gets 503, but its thread is waited for, so no more than
    max_ongoing_requests stage threads ever run at once (before, timed-out threads kept running)."""
    import httpx

    from trainer.serve.cli import remove_app, start_local

    base = start_local(
        ckpts[0],
        app_name="deadline",
        route_prefix="/deadline",
        max_batch_size=1,
        max_ongoing_requests=1,
        max_queued_requests=16,
        request_timeout_s=0.2,
        retry_after_s=3,
        num_cpus=0.5,
    )
    try:
        # Small on the wire (zeros compress), slow to preprocess (3.5 M voxels): requests time out in a stage.
        body = _nifti(np.zeros((192, 192, 96), np.int16))

        def one(_):
            with httpx.Client(timeout=120) as c:
                r = c.post(f"{base}/v1/segment", content=body)
                return r.status_code, r.headers.get("retry-after"), r.text

        with cf.ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(one, range(12)))
        assert {s for s, _, _ in results} <= {200, 503}, results
        timed_out = [(ra, text) for s, ra, text in results if s == 503]
        assert timed_out and all(ra == "3" for ra, _ in timed_out)
        with httpx.Client(timeout=30) as c:
            assert c.get(f"{base}/healthz").status_code == 200
            counters = c.get(f"{base}/v1/info").json()["counters"]
        assert 1 <= counters["stage_threads_peak"] <= 1, counters
    finally:
        remove_app("deadline")


@pytest.mark.serve
@pytest.mark.slow
def test_openapi_surface_fuzzed_with_schemathesis(service):
    """Issue 15: Schemathesis draws requests for every route of the OpenAPI document (which the service
    builds but does not publish): no 5xx, and statuses and JSON bodies match the document. Bounded:
    8 draws per operation, generation only (no stateful links, no shrinking database)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

    import trainer.serve.app  # noqa: F401 - registers the routes on the FastAPI app
    from trainer.serve.ingress import api

    schema = schemathesis.openapi.from_dict(api.openapi())
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=8,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def fuzz(case):
            nonlocal calls
            calls += 1
            response = case.call(base_url=service[0], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
            try:
                case.validate_response(
                    response, checks=[not_a_server_error, status_code_conformance, response_schema_conformance]
                )
            except Exception as exc:  # noqa: BLE001 - collected, reported together below
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {str(exc)[:200]}")

        fuzz()
    assert calls >= 50
    assert not failures, "\n".join(failures[:10])


# ----------------------------------------------------------------------------- model swap


@pytest.mark.serve
@pytest.mark.slow
def test_zero_downtime_swap_via_reconfigure(service, client, ckpts, volume):
    from trainer.serve.cli import swap_checkpoint

    old = _info(client)["model"]["version"]
    assert old.startswith("model_a.pt")
    sid = client.post("/v1/sessions", content=volume).json()["session_id"]
    stop = threading.Event()
    results: list[tuple[int, str]] = []

    def traffic():
        import httpx

        with httpx.Client(base_url=service[0], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
            while not stop.is_set() and len(results) < 200:  # bounded
                r = c.post(f"/v1/sessions/{sid}/segment", json={"spleen": [], "background": []})
                results.append((r.status_code, r.headers.get("x-model-version", "")))

    workers = [threading.Thread(target=traffic) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        time.sleep(1.0)
        # Only the deployment's user_config changes (as in a RayService serveConfigV2 edit): Serve
        # calls reconfigure on the live replica, which loads the new weights and swaps them in.
        # Checkpoint b comes from S3 (SeaweedFS on loopback) when it is installed.
        swap_checkpoint(service[3] or ckpts[1])
        time.sleep(1.0)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=120)
    model = _info(client)["model"]
    assert model["version"].startswith("model_b.pt")
    assert model["checkpoint_source"] == ("s3" if service[3] else "local")
    statuses = [s for s, _ in results]
    assert statuses and set(statuses) == {200}, statuses
    versions = [v for _, v in results]
    assert versions[0].startswith("model_a.pt") and any(v.startswith("model_b.pt") for v in versions)
    # The cached session survived the swap (same profile): no re-upload needed.
    assert client.post(f"/v1/sessions/{sid}/segment", json={}).headers["x-model-version"].startswith("model_b.pt")
    # A checkpoint that fails to load is reported, and the old model keeps serving.
    with pytest.raises(RuntimeError, match="missing.pt"):
        swap_checkpoint(os.path.join(os.path.dirname(ckpts[1]), "missing.pt"), timeout_s=60)
    info = _info(client)
    assert info["model"]["version"].startswith("model_b.pt") and "does not exist" in info["last_reload_error"]["error"]
    assert "/" not in info["last_reload_error"]["checkpoint"]
    import httpx

    ready = httpx.get(f"{service[0]}/readyz", timeout=10).text  # unauthenticated: no paths, URIs or endpoints
    assert (
        "missing.pt" in ready and "/tmp" not in ready and os.path.dirname(ckpts[1]) not in ready and "://" not in ready
    )
    assert client.post(f"/v1/sessions/{sid}/segment", json={}).status_code == 200


# ----------------------------------------------------------------------------- Prometheus


def _prom_query(base: str, expr: str) -> list:
    import httpx

    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


@pytest.mark.serve
@pytest.mark.slow
def test_prometheus_scrapes_our_metrics_and_ray_serve_metrics(service, client, volume, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the 'prometheus' binary is not installed (Debian: apt-get install prometheus)")
    metrics_port = service[1]
    prom_port = _free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: ray\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{prom_port}"
    try:
        queries = (
            'sum(ray_deepedit_requests_total{endpoint="/auth/",method="GET",status="200"})',
            'sum(ray_deepedit_request_latency_seconds_count{endpoint="/auth/"})',
        )

        def values() -> list[float]:
            return [float(r[0]["value"][1]) if r else 0.0 for r in (_prom_query(base, q) for q in queries)]

        deadline = time.monotonic() + 60
        while True:  # wait for the first scrape of Ray's metrics agent
            try:
                if _prom_query(base, 'up{job="ray"} == 1'):
                    break
            except Exception:  # noqa: BLE001 - Prometheus still starting
                pass
            assert time.monotonic() < deadline, "Prometheus never scraped Ray's metrics port"
            time.sleep(0.5)
        before = values()  # earlier tests' /auth/ calls: wait until they are all flushed and scraped
        while True:
            time.sleep(2.5)
            again = values()
            if again == before:
                break
            before = again
        assert client.post("/v1/segment", content=volume).status_code == 200  # stage, batch, voxel metrics
        n = 7
        for _ in range(n):
            assert client.get("/auth/").status_code == 200
        want = [b + n for b in before]
        got = values()
        while got != want and time.monotonic() < deadline + 30:
            time.sleep(1)
            got = values()
        assert got == want, f"counter and histogram count {got}, expected {want}"
        series = _prom_query(base, 'ray_deepedit_requests_total{endpoint="/auth/"}')
        assert {"deployment", "replica", "application"} <= set(series[0]["metric"])
        assert _prom_query(base, 'ray_deepedit_request_latency_seconds_bucket{endpoint="/auth/",le="+Inf"}')
        assert _prom_query(base, 'ray_deepedit_stage_latency_seconds_count{stage="forward"} > 0')
        for name in (
            "ray_deepedit_stage_latency_seconds_count",
            "ray_deepedit_input_voxels_count",
            "ray_deepedit_batch_size_count",
            "ray_deepedit_model_info",
            "ray_serve_num_http_requests_total",
            "ray_serve_deployment_processing_latency_ms_bucket",
            "ray_serve_deployment_request_counter_total",
        ):
            # Ray's own serve metrics reach its metrics agent on Ray's export cadence, not per request:
            # poll (bounded) rather than expect them in the same scrape as ours.
            late = time.monotonic() + 30
            while not (found := _prom_query(base, name)) and time.monotonic() < late:
                time.sleep(1)
            assert found, f"{name} not scraped within 30 s"
    finally:
        stop_process(proc, timeout_s=20)
