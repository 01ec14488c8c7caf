"""MONAI Label compatible routes, so the 3D Slicer MONAI Label module (and OHIF) work against us.

The contract is MONAI Label 0.8's infer path (see docs/serving.md): `GET /info/`, `GET /auth/`
(+ `POST /auth/token`), `PUT /session/`, `GET|DELETE /session/{id}`, `PUT /datastore/?image=`,
`POST /infer/{model}`. The model is registered twice, as MONAI Label does with a DeepEdit bundle:
`<name>` of type `deepedit` (clicks) and `<name>_seg` of type `segmentation` (automatic, clicks
ignored). Sessions and datastore images share the native API's cache, so a Slicer click costs one
forward, not a re-upload.
"""

# No `from __future__ import annotations`: FastAPI must see real annotation objects.
import json
import re
import secrets
import time
from typing import TYPE_CHECKING, Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from trainer.config import LABELS

from .codecs import MASK_DTYPES, MASK_EXTENSIONS
from .core import Stopwatch
from .errors import ApiError
from .ingress import MAX_FORM_FILES, RUNTIME, api, caller_id, form_upload, read_form, token_matches
from .series import DICOM_MEDIA_TYPE, META_KEY, is_series_upload, seg_needs_series

#: DeepGrow-style clients send `foreground` for the label being edited.
FOREGROUND_SYNONYM = "foreground"
OUTPUTS = ("image", "json", "all", "dicom_seg")
#: `output` that answers with a DICOM SEG (as MONAI Label's DICOMweb datastore asks for).
SEG_OUTPUT = "dicom_seg"


def clicks_from_params(params: dict[str, Any]) -> dict[str, list]:
    """Slicer's params (one key per label name, plus options) -> our clicks; other keys are options."""
    clicks: dict[str, list] = {}
    for name in LABELS:
        value = params.get(name, [])
        if not isinstance(value, list):
            raise ApiError(
                400, "bad_clicks", f"params[{name!r}] must be a list of [i, j, k] points, got {type(value).__name__}"
            )
        clicks[name] = list(value)
    fg = params.get(FOREGROUND_SYNONYM, [])
    if not isinstance(fg, list):
        raise ApiError(
            400, "bad_clicks", f"params['foreground'] must be a list of [i, j, k] points, got {type(fg).__name__}"
        )
    clicks["spleen"] += fg
    return clicks


def multipart_reply(params: dict[str, Any], body: bytes, filename: str) -> Response:
    """MONAI Label's default reply: a `params` JSON part and an `image` file part."""
    boundary = secrets.token_hex(16)
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\nContent-Type: application/json\r\n\r\n'.encode(),
        json.dumps(params).encode(),
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode(),
        body,
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return Response(content=b"".join(parts), media_type=f"multipart/form-data; boundary={boundary}")


def _session_info(session_id: str, entry, ttl: float) -> dict[str, Any]:
    now = time.time()
    return {
        "name": session_id,
        "image": "volume",
        "shape": entry.info["shape"],
        "expiry": ttl,
        "create_ts": int(now - (entry.last_used - entry.created)),
        "last_access_ts": int(now),
    }


# A mixin of the deployment class: it uses ServiceCore's state, which the type checker sees through this
# base; at run time the deployment inherits both (FastAPI's class-based views need plain methods here).
if TYPE_CHECKING:
    from .core import ServiceCore as _Service
else:
    _Service = object


