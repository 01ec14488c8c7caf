"""The Ray Serve application: one deployment with a FastAPI ingress, built by a typed builder.

    serve run trainer.serve.app:build_app checkpoint=runs/x/checkpoints/best.pt

or, in a KubeRay RayService `serveConfigV2`:

    applications:
      - name: deepedit
        import_path: trainer.serve.app:build_app
        route_prefix: /
        args: {checkpoint: s3://bucket/run/best.pt, num_gpus: 1, auth_token_env: DEEPEDIT_TOKEN}
        deployments:   # edit only this to swap models in place (reconfigure), see docs/serving.md
          - {name: DeepEdit, user_config: {checkpoint: s3://bucket/run/best_v2.pt}}

Native API (this file): `POST /v1/segment`, `POST /v1/sessions`, `GET|DELETE /v1/sessions/{id}`,
`POST /v1/sessions/{id}/segment`, `GET /healthz`, `GET /readyz`, `GET /v1/info`. MONAI Label routes
for 3D Slicer are in `monailabel.py`. Errors are JSON `{"error", "detail"}` (see `errors.py`).
"""

from typing import Any

import torch
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from .core import ServiceCore, Stopwatch, redact
from .errors import ApiError
from .ingress import MAX_FORM_FILES, api, caller_id, form_upload, is_multipart, read_form, server_timing
from .monailabel import MonaiLabelRoutes
from .series import DICOM_MEDIA_TYPE, META_KEY, is_series_upload, seg_needs_series
from .settings import ServeArgs

#: `format` query values of the native API -> file extension.
FORMATS = {"nii.gz": ".nii.gz", "nii": ".nii", "nrrd": ".nrrd", "dcm": ".dcm"}
#: The format that answers with a DICOM SEG (DICOM series uploads only).
SEG_FORMAT = "dcm"


