"""The service core shared by the native and MONAI Label routes: model holder and pipeline stages.

Every request runs decode -> preprocess -> clicks -> forward -> postprocess -> encode, the same code as
`spleen-deepedit infer` (the one `Predictor`). CPU-heavy stages run in worker threads so the event loop
keeps accepting requests and filling batches; the forward pass of concurrent requests is batched with
`@serve.batch`. A request takes the predictor reference once at its start, so a model swap in
`reconfigure` never mixes two models inside one request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import numpy as np
from ray import serve

from .codecs import VolumeLimits, decode_nifti, encode_mask
from .errors import ApiError
from .metrics import create_metrics
from .sessions import SessionStore
from .settings import ServeArgs
from . import ingress

log = logging.getLogger("trainer.serve")


def resolve_checkpoint(uri: str) -> str:
    """A local path for a checkpoint URI: `s3://` objects are downloaded through `trainer.storage`."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if uri.startswith("s3://"):
        from trainer import storage  # lazy: boto3 is needed only for s3://

        return storage.fetch(uri)  # cached under the object's key, so the version keeps its name
    return uri


def load_predictor(uri: str, profile: str | None, device: str | None, click_radius: float | None = None):
    """The one `Predictor`, its version suffixed with a digest of the file (a retrained `best.pt` differs)."""
    import hashlib

    import torch

    from trainer.predictor import Predictor

    path = resolve_checkpoint(uri)
    predictor = Predictor.from_checkpoint(path, profile=profile, device=torch.device(device) if device else None,
                                          click_radius=click_radius)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    predictor.version = f"{predictor.version}+{h.hexdigest()[:10]}"
    return predictor


def redact(uri: str | None) -> str | None:
    """Only the file name of a checkpoint URI: bucket layout and local paths stay private."""
    return None if uri is None else str(uri).rstrip("/").rsplit("/", 1)[-1]