class MonaiLabelRoutes(_Service):
    """Route methods mixed into the deployment class (they use `ServiceCore`'s stages)."""

    @api.get("/info/")
    async def ml_info(self) -> dict:
        p = self.current()
        name = self.settings.model_name
        common = {
            "labels": dict(LABELS),
            "dimension": 3,
            "config": {},
            "version": p.version,
            "spatial_size": list(p.profile.spatial_size),
        }
        return {
            "name": "spleen-deepedit",
            "description": "DeepEdit spleen segmentation on Ray Serve (MONAI Label compatible infer API)",
            "version": p.version,
            "labels": ["spleen"],
            "models": {
                name: {
                    "type": "deepedit",
                    "description": "interactive spleen segmentation: spleen/background clicks",
                    **common,
                },
                f"{name}_seg": {"type": "segmentation", "description": "automatic spleen segmentation", **common},
            },
            "trainers": {},
            "strategies": {},
            "scoring": {},
            "train_stats": {},
            "datastore": {},
        }

    @api.get("/auth/")
    async def ml_auth(self) -> dict:
        return {"enabled": RUNTIME.token is not None, "client_id": "spleen-deepedit", "realm-uri": ""}

    @api.post("/auth/token")
    async def ml_auth_token(self, request: Request) -> JSONResponse:
        """OAuth2 password form as Slicer sends it: the password is the service token (username ignored)."""
        token = RUNTIME.token
        if token is None:
            raise ApiError(404, "auth_disabled", "authentication is not enabled on this server")
        form = await read_form(request)  # the guard caps this body at ingress.AUTH_BODY_BYTES
        password = form.get("password")
        if not isinstance(password, str) or not token_matches(password):
            raise ApiError(401, "unauthorized", "invalid credentials: use the service token as the password")
        return JSONResponse({"access_token": token, "token_type": "bearer"})

    @api.put("/session/")
    async def ml_create_session(self, request: Request) -> dict:
        async with self.deadline():
            form = await read_form(request, MAX_FORM_FILES)
            data = await form_upload(form, "files", "file")
            if data is None:
                raise ApiError(400, "missing_file", "multipart body has no file field 'files'")
            session_id, _ = await self.open_session(data, Stopwatch(self.metrics), owner=caller_id(request))
        entry = self.store.get(session_id)
        return {"session_id": session_id, "session_info": _session_info(session_id, entry, self.settings.session_ttl_s)}

    @api.get("/session/{session_id}")
    async def ml_get_session(self, session_id: str) -> dict:
        entry = self.store.get(session_id)
        return {"session_id": session_id, "session_info": _session_info(session_id, entry, self.settings.session_ttl_s)}

    @api.delete("/session/{session_id}")
    async def ml_delete_session(self, session_id: str) -> dict:
        self.store.delete(session_id)
        self.update_gauges()
        return {"session_id": session_id}

    @api.put("/datastore/")
    async def ml_datastore_put(self, request: Request, image: str | None = None) -> dict:
        async with self.deadline():
            form = await read_form(request, MAX_FORM_FILES)
            data = await form_upload(form, "file")
            if data is None:
                raise ApiError(400, "missing_file", "multipart body has no file field 'file'")
            if image is None:
                upload = form.get("file")
                image = re.sub(r"(\.nii\.gz|\.nii|\.zip)$", "", getattr(upload, "filename", "") or "")
            self.store.check_image_id(image)
            await self.open_session(data, Stopwatch(self.metrics), image_id=image, owner=caller_id(request))
        return {"image": image}

    @api.post("/infer/{model}")
    async def ml_infer(
        self,
        model: str,
        request: Request,
        image: str | None = None,
        session_id: str | None = None,
        output: str | None = None,
    ) -> Response:
        name = self.settings.model_name
        if model not in (name, f"{name}_seg"):
            raise ApiError(404, "unknown_model", f"model {model!r} is not served: use {name!r} or {name + '_seg'!r}")
        if output is not None and output not in OUTPUTS:
            raise ApiError(400, "bad_output", f"output {output!r} is not supported: use one of {list(OUTPUTS)}")
        async with self.deadline():
            form = await read_form(request, MAX_FORM_FILES) if request.headers.get("content-type") else {}
            field = form.get("params") if form else None
            params = await self.parse(field if isinstance(field, str) else None, "params") or {}
            extension, dtype = result_format(params)
            clicks = clicks_from_params(params) if model == name else None

            predictor = self.current()
            watch = Stopwatch(self.metrics)
            data = await form_upload(form, "file") if form else None
            if output == SEG_OUTPUT and data is not None and not is_series_upload(data):  # before any decoding
                raise seg_needs_series()
            meta = None
            if session_id is not None:
                entry = self.store.get(session_id)
                prepared, meta = self.cached(entry, predictor), entry.extra.get(META_KEY)
            elif data is not None:
                prepared, meta = await self.load_upload(predictor, data, watch, clicks)
            elif image is not None:
                entry = self.store.get_image(image, caller_id(request))
                prepared, meta = self.cached(entry, predictor), entry.extra.get(META_KEY)
            else:
                raise ApiError(
                    400, "missing_image", "give session_id, image (uploaded with PUT /datastore/) or a 'file' field"
                )
            t0 = time.perf_counter()
            mask = await self.segment(predictor, prepared, clicks, watch)
            if output == SEG_OUTPUT:
                body = await self.encode_seg(mask, meta, predictor.version, watch)
            else:
                body = await self.encode(mask, prepared.orig_affine, extension, dtype, watch)
            total = time.perf_counter() - t0 + watch.timings.get("decode", 0) + watch.timings.get("preprocess", 0)
        t = watch.timings
        result = {
            "label_names": dict(LABELS),
            "latencies": {
                "pre": round(t.get("decode", 0) + t.get("preprocess", 0), 4),
                "infer": round(t.get("forward", 0), 4),
                "invert": round(t.get("postprocess", 0), 4),
                "post": 0.0,
                "write": round(t.get("encode", 0), 4),
                "total": round(total, 4),
            },
            "model": model,
            "model_version": predictor.version,
            "clicks": {k: len(v) for k, v in (clicks or {}).items()},
        }
        return infer_reply(result, body, extension, output)


