"""The one error shape of the service: HTTP status + JSON `{"error": code, "detail": message}`."""

from __future__ import annotations

import json
import re

from ..errors import SpleenDeepEditError

#: What must not reach a client: URIs (s3://, https://...), host:port endpoints and absolute paths.
_PRIVATE = re.compile(
    r"[A-Za-z][A-Za-z0-9+.-]*://\S+|\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b|\b[\w.-]+\.[a-z]{2,}:\d+\b"
    r"|(?<![\w.])(?:~|[A-Za-z]:)?[/\\](?:[\w.@+-]+[/\\])+[\w.@+-]*"
)


def scrub(text: str) -> str:
    """`text` with URIs, endpoints and absolute paths replaced by `<redacted>` (logs keep the original).

    For exception messages shown to clients: a failed checkpoint load names its bucket, key and S3
    endpoint, a failed read its local path.
    """
    return _PRIVATE.sub("<redacted>", text)


class ApiError(SpleenDeepEditError):
    """A client-visible error. `detail` names the offending value; it never holds a stack trace.

    Args:
        status: HTTP status code (4xx for client errors, 503 for overload).
        error: a short stable code (`not_nifti`, `unknown_session`, ...), for programs.
        detail: a sentence for humans.
        headers: extra response headers (e.g. `Retry-After`).
    """

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> bytes:
        return json.dumps({"error": self.error, "detail": self.detail}).encode()


def bad_request(detail: str, error: str = "bad_request") -> ApiError:
    return ApiError(400, error, detail)