def _extension(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ApiError(400, "bad_format", f"format {fmt!r} is not supported: use one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def _mask_response(body: bytes, extension: str, watch: Stopwatch, version: str, status: int = 200) -> Response:
    return Response(
        content=body,
        status_code=status,
        media_type=DICOM_MEDIA_TYPE if extension == ".dcm" else "application/octet-stream",
        headers={
            "Server-Timing": server_timing(watch.timings),
            "X-Model-Version": version,
            "Content-Disposition": f'attachment; filename="mask{extension}"',
        },
    )


# NOTE: `@serve.deployment` serializes this class when the module is imported, so everything its
# methods use must be defined above it, and annotations must be real objects (no postponed
# evaluation), or FastAPI cannot resolve `Request` in the replica.
@serve.deployment(name="DeepEdit")
@serve.ingress(api)
class DeepEditService(MonaiLabelRoutes, ServiceCore):
    """DeepEdit spleen segmentation over HTTP (one replica; see `build_app` for its options)."""

    def __init__(self, settings: dict[str, Any]):
        # The checkpoint is not an init argument: it lives in user_config (see `reconfigure`), so
        # changing it swaps the model in place instead of restarting the replica.
        ServiceCore.__init__(self, ServeArgs(checkpoint="(user_config)", **settings))

    # ------------------------------------------------------------------ health and facts

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        if self.predictor is None:
            return JSONResponse(
                {"error": "not_ready", "detail": "the model is not loaded yet"},
                status_code=503,
                headers=self.retry_headers(),
            )
        return JSONResponse(
            {"status": "ready", "model_version": self.predictor.version, "last_reload_error": self.reload_error}
        )

    @api.get("/v1/info")
    async def info(self) -> dict:
        p = self.current()
        s = self.settings
        return {
            "name": "spleen-deepedit",
            "description": "DeepEdit interactive spleen segmentation from CT (clicks are original voxel indices)",
            "model": {
                "version": p.version,
                "profile": p.profile.name,
                "spatial_size": list(p.profile.spatial_size),
                "labels": {"background": 0, "spleen": 1},
                "click_labels": ["spleen", "background"],
                "click_radius": p.click_radius,
                "refine": p.refine,
                "upsample": p.profile.upsample,
                "device": str(p.device),
                "checkpoint": redact(self.checkpoint_uri),
                "checkpoint_source": "s3" if (self.checkpoint_uri or "").startswith("s3://") else "local",
                "torch_threads": torch.get_num_threads(),
            },
            "limits": {
                "max_upload_bytes": s.max_upload_bytes,
                "max_voxels": s.max_voxels,
                "max_dim": s.max_dim,
                "max_volume_bytes": s.max_volume_bytes,
                "max_extension_bytes": s.max_extension_bytes,
                "max_gzip_members": s.max_gzip_members,
                "max_json_bytes": s.max_json_bytes,
                "max_clicks_per_label": s.max_clicks_per_label,
                "memory_budget_bytes": self.budget.capacity,
                "request_timeout_s": s.request_timeout_s,
            },
            "batching": {"max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s},
            "sessions": {**self.store.stats(), "ttl_s": s.session_ttl_s, "max_bytes": s.session_max_bytes},
            "counters": self.counters_view(),
            "auth": s.auth_token_env is not None or s.auth_token_file is not None,
            "last_reload_error": self.reload_error,
        }

    # ------------------------------------------------------------------ one-shot segmentation

    @api.post("/v1/segment")
    async def segment_once(self, request: Request, clicks: str | None = None, format: str = "nii.gz") -> Response:
        """A volume (raw body, or multipart `file` + optional `clicks` field) -> mask.

        The volume is NIfTI, or a DICOM series: a zip of its .dcm files, or one multipart `file` part
        per slice. `format=dcm` answers a series with a DICOM SEG referencing it."""
        extension = _extension(format)
        async with self.deadline():
            if is_multipart(request):
                form = await read_form(request, MAX_FORM_FILES)
                data = await form_upload(form, "file")
                if data is None:
                    raise ApiError(400, "missing_file", "multipart body has no file field 'file'")
                field = form.get("clicks")
                clicks_obj = await self.parse(field if isinstance(field, str) else clicks, "clicks")
            else:
                data = await request.body()
                clicks_obj = await self.parse(clicks, "clicks")
            if format == SEG_FORMAT and not is_series_upload(data):  # before any decoding
                raise seg_needs_series()
            predictor = self.current()
            watch = Stopwatch(self.metrics)
            # Clicks are checked against the declared shape before any voxel is decoded: fail fast.
            prepared, meta = await self.load_upload(predictor, data, watch, clicks_obj)
            mask = await self.segment(predictor, prepared, clicks_obj, watch)
            body = await self._encode_any(mask, prepared, meta, extension, predictor.version, watch)
        return _mask_response(body, extension, watch, predictor.version)

    # ------------------------------------------------------------------ interactive sessions

    @api.post("/v1/sessions", status_code=201)
    async def create_session(self, request: Request) -> JSONResponse:
        """Upload once (raw body or multipart `file`) -> `{"session_id": ...}`."""
        async with self.deadline():
            data = await self._upload(request, "file")
            watch = Stopwatch(self.metrics)
            session_id, info = await self.open_session(data, watch, owner=caller_id(request))
        return JSONResponse(
            {"session_id": session_id, **info, "expires_in_s": self.settings.session_ttl_s},
            status_code=201,
            headers={"Server-Timing": server_timing(watch.timings)},
        )

    @api.get("/v1/sessions/{session_id}")
    async def get_session(self, session_id: str) -> dict:
        return self.session_view(session_id, self.store.get(session_id))

    @api.delete("/v1/sessions/{session_id}", status_code=204)
    async def delete_session(self, session_id: str) -> Response:
        self.store.delete(session_id)
        self.update_gauges()
        return Response(status_code=204)

    @api.post("/v1/sessions/{session_id}/segment")
    async def segment_session(self, session_id: str, request: Request, format: str = "nii.gz") -> Response:
        """JSON clicks body (empty: automatic) -> mask, from the cached volume: no upload, no preprocess."""
        extension = _extension(format)
        async with self.deadline():
            clicks_obj = await self.parse(await request.body(), "request body (clicks)")
            predictor = self.current()
            entry = self.store.get(session_id)
            prepared = self.cached(entry, predictor)
            watch = Stopwatch(self.metrics)
            mask = await self.segment(predictor, prepared, clicks_obj, watch)
            body = await self._encode_any(
                mask, prepared, entry.extra.get(META_KEY), extension, predictor.version, watch
            )
            entry.extra["segmentations"] = entry.extra.get("segmentations", 0) + 1
        return _mask_response(body, extension, watch, predictor.version)

    async def _encode_any(self, mask, prepared, meta, extension: str, version: str, watch: Stopwatch) -> bytes:
        if extension == FORMATS[SEG_FORMAT]:
            return await self.encode_seg(mask, meta, version, watch)
        return await self.encode(mask, prepared.orig_affine, extension, "uint8", watch)

    async def _upload(self, request: Request, *fields: str):
        if is_multipart(request):
            form = await read_form(request, MAX_FORM_FILES)
            data = await form_upload(form, *fields)
            if data is None:
                raise ApiError(
                    400, "missing_file", f"multipart body has no file field {' or '.join(map(repr, fields))}"
                )
            return data
        return await request.body()


def build_app(args: ServeArgs) -> Application:
    """Typed application builder for `serve run trainer.serve.app:build_app` and RayService configs."""
    # @serve.deployment made the class a Deployment; mypy keeps a class's type through decorators.
    return DeepEditService.options(  # type: ignore[attr-defined]
        num_replicas=args.num_replicas,
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=args.retry_after_s),
        user_config=args.user_config(),
        health_check_period_s=10,
        health_check_timeout_s=30,
    ).bind(args.model_dump(exclude={"checkpoint", "profile"}))
