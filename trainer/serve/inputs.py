"""Bounded parsing of the JSON a client sends (clicks, MONAI Label `params`) and of its clicks.

JSON is refused before parsing past `max_json_bytes`, and while parsing: integers of more than
`MAX_NUMBER_CHARS` characters, non-finite numbers (`NaN`, `Infinity`, `1e999`) and nesting deeper than
`MAX_JSON_DEPTH` (a body of 100 000 `[` is a 400, not Python's RecursionError). Clicks are capped per
label (`max_clicks_per_label`) before any of them is looked at, then checked with the predictor's
`validate_clicks` and de-duplicated (the same voxel twice is one click: the guidance and the nudge
are the same, and the per-click work is not). These run in worker threads, off the event loop.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import ApiError

#: Deepest accepted nesting of a JSON body: clicks are {"label": [[i, j, k]]}, depth 3.
MAX_JSON_DEPTH = 8
#: Longest accepted number literal: a voxel index or an option needs a handful of digits.
MAX_NUMBER_CHARS = 32


def _bad_number(text: str) -> ApiError:
    return ApiError(
        400,
        "bad_json",
        f"number {text[:20]}... ({len(text)} characters) is too long: "
        f"numbers have at most {MAX_NUMBER_CHARS} characters",
    )


def _parse_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise _bad_number(text)
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise _bad_number(text)
    value = float(text)
    if not math.isfinite(value):
        raise ApiError(400, "bad_json", f"number {text} is out of range: send finite numbers")
    return value


def _parse_constant(text: str) -> Any:
    raise ApiError(400, "bad_json", f"{text} is not valid JSON: send finite numbers")


def _depth_ok(obj: Any, limit: int) -> bool:
    """True if `obj` nests at most `limit` containers deep (iterative: no recursion to exhaust)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (list, dict)):
            if depth > limit:
                return False
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return True


def parse_json(text: str | bytes | None, what: str, max_bytes: int) -> Any:
    """JSON from a field or body; 400/413 naming the field, the limit and the fix on any problem."""
    if text is None:
        return None
    if len(text) > max_bytes:
        raise ApiError(
            413,
            "json_too_large",
            f"{what} has {len(text)} bytes, over the limit of {max_bytes} (max_json_bytes): send fewer clicks",
        )
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "bad_json", f"{what} is not UTF-8 text") from None
    if not text.strip():
        return None
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except json.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"{what} is not valid JSON ({exc.msg} at char {exc.pos})") from None
    except RecursionError:
        raise ApiError(400, "bad_json", f"{what} nests deeper than {MAX_JSON_DEPTH} levels: send flat JSON") from None
    except ValueError as exc:  # e.g. Python's own cap on integer digits
        raise ApiError(400, "bad_json", f"{what} holds an unreadable value ({str(exc)[:80]})") from None
    if not _depth_ok(value, MAX_JSON_DEPTH):
        raise ApiError(400, "bad_json", f"{what} nests deeper than {MAX_JSON_DEPTH} levels: send flat JSON")
    return value


def check_clicks(clicks: Any, shape: tuple[int, int, int], max_per_label: int) -> dict[str, list[tuple[int, int, int]]]:
    """Capped, validated, de-duplicated clicks (original voxel indices), or 400 naming the problem."""
    from trainer.clicks import ClickError, validate_clicks

    if isinstance(clicks, dict):
        for name, points in clicks.items():
            if isinstance(points, (list, tuple)) and len(points) > max_per_label:
                raise ApiError(
                    400,
                    "too_many_clicks",
                    f"clicks[{str(name)[:40]!r}] has {len(points)} clicks, over the limit of "
                    f"{max_per_label} per label (max_clicks_per_label): send the clicks of one editing step",
                )
    try:
        checked = validate_clicks(clicks, shape)
    except ClickError as exc:
        raise ApiError(400, "bad_clicks", str(exc)[:500]) from None
    return {name: list(dict.fromkeys(points)) for name, points in checked.items()}
