"""A small Python client of the native API (the README demo, benchmarks and scripts use it).

from trainer.serve.client import DeepEditClient
c = DeepEditClient("http://127.0.0.1:8000")
auto = c.segment("ct.nii.gz")                              # automatic
with c.session("ct.nii.gz") as s:                          # upload once
    r = s.click({"spleen": [[140, 210, 28]], "background": []})   # one forward per click
print(r.mask.shape, r.server_timing, r.seconds)
"""

from __future__ import annotations

import gzip
import json
import os
import time
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class MaskResult:
    mask: np.ndarray  # uint8, original array order
    affine: np.ndarray
    server_timing: dict[str, float]  # stage -> seconds, from the Server-Timing header
    seconds: float  # client-side round trip
    model_version: str


def _read(volume: str | os.PathLike | bytes) -> bytes:
    if isinstance(volume, bytes):
        return volume
    with open(volume, "rb") as f:
        return f.read()


def _mask(response, t0: float) -> MaskResult:
    import nibabel as nib

    from .ingress import parse_server_timing

    if response.status_code != 200:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text[:300]}"
        )
    raw = gzip.decompress(response.content) if response.content[:2] == b"\x1f\x8b" else response.content
    img = nib.Nifti1Image.from_bytes(raw)
    return MaskResult(
        mask=np.asarray(img.dataobj),
        affine=img.affine,
        server_timing=parse_server_timing(response.headers.get("server-timing", "")),
        seconds=time.perf_counter() - t0,
        model_version=response.headers.get("x-model-version", ""),
    )


class DeepEditClient:
    """Args: base URL; bearer token (or None); request timeout in seconds."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 300.0):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def info(self) -> dict:
        r = self.http.get("/v1/info")
        r.raise_for_status()
        return r.json()

    def segment(self, volume: str | os.PathLike | bytes, clicks: dict | None = None) -> MaskResult:
        """One request: upload + (clicks) -> mask."""
        params = {"clicks": json.dumps(clicks)} if clicks else None
        t0 = time.perf_counter()
        return _mask(self.http.post("/v1/segment", content=_read(volume), params=params), t0)

    def session(self, volume: str | os.PathLike | bytes) -> Session:
        r = self.http.post("/v1/sessions", content=_read(volume))
        if r.status_code != 201:
            raise RuntimeError(f"POST /v1/sessions: {r.status_code} {r.text[:300]}")
        return Session(self, r.json()["session_id"])

    def close(self) -> None:
        self.http.close()


class Session:
    """An uploaded volume on the server; each `click` costs one forward pass. Deleted on exit."""

    def __init__(self, client: DeepEditClient, session_id: str):
        self.client, self.id = client, session_id

    def click(self, clicks: dict | None = None) -> MaskResult:
        t0 = time.perf_counter()
        return _mask(self.client.http.post(f"/v1/sessions/{self.id}/segment", json=clicks or {}), t0)

    def close(self) -> None:
        self.client.http.delete(f"/v1/sessions/{self.id}")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