class Stopwatch:
    """Collects stage durations for the `Server-Timing` header and the stage histogram."""

    def __init__(self, metrics):
        self.timings: dict[str, float] = {}
        self._metrics = metrics

    def add(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        if self._metrics is not None:
            self._metrics.stage_latency.observe(seconds, tags={"stage": stage})

    async def run(self, stage: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            self.add(stage, time.perf_counter() - t0)


class ServiceCore:
    """Model, cache and stages; the deployment class adds the routes (FastAPI ingress)."""

    def __init__(self, settings: ServeArgs):
        self.settings = settings
        self.limits = VolumeLimits(max_voxels=settings.max_voxels, max_dim=settings.max_dim)
        self.store = SessionStore(settings.session_ttl_s, settings.session_max_bytes)
        self.metrics = create_metrics()
        self.predictor = None
        self.checkpoint_uri: str | None = None
        self.reload_error: dict[str, str] | None = None
        self.counters = {"preprocess": 0, "forward": 0, "forward_batches": 0}
        self._swap_lock = asyncio.Lock()
        self._forward_batch.set_max_batch_size(settings.max_batch_size)
        self._forward_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        ingress.configure(token=settings.auth_token(), max_upload_bytes=settings.max_upload_bytes,
                       cors_origins=settings.cors_origins, metrics=self.metrics)

    # ------------------------------------------------------------------ model lifecycle

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the checkpoint named in `user_config` in a thread, then swap the reference atomically.

        Requests keep running on the old model while the new one loads. The first load must succeed
        (an exception fails the replica's start). A later load that fails is logged and reported in
        `/readyz` and `/v1/info` as `last_reload_error`, and the old model keeps serving: raising here
        would make Serve replace the replica, dropping the model and the sessions.
        """
        uri = (user_config or {}).get("checkpoint")
        profile = (user_config or {}).get("profile", self.settings.profile)
        async with self._swap_lock:
            t0 = time.perf_counter()
            try:
                if not isinstance(uri, str) or not uri:
                    raise ValueError("user_config must hold 'checkpoint': a local path or s3:// URI")
                predictor = await asyncio.to_thread(load_predictor, uri, profile, self.settings.device,
                                                   self.settings.click_radius)
            except Exception as exc:
                if self.predictor is None:
                    raise
                log.error("keeping %s: loading %s failed: %s", self.predictor.version, uri, exc)
                self.reload_error = {"checkpoint": redact(uri), "error": f"{type(exc).__name__}: {exc}"}
                return
            self.predictor, self.checkpoint_uri, self.reload_error = predictor, uri, None
            self.metrics.set_model(predictor.version, predictor.profile.name)
            log.info("loaded %s (%s) in %.2fs", redact(uri), predictor.version, time.perf_counter() - t0)

    def check_health(self) -> None:
        if self.predictor is None:
            raise RuntimeError("no model loaded")

    def current(self):
        if self.predictor is None:
            raise ApiError(503, "not_ready", "the model is not loaded yet", {"Retry-After": str(self.settings.retry_after_s)})
        return self.predictor

    @contextlib.asynccontextmanager
    async def deadline(self):
        """The per-request timeout: 503 + Retry-After when a request runs too long (usually a full queue)."""
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                yield
        except TimeoutError:
            raise ApiError(503, "timeout", f"the request took longer than {self.settings.request_timeout_s}s; retry later",
                           {"Retry-After": str(self.settings.retry_after_s)}) from None

    # ------------------------------------------------------------------ stages

    async def decode(self, data: bytes, watch: Stopwatch) -> tuple[np.ndarray, np.ndarray]:
        image, affine = await watch.run("decode", decode_nifti, data, self.limits)
        self.metrics.input_voxels.observe(float(image.size))
        return image, affine

    async def prepare(self, predictor, image: np.ndarray, affine: np.ndarray, watch: Stopwatch):
        from trainer.data import DataError

        try:
            prepared = await watch.run("preprocess", predictor.preprocess, image, affine)
        except DataError as exc:
            raise ApiError(422, "bad_volume", str(exc)) from None
        self.counters["preprocess"] += 1
        return prepared

    def check_clicks(self, clicks: Any, shape: tuple[int, int, int]):
        from trainer.predictor import ClickError, validate_clicks

        try:
            return validate_clicks(clicks, shape)
        except ClickError as exc:
            raise ApiError(400, "bad_clicks", str(exc)) from None

    async def segment(self, predictor, prepared, clicks: Any, watch: Stopwatch) -> np.ndarray:
        """Validated clicks -> uint8 mask in the original array order."""
        checked = self.check_clicks(clicks, prepared.orig_shape)
        net_clicks = predictor.map_clicks(checked, prepared)
        exact = predictor.grid_points(checked, prepared)
        t0 = time.perf_counter()
        prob = await self._forward_batch(predictor, prepared, net_clicks, exact)
        watch.add("forward", time.perf_counter() - t0)
        return await watch.run("postprocess", predictor.postprocess, prob, prepared)

    async def encode(self, mask: np.ndarray, affine: np.ndarray, extension: str, dtype: str, watch: Stopwatch) -> bytes:
        return await watch.run("encode", encode_mask, mask, affine, extension, dtype)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _forward_batch(self, predictors: list, prepared: list, net_clicks: list, exact: list) -> list:
        """Concurrent requests' forwards as one batch (grouped by model, should a swap split them)."""
        self.metrics.batch_size.observe(len(prepared))
        self.counters["forward_batches"] += 1
        self.counters["forward"] += len(prepared)
        out: list = [None] * len(prepared)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(predictors):
            groups.setdefault(id(p), []).append(i)
        for idx in groups.values():
            pred = predictors[idx[0]]
            prob = await asyncio.to_thread(pred.forward, [prepared[i] for i in idx], [net_clicks[i] for i in idx],
                                           [exact[i] for i in idx])
            for j, i in enumerate(idx):
                out[i] = prob[j]
        return out

    # ------------------------------------------------------------------ sessions

    async def open_session(self, data: bytes, watch: Stopwatch, image_id: str | None = None) -> tuple[str, dict]:
        """Upload -> cached Prepared; returns (session id or image id, info)."""
        predictor = self.current()
        image, affine = await self.decode(data, watch)
        prepared = await self.prepare(predictor, image, affine, watch)
        info = {"shape": list(prepared.orig_shape), "profile": predictor.profile.name, "model_version": predictor.version}
        if image_id is None:
            key = self.store.create(prepared, prepared.nbytes, info)
        else:
            self.store.put_image(image_id, prepared, prepared.nbytes, info)
            key = image_id
        self.update_gauges()
        return key, info

    def cached(self, entry, predictor):
        """A session's Prepared, if it was made for the loaded profile (else 404: upload again)."""
        if entry.info["profile"] != predictor.profile.name:
            raise ApiError(404, "unknown_session", "the session was prepared for another model profile: upload the volume again")
        return entry.value

    def update_gauges(self) -> None:
        stats = self.store.stats()
        self.metrics.live_sessions.set(stats["sessions"])
        self.metrics.cache_bytes.set(stats["bytes"])

    def session_view(self, session_id: str, entry) -> dict:
        return {"session_id": session_id, **entry.info, "segmentations": entry.extra.get("segmentations", 0),
                "preprocessed": 1, "expires_in_s": round(self.store.expires_in(entry), 1)}

    def retry_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)}
