"""The FastAPI app shared by the native and MONAI Label routes, and its guard middleware.

The guard is the one place that sees every request: bearer-token check (every route but health),
upload size limit (413, from `Content-Length` and while streaming; 4 KiB on `/auth/token`), a rate
limit on `/auth/token` (429), the request metrics, CORS, and a last-resort handler that turns an
unexpected exception into a JSON 500 without a stack trace. It drops Ray Serve's per-request client
headers (`x-request-timeout-seconds`, `x-request-disconnect-disabled`) before the app sees them: the
replica's own deadline governs (Ray's HTTP proxy reads them before us, so an Ingress in front should
strip them too; see docs/serving.md). Its settings come from the replica (`configure`), which runs
before the first request; each replica is its own process, so the module-level state is per replica.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ApiError
from .inputs import parse_json as _parse_json_bounded
from .settings import serve_default

log = logging.getLogger("trainer.serve")

#: Routes answered without a token: liveness and readiness probes, and MONAI Label's auth discovery.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/auth/", "/auth/token"})
#: Body limit of the public token route (an OAuth2 password form is a few hundred bytes).
AUTH_BODY_BYTES = 4096
#: Ray Serve reads these client headers to change its proxy timeout and disconnect handling.
RAY_CLIENT_HEADERS = frozenset({b"x-request-timeout-seconds", b"x-request-disconnect-disabled"})
#: A token file is checked for changes at most this often.
TOKEN_RECHECK_S = 1.0


class TokenSource:
    """The bearer token: fixed, or read from a file and re-read when the file changes (rotation).

    A file that becomes unreadable or holds a short token keeps the previous token (and logs why),
    so a half-written Secret update never opens or locks the service.
    """

    def __init__(self, token: str | None = None, path: str | None = None, reader: Callable[[str], str] | None = None):
        self._token = token
        self._path = path
        self._reader = reader
        self._stamp: tuple | None = None
        self._checked = 0.0
        if path is not None:
            self._stamp = self._stat()

    def _stat(self) -> tuple | None:
        if self._path is None:
            return None
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def get(self) -> str | None:
        if self._path is not None and self._reader is not None and time.monotonic() - self._checked >= TOKEN_RECHECK_S:
            self._checked = time.monotonic()
            stamp = self._stat()
            if stamp != self._stamp:
                try:
                    self._token = self._reader(self._path)
                    self._stamp = stamp
                    log.info("bearer token re-read from its file")
                except ValueError as exc:
                    log.error("keeping the previous bearer token: %s", exc)
        return self._token


class RateLimiter:
    """At most `per_min` events per key in any 60 s window (sliding log, bounded keys)."""

    def __init__(self, per_min: int, max_keys: int = 10_000):
        self.per_min = per_min
        self.max_keys = max_keys
        self._log: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        events = self._log.pop(key, None) or collections.deque()
        while events and now - events[0] >= 60.0:
            events.popleft()
        allowed = len(events) < self.per_min
        if allowed:
            events.append(now)
        self._log[key] = events
        while len(self._log) > self.max_keys:
            self._log.popitem(last=False)
        return allowed


class ErrorBody(BaseModel):
    """The one error shape (see `errors.ApiError`), declared so the OpenAPI document tells the truth."""

    error: str
    detail: str


_ERROR_RESPONSES: dict = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        ("4XX", "client error: the detail names the value and the fix"),
        ("503", "overloaded, out of decode memory, timed out or not ready (with Retry-After)"),
    )
}

# No OpenAPI route is served (`openapi_url=None`); `api.openapi()` still builds the document (tests fuzz it).
api = FastAPI(title="spleen-deepedit", docs_url=None, redoc_url=None, openapi_url=None, responses=_ERROR_RESPONSES)


class _Runtime:
    """What the guard needs from the replica; set by `configure` in the deployment's `__init__`."""

    tokens: TokenSource = TokenSource()
    max_upload_bytes: int = serve_default("max_upload_bytes")
    max_json_bytes: int = serve_default("max_json_bytes")
    cors_origins: tuple[str, ...] = ()
    metrics: Any = None
    auth_limiter: RateLimiter = RateLimiter(serve_default("auth_token_rate_per_min"))

    @property
    def token(self) -> str | None:
        return self.tokens.get()