def result_format(params: Any) -> tuple[str, str]:
    """The mask's file extension and dtype asked for in `/infer`'s `params`; a 400 ApiError naming a bad one."""
    if not isinstance(params, dict):
        raise ApiError(400, "bad_params", f"params must be a JSON object, got {type(params).__name__}")
    extension = params.get("result_extension", ".nii.gz")
    dtype = params.get("result_dtype", "uint8")
    if not isinstance(extension, str) or not isinstance(dtype, str):
        raise ApiError(400, "bad_params", "result_extension and result_dtype must be strings")
    if extension not in MASK_EXTENSIONS:
        raise ApiError(
            400,
            "bad_result_extension",
            f"result_extension {extension!r} is not supported: use one of {list(MASK_EXTENSIONS)}",
        )
    if dtype not in MASK_DTYPES:
        raise ApiError(
            400, "bad_result_dtype", f"result_dtype {dtype!r} is not supported: use one of {sorted(MASK_DTYPES)}"
        )
    return extension, dtype


def infer_reply(result: dict[str, Any], body: bytes, extension: str, output: str | None) -> Response:
    """`/infer`'s answer in the `output` MONAI Label asked for: a SEG, the JSON, the image, or both (multipart)."""
    filename = f"result{extension}"
    if output == SEG_OUTPUT:
        return Response(
            content=body,
            media_type=DICOM_MEDIA_TYPE,
            headers={"Content-Disposition": 'attachment; filename="result.dcm"'},
        )
    if output == "json":
        return JSONResponse(result)
    if output == "image":
        return Response(
            content=body,
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    return multipart_reply(result, body, filename)


def parse_multipart_reply(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Client side of `multipart_reply`: part name -> (filename, bytes). For tests, demos, benchmarks."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise ValueError(f"not a multipart content type: {content_type!r}")
    delimiter = b"--" + match.group(1).encode()
    parts: dict[str, tuple[str | None, bytes]] = {}
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.partition(b"\r\n\r\n")
        head_text = head.decode("latin-1")
        name = re.search(r'name="([^"]*)"', head_text)
        filename = re.search(r'filename="([^"]*)"', head_text)
        if name:
            parts[name.group(1)] = (
                filename.group(1) if filename else None,
                data[:-2] if data.endswith(b"\r\n") else data,
            )
    return parts
