"""Per-replica cache of preprocessed volumes: interactive sessions and uploaded datastore images.

A session holds the `Prepared` volume (network-grid tensor + geometry), so a click costs one forward
and the inverse resize instead of a re-upload and re-preprocess. Entries expire `ttl_s` after their
last use; when the cache holds more than `max_bytes`, the least recently used entries go first.
Session ids are 128 random bits (hex); ids from clients are checked against that pattern before any
lookup, and are never used as paths. Datastore images (MONAI Label `PUT /datastore/?image=`) have
client-chosen ids, checked against a conservative pattern, in a separate namespace of the same cache.

Every entry belongs to a caller (`ingress.caller_id`: a digest of its token, or `anon`). Datastore ids
are scoped to the caller, and within a caller an id that holds another volume is not overwritten
(409: the first client would otherwise get masks of the second's volume). A caller holds at most
`caller_max_entries` entries and `caller_max_bytes` bytes: past either, its own least recently used
entries go first, so one caller cannot evict everyone else's sessions. An entry's size is what it
will hold at most, including the automatic pass a session caches after its first segmentation.

The cache lives in one replica. With several replicas a client may reach one that does not hold its
session: it gets 404 and uploads again (what 3D Slicer does after `GET /session/{id}` answers 404).
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError

SESSION_ID_RE = re.compile(r"^[0-9a-f]{32}$")
IMAGE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(slots=True)
class Entry:
    value: Any  # a trainer.predictor.Prepared
    nbytes: int
    info: dict[str, Any]
    created: float
    last_used: float
    uses: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    owner: str = "anon"
    digest: str | None = None  # datastore images: what was uploaded, to refuse silent overwrites


class SessionStore:
    """TTL + LRU-by-bytes cache.

    Args:
        ttl_s: an entry expires this long after its last use.
        max_bytes: total size cap; least recently used entries are evicted past it.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        ttl_s: float,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        caller_max_entries: int | None = None,
        caller_max_bytes: int | None = None,
    ):
        if ttl_s <= 0 or max_bytes <= 0:
            raise ValueError("session ttl_s and max_bytes must be positive")
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.caller_max_entries = caller_max_entries
        self.caller_max_bytes = max_bytes if caller_max_bytes is None else min(caller_max_bytes, max_bytes)
        self._clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # routes run in the event loop, stages in threads

    # -------------------------------------------------------------- ids

    @staticmethod
    def check_session_id(session_id: str) -> str:
        if not isinstance(session_id, str) or not SESSION_ID_RE.match(session_id):
            raise ApiError(
                404, "unknown_session", "session id is malformed: expected 32 hex characters from POST /v1/sessions"
            )
        return session_id

    @staticmethod
    def check_image_id(image_id: str) -> str:
        if not isinstance(image_id, str) or not IMAGE_ID_RE.match(image_id) or ".." in image_id:
            raise ApiError(400, "bad_image_id", "image id must be 1-128 characters of letters, digits, '.', '_' or '-'")
        return image_id

    # -------------------------------------------------------------- cache

    def create(
        self, value: Any, nbytes: int, info: dict[str, Any], owner: str = "anon", extra: dict[str, Any] | None = None
    ) -> str:
        session_id = secrets.token_hex(16)
        self._put("s:" + session_id, value, nbytes, info, owner, extra=extra)
        return session_id

    @staticmethod
    def _image_key(image_id: str, owner: str) -> str:
        return f"d:{owner}:{SessionStore.check_image_id(image_id)}"

    def check_image_free(self, image_id: str, owner: str, digest: str) -> None:
        """409 if the caller's `image_id` holds another volume (checked before decoding the upload)."""
        with self._lock:
            self._expire()
            old = self._entries.get(self._image_key(image_id, owner))
        if old is not None and old.digest != digest:
            raise ApiError(
                409,
                "image_exists",
                f"image {image_id!r} already holds another volume: upload it under a new id "
                f"(ids expire {self.ttl_s:.0f}s after their last use)",
            )

    def put_image(
        self,
        image_id: str,
        value: Any,
        nbytes: int,
        info: dict[str, Any],
        owner: str = "anon",
        digest: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        key = self._image_key(image_id, owner)
        if digest is not None:
            self.check_image_free(image_id, owner, digest)
        self._put(key, value, nbytes, info, owner, digest, extra)

    def get(self, session_id: str) -> Entry:
        return self._get(
            "s:" + self.check_session_id(session_id),
            f"session {session_id} is unknown or expired: upload the volume again",
        )

    def get_image(self, image_id: str, owner: str = "anon") -> Entry:
        return self._get(
            self._image_key(image_id, owner),
            f"image {image_id!r} is not in the datastore (or expired): PUT /datastore/?image={image_id} first",
        )

    def delete(self, session_id: str) -> None:
        key = "s:" + self.check_session_id(session_id)
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                raise ApiError(404, "unknown_session", f"session {session_id} is unknown or expired")
            self._bytes -= entry.nbytes

    def expires_in(self, entry: Entry) -> float:
        return max(0.0, entry.last_used + self.ttl_s - self._clock())

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._expire()
            sessions = sum(1 for k in self._entries if k.startswith("s:"))
            return {"sessions": sessions, "images": len(self._entries) - sessions, "bytes": self._bytes}

    # -------------------------------------------------------------- internals

    def _put(
        self,
        key: str,
        value: Any,
        nbytes: int,
        info: dict[str, Any],
        owner: str = "anon",
        digest: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if nbytes > self.caller_max_bytes:
            raise ApiError(
                413,
                "volume_too_large",
                f"the preprocessed volume ({nbytes} bytes) exceeds one caller's share of the "
                f"session cache ({self.caller_max_bytes} bytes: session_max_bytes x caller_max_share)",
            )
        now = self._clock()
        with self._lock:
            self._expire()
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = Entry(
                value=value,
                nbytes=nbytes,
                info=info,
                created=now,
                last_used=now,
                owner=owner,
                digest=digest,
                extra=dict(extra or {}),
            )
            self._bytes += nbytes
            self._evict_over_quota(owner)
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    def _evict_over_quota(self, owner: str) -> None:
        """The caller's own least recently used entries go while it is over its entry or byte quota."""
        mine = [k for k, e in self._entries.items() if e.owner == owner]  # oldest first
        held = sum(self._entries[k].nbytes for k in mine)
        limit = self.caller_max_entries or len(mine)
        for k in mine[:-1]:  # never the entry just added (last)
            if len(mine) <= limit and held <= self.caller_max_bytes:
                break
            evicted = self._entries.pop(k)
            self._bytes -= evicted.nbytes
            held -= evicted.nbytes
            mine = mine[1:]

    def _get(self, key: str, missing: str) -> Entry:
        with self._lock:
            self._expire()
            entry = self._entries.get(key)
            if entry is None:
                raise ApiError(404, "unknown_session" if key.startswith("s:") else "unknown_image", missing)
            entry.last_used = self._clock()
            entry.uses += 1
            self._entries.move_to_end(key)
            return entry

    def _expire(self) -> None:
        now = self._clock()
        # Entries are in last-used order, so expired ones are at the front.
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.last_used < self.ttl_s:
                break
            del self._entries[key]
            self._bytes -= entry.nbytes