RUNTIME = _Runtime()


def configure(
    *,
    tokens: TokenSource,
    max_upload_bytes: int,
    cors_origins: list[str],
    metrics: Any,
    max_json_bytes: int = 64 * 1024,
    auth_rate_per_min: int = 10,
) -> None:
    RUNTIME.tokens = tokens
    RUNTIME.max_upload_bytes = max_upload_bytes
    RUNTIME.max_json_bytes = max_json_bytes
    RUNTIME.cors_origins = tuple(cors_origins)
    RUNTIME.metrics = metrics
    RUNTIME.auth_limiter = RateLimiter(auth_rate_per_min)


def token_matches(given: str | None) -> bool:
    """Constant-time comparison with the configured token."""
    token = RUNTIME.token
    return token is not None and given is not None and hmac.compare_digest(given.encode(), token.encode())


def caller_id(request: Request) -> str:
    """Who is calling, for scoping datastore ids and session quotas: a digest of the bearer token.

    Anonymous callers (auth off) share the scope `anon`; they never see an authenticated caller's
    ids, and a token's digest reveals nothing about the token.
    """
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "anon"
    return "t" + hashlib.sha256(given.strip().encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- error handlers


def _json_error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _json_error(exc.status, exc.error, exc.detail, exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "too_large"}
    return _json_error(
        exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail), getattr(exc, "headers", None)
    )


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return _json_error(422, "invalid_request", "; ".join(parts) or "invalid request")


# ----------------------------------------------------------------------------- guard middleware


class _BodyTooLarge(Exception):
    pass


