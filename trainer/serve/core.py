"""The service core shared by the native and MONAI Label routes: model holder and pipeline stages.

Every request runs decode -> preprocess -> clicks -> forward -> postprocess -> encode, the same code as
`spleen-deepedit infer` (the one `Predictor`). CPU-heavy stages (and click parsing and validation) run
in worker threads so the event loop keeps accepting requests and filling batches; the forward pass of
concurrent requests is batched with `@serve.batch`, never more than `max_batch_size` volumes at once.
A request takes the predictor reference once at its start, so a model swap in `reconfigure` never
mixes two models inside one request.

Bounded cost: the upload's header is read first (`codecs.read_header`), which prices decode +
preprocess (`NiftiPlan.work_bytes`); the request then reserves that many bytes of the replica's
`MemoryBudget` (waiting up to `admission_wait_s`, else 503 + Retry-After) and holds them until its
volume is preprocessed. A request past `request_timeout_s` stops at the next stage boundary: the
stage running in a thread is waited for (`finish_work`), so the request's concurrency slot is not
given to another request while its work still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from typing import Any

import numpy as np
from ray import serve

from . import ingress, series
from .budget import MemoryBudget as MemoryBudget
from .budget import memory_limit_bytes
from .codecs import NiftiPlan, VolumeLimits, decode_volume, encode_mask, read_header
from .errors import ApiError, scrub
from .inputs import check_clicks
from .metrics import create_metrics
from .sessions import SessionStore
from .settings import ServeArgs, read_token_file, serve_default

log = logging.getLogger("trainer.serve")
#: The batching defaults of ServeArgs (their one home), for the `@serve.batch` decorator below.
_SERVE_DEFAULTS = {name: serve_default(name) for name in ("max_batch_size", "batch_wait_timeout_s")}


def load_predictor(
    uri: str, profile: str | None, device: str | None, click_radius: float | None = None, refine: bool | None = None
):
    """The one `Predictor`, its version suffixed with a digest of the file (a retrained `best.pt` differs)."""
    import torch

    from trainer.predictor import Predictor

    return Predictor.from_checkpoint(
        uri,
        profile=profile,
        device=torch.device(device) if device else None,
        click_radius=click_radius,
        digest=True,
        refine=refine,
    )


def redact(uri: str | None) -> str | None:
    """Only the file name of a checkpoint URI: bucket layout and local paths stay private."""
    return None if uri is None else str(uri).rstrip("/").rsplit("/", 1)[-1]


async def finish_work(awaitable):
    """Await `awaitable`; if the caller is cancelled (deadline, disconnect), first let the work finish.

    A thread cannot be stopped, so a timed-out request waits here for its running stage and only then
    propagates the cancellation: the request (and its Serve concurrency slot) ends when its work has
    stopped, and the next stage never starts.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError:
                continue
        if not task.cancelled():
            task.exception()  # retrieved: the request is answered with the timeout, not this
        raise


class WorkGauge:
    """Stage threads running in this replica now, and the most ever at once (`/v1/info` counters).

    With `finish_work`, a request runs at most one stage thread at a time and ends only after it, so
    the peak stays at most `max_ongoing_requests` even when requests time out (the tests check it).
    """

    def __init__(self):
        self.now = 0
        self.peak = 0
        self._lock = threading.Lock()

    def wrap(self, fn):
        def counted(*args, **kwargs):
            with self._lock:
                self.now += 1
                self.peak = max(self.peak, self.now)
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.now -= 1

        return counted


WORK = WorkGauge()


def _upload_digest(data) -> str:
    """What an upload holds: its bytes, or its (name, bytes) files (a multipart DICOM series)."""
    h = hashlib.blake2b(digest_size=16)
    for name, blob in [("", data)] if isinstance(data, (bytes, bytearray)) else sorted(data):
        h.update(len(name).to_bytes(8, "little") + name.encode() + len(blob).to_bytes(8, "little"))
        h.update(blob)
    return h.hexdigest()