class Guard:
    """Pure ASGI middleware (so it can stop an upload while it streams)."""

    def __init__(self, app):
        self.app = app
        self._cors_app = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if RUNTIME.cors_origins:
            if self._cors_app is None:  # built lazily: the origins come from the replica's settings
                from starlette.middleware.cors import CORSMiddleware

                self._cors_app = CORSMiddleware(
                    self._guarded,
                    allow_origins=list(RUNTIME.cors_origins),
                    allow_methods=["*"],
                    allow_headers=["authorization", "content-type"],
                    expose_headers=["server-timing", "retry-after", "x-model-version"],
                )
            return await self._cors_app(scope, receive, send)
        return await self._guarded(scope, receive, send)

    async def _guarded(self, scope, receive, send):
        t0 = time.perf_counter()
        state = {"status": 500, "started": False, "too_large": False}
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if any(k.lower() in RAY_CLIENT_HEADERS for k, _ in scope.get("headers", [])):
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k.lower() not in RAY_CLIENT_HEADERS])
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        limit = AUTH_BODY_BYTES if path == "/auth/token" else RUNTIME.max_upload_bytes

        async def send_w(message):
            if message["type"] == "http.response.start":
                if state["too_large"]:
                    return
                state["started"] = True
                state["status"] = message["status"]
            elif state["too_large"] and not state["started"]:
                return
            await send(message)

        received = 0

        async def receive_w():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    state["too_large"] = True
                    raise _BodyTooLarge()
            return message

        try:
            early = self._check(scope, path, headers, limit)
            if early is not None:
                await early(scope, receive, send_w)
            else:
                await self.app(scope, receive_w, send_w)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: never a stack trace out
            if not isinstance(exc, _BodyTooLarge) and not state["too_large"]:
                ref = uuid.uuid4().hex[:12]
                log.exception("unhandled error in %s %s (ref %s)", scope.get("method"), path, ref)
                if not state["started"]:
                    await send_w_json(
                        send_w, 500, "internal_error", f"internal error (reference {ref}); the service is still up"
                    )
        if state["too_large"] and not state["started"]:
            state["too_large"] = False  # let our own 413 through
            await send_w_json(send_w, 413, "body_too_large", f"request body is over the limit of {limit} bytes")
        self._record(scope, state["status"], time.perf_counter() - t0)

    @staticmethod
    def _check(scope, path: str, headers: dict[str, str], limit: int):
        """An early response (auth, size, rate) or None."""
        if path == "/auth/token" and scope.get("method") == "POST":
            client = (scope.get("client") or ("?", 0))[0]
            if not RUNTIME.auth_limiter.allow(str(client)):
                return _json_error(
                    429,
                    "too_many_requests",
                    f"more than {RUNTIME.auth_limiter.per_min} token requests a minute "
                    "from this address: wait a minute",
                    {"Retry-After": "60"},
                )
        if RUNTIME.token is not None and path not in PUBLIC_PATHS and scope.get("method") != "OPTIONS":
            auth = headers.get("authorization", "")
            scheme, _, given = auth.partition(" ")
            if not auth:
                return _json_error(
                    401,
                    "unauthorized",
                    "missing bearer token: send 'Authorization: Bearer <token>'",
                    {"WWW-Authenticate": "Bearer"},
                )
            if scheme.lower() != "bearer" or not token_matches(given.strip()):
                return _json_error(401, "unauthorized", "invalid bearer token", {"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return _json_error(400, "bad_request", f"Content-Length {length[:32]!r} is not a number")
            if int(length) > limit:
                return _json_error(
                    413, "body_too_large", f"request body of {int(length)} bytes is over the limit of {limit} bytes"
                )
        return None

    @staticmethod
    def _record(scope, status: int, seconds: float) -> None:
        m = RUNTIME.metrics
        if m is None:
            return
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        try:
            m.requests.inc(1, tags={"endpoint": endpoint, "method": scope.get("method", ""), "status": str(status)})
            m.request_latency.observe(seconds, tags={"endpoint": endpoint})
        except Exception:  # metrics must never fail a request
            log.debug("metrics recording failed", exc_info=True)


async def send_w_json(send, status: int, error: str, detail: str) -> None:
    body = json.dumps({"error": error, "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


api.add_middleware(Guard)


# ----------------------------------------------------------------------------- request helpers


def parse_json(text: str | bytes | None, what: str) -> Any:
    """JSON from a field or body within the replica's `max_json_bytes` (see `inputs.parse_json`)."""
    return _parse_json_bounded(text, what, RUNTIME.max_json_bytes)


#: Most file parts of an upload form: the slices of one DICOM series (at most `max_dim` of them).
MAX_FORM_FILES = 2048


async def read_form(request: Request, max_files: int = 4):
    """Parse a multipart form with bounded part counts; 400 on a malformed body.

    `max_files` > 4 only on upload routes, which take a DICOM series as one part per slice."""
    try:
        return await request.form(max_files=max_files, max_fields=32)
    except StarletteHTTPException as exc:
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {exc.detail}") from None
    except _BodyTooLarge:
        raise
    except Exception as exc:  # the multipart parser raises several types
        raise ApiError(400, "bad_multipart", f"malformed multipart body ({type(exc).__name__})") from None


async def form_file(form, *names: str) -> bytes | None:
    """Bytes of the first file field among `names`, or None."""
    for name in names:
        value = form.get(name)
        if isinstance(value, UploadFile):
            return await value.read()
        if isinstance(value, str) and value:
            raise ApiError(400, "bad_multipart", f"multipart field {name!r} must be a file upload, not a text field")
    return None


async def form_upload(form, *names: str) -> bytes | list[tuple[str, bytes]] | None:
    """The upload of the first file field among `names`: its bytes (NIfTI, a zip, one .dcm file), or
    (file name, bytes) of each part when the field repeats (a DICOM series sent file by file)."""
    for name in names:
        values = form.getlist(name)
        files = [v for v in values if isinstance(v, UploadFile)]
        if len(files) > 1:
            return [(f.filename or f"part{i}.dcm", await f.read()) for i, f in enumerate(files)]
        if files or values:
            return await form_file(form, name)
    return None


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def server_timing(timings: dict[str, float]) -> str:
    """`Server-Timing` header value (milliseconds), e.g. `forward;dur=12.3, postprocess;dur=4.0`."""
    return ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in timings.items())


def parse_server_timing(value: str) -> dict[str, float]:
    """Inverse of `server_timing`: stage -> seconds (clients and tests use it)."""
    out: dict[str, float] = {}
    for part in value.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name and dur:
            out[name] = float(dur) / 1000
    return out


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Logged by the guard (with a reference); the client gets no stack trace.
    return _json_error(500, "internal_error", "internal error; the service is still up")