async def in_thread(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a worker thread, counted by `WORK`, waited for even if the request is cancelled."""
    return await finish_work(asyncio.to_thread(WORK.wrap(fn), *args, **kwargs))


class Stopwatch:
    """Collects stage durations for the `Server-Timing` header and the stage histogram."""

    def __init__(self, metrics):
        self.timings: dict[str, float] = {}
        self._metrics = metrics

    def add(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        if self._metrics is not None:
            self._metrics.stage_latency.observe(seconds, tags={"stage": stage})

    async def run(self, stage: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return await in_thread(fn, *args, **kwargs)
        finally:
            self.add(stage, time.perf_counter() - t0)


class ServiceCore:
    """Model, cache and stages; the deployment class adds the routes (FastAPI ingress)."""

    def __init__(self, settings: ServeArgs):
        self.settings = settings
        self.limits = VolumeLimits(
            max_voxels=settings.max_voxels,
            max_dim=settings.max_dim,
            max_volume_bytes=settings.max_volume_bytes,
            max_extension_bytes=settings.max_extension_bytes,
            max_gzip_members=settings.max_gzip_members,
        )
        self.store = SessionStore(
            settings.session_ttl_s,
            settings.session_max_bytes,
            caller_max_entries=settings.caller_max_sessions,
            caller_max_bytes=int(settings.session_max_bytes * settings.caller_max_share),
        )
        budget = settings.memory_budget_bytes or memory_limit_bytes() // 2
        self.budget = MemoryBudget(budget, settings.admission_wait_s, settings.retry_after_s)
        self.metrics = create_metrics()
        self.predictor = None
        self.checkpoint_uri: str | None = None
        self.reload_error: dict[str, str] | None = None
        self.counters = {"preprocess": 0, "forward": 0, "window": 0, "forward_batches": 0, "max_forward_batch": 0}
        self._swap_lock = asyncio.Lock()
        self._forward_batch.set_max_batch_size(settings.max_batch_size)
        self._forward_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        tokens = ingress.TokenSource(
            settings.auth_token(), settings.auth_token_file, read_token_file if settings.auth_token_file else None
        )
        if tokens.get() is None:
            log.warning(
                "authentication is OFF: every client that reaches this replica can use it "
                "(set auth_token_file or auth_token_env; see docs/serving.md, Security)"
            )
        ingress.configure(
            tokens=tokens,
            max_upload_bytes=settings.max_upload_bytes,
            cors_origins=settings.cors_origins,
            metrics=self.metrics,
            max_json_bytes=settings.max_json_bytes,
            auth_rate_per_min=settings.auth_token_rate_per_min,
        )

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
                predictor = await asyncio.to_thread(
                    load_predictor, uri, profile, self.settings.device, self.settings.click_radius, self.settings.refine
                )
            except Exception as exc:
                if self.predictor is None:
                    raise
                log.error("keeping %s: loading %s failed: %s", self.predictor.version, uri, exc)
                # Clients see no paths, URIs or endpoints (the log above keeps them).
                self.reload_error = {"checkpoint": redact(uri), "error": scrub(f"{type(exc).__name__}: {exc}")[:300]}
                return
            self.predictor, self.checkpoint_uri, self.reload_error = predictor, uri, None
            self.metrics.set_model(predictor.version, predictor.profile.name)
            log.info("loaded %s (%s) in %.2fs", redact(uri), predictor.version, time.perf_counter() - t0)

    def check_health(self) -> None:
        if self.predictor is None:
            raise RuntimeError("no model loaded")

    def current(self):
        if self.predictor is None:
            raise ApiError(
                503, "not_ready", "the model is not loaded yet", {"Retry-After": str(self.settings.retry_after_s)}
            )
        return self.predictor

    @contextlib.asynccontextmanager
    async def deadline(self):
        """The per-request timeout: 503 + Retry-After when a request runs too long (usually a full queue)."""
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                yield
        except TimeoutError:
            raise ApiError(
                503,
                "timeout",
                f"the request took longer than {self.settings.request_timeout_s}s; retry later",
                {"Retry-After": str(self.settings.retry_after_s)},
            ) from None

    # ------------------------------------------------------------------ stages

    async def load(self, predictor, data, watch: Stopwatch, clicks: Any = None):
        """Upload -> Prepared (see `load_upload`; the series headers of a DICOM upload are dropped)."""
        prepared, _ = await self.load_upload(predictor, data, watch, clicks)
        return prepared

    async def load_upload(self, predictor, data, watch: Stopwatch, clicks: Any = None):
        """Upload -> (Prepared, SeriesMeta or None): header checked and priced, memory reserved, decoded,
        preprocessed. `data` is NIfTI bytes, a zip or DICOM file's bytes, or (name, bytes) DICOM files.

        `clicks`, if given, are checked against the declared shape before any voxel is decoded.
        """
        if series.is_series_upload(data):
            scan = await watch.run("decode", series.scan_upload, data, self.limits)
            shape, nbytes = scan.shape, series.work_bytes(scan)
        else:
            plan: NiftiPlan = await watch.run("decode", read_header, data, self.limits)
            shape, nbytes = plan.shape, plan.work_bytes
        if clicks is not None:
            await in_thread(self.check_clicks, clicks, shape)
        async with self.budget.reserve(nbytes):
            meta = None
            if series.is_series_upload(data):
                image, affine, meta = await watch.run("decode", series.decode_upload, scan)
            else:
                image, affine = await watch.run("decode", decode_volume, data, plan, self.limits)
            self.metrics.input_voxels.observe(float(image.size))
            return await self.prepare(predictor, image, affine, watch), meta

    async def prepare(self, predictor, image: np.ndarray, affine: np.ndarray, watch: Stopwatch):
        from trainer.data import DataError

        try:
            prepared = await watch.run("preprocess", predictor.preprocess, image, affine)
        except (DataError, ValueError) as exc:  # nibabel's OrientationError is a ValueError
            raise ApiError(422, "bad_volume", scrub(str(exc))[:300]) from None
        self.counters["preprocess"] += 1
        return prepared

    async def parse(self, text: str | bytes | None, what: str) -> Any:
        """Bounded JSON parsing (`inputs.parse_json`), in a worker thread."""
        return await in_thread(ingress.parse_json, text, what)

    def check_clicks(self, clicks: Any, shape: tuple[int, int, int]):
        return check_clicks(clicks, shape, self.settings.max_clicks_per_label)

    def _map_clicks(self, predictor, prepared, clicks: Any):
        checked = self.check_clicks(clicks, prepared.orig_shape)
        return checked, predictor.map_clicks(checked, prepared), predictor.grid_points(checked, prepared)

    async def segment(self, predictor, prepared, clicks: Any, watch: Stopwatch) -> np.ndarray:
        """Validated clicks -> uint8 mask in the original array order (validation off the event loop).

        `Server-Timing` shows `forward` (the whole-scan pass: cached for a session's clicks when the
        model refines) and `window` (refinement's click-centred pass) apart."""
        checked, net_clicks, exact = await in_thread(self._map_clicks, predictor, prepared, clicks)
        t0 = time.perf_counter()
        prob, window, window_s = await finish_work(
            self._forward_batch(predictor, prepared, (net_clicks, checked), exact)
        )
        watch.add("forward", time.perf_counter() - t0 - window_s)
        if window:
            watch.add("window", window_s)
        return await watch.run("postprocess", predictor.postprocess, prob, prepared, window, forwarded=True)

    async def encode_seg(self, mask: np.ndarray, meta, version: str, watch: Stopwatch) -> bytes:
        """The DICOM SEG of `mask` referencing the uploaded series (`meta`); 400 if the input was not DICOM."""
        if meta is None:
            raise series.seg_needs_series()
        return await watch.run("encode", series.seg_body, mask, meta, version)

    async def encode(self, mask: np.ndarray, affine: np.ndarray, extension: str, dtype: str, watch: Stopwatch) -> bytes:
        return await watch.run("encode", encode_mask, mask, affine, extension, dtype)

    # Placeholders: __init__ sets both from the ServeArgs in use (set_max_batch_size / set_batch_wait_timeout_s).
    @serve.batch(
        max_batch_size=_SERVE_DEFAULTS["max_batch_size"], batch_wait_timeout_s=_SERVE_DEFAULTS["batch_wait_timeout_s"]
    )
    async def _forward_batch(self, predictors: list, prepared: list, clicks: list, exact: list) -> list:
        """Concurrent requests' forwards as one batch (grouped by model, should a swap split them).

        `clicks`: per request (grid clicks, validated original clicks). Per request: (whole-scan
        probability, refinement window answers (a list, empty without), the seconds of the batch's window pass)."""
        net_clicks = [c[0] for c in clicks]
        self.metrics.batch_size.observe(len(prepared))
        self.counters["forward_batches"] += 1
        self.counters["forward"] += len(prepared)
        out: list = [None] * len(prepared)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(predictors):
            groups.setdefault(id(p), []).append(i)
        limit = self.settings.max_batch_size  # one forward never holds more volumes than this
        for group in groups.values():
            for start in range(0, len(group), limit):
                idx = group[start : start + limit]
                pred = predictors[idx[0]]
                prob = await asyncio.to_thread(
                    WORK.wrap(pred.forward),
                    [prepared[i] for i in idx],
                    [net_clicks[i] for i in idx],
                    [exact[i] for i in idx],
                )
                t0, ran = time.perf_counter(), getattr(pred, "window_forwards", 0)
                windows = await asyncio.to_thread(
                    WORK.wrap(pred.windows), [prepared[i] for i in idx], [clicks[i][1] for i in idx]
                )
                window_s = time.perf_counter() - t0
                self.counters["max_forward_batch"] = max(self.counters["max_forward_batch"], len(idx))
                self.counters["window"] += getattr(pred, "window_forwards", 0) - ran
                for j, i in enumerate(idx):
                    out[i] = (prob[j], windows[j], window_s)
        return out

    # ------------------------------------------------------------------ sessions

    async def open_session(
        self, data: bytes | list[tuple[str, bytes]], watch: Stopwatch, image_id: str | None = None, owner: str = "anon"
    ) -> tuple[str, dict]:
        """Upload -> cached Prepared; returns (session id or image id, info).

        Datastore images are scoped to `owner`; an id that holds another volume is refused (409)
        before the upload is decoded.
        """
        predictor = self.current()
        digest = None
        if image_id is not None:
            digest = await in_thread(_upload_digest, data)
            self.store.check_image_free(image_id, owner, digest)
        prepared, meta = await self.load_upload(predictor, data, watch)
        info = {
            "shape": list(prepared.orig_shape),
            "profile": predictor.profile.name,
            "model_version": predictor.version,
        }
        # Charge what the entry will hold: the automatic pass a session caches (as big as the
        # network-grid image) is added after its first segmentation.
        nbytes = prepared.nbytes + (
            prepared.image.element_size() * prepared.image.nelement() if prepared.auto_prob is None else 0
        )
        if meta is not None:  # a series keeps its slice headers, for a DICOM SEG reply
            nbytes += series.meta_bytes(meta)
            info["input"] = "dicom"
        extra = {series.META_KEY: meta} if meta is not None else None
        if image_id is None:
            key = self.store.create(prepared, nbytes, info, owner, extra=extra)
        else:
            self.store.put_image(image_id, prepared, nbytes, info, owner, digest, extra=extra)
            key = image_id
        self.update_gauges()
        return key, info

    def cached(self, entry, predictor):
        """A session's Prepared, if it was made for the loaded profile (else 404: upload again)."""
        if entry.info["profile"] != predictor.profile.name:
            raise ApiError(
                404, "unknown_session", "the session was prepared for another model profile: upload the volume again"
            )
        if predictor.refine and entry.value.fine is None:  # a model that refines needs the fine volume
            raise ApiError(
                404,
                "unknown_session",
                "the session was prepared for a model without refinement: upload the volume again",
            )
        return entry.value

    def counters_view(self) -> dict[str, int]:
        """Stage counters plus the peak of concurrently running stage threads (read here, in this
        module: the deployment class is serialized by value, so its module globals are copies)."""
        return {**self.counters, "stage_threads_peak": WORK.peak}

    def update_gauges(self) -> None:
        stats = self.store.stats()
        self.metrics.live_sessions.set(stats["sessions"])
        self.metrics.cache_bytes.set(stats["bytes"])

    def session_view(self, session_id: str, entry) -> dict:
        return {
            "session_id": session_id,
            **entry.info,
            "segmentations": entry.extra.get("segmentations", 0),
            "preprocessed": 1,
            "expires_in_s": round(self.store.expires_in(entry), 1),
        }

    def retry_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)}
